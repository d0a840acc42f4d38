"""Encrypted history (optional): a Temporal payload codec that encrypts everything Tardigrade puts in history.

Temporal stores every workflow input, activity input and result, query answer, memo, summary and heartbeat as a
*payload* in its history. With a key set, `TardigradePlugin` adds `EncryptionCodec` to the client's data converter
(so the worker, which uses the client's, gets it too): each payload is sealed whole - its metadata and data - with
AES-256-GCM, and failures' messages and stack traces move into an encoded payload
(`DefaultFailureConverterWithEncodedAttributes`), so the Temporal server, its database and anyone with read access
to it see only ciphertext. `tardigrade codec-server` lets the Web UI and the `temporal` CLI show decoded payloads
to an operator who holds the key.

Keys: ``TARDIGRADE_CODEC_KEY`` (32 bytes, base64 or hex; `tardigrade snapshot keygen` prints one), or
``TARDIGRADE_CODEC_KEY_FILE`` (one key per line). Several keys, comma-separated or one per line, rotate them: the
first encrypts, all of them decrypt. Each encrypted payload names its key by an id (a hash of the key, never the
key) in its metadata, so a process that lacks that key says which one it needs instead of failing as corruption.

Without a key, the plugin adds `KeylessCodec`: it leaves payloads as they are, and reading an encrypted one is a
one-line error saying to set the key. Payloads that were never encrypted are always read as they are (history
written before the key was turned on stays readable). Not encrypted, by Temporal's design: workflow ids, task queue
and activity type names, timestamps and search attributes.

The wire format (also implemented by the TypeScript client, clients/typescript/src/codec.ts): metadata
``encoding: binary/encrypted``, ``encryption-key-id: <16 hex>``, ``encryption-cipher: AES-256-GCM``; data is a
12-byte nonce then the AES-GCM ciphertext and tag of the serialized inner `Payload` protobuf, with the additional
data ``tardigrade-codec-v1:<key id>``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)

from tardigrade.sandboxes.errors import TardigradeError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENV_KEY = "TARDIGRADE_CODEC_KEY"
ENV_KEY_FILE = "TARDIGRADE_CODEC_KEY_FILE"
ENCODING = b"binary/encrypted"
CIPHER = b"AES-256-GCM"
META_KEY_ID = "encryption-key-id"
META_CIPHER = "encryption-cipher"
NONCE_BYTES = 12
KEY_BYTES = 32
AAD_PREFIX = b"tardigrade-codec-v1:"
_KEY_HINT = f"set {ENV_KEY} (or {ENV_KEY_FILE}) to the workers' key"


class CodecError(TardigradeError):
    """A codec key cannot be used, or a payload cannot be decrypted with the keys at hand; the message says which
    key is needed and where to set it."""


def new_key() -> str:
    """A fresh key, as base64 (what ``TARDIGRADE_CODEC_KEY`` holds)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def key_id(key: bytes) -> str:
    """The public name of a key: stored in each payload it encrypts, shown in errors. Reveals nothing of the key."""
    return hashlib.sha256(b"tardigrade codec key id\0" + key).hexdigest()[:16]


def parse_key(text: str, where: str) -> bytes:
    """One key, as base64 (44 characters) or hex (64)."""
    text = text.strip()
    try:
        key = bytes.fromhex(text) if len(text) == 2 * KEY_BYTES else base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise CodecError(
            f"{where}: a codec key must be {KEY_BYTES} bytes written as base64 (44 characters) or hex (64);"
            " generate one with `tardigrade snapshot keygen` (or `openssl rand -base64 32`)"
        )
    return key


@dataclass(frozen=True)
class CodecKeys:
    """The keys of a process: ``current`` encrypts, every one of ``keys`` (the current one first) decrypts."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise CodecError("a codec key set needs at least one key")

    @property
    def current(self) -> bytes:
        return self.keys[0]

    @property
    def ids(self) -> list[str]:
        return [key_id(k) for k in self.keys]

    @classmethod
    def parse(cls, text: str, where: str = ENV_KEY) -> CodecKeys:
        """Keys separated by commas or newlines (``#`` starts a comment), the current one first."""
        items = [item.split("#", 1)[0].strip() for line in text.splitlines() for item in line.split(",")]
        keys = [parse_key(item, f"{where} (key {n})") for n, item in enumerate(filter(None, items), 1)]
        if not keys:
            raise CodecError(f"{where} holds no key; put the current key first, then any older ones")
        return cls(tuple(keys))

    @classmethod
    def from_env(cls) -> CodecKeys | None:
        """The keys ``TARDIGRADE_CODEC_KEY`` or ``TARDIGRADE_CODEC_KEY_FILE`` name; None when neither is set."""
        value, file = os.environ.get(ENV_KEY, "").strip(), os.environ.get(ENV_KEY_FILE, "").strip()
        if value and file:
            raise CodecError(f"both {ENV_KEY} and {ENV_KEY_FILE} are set; set only one of them")
        if value:
            return cls.parse(value, ENV_KEY)
        if file:
            try:
                text = Path(file).expanduser().read_text()
            except OSError as e:
                raise CodecError(f"{ENV_KEY_FILE}={file}: cannot read it ({e.strerror})") from None
            return cls.parse(text, f"{ENV_KEY_FILE} ({file})")
        return None


def _aesgcm(key: bytes) -> AESGCM:
    # `cryptography` is the optional 'encryption' extra: a process without a codec key never needs it.
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ModuleNotFoundError:
        raise CodecError(
            f"{ENV_KEY} is set but the 'cryptography' package is missing;"
            " install it with: pip install 'tardigrade-temporal[encryption]'"
        ) from None
    return AESGCM(key)


def is_encrypted(payload: Payload) -> bool:
    return payload.metadata.get("encoding") == ENCODING


def _payload_key_id(payload: Payload) -> str:
    return payload.metadata.get(META_KEY_ID, b"").decode("ascii", "replace") or "(none)"


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over whole payloads, with the key id in the metadata (see the module docstring)."""

    def __init__(self, keys: CodecKeys) -> None:
        self.keys = keys
        self.key_id = key_id(keys.current)
        self._ciphers = {key_id(k): _aesgcm(k) for k in keys.keys}

    def encrypt(self, payload: Payload) -> Payload:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._ciphers[self.key_id].encrypt(
            nonce, payload.SerializeToString(), AAD_PREFIX + self.key_id.encode()
        )
        metadata = {"encoding": ENCODING, META_KEY_ID: self.key_id.encode(), META_CIPHER: CIPHER}
        return Payload(metadata=metadata, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        if not is_encrypted(payload):
            return payload  # written before encryption was turned on
        kid = _payload_key_id(payload)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise CodecError(
                f"a payload is encrypted with codec key {kid}, which is not among this process's keys"
                f" ({', '.join(self._ciphers)}); add that key after the current one ({ENV_KEY}=CURRENT,OLD)"
            )
        if payload.metadata.get(META_CIPHER, CIPHER) != CIPHER or len(payload.data) < NONCE_BYTES + 16:
            raise CodecError(f"a payload encrypted with codec key {kid} is malformed (unknown cipher or truncated)")
        from cryptography.exceptions import InvalidTag  # present: __init__ built the ciphers with it

        try:
            inner = cipher.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], AAD_PREFIX + kid.encode())
        except InvalidTag:
            raise CodecError(
                f"a payload encrypted with codec key {kid} fails authentication: it was corrupted or tampered with"
            ) from None
        return Payload.FromString(inner)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]


class KeylessCodec(PayloadCodec):
    """For a process without a key: payloads pass as they are, and an encrypted one is a clear error, not the
    payload converter's "unknown encoding"."""

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return list(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        for p in payloads:
            if is_encrypted(p):
                raise CodecError(
                    f"this run's history is encrypted (codec key {_payload_key_id(p)}) and no codec key is set"
                    f" here; {_KEY_HINT}"
                )
        return list(payloads)


@dataclass(frozen=True)
class _Chain(PayloadCodec):
    """Your codec, then ours: encode runs yours first (e.g. compression before encryption), decode the reverse."""

    first: PayloadCodec
    then: PayloadCodec

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await self.then.encode(await self.first.encode(payloads))

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await self.first.decode(await self.then.decode(payloads))


def codec_from_env() -> EncryptionCodec | KeylessCodec:
    keys = CodecKeys.from_env()
    return EncryptionCodec(keys) if keys else KeylessCodec()


def _ours(codec: PayloadCodec | None) -> bool:
    return isinstance(codec, EncryptionCodec | KeylessCodec) or (isinstance(codec, _Chain) and _ours(codec.then))


def encrypts(converter: DataConverter) -> bool:
    """Whether ``converter`` encrypts payloads with our codec (then nothing plaintext should name the pipeline)."""
    codec = converter.payload_codec
    return isinstance(codec, EncryptionCodec) or (isinstance(codec, _Chain) and isinstance(codec.then, EncryptionCodec))


def install_codec(converter: DataConverter, codec: EncryptionCodec | KeylessCodec) -> DataConverter:
    """``converter`` with ``codec`` added, keeping everything else. An existing codec of yours runs before an
    `EncryptionCodec` (and is left alone by a `KeylessCodec`); a converter that already has ours is kept."""
    existing = converter.payload_codec
    if _ours(existing):
        return converter
    if isinstance(codec, KeylessCodec):
        return converter if existing is not None else dataclasses.replace(converter, payload_codec=codec)
    failures = converter.failure_converter_class
    if failures is DefaultFailureConverter:
        # Failure messages and stack traces (which may quote a step's output) move into an encrypted payload.
        failures = DefaultFailureConverterWithEncodedAttributes
    return dataclasses.replace(
        converter,
        payload_codec=codec if existing is None else _Chain(existing, codec),
        failure_converter_class=failures,
    )
