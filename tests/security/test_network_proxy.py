"""The worker-side egress proxy on real sockets: what it lets through, what it refuses, and its broker hook."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from tardigrade.sandboxes.network.addresses import IPAddress
from tardigrade.sandboxes.network.policy import NetworkPolicy
from tardigrade.sandboxes.network.proxy import EgressProxy
from tardigrade.sandboxes.network.rules import NetworkRule


@dataclass
class Upstream:
    """A loopback server that records the raw bytes of each request and answers one fixed response."""

    port: int = 0
    received: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> Upstream:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.readuntil(b"\r\n\r\n")
            self.received.append(data)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nupstream")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = await Upstream().start()
    yield up
    assert up.server is not None
    up.server.close()


def resolver(names: dict[str, list[str]]) -> Callable[[str, int], Awaitable[list[IPAddress]]]:
    """Name resolution as a test's DNS would answer (the proxy resolves on the worker, never in the sandbox)."""

    async def resolve(host: str, port: int) -> list[IPAddress]:
        if host not in names:
            raise OSError(f"{host}: no such name")
        return [ipaddress.ip_address(a) for a in names[host]]

    return resolve


async def start_proxy(proxy: EgressProxy) -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    await proxy.serve_socket(listener)
    return port


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_plain_http_reaches_an_allowed_host_without_proxy_headers(upstream: Upstream) -> None:
    rule = NetworkRule.parse({"allow": ["api.test"]})
    policy = NetworkPolicy(reachable=[f"127.0.0.1:{upstream.port}"])
    proxy = EgressProxy(rule, policy, resolve=resolver({"api.test": ["127.0.0.1"]}))
    port = await start_proxy(proxy)
    try:
        answer = await exchange(
            port,
            f"GET http://api.test:{upstream.port}/v1?q=1 HTTP/1.1\r\nHost: api.test\r\n"
            "Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\n\r\n".encode(),
        )
        assert answer.endswith(b"upstream")
        (request,) = upstream.received
        assert request.startswith(b"GET /v1?q=1 HTTP/1.1\r\n")
        assert b"Proxy-" not in request and b"c2VjcmV0" not in request and b"Connection: close" in request
    finally:
        await proxy.close()


@pytest.mark.parametrize(
    ("target", "names", "reason"),
    [
        ("evil.test:80", {"evil.test": ["127.0.0.1"]}, "not in this sandbox's network allowlist"),
        ("api.test.evil.net:80", {}, "not in this sandbox's network allowlist"),
        ("api.test:80", {"api.test": ["169.254.169.254"]}, "internal"),  # an allowed name pointing at metadata
        ("api.test:80", {"api.test": ["10.0.0.7", "192.168.1.2"]}, "internal"),
        ("api.test:80", {"api.test": ["::ffff:127.0.0.1"]}, "internal"),  # IPv4-mapped loopback
        ("api.test:80", {}, "does not resolve"),
        ("127.0.0.1:80", {}, "not in this sandbox's network allowlist"),
    ],
)
async def test_refused_destinations(target: str, names: dict[str, list[str]], reason: str) -> None:
    refusals: list[str] = []
    proxy = EgressProxy(NetworkRule.parse({"allow": ["api.test"]}), resolve=resolver(names), on_refusal=refusals.append)
    port = await start_proxy(proxy)
    try:
        answer = await exchange(port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        assert reason in answer.decode() and reason in refusals[0]
    finally:
        await proxy.close()


async def test_a_reachable_entry_opens_one_port_only(upstream: Upstream) -> None:
    other = await Upstream().start()
    try:
        policy = NetworkPolicy(reachable=[f"127.0.0.1:{upstream.port}"])
        proxy = EgressProxy(NetworkRule("internet"), policy)
        port = await start_proxy(proxy)
        tunnel = f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\n\r\nGET /through HTTP/1.1\r\n\r\n"
        ok = await exchange(port, tunnel.encode())
        assert ok.startswith(b"HTTP/1.1 200 Connection Established") and ok.endswith(b"upstream")
        assert upstream.received == [b"GET /through HTTP/1.1\r\n\r\n"]
        refused = await exchange(port, f"CONNECT 127.0.0.1:{other.port} HTTP/1.1\r\n\r\n".encode())
        assert refused.startswith(b"HTTP/1.1 403") and other.received == []
        await proxy.close()
    finally:
        assert other.server is not None
        other.server.close()


async def test_malformed_and_oversized_requests() -> None:
    proxy = EgressProxy(NetworkRule.parse({"allow": ["api.test"]}), resolve=resolver({}))
    port = await start_proxy(proxy)
    try:
        assert (await exchange(port, b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")).startswith(b"HTTP/1.1 403")
        assert (await exchange(port, b"GET https://api.test/ HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 403")
        assert (await exchange(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await exchange(port, b"CONNECT api.test:99999 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 403")
        huge = b"CONNECT api.test:443 HTTP/1.1\r\n" + b"X: " + b"a" * 200_000 + b"\r\n\r\n"
        assert (await exchange(port, huge)).startswith(b"HTTP/1.1 431")
    finally:
        await proxy.close()


class EchoBroker:
    """A broker on the agreed interface (handles/serve), to check the proxy hands connections over correctly."""

    def __init__(self, hosts: set[str]) -> None:
        self.hosts = hosts
        self.served: list[tuple[str, int]] = []

    def handles(self, host: str, port: int) -> bool:
        return host in self.hosts

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
        self.served.append((host, port))
        writer.write(b"broker:" + await reader.readexactly(5))
        await writer.drain()


async def test_brokered_hosts_are_handed_to_the_broker_after_the_checks(upstream: Upstream) -> None:
    broker = EchoBroker({"api.test", "other.test"})
    names = {"api.test": ["93.184.216.34"], "other.test": ["10.0.0.1"]}
    proxy = EgressProxy(
        NetworkRule.parse({"allow": ["api.test", "other.test"]}), broker=broker, resolve=resolver(names)
    )
    port = await start_proxy(proxy)
    try:
        answer = await exchange(port, b"CONNECT api.test:443 HTTP/1.1\r\n\r\nhello")
        assert answer == b"HTTP/1.1 200 Connection Established\r\n\r\nbroker:hello"
        assert broker.served == [("api.test", 443)]
        refused = await exchange(port, b"CONNECT other.test:443 HTTP/1.1\r\n\r\nhello")  # internal: never brokered
        assert refused.startswith(b"HTTP/1.1 403") and broker.served == [("api.test", 443)]
    finally:
        await proxy.close()
