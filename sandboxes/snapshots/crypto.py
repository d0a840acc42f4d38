"""Encryption at rest (optional): AES-256-GCM for every object the engine stores, with a key from the worker.

Set ``TARDIGRADE_ENCRYPTION_KEY`` (32 random bytes, base64; `tardigrade snapshot keygen` prints one) on every
worker and client that uses the store. Then:

* each blob in a pack is encrypted on its own (packs stay readable by ranged reads), and every other object -
  trees, records, pack indexes, logs, GC epochs - is encrypted whole;
* blobs are named by a *keyed* BLAKE3 hash, so the store learns nothing from names, and dedupe still works
  between snapshots made with the same key (and never across keys);
* every encrypted object starts with ``TGE1`` and the key's id (a hash of the key, not the key), so reading it
  with no key or a different key fails saying exactly that, instead of as corruption.

Objects written before encryption was turned on stay readable (they have no header); new ones are encrypted.
The workspace digest does not depend on encryption: it uses plain content hashes, kept inside encrypted trees.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from tardigrade.sandboxes.errors import SnapshotError
from tardigrade.sandboxes.store_keys import PACKS
from tardigrade.sandboxes.stores.base import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENV_KEY = "TARDIGRADE_ENCRYPTION_KEY"
MAGIC = b"TGE1"
KEY_ID_BYTES = 8
NONCE_BYTES = 12
OVERHEAD = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES + 16  # + the GCM tag


class EncryptionError(SnapshotError):
    pass


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _aesgcm(key: bytes) -> AESGCM:
    # `cryptography` is the optional 'encryption' extra: a worker without a key never needs it.
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ModuleNotFoundError:
        raise EncryptionError(
            f"{ENV_KEY} is set but the 'cryptography' package is missing; "
            "install it with: pip install 'tardigrade-temporal[encryption]'"
        ) from None
    return AESGCM(key)


class Encryption:
    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise EncryptionError(f"{ENV_KEY} must be 32 bytes, base64-encoded; got {len(master_key)} bytes")
        self._aead = _aesgcm(blake3.blake3(master_key, derive_key_context="tardigrade 2026 object encryption").digest())
        self._mac_key = blake3.blake3(master_key, derive_key_context="tardigrade 2026 blob ids").digest()
        self.key_id = blake3.blake3(master_key, derive_key_context="tardigrade 2026 key id").digest()[:KEY_ID_BYTES]

    @classmethod
    def from_env(cls) -> Encryption | None:
        value = os.environ.get(ENV_KEY)
        if not value:
            return None
        try:
            return cls(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise EncryptionError(
                f"{ENV_KEY} is not valid base64; generate one with `tardigrade snapshot keygen`"
            ) from None

    def blob_id(self, data: bytes | bytearray | memoryview) -> str:
        return blake3.blake3(data, key=self._mac_key).hexdigest()

    def encrypt(self, data: bytes | bytearray | memoryview) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return MAGIC + self.key_id + nonce + self._aead.encrypt(nonce, bytes(data), MAGIC + self.key_id)

    def decrypt(self, data: bytes | memoryview, what: str) -> bytes:
        data = bytes(data)
        if not data.startswith(MAGIC):
            return data  # written before encryption was enabled
        key_id = data[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES]
        if key_id != self.key_id:
            raise EncryptionError(f"{what} is encrypted with another key (id {key_id.hex()}, ours {self.key_id.hex()})")
        nonce = data[len(MAGIC) + KEY_ID_BYTES : len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES]
        from cryptography.exceptions import InvalidTag  # present: __init__ built the cipher with it

        try:
            return self._aead.decrypt(nonce, data[len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES :], MAGIC + key_id)
        except InvalidTag:
            raise EncryptionError(f"{what} fails authentication: it is corrupt or was tampered with") from None


def require_no_encryption(data: bytes | memoryview, what: str) -> None:
    """Reading without a key: an encrypted object must say so, not look corrupt."""
    if bytes(data[: len(MAGIC)]) == MAGIC:
        key_id = bytes(data[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES]).hex()
        raise EncryptionError(f"{what} is encrypted (key id {key_id}); set {ENV_KEY} to read it")


class EncryptedStore(ObjectStore):
    """Encrypts whole objects on the way in and decrypts them on the way out - except packs, whose blobs are
    encrypted one by one by the pack writer so that ranged reads keep working."""

    def __init__(self, inner: ObjectStore, encryption: Encryption) -> None:
        self.inner = inner
        self.encryption = encryption
        self.url = inner.url

    @staticmethod
    def _raw(key: str) -> bool:
        return key.startswith(PACKS)

    def put(self, key: str, data: bytes) -> bool:
        return self.inner.put(key, data if self._raw(key) else self.encryption.encrypt(data))

    def put_deferred(self, key: str, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        if self._raw(key):
            self.inner.put_deferred(key, parts)
        else:
            self.inner.put_deferred(key, [self.encryption.encrypt(b"".join(parts))])

    def flush(self) -> None:
        self.inner.flush()

    def put_file(self, key: str, path: Path) -> bool:
        return self.put(key, path.read_bytes())

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        return data if self._raw(key) else self.encryption.decrypt(data, f"object {key}")

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if not self._raw(key):
            raise EncryptionError(f"ranged reads of whole-encrypted object {key} are not possible")
        return self.inner.get_range(key, offset, length)

    def get_file(self, key: str, path: Path) -> None:
        path.write_bytes(self.get(key))

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def close(self) -> None:
        self.inner.close()
