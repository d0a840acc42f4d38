"""Attacks on sandbox networking, against real bubblewrap, slirp4netns and listeners on the worker (issue 9, row 2).

The finding: ``network: true`` shared the worker's network namespace, so sandbox code reached Temporal's frontend
on 127.0.0.1. Now a sandbox with network has a namespace of its own: with ``true`` it gets user-mode networking
(slirp4netns) in which the worker's loopback, its own interface addresses, slirp's host alias, link-local/cloud
metadata and private ranges are unreachable; with ``{allow: [...]}`` only loopback and the worker's egress proxy.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.errors import IsolationUnavailable
from tardigrade.sandboxes.network.policy import NetworkPolicy
from tardigrade.sandboxes.provider import SandboxSpec

needs_slirp = pytest.mark.skipif(
    shutil.which("slirp4netns") is None, reason="needs slirp4netns (apt-get install -y slirp4netns)"
)

# Run inside the sandbox: try each host:port, print one line per attempt ("CONNECTED" only on success).
PROBE = """
import socket, sys
for target in sys.argv[1:]:
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print(target, "CONNECTED")
    except OSError as e:
        print(target, "failed:", e)
"""

# slirp's DNS forwarder answers (any answer, NXDOMAIN included, proves packets leave through user-mode networking).
DNS_PROBE = """
import socket, struct
query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\\x07example\\x03com\\x00" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(query, ("10.0.2.3", 53))
print("DNS-ANSWER", s.recv(512)[:2].hex())
"""


def worker_ipv4() -> str | None:
    """A non-loopback IPv4 address of this machine (found without the code under test)."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return str(a.address)
    return None


class Listener:
    """A real TCP listener on the worker that counts who reached it."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener_all() -> Iterator[Listener]:
    """Listening on every interface of the worker (0.0.0.0), like a careless internal service."""
    listener = Listener("0.0.0.0")
    yield listener
    listener.close()


class AllowedHost(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:
        AllowedHost.requests.append(self.path)
        body = b"hello from the test host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_host() -> Iterator[int]:
    """A loopback HTTP server on the worker (127.0.0.1): the allowlisted "internet host" of these tests."""
    AllowedHost.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AllowedHost)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[LocalSandboxProvider]:
    p = LocalSandboxProvider(tmp_path / "sandboxes")
    assert p.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    yield p
    await p.close()


async def sh(sandbox: LocalSandbox, command: str, timeout: float = 60) -> tuple[int, str]:
    result = await sandbox.exec(command, env={}, timeout=timeout, tail_bytes=65536)
    return result.exit_code, result.output_tail.decode()


async def probe(sandbox: LocalSandbox, *targets: str) -> dict[str, str]:
    await sandbox.write_file("probe.py", PROBE.encode())
    _, out = await sh(sandbox, "python3 probe.py " + " ".join(targets))
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.strip())
    assert set(lines) == set(targets), out
    return lines


# -- network: true -------------------------------------------------------------------------------------------------


@needs_slirp
async def test_internet_sandbox_cannot_reach_any_address_of_the_worker(
    provider: LocalSandboxProvider, listener_all: Listener, temporal_address: str
) -> None:
    sandbox = await provider.create(SandboxSpec(network=True))
    targets = [
        f"127.0.0.1:{listener_all.port}",  # the worker's loopback
        temporal_address,  # the original attack: Temporal's frontend on the worker's loopback
        f"10.0.2.2:{listener_all.port}",  # slirp's alias for the host's loopback
        "169.254.169.254:80",  # cloud metadata
        "10.1.2.3:80", "172.16.0.1:80", "192.168.1.1:80", "100.64.0.1:80",  # private and CGNAT ranges
    ]  # fmt: skip
    own = worker_ipv4()
    if own is not None:
        targets.append(f"{own}:{listener_all.port}")  # the worker's own interface address
    results = await probe(sandbox, *targets)
    assert not [t for t, r in results.items() if "CONNECTED" in r], results
    assert listener_all.accepted == 0


@needs_slirp
async def test_internet_sandbox_has_working_user_mode_networking(
    provider: LocalSandboxProvider, listener_all: Listener
) -> None:
    """There is no internet here: prove packets leave through slirp4netns with its DNS forwarder, and with a TCP
    listener the worker's policy explicitly lists as reachable (the way an internal mirror would be)."""
    own = worker_ipv4()
    if own is None:
        pytest.skip("this machine has no non-loopback IPv4 address to listen on")
    policy = NetworkPolicy(reachable=[own])
    sandbox = await provider.create(SandboxSpec(network=True, network_policy=policy))
    results = await probe(sandbox, f"{own}:{listener_all.port}")
    assert "CONNECTED" in results[f"{own}:{listener_all.port}"], results
    assert listener_all.accepted == 1
    await sandbox.write_file("dns.py", DNS_PROBE.encode())
    code, out = await sh(sandbox, "cat /etc/resolv.conf; python3 dns.py")
    assert "nameserver 10.0.2.3" in out
    assert code == 0 and "DNS-ANSWER 1234" in out, out


@needs_slirp
async def test_internet_sandbox_cannot_change_its_own_routes(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(SandboxSpec(network=True))
    _, out = await sh(sandbox, "ip route del prohibit 10.0.0.0/8; ip route flush table main; ip route")
    assert "prohibit 10.0.0.0/8" in out and "prohibit 169.254.0.0/16" in out, out
    assert "Operation not permitted" in out


@needs_slirp
async def test_slirp4netns_ends_with_each_command(provider: LocalSandboxProvider) -> None:
    def slirps() -> set[int]:
        # Only this worker process's own: the other xdist worker may be running a networked sandbox right now.
        found = set()
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.name() == "slirp4netns":
                    found.add(child.pid)
        return found

    before = slirps()
    sandbox = await provider.create(SandboxSpec(network=True))
    code, _ = await sh(sandbox, "true")
    assert code == 0
    assert slirps() - before == set()


async def test_network_true_is_refused_without_slirp4netns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker without slirp4netns never falls back to its own namespace: it refuses, naming the package."""
    empty = tmp_path / "bin"
    empty.mkdir()
    provider = LocalSandboxProvider(tmp_path / "sandboxes")  # bwrap found first
    try:
        monkeypatch.setenv("PATH", str(empty))
        with pytest.raises(IsolationUnavailable, match="apt-get install -y slirp4netns"):
            await provider.create(SandboxSpec(network=True))
    finally:
        await provider.close()


async def test_network_is_refused_without_bubblewrap(tmp_path: Path) -> None:
    provider = LocalSandboxProvider(tmp_path / "sandboxes", bwrap=False)
    try:
        for rule in (True, {"allow": ["pypi.org"]}):
            with pytest.raises(IsolationUnavailable, match="needs bubblewrap"):
                await provider.create(SandboxSpec(network=rule, isolation="preferred"))
    finally:
        await provider.close()


# -- network: {allow: [...]} -----------------------------------------------------------------------------------------


async def test_allowlisted_sandbox_reaches_only_its_hosts_through_the_proxy(
    provider: LocalSandboxProvider, http_host: int, listener_all: Listener, temporal_address: str
) -> None:
    temporal_port = int(temporal_address.rpartition(":")[2])
    policy = NetworkPolicy(reachable=[f"127.0.0.1:{http_host}"])  # the test host stands in for a public one
    sandbox = await provider.create(SandboxSpec(network={"allow": ["localhost"]}, network_policy=policy))
    # NO_PROXY keeps the sandbox's own loopback direct; --noproxy '' sends "localhost" through the proxy.
    curl = "curl -sS -m 10 --noproxy ''"
    code, out = await sh(sandbox, f"{curl} http://localhost:{http_host}/plain")
    assert code == 0 and "hello from the test host" in out, out
    code, out = await sh(sandbox, f"{curl} -p http://localhost:{http_host}/tunnel")  # through CONNECT
    assert code == 0 and "hello from the test host" in out, out
    assert AllowedHost.requests == ["/plain", "/tunnel"]

    code, out = await sh(sandbox, f"{curl} -i http://example.com/")
    assert "403" in out and "not in this sandbox's network allowlist" in out, out
    code, out = await sh(sandbox, f"{curl} -i -p http://localhost:{temporal_port}/")  # Temporal: allowed name,
    assert code != 0 or "403" in out, out  # but an internal address and port the policy does not list
    code, out = await sh(sandbox, f"{curl} -i http://localhost:{listener_all.port}/")
    assert "403" in out and "internal" in out, out
    assert listener_all.accepted == 0
    refusals = (sandbox.state / "egress-refusals.log").read_text()
    assert "example.com:80" in refusals and f"localhost:{temporal_port}" in refusals


async def test_allowlisted_sandbox_cannot_bypass_the_proxy(
    provider: LocalSandboxProvider, http_host: int, listener_all: Listener, temporal_address: str
) -> None:
    policy = NetworkPolicy(reachable=[f"127.0.0.1:{http_host}"])
    sandbox = await provider.create(SandboxSpec(network={"allow": ["localhost"]}, network_policy=policy))
    targets = [f"127.0.0.1:{http_host}", temporal_address, "10.0.2.2:80", "169.254.169.254:80", "8.8.8.8:53"]
    if (own := worker_ipv4()) is not None:
        targets.append(f"{own}:{listener_all.port}")
    results = await probe(sandbox, *targets)
    assert not [t for t, r in results.items() if "CONNECTED" in r], results
    assert AllowedHost.requests == [] and listener_all.accepted == 0
    code, out = await sh(sandbox, "ip -o link")
    assert code == 0 and [line.split(":")[1].strip() for line in out.splitlines()] == ["lo"], out


async def test_an_allowlisted_sandbox_proxy_is_its_own(provider: LocalSandboxProvider, http_host: int) -> None:
    """Two sandboxes with different allowlists each get their own proxy, on the same port of their own loopback."""
    policy = NetworkPolicy(reachable=[f"127.0.0.1:{http_host}"])
    allowed = await provider.create(SandboxSpec(network={"allow": ["localhost"]}, network_policy=policy))
    other = await provider.create(SandboxSpec(network={"allow": ["pypi.org"]}, network_policy=policy))
    curl = f"curl -sS -m 10 --noproxy '' -i http://localhost:{http_host}/"
    (_, a), (_, b) = await sh(allowed, curl), await sh(other, curl)
    assert "hello from the test host" in a and "403" in b, (a, b)
