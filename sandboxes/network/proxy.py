"""The worker-side egress proxy: the only way out of an allowlisted sandbox.

A sandbox with ``network: {allow: [...]}`` has a network namespace with nothing but loopback; on its
``127.0.0.1:3128`` listens a socket that was created inside that namespace and handed to the worker
(namespace.py), so the sandbox reaches this proxy without any route out. The proxy speaks HTTP/1.1 ``CONNECT``
(HTTPS and any TLS) and plain ``http://`` requests in absolute form. For each it

1. checks the host against the sandbox's allowlist (exact names, ``*.`` suffix rules),
2. resolves the name on the worker and drops every address that is internal (addresses.py: the worker's own,
   its subnets, loopback, link-local and cloud metadata, private ranges) unless the worker policy lists it as
   reachable, then connects to a vetted address itself (so a name cannot be re-resolved to somewhere else),
3. streams bytes both ways with bounded buffers (back-pressure through ``drain``).

Every refusal is answered with a 403 naming the reason, logged (python logging) and passed to ``on_refusal``.

Hook for credential brokering (sandboxes/network/broker.py): a `BrokerHook` given to the proxy sees every allowed
CONNECT first; if ``handles(host, port)`` is true the proxy answers 200 and hands the client streams to
``serve(reader, writer, host, port)``, which may call `EgressProxy.open_upstream` to reach the real host through
the same address checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

from tardigrade.sandboxes.network.addresses import IPAddress, is_internal, worker_addresses, worker_subnets
from tardigrade.sandboxes.network.policy import NetworkPolicy
from tardigrade.sandboxes.network.rules import NetworkRule, normalize_host

log = logging.getLogger(__name__)

PROXY_PORT = 3128  # inside the sandbox's own namespace, so it never collides with anything of the worker's
MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT = 30.0
CONNECT_TIMEOUT = 30.0
_CHUNK = 64 * 1024

Resolve = Callable[[str, int], Awaitable[list[IPAddress]]]


class BrokerHook(Protocol):
    """What the proxy needs of a credential broker (implemented by broker.Broker)."""

    def handles(self, host: str, port: int) -> bool: ...

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None: ...


class EgressRefused(Exception):
    """A destination the sandbox may not reach; the message says why (it goes back to the sandbox as a 403)."""


async def resolve_on_worker(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))


class EgressProxy:
    """One sandbox's proxy: its rule, the worker's policy, an optional broker. Serve it with `serve_socket`."""

    def __init__(
        self,
        rule: NetworkRule,
        policy: NetworkPolicy | None = None,
        *,
        broker: BrokerHook | None = None,
        on_refusal: Callable[[str], None] | None = None,
        resolve: Resolve | None = None,
    ) -> None:
        self.rule = rule
        self.policy = policy or NetworkPolicy()
        self.broker = broker
        self.on_refusal = on_refusal
        self.refusals: list[str] = []
        self._resolve = resolve or resolve_on_worker
        self._exceptions = self.policy.exceptions
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    # -- serving ------------------------------------------------------------------------------------------------

    async def serve_socket(self, listener: socket.socket) -> None:
        """Accept connections on ``listener`` (a listening socket, e.g. one made inside a sandbox's namespace)."""
        listener.setblocking(False)
        server = await asyncio.start_server(self._client, sock=listener, limit=MAX_HEAD_BYTES)
        self._servers.append(server)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- one connection -------------------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            await _answer(writer, 431, "Request Header Fields Too Large", "the request head is too large")
            return
        request_line, _, rest = head.partition(b"\r\n")
        parts = request_line.decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _answer(writer, 400, "Bad Request", "not an HTTP/1.x proxy request")
            return
        method, target, version = parts
        try:
            if method.upper() == "CONNECT":
                host, port = _split_authority(target, default_port=443)
                await self._connect(reader, writer, host, port)
            else:
                await self._forward(reader, writer, method, target, version, rest)
        except EgressRefused as refused:
            self._refuse(str(refused))
            await _answer(writer, 403, "Forbidden", f"tardigrade egress proxy: {refused}")

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
        self._check_host(host, port)
        if self.broker is not None and self.broker.handles(host, port):
            # The broker reaches the real host itself, through open_upstream (the same address checks).
            await self._check_addresses(host, port)
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
            await self.broker.serve(reader, writer, host, port)
            return
        upstream = await self._open_checked(host, port, writer)
        if upstream is None:
            return
        up_reader, up_writer = upstream
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await writer.drain()
        await _pipe_both(reader, writer, up_reader, up_writer)

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        version: str,
        headers: bytes,
    ) -> None:
        if not target.lower().startswith("http://"):
            raise EgressRefused(f"{method} {target[:200]!r}: only CONNECT and absolute http:// requests are proxied")
        authority, slash, path = target[len("http://") :].partition("/")
        host, port = _split_authority(authority.rpartition("@")[2], default_port=80)
        self._check_host(host, port)
        upstream = await self._open_checked(host, port, writer)
        if upstream is None:
            return
        up_reader, up_writer = upstream
        kept = [
            line
            for line in headers.split(b"\r\n")
            if line and not line.lower().startswith((b"proxy-", b"connection:", b"keep-alive:"))
        ]
        # One request per upstream connection: a client reusing it cannot reach another host through it anyway.
        request_line = f"{method} {slash}{path} {version}".encode("latin-1")
        up_writer.write(b"\r\n".join([request_line, *kept, b"Connection: close", b"", b""]))
        await up_writer.drain()
        await _pipe_both(reader, writer, up_reader, up_writer)

    # -- the checks ---------------------------------------------------------------------------------------------

    def _check_host(self, host: str, port: int) -> None:
        if not self.rule.allows_host(host):
            raise EgressRefused(f"{host}:{port} is not in this sandbox's network allowlist ({self.rule.describe()})")

    def _reachable(self, address: IPAddress, port: int) -> bool:
        if any(exception.covers(address, port) for exception in self._exceptions):
            return True
        return not is_internal(address, worker_addresses(), worker_subnets())

    async def _check_addresses(self, host: str, port: int) -> list[IPAddress]:
        try:
            addresses = await asyncio.wait_for(self._resolve(host, port), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            raise EgressRefused(f"{host} does not resolve on the worker ({e})") from None
        allowed = [a for a in addresses if self._reachable(a, port)]
        if not allowed:
            shown = ", ".join(map(str, addresses)) or "no address"
            raise EgressRefused(
                f"{host}:{port} resolves to {shown}: internal (the worker, its network, loopback, link-local or a"
                " private range), which sandboxes may not reach unless the worker policy's network.reachable lists it"
            )
        return allowed

    async def open_upstream(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to ``host:port`` from the worker, to a vetted address only. Raises `EgressRefused` (an
        OSError is raised by the last failed connect)."""
        failure: OSError | None = None
        for address in await self._check_addresses(host, port):
            try:
                return await asyncio.wait_for(asyncio.open_connection(str(address), port), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as e:
                failure = e if isinstance(e, OSError) else OSError(f"timed out connecting to {address}:{port}")
        assert failure is not None
        raise failure

    async def _open_checked(
        self, host: str, port: int, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await self.open_upstream(host, port)
        except OSError as e:
            await _answer(writer, 502, "Bad Gateway", f"tardigrade egress proxy: cannot reach {host}:{port}: {e}")
            return None

    def _refuse(self, reason: str) -> None:
        self.refusals.append(reason)
        log.warning("sandbox egress refused: %s", reason)
        if self.on_refusal is not None:
            with contextlib.suppress(Exception):
                self.on_refusal(reason)


def _split_authority(authority: str, *, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` -> (normalized host, port); refuses anything else."""
    text = authority.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else "x")
    else:
        host, _, port_text = text.partition(":") if text.count(":") == 1 else (text, "", "")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise EgressRefused(f"{authority[:200]!r} has no valid port")
    host = normalize_host(host)
    if not host or any(c in host for c in "/\\@ \t"):
        raise EgressRefused(f"{authority[:200]!r} is not a host[:port]")
    return host, int(port_text) if port_text else default_port


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str, detail: str) -> None:
    body = (detail + "\n").encode()
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    with contextlib.suppress(ConnectionError):
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
        await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()  # bounded: never more than the transport's high-water mark queued
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    try:
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    finally:
        up_writer.close()
        with contextlib.suppress(Exception):
            await up_writer.wait_closed()
