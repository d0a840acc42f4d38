"""Credential brokering: the sandbox holds a placeholder, the worker puts the real secret into request headers.

A brokered secret (``secrets: [{name: GITHUB_TOKEN, hosts: [api.github.com]}]``) never enters the sandbox: its
environment holds an opaque placeholder (``tardigrade-brokered-<random>``). The sandbox's HTTPS goes through the
worker's egress proxy; for a CONNECT to one of the secret's hosts the proxy hands the connection to `Broker.serve`,
which terminates TLS with a certificate from the sandbox's own CA (sandboxes/network/ca.py), reads each HTTP/1.1
request, swaps placeholder -> value in its headers only (``Authorization: Basic`` credentials decoded, swapped and
re-encoded too), and relays it over a verified TLS connection to the real host. Requests to any other host never
reach the broker, so they carry the placeholder and nothing more.

The request stream is parsed strictly and re-serialized (CRLF line ends, one framing: chunked or Content-Length,
never both), so the broker and the real server cannot disagree about where a request ends and smuggle an extra,
unexamined request past the host check: a request whose Host names another server than the tunnel's (domain
fronting) is refused with 421. Responses are relayed as they come, with any echo of a real value masked
(same-length, so framing holds) - best effort: a compressed echo is not recognized.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tardigrade.sandboxes.network.ca import SandboxCA
from tardigrade.sandboxes.network.rules import host_matches, normalize_host

log = logging.getLogger(__name__)

PLACEHOLDER_PREFIX = "tardigrade-brokered-"
MAX_HEAD_BYTES = 64 * 1024  # request line + headers; more is refused with 431
MAX_LINE_BYTES = 8 * 1024  # a chunk-size or trailer line
HANDSHAKE_TIMEOUT = 30.0
CONNECT_TIMEOUT = 30.0
CLOSE_GRACE = 1.0  # after the client stops sending (it has closed, in practice), how long a last response may take
_READ = 64 * 1024
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

OpenUpstream = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def new_placeholder() -> str:
    """An opaque stand-in for a secret: random, so it says nothing about the value and never occurs by chance."""
    return PLACEHOLDER_PREFIX + secrets.token_hex(16)


@dataclass(frozen=True)
class HostSecret:
    """A secret's name, its value (read on the worker) and the host patterns its value may be sent to."""

    name: str
    value: str
    hosts: tuple[str, ...]

    def __repr__(self) -> str:  # a value must never reach a log or an error through repr()
        return f"HostSecret(name={self.name!r}, hosts={self.hosts!r})"


@dataclass(frozen=True)
class BrokeredSecret:
    """A secret the broker adds to requests for ``hosts``; the sandbox only ever sees ``placeholder``."""

    name: str
    value: str
    placeholder: str
    hosts: tuple[str, ...]

    def covers(self, host: str) -> bool:
        return any(host_matches(pattern, host) for pattern in self.hosts)

    def __repr__(self) -> str:  # a value must never reach a log or an error through repr()
        return f"BrokeredSecret(name={self.name!r}, hosts={self.hosts!r})"


#: Where the sandbox reads its CA bundle (the system's roots plus its own CA): a read-only bind of a file in the
#: sandbox's state folder on the worker, so it is in no snapshot and the sandbox cannot change it.
CA_BUNDLE_PATH = "/etc/tardigrade/ca-bundle.pem"
#: The system's bundle on Debian and Ubuntu (what wget, OpenSSL's default and most clients read without variables).
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
#: The variables through which OpenSSL, curl, Python (ssl, requests, pip), git and Node find that bundle.
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "PIP_CERT",
                "GIT_SSL_CAINFO")  # fmt: skip


class SandboxBrokering:
    """One sandbox's brokering, kept for its whole life: a placeholder per secret name (stable, so a placeholder a
    step wrote into a config file keeps working in later steps), its CA and CA bundle, and the `Broker` its egress
    proxy consults. Values are refreshed on every `update` (a rotated secret takes effect at the next command)."""

    def __init__(
        self, folder: Path, *, open_upstream: OpenUpstream | None = None, upstream_ca_file: str | Path | None = None
    ) -> None:
        """``folder`` is on the worker, outside the sandbox's files (it holds the CA bundle, never a key)."""
        self.folder = folder
        self._open_upstream = open_upstream
        self._upstream_ca_file = upstream_ca_file
        self._placeholders: dict[str, str] = {}
        self._ca: SandboxCA | None = None
        self.broker: Broker | None = None

    @property
    def bundle(self) -> Path:
        return self.folder / "ca-bundle.pem"

    @property
    def hosts(self) -> tuple[str, ...]:
        return self._ca.hosts if self._ca is not None else ()

    def bwrap_binds(self) -> list[str]:
        """bubblewrap arguments that show the bundle, read-only, at `CA_BUNDLE_PATH` and in place of the system's
        bundle (for clients that read only that one, such as wget). Files on the worker: in no snapshot."""
        binds = ["--ro-bind", str(self.bundle), CA_BUNDLE_PATH]
        if os.path.isfile(SYSTEM_BUNDLE) and not os.path.islink(SYSTEM_BUNDLE):
            binds += ["--ro-bind", str(self.bundle), SYSTEM_BUNDLE]
        return binds

    def update(self, secrets: Sequence[HostSecret]) -> dict[str, str]:
        """Broker ``secrets`` from now on; returns the variables commands get: each name with its placeholder, and
        the CA variables pointing at `CA_BUNDLE_PATH`. Makes a new CA when the set of hosts changes."""
        hosts = sorted({h for s in secrets for h in s.hosts})
        if self._ca is None or list(self._ca.hosts) != hosts:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._ca = SandboxCA(hosts)
            self._ca.write_bundle(self.bundle)
        brokered = [
            BrokeredSecret(s.name, s.value, self._placeholders.setdefault(s.name, new_placeholder()), s.hosts)
            for s in secrets
        ]
        self.broker = Broker(
            brokered, self._ca, upstream_ca_file=self._upstream_ca_file, open_upstream=self._open_upstream
        )
        return {**{s.name: s.placeholder for s in brokered}, **dict.fromkeys(CA_VARIABLES, CA_BUNDLE_PATH)}


class _Refused(Exception):
    """A request the broker will not relay: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason = status, reason


class _TLS:
    """TLS over a pair of asyncio streams through memory BIOs: works whatever made the streams (a server's
    accepted connection, an fd handed over by a helper), and takes bytes already buffered in ``reader``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self._reader, self._writer = reader, writer
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _fill(self) -> None:
        data = await self._reader.read(_READ)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    async def read(self) -> bytes:
        """Some decrypted bytes; b"" once the peer has closed."""
        while True:
            try:
                return self._tls.read(_READ)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def write(self, data: bytes) -> None:
        if data:
            self._tls.write(data)
            await self._flush()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._tls.unwrap()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush(), 1)
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1)


class _Buffered:
    """Line and exact-size reads over a `_TLS` stream, each bounded."""

    def __init__(self, stream: _TLS) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self.eof = False

    async def _more(self) -> bool:
        data = await self._stream.read()
        if not data:
            self.eof = True
            return False
        self._buffer += data
        return True

    async def until(self, marker: bytes, limit: int, too_long: _Refused) -> bytes | None:
        """Bytes up to and including ``marker``; None on EOF before any byte; ``too_long`` past ``limit``."""
        start = 0
        while True:
            at = self._buffer.find(marker, start)
            if at != -1 and at + len(marker) <= limit:
                data = bytes(self._buffer[: at + len(marker)])
                del self._buffer[: at + len(marker)]
                return data
            if len(self._buffer) >= limit:
                raise too_long
            start = max(0, len(self._buffer) - len(marker) + 1)
            if not await self._more():
                if self._buffer:
                    raise _Refused(400, "Bad Request", "the connection closed in the middle of a request")
                return None

    async def exactly(self, count: int) -> Iterable[bytes]:
        """Yield ``count`` bytes in pieces as they arrive (streamed, never held whole)."""
        pieces = []
        while count > 0:
            if not self._buffer and not await self._more():
                raise _Refused(400, "Bad Request", "the connection closed in the middle of a request body")
            piece = bytes(self._buffer[:count])
            del self._buffer[: len(piece)]
            count -= len(piece)
            pieces.append(piece)
            if sum(map(len, pieces)) >= _READ:
                break
        return pieces

    def take_buffer(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class _Scrubber:
    """Masks every real value in a byte stream with as many ``*``: a response that echoes a request's headers
    (a debugging endpoint, an error page) does not carry the secret into the sandbox. A partial match at the end
    of a piece is held back until the next piece shows whether it completes."""

    def __init__(self, values: Sequence[bytes]) -> None:
        self._values = sorted({v for v in values if v}, key=len, reverse=True)
        self._pending = b""

    @property
    def holding(self) -> bool:
        return bool(self._pending)

    def feed(self, data: bytes) -> bytes:
        data = self._pending + data
        for value in self._values:
            data = data.replace(value, b"*" * len(value))
        keep = 0
        for k in range(min(len(data), max((len(v) for v in self._values), default=1) - 1), 0, -1):
            if any(v.startswith(data[-k:]) for v in self._values):
                keep = k
                break
        self._pending = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep]

    def flush(self) -> bytes:
        data, self._pending = self._pending, b""
        return data


class Broker:
    """The egress proxy's hook for brokered secrets (one per sandbox): `handles` says which CONNECTs are its,
    `serve` takes such a connection over after the proxy answered 200."""

    def __init__(
        self,
        brokered: Sequence[BrokeredSecret],
        ca: SandboxCA,
        *,
        upstream_ca_file: str | Path | None = None,
        open_upstream: OpenUpstream | None = None,
    ) -> None:
        """``upstream_ca_file`` adds roots (beside the system's) that real hosts' certificates may chain to: an
        internal CA, or a test host's. ``open_upstream`` opens the TCP connection to a host (the proxy passes its
        own, which applies the worker's address rules); the default connects directly."""
        self.brokered = tuple(brokered)
        self.ca = ca
        self._open_upstream = open_upstream or _open_direct
        self._upstream_context = ssl.create_default_context()
        if upstream_ca_file is not None:
            self._upstream_context.load_verify_locations(cafile=str(upstream_ca_file))
        self._upstream_context.set_alpn_protocols(["http/1.1"])

    def handles(self, host: str, port: int) -> bool:
        return any(secret.covers(host) for secret in self.brokered)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
        """Serve one CONNECT tunnel to ``host:port``: TLS toward the sandbox, requests relayed with the real values
        in their headers, responses relayed back. Returns when either side is done; closes both."""
        host = normalize_host(host)
        relevant = [s for s in self.brokered if s.covers(host)]
        client = _TLS(reader, writer, self.ca.server_context(host), server_side=True)
        upstream: _TLS | None = None
        try:
            try:
                await asyncio.wait_for(client.handshake(), HANDSHAKE_TIMEOUT)
            except (ssl.SSLError, OSError, TimeoutError) as e:
                log.info("brokered tunnel to %s:%s: the sandbox's TLS handshake failed: %s", host, port, e)
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(self._open_upstream(host, port), CONNECT_TIMEOUT)
                upstream = _TLS(up_reader, up_writer, self._upstream_context, server_side=False, server_hostname=host)
                await asyncio.wait_for(upstream.handshake(), HANDSHAKE_TIMEOUT)
            except (ssl.SSLError, OSError, TimeoutError) as e:
                log.warning("brokered tunnel to %s:%s: cannot reach the real host: %s", host, port, e)
                await _answer(client, 502, "Bad Gateway", f"the worker could not reach {host}:{port}: {e}")
                return
            await self._relay(client, upstream, host, port, relevant)
        finally:
            if upstream is not None:
                await upstream.close()
            await client.close()

    async def _relay(self, client: _TLS, upstream: _TLS, host: str, port: int, relevant: list[BrokeredSecret]) -> None:
        requests = asyncio.ensure_future(self._requests(client, upstream, host, port, relevant))
        responses = asyncio.ensure_future(_responses(upstream, client, [s.value.encode() for s in relevant]))
        try:
            done, _ = await asyncio.wait({requests, responses}, return_when=asyncio.FIRST_COMPLETED)
            if requests in done and responses not in done and requests.exception() is None:
                # The client sent its last request: let its responses arrive, for a while.
                await asyncio.wait({responses}, timeout=CLOSE_GRACE)
        finally:
            for task in (requests, responses):
                task.cancel()
            for task in (requests, responses):
                with contextlib.suppress(BaseException):
                    await task
        if requests.done() and not requests.cancelled() and (error := requests.exception()) is not None:
            if isinstance(error, _Refused):
                log.warning("brokered tunnel to %s:%s: request refused: %s", host, port, error)
                with contextlib.suppress(Exception):
                    await _answer(client, error.status, error.reason, str(error))
            elif not isinstance(error, (ssl.SSLError, OSError)):
                raise error

    async def _requests(
        self, client: _TLS, upstream: _TLS, host: str, port: int, relevant: list[BrokeredSecret]
    ) -> None:
        incoming = _Buffered(client)
        while True:
            head = await incoming.until(
                b"\r\n\r\n", MAX_HEAD_BYTES, _Refused(431, "Request Header Fields Too Large", "request head too big")
            )
            if head is None:
                return
            request = _parse_head(head, host, port)
            await upstream.write(_serialize(request, relevant))
            if request.chunked:
                await _relay_chunked(incoming, upstream)
            else:
                remaining = request.length
                while remaining:
                    for piece in await incoming.exactly(remaining):
                        remaining -= len(piece)
                        await upstream.write(piece)
            if request.upgrade:
                # A protocol switch (websocket): what follows is not HTTP; relay it untouched, no substitution.
                await upstream.write(incoming.take_buffer())
                while data := await client.read():
                    await upstream.write(data)
                return


@dataclass
class _Request:
    request_line: bytes
    headers: list[tuple[bytes, bytes]]
    chunked: bool
    length: int
    upgrade: bool


def _parse_head(head: bytes, host: str, port: int) -> _Request:
    lines = head[:-4].split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise _Refused(400, "Bad Request", "bare CR or LF in the request head")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not _TOKEN.match(parts[0]) or not parts[1]:
        raise _Refused(400, "Bad Request", "malformed request line")
    if parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _Refused(505, "HTTP Version Not Supported", "the broker speaks HTTP/1.1 only")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise _Refused(400, "Bad Request", "malformed header line (folded, or a space before the colon)")
        headers.append((name, value.strip(b" \t")))

    def values(wanted: bytes) -> list[bytes]:
        return [v for n, v in headers if n.lower() == wanted]

    encodings, lengths = values(b"transfer-encoding"), values(b"content-length")
    chunked = False
    if encodings:
        if lengths or len(encodings) != 1 or encodings[0].lower() != b"chunked":
            raise _Refused(400, "Bad Request", "only 'Transfer-Encoding: chunked' alone, without Content-Length")
        chunked = True
    length = 0
    if lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
            raise _Refused(400, "Bad Request", "invalid or conflicting Content-Length")
        length = int(lengths[0])
    authorities = values(b"host")
    target = parts[1]
    if b"://" in target[:16]:  # absolute-form: its authority must be the tunnel's too
        authorities.append(target.split(b"://", 1)[1].split(b"/", 1)[0].split(b"?", 1)[0])
    if not authorities or len(values(b"host")) > 1:
        raise _Refused(400, "Bad Request", "a request needs exactly one Host header")
    for authority in authorities:
        if not _same_authority(authority, host, port):
            raise _Refused(
                421, "Misdirected Request", f"Host {authority[:200].decode(errors='replace')!r} is not {host}:{port}"
            )
    connection = {t.strip().lower() for v in values(b"connection") for t in v.split(b",")}
    return _Request(lines[0], headers, chunked, length, upgrade=b"upgrade" in connection)


def _same_authority(authority: bytes, host: str, port: int) -> bool:
    text = authority.decode("latin-1").strip().lower()
    if "@" in text:
        return False
    name, port_text = text, ""
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        name, _, port_text = text.partition(":")
    if port_text and (not port_text.isdigit() or int(port_text) != port):
        return False
    if not port_text and port != 443:
        return False
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(name) == ipaddress.ip_address(host)
    return normalize_host(name) == host


def _serialize(request: _Request, relevant: list[BrokeredSecret]) -> bytes:
    out = [request.request_line]
    for name, value in request.headers:
        out.append(name + b": " + _substitute(value, relevant))
    return b"\r\n".join(out) + b"\r\n\r\n"


def _substitute(value: bytes, relevant: list[BrokeredSecret]) -> bytes:
    for secret in relevant:
        value = value.replace(secret.placeholder.encode(), secret.value.encode())
    scheme, space, credentials = value.partition(b" ")
    if space and scheme.lower() == b"basic":  # git, pip, curl -u: user:password, base64-encoded
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return value
        swapped = decoded
        for secret in relevant:
            swapped = swapped.replace(secret.placeholder.encode(), secret.value.encode())
        if swapped != decoded:
            value = scheme + b" " + base64.b64encode(swapped)
    return value


async def _relay_chunked(incoming: _Buffered, upstream: _TLS) -> None:
    too_long = _Refused(400, "Bad Request", "chunk-size or trailer line too long")
    while True:
        line = await incoming.until(b"\r\n", MAX_LINE_BYTES, too_long)
        if line is None:
            raise _Refused(400, "Bad Request", "the connection closed in the middle of a chunked body")
        size_text = line[:-2].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _Refused(400, "Bad Request", "invalid chunk size") from None
        if not size_text or size < 0 or len(size_text) > 16:
            raise _Refused(400, "Bad Request", "invalid chunk size")
        await upstream.write(b"%x\r\n" % size)
        if size == 0:
            while True:  # trailers, up to the empty line
                trailer = await incoming.until(b"\r\n", MAX_LINE_BYTES, too_long)
                if trailer is None:
                    raise _Refused(400, "Bad Request", "the connection closed in a chunked body's trailers")
                await upstream.write(trailer)
                if trailer == b"\r\n":
                    return
        remaining = size + 2  # the chunk and its CRLF
        tail = b""
        while remaining:
            for piece in await incoming.exactly(remaining):
                remaining -= len(piece)
                tail = (tail + piece)[-2:]
                await upstream.write(piece)
        if tail != b"\r\n":
            raise _Refused(400, "Bad Request", "a chunk does not end with CRLF")


async def _responses(upstream: _TLS, client: _TLS, values: list[bytes]) -> None:
    scrubber = _Scrubber(values)
    while True:
        if scrubber.holding:
            try:
                data = await asyncio.wait_for(upstream.read(), 0.2)
            except TimeoutError:
                await client.write(scrubber.flush())  # a partial match that went no further: not a value
                continue
        else:
            data = await upstream.read()
        if not data:
            await client.write(scrubber.flush())
            return
        await client.write(scrubber.feed(data))


async def _answer(client: _TLS, status: int, reason: str, detail: str) -> None:
    body = (detail + "\n").encode()
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    await client.write(head.encode() + b"Connection: close\r\n\r\n" + body)


async def _open_direct(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)
