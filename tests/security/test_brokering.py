"""Credential brokering: a brokered secret never exists inside the sandbox, yet requests to its hosts carry it.

Real parts throughout: loopback HTTPS test hosts (Python's http.server behind TLS, with certificates from a test
CA of their own) record what they receive; `curl` is the client; the broker terminates TLS with the sandbox's CA
and opens verified TLS to the test host. The first tests drive the broker through a minimal CONNECT front of
their own (the egress proxy's job), so the broker's HTTP handling is tested on its own; the end-to-end tests run
`curl` inside a real bubblewrap sandbox and then search its environment, files, process memory and snapshots for
any byte of the value.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from tardigrade.activities.sandbox import SandboxActivities
from tardigrade.activities.secrets import Redactor, ResolvedSecrets, resolve_secrets
from tardigrade.client import start_pipeline
from tardigrade.pipeline import parse_pipeline
from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.errors import IsolationUnavailable
from tardigrade.sandboxes.manifest import SecretForHosts
from tardigrade.sandboxes.network.broker import (
    CA_BUNDLE_PATH,
    Broker,
    BrokeredSecret,
    HostSecret,
    new_placeholder,
)
from tardigrade.sandboxes.network.ca import SandboxCA
from tardigrade.sandboxes.network.policy import NetworkPolicy
from tardigrade.sandboxes.network.rules import NetworkRule
from tardigrade.sandboxes.policy import AppliedPolicy, PolicyViolation, WorkerPolicy
from tardigrade.sandboxes.provider import SandboxSpec
from tardigrade.sandboxes.snapshots import Selection, SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tests.conftest import InProcessWorkers, pipeline_from
from tests.history import history_json
from tests.security.helpers import tool_run

VALUE = "ghp_" + uuid.uuid4().hex + "Zq"  # 38 bytes; tests search for any 6-byte piece of it
# Loopback test hosts by address: a sandbox's NO_PROXY keeps localhost and 127.0.0.1 to its own loopback, and no
# other name resolves to loopback everywhere.
API_HOST = "127.0.0.2"  # the brokered "api" host
OTHER_HOST = "127.0.0.3"  # a host the secret is not for

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (apt-get install -y curl)")


def pieces(value: str = VALUE, size: int = 6) -> set[bytes]:
    return {value[i : i + size].encode() for i in range(len(value) - size + 1)}


def holds_value(data: bytes) -> bool:
    return any(p in data for p in pieces())


# -- loopback HTTPS test hosts -------------------------------------------------------------------------------------


class LoopbackHost:
    """A loopback HTTPS server that records every request (method, path, headers, body) it receives."""

    def __init__(self, name: str, ca: SandboxCA) -> None:
        self.name = name
        self.requests: list[dict[str, object]] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                else:
                    body = self.rfile.read(length)
                record = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                          "body": body.decode(errors="replace")}  # fmt: skip
                host.requests.append(record)
                if self.path.startswith("/echo"):  # a debugging endpoint that reflects the request's headers
                    reply = json.dumps(record).encode()
                else:
                    authorized = self.headers.get("Authorization") == f"Bearer {VALUE}"
                    reply = json.dumps({"host": host.name, "authorized": authorized, "bytes": len(body)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((name, 0), Handler)
        self.server.daemon_threads = True
        context = ca.server_context(name)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackHost, LoopbackHost, Path]]:
    """The "api" host (brokered), another host (not brokered), and the test CA file that verifies both."""
    test_ca = SandboxCA([API_HOST, OTHER_HOST])
    ca_file = tmp_path_factory.mktemp("test-ca") / "test-ca.pem"
    ca_file.write_bytes(test_ca.cert_pem)
    api, other = LoopbackHost(API_HOST, test_ca), LoopbackHost(OTHER_HOST, test_ca)
    yield api, other, ca_file
    api.close()
    other.close()


# -- a minimal CONNECT front (the egress proxy's part), for testing the broker on its own --------------------------


class ConnectFront:
    """Answers CONNECT, then hands brokered hosts to the broker and tunnels every other host byte for byte."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tunnels = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, authority, _ = head.split(b"\r\n")[0].decode().split(" ")
        assert method == "CONNECT"
        host, port = authority.rsplit(":", 1)
        self.tunnels += 1
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        if self.broker.handles(host, int(port)):
            await self.broker.serve(reader, writer, host, int(port))
            return
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def front(
    hosts: tuple[LoopbackHost, LoopbackHost, Path], tmp_path: Path
) -> AsyncIterator[tuple[ConnectFront, BrokeredSecret, Path]]:
    _api, _other, test_ca = hosts
    secret = BrokeredSecret("GITHUB_TOKEN", VALUE, new_placeholder(), (API_HOST,))
    sandbox_ca = SandboxCA(secret.hosts)
    bundle = sandbox_ca.write_bundle(tmp_path / "bundle.pem")
    # The sandbox's side trusts the sandbox CA (for the brokered host) and the test CA (to reach the other host
    # directly through the tunnel, as it would reach any real host).
    bundle.write_bytes(bundle.read_bytes() + test_ca.read_bytes())
    f = ConnectFront(Broker([secret], sandbox_ca, upstream_ca_file=test_ca))
    await f.start()
    yield f, secret, bundle
    await f.close()


async def curl(front: ConnectFront, bundle: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", "--proxy", f"http://127.0.0.1:{front.port}", "--cacert", str(bundle),
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode or 0, out, err)


@needs_curl
async def test_brokered_host_gets_the_value_and_other_hosts_the_placeholder(
    front: tuple[ConnectFront, BrokeredSecret, Path], hosts: tuple[LoopbackHost, LoopbackHost, Path]
) -> None:
    f, secret, bundle = front
    api, other, _ = hosts
    auth = f"Authorization: Bearer {secret.placeholder}"
    done = await curl(f, bundle, "-H", auth, f"https://{API_HOST}:{api.port}/user")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"host": API_HOST, "authorized": True, "bytes": 0}
    assert api.requests[-1]["headers"]["Authorization"] == f"Bearer {VALUE}"  # type: ignore[index]

    done = await curl(f, bundle, "-H", auth, f"https://{OTHER_HOST}:{other.port}/collect")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["authorized"] is False
    assert other.requests[-1]["headers"]["Authorization"] == f"Bearer {secret.placeholder}"  # type: ignore[index]
    assert not holds_value(json.dumps(other.requests).encode())


@needs_curl
async def test_keep_alive_bodies_and_basic_auth(
    front: tuple[ConnectFront, BrokeredSecret, Path], hosts: tuple[LoopbackHost, LoopbackHost, Path], tmp_path: Path
) -> None:
    """Several requests on one connection, a Content-Length body, a chunked body streamed from a file, and
    ``Authorization: Basic`` (git's and pip's form) all arrive intact, with the value swapped in headers only."""
    f, secret, bundle = front
    api, _, _ = hosts
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 3_000_000)
    url = f"https://{API_HOST}:{api.port}"
    before, tunnels = len(api.requests), f.tunnels
    done = await curl(
        f, bundle, "-H", f"Authorization: Bearer {secret.placeholder}",
        "--data-binary", f"body keeps {secret.placeholder}", f"{url}/a",
        "--next", "--cacert", str(bundle), "--proxy", f"http://127.0.0.1:{f.port}",
        "-H", "Transfer-Encoding: chunked", "-H", f"Authorization: Bearer {secret.placeholder}",
        "-T", str(big), f"{url}/b",
        "--next", "--cacert", str(bundle), "--proxy", f"http://127.0.0.1:{f.port}",
        "-u", f"x-access-token:{secret.placeholder}", f"{url}/c",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f.tunnels == tunnels + 1  # one connection, kept alive for all three
    a, b, c = api.requests[before:]
    assert a["body"] == f"body keeps {secret.placeholder}"  # bodies are not touched
    assert a["headers"]["Authorization"] == f"Bearer {VALUE}"  # type: ignore[index]
    assert b["method"] == "PUT" and b["body"] == "x" * 3_000_000
    assert b["headers"]["Authorization"] == f"Bearer {VALUE}"  # type: ignore[index]
    basic = c["headers"]["Authorization"]  # type: ignore[index]
    assert base64.b64decode(basic.split()[1]).decode() == f"x-access-token:{VALUE}"


@needs_curl
async def test_an_echoed_value_is_masked_on_the_way_back(
    front: tuple[ConnectFront, BrokeredSecret, Path], hosts: tuple[LoopbackHost, LoopbackHost, Path]
) -> None:
    f, secret, bundle = front
    api, _, _ = hosts
    done = await curl(
        f, bundle, "-H", f"Authorization: Bearer {secret.placeholder}", f"https://{API_HOST}:{api.port}/echo"
    )
    assert done.returncode == 0, done.stderr
    assert api.requests[-1]["headers"]["Authorization"] == f"Bearer {VALUE}"  # type: ignore[index]
    assert not holds_value(done.stdout)
    assert json.loads(done.stdout)["headers"]["Authorization"] == "Bearer " + "*" * len(VALUE)


def _raw_tls_exchange(port: int, bundle: Path, tunnel_host: str, tunnel_port: int, request: bytes) -> bytes:
    """CONNECT through the front, TLS with the sandbox CA, send ``request`` as is, return all that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        raw.sendall(f"CONNECT {tunnel_host}:{tunnel_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cafile=str(bundle))
        with context.wrap_socket(raw, server_hostname=tunnel_host) as tls:
            tls.sendall(request)
            out = b""
            with contextlib.suppress(OSError):
                while data := tls.recv(65536):
                    out += data
            return out


@pytest.mark.parametrize(
    ("name", "request_bytes", "status"),
    [
        ("domain fronting", b"GET / HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {p}\r\n\r\n", b"421"),
        (
            "absolute-form",
            b"GET https://evil.example/ HTTP/1.1\r\nHost: {h}\r\nAuthorization: Bearer {p}\r\n\r\n",
            b"421",
        ),
        ("second Host", b"GET / HTTP/1.1\r\nHost: {h}\r\nHost: evil.example\r\nX: {p}\r\n\r\n", b"400"),
        (
            "smuggling CL+TE",
            b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n"
            b"X: {p}\r\n\r\n0\r\n\r\n",
            b"400",
        ),
        ("folded header", b"GET / HTTP/1.1\r\nHost: {h}\r\nX: a\r\n  {p}\r\n\r\n", b"400"),
        ("huge head", b"GET / HTTP/1.1\r\nHost: {h}\r\nX: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"505"),
    ],
)
async def test_requests_that_could_carry_the_value_elsewhere_are_refused(
    front: tuple[ConnectFront, BrokeredSecret, Path],
    hosts: tuple[LoopbackHost, LoopbackHost, Path],
    name: str,
    request_bytes: bytes,
    status: bytes,
) -> None:
    f, secret, bundle = front
    api, _, _ = hosts
    before = len(api.requests)
    request = request_bytes.replace(b"{p}", secret.placeholder.encode())
    request = request.replace(b"{h}", f"{API_HOST}:{api.port}".encode())
    out = await asyncio.to_thread(_raw_tls_exchange, f.port, bundle, API_HOST, api.port, request)
    assert out.startswith(b"HTTP/1.1 " + status), (name, out[:200])
    assert len(api.requests) == before, f"{name}: the request reached the host"


async def test_the_sandbox_ca_can_sign_for_its_hosts_only(tmp_path: Path) -> None:
    """Name constraints: even the CA's own key could not make a certificate another host's clients accept."""
    from cryptography import x509

    ca = SandboxCA(["api.github.com", "*.example.org", "10.1.2.3"])
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    assert {str(getattr(s, "value", s)) for s in constraints.permitted_subtrees or []} == {
        "api.github.com", "example.org", "10.1.2.3/32",
    }  # fmt: skip
    bundle = ca.write_bundle(tmp_path / "bundle.pem")
    text = bundle.read_text()
    assert text.count("BEGIN CERTIFICATE") > 1 and ca.cert_pem.decode() in text  # system roots + the sandbox CA
    assert "PRIVATE KEY" not in text


# -- end to end: curl inside a real bubblewrap sandbox, through the real egress proxy ------------------------------


@pytest.fixture
async def brokered_sandbox(
    tmp_path: Path, hosts: tuple[LoopbackHost, LoopbackHost, Path]
) -> AsyncIterator[tuple[LocalSandbox, dict[str, str]]]:
    """A sandbox whose network allows only the other host (by IP), with GITHUB_TOKEN brokered for the api host;
    the worker policy lets it reach the two loopback test hosts (which it otherwise could not)."""
    api, other, test_ca = hosts
    provider = LocalSandboxProvider(tmp_path / "sandboxes", broker_upstream_ca=test_ca)
    assert provider.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    policy = NetworkPolicy(reachable=[f"{API_HOST}:{api.port}", f"{OTHER_HOST}:{other.port}"])
    spec = SandboxSpec(network=NetworkRule.parse({"allow": [OTHER_HOST]}), network_policy=policy)
    sandbox = await provider.create(spec)
    env = await sandbox.broker_secrets([HostSecret("GITHUB_TOKEN", VALUE, (API_HOST,))])
    yield sandbox, env
    await provider.close()


def sandbox_processes(marker: str) -> list[psutil.Process]:
    """The processes whose environment holds ``marker`` (a placeholder only sandbox commands have)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if marker.encode() in Path(f"/proc/{proc.pid}/environ").read_bytes():
                found.append(proc)
    return found


def memory_of(pid: int) -> bytes:
    """Every readable mapping of a process, read from the worker through /proc/<pid>/mem (what gcore would dump)."""
    out = bytearray()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "[vsyscall]" in line:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            with contextlib.suppress(OSError, ValueError, OverflowError):
                mem.seek(start)
                out += mem.read(end - start)
    return bytes(out)


def files_holding_value(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                if holds_value(path.read_bytes()):
                    hits.append(str(path))
    return hits


@needs_curl
async def test_curl_in_a_sandbox_gets_the_value_to_the_api_and_nowhere_else(
    brokered_sandbox: tuple[LocalSandbox, dict[str, str]],
    hosts: tuple[LoopbackHost, LoopbackHost, Path],
    tmp_path: Path,
) -> None:
    sandbox, env = brokered_sandbox
    api, other, _ = hosts
    placeholder = env["GITHUB_TOKEN"]
    assert placeholder.startswith("tardigrade-brokered-") and not holds_value(placeholder.encode())

    # The step: curl with the token from the environment, to the api host.
    call_api = f'curl -sS --max-time 20 -H "Authorization: Bearer $GITHUB_TOKEN" https://{API_HOST}:{api.port}/user'
    done = await sandbox.exec(call_api, env=env, timeout=60)
    assert done.exit_code == 0, done.output_tail
    assert json.loads(done.output_tail) == {"host": API_HOST, "authorized": True, "bytes": 0}
    assert api.requests[-1]["headers"]["Authorization"] == f"Bearer {VALUE}"  # type: ignore[index]

    # wget reads no CA variable, only the system's bundle: the sandbox sees its bundle there too.
    if shutil.which("wget"):
        call_api = f'wget -q -O - --header "Authorization: Bearer $GITHUB_TOKEN" https://{API_HOST}:{api.port}/user'
        done = await sandbox.exec(call_api, env=env, timeout=60)
        assert done.exit_code == 0, done.output_tail
        assert json.loads(done.output_tail)["authorized"] is True

    # The same header to a host the secret is not for: that host sees the placeholder, nothing more.
    call_other = f'curl -sSk --max-time 20 -H "Authorization: Bearer $GITHUB_TOKEN" https://{OTHER_HOST}:{other.port}/x'
    done = await sandbox.exec(call_other, env=env, timeout=60)
    assert done.exit_code == 0, done.output_tail
    assert other.requests[-1]["headers"]["Authorization"] == f"Bearer {placeholder}"  # type: ignore[index]
    assert not holds_value(json.dumps(other.requests).encode())

    # A step that prints its environment shows only the placeholder (and the CA bundle it trusts).
    done = await sandbox.exec("env; cat $SSL_CERT_FILE | tail -c 2000", env=env, timeout=60)
    printed = done.output_tail.decode()
    assert f"GITHUB_TOKEN={placeholder}" in printed and f"SSL_CERT_FILE={CA_BUNDLE_PATH}" in printed
    assert not holds_value(done.output_tail)

    # The bundle is readable but not writable, and is not in the sandbox's files.
    done = await sandbox.exec(f"echo x >> {CA_BUNDLE_PATH}", env=env, timeout=60)
    assert done.exit_code != 0
    assert not list(sandbox.fs.rglob("ca-bundle.pem"))

    # A process that made brokered requests (one echoing the headers back) and is still alive: its memory,
    # read from the worker, holds no byte of the value.
    script = (
        "import os, sys, time, urllib.request\n"
        "for path in ('/user', '/echo'):\n"
        f"    request = urllib.request.Request('https://{API_HOST}:{api.port}' + path)\n"
        "    request.add_header('Authorization', 'Bearer ' + os.environ['GITHUB_TOKEN'])\n"
        "    print(urllib.request.urlopen(request, timeout=20).read().decode(), flush=True)\n"
        "print('READY', flush=True)\n"
        "time.sleep(60)\n"
    )
    await sandbox.write_file("/workspace/client.py", script.encode())
    output = bytearray()
    running = asyncio.ensure_future(sandbox.exec("python3 client.py", env=env, timeout=90, on_output=output.extend))
    try:
        for _ in range(300):
            if b"READY" in output or running.done():
                break
            await asyncio.sleep(0.1)
        assert b"READY" in output, bytes(output) + (running.result().output_tail if running.done() else b"")
        assert b'"authorized": true' in output and not holds_value(bytes(output))
        processes = sandbox_processes(placeholder)
        assert any("python3" in " ".join(p.cmdline()) for p in processes), processes
        for proc in processes:
            memory = memory_of(proc.pid)
            assert placeholder.encode() in memory  # the dump is real: it does hold what the process was given
            assert not holds_value(memory), f"process {proc.pid} ({proc.name()}) holds part of the value"
    finally:
        await sandbox.kill_processes()
        with contextlib.suppress(BaseException):
            await running

    # Nothing the sandbox owns on the worker (its files, logs, CA bundle) and no snapshot holds it.
    assert files_holding_value(sandbox.dir) == []
    store = tmp_path / "store"
    engine = SnapshotEngine(open_store(store.as_uri()), scratch_dir=tmp_path / "scratch")
    info = await sandbox.snapshot(engine, selection=Selection(roots=("workspace", "home")), parent=None, labels={})
    assert files_holding_value(store) == []
    restored = tmp_path / "restored"
    engine.restore(info.id, restored)
    assert (restored / "workspace" / "client.py").exists()
    assert files_holding_value(restored) == []


# -- a whole pipeline on a real Temporal dev server ---------------------------------------------------------------


@needs_curl
async def test_a_pipeline_with_a_brokered_secret_never_holds_its_value(
    workers: InProcessWorkers,
    hosts: tuple[LoopbackHost, LoopbackHost, Path],
    tmp_path: Path,
    local_store: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's test as a user runs it: `secrets: [{name: GITHUB_TOKEN, hosts: [...]}]`, a step that curls the
    api with the token, one that sends it elsewhere, one that prints its environment. The api got the value; the
    history, the step outputs, the snapshots and the sandbox's files got the placeholder at most."""
    api, other, test_ca = hosts
    monkeypatch.setenv("GITHUB_TOKEN", VALUE)  # the in-process worker's environment
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        f"file_roots: [{str(tmp_path.parent.resolve())!r}]\n"
        f"network: {{reachable: ['{API_HOST}:{api.port}', '{OTHER_HOST}:{other.port}']}}\n"
    )
    monkeypatch.setenv("TARDIGRADE_POLICY", str(policy_file))
    loaded = pipeline_from(
        {
            "name": "brokered",
            "sandbox": {"network": {"allow": [OTHER_HOST]}},
            "manifest": {"secrets": [{"name": "GITHUB_TOKEN", "hosts": [API_HOST]}]},
            "steps": [
                {
                    "name": "call the api",
                    "run": f'curl -sS --max-time 20 -H "Authorization: Bearer $GITHUB_TOKEN"'
                    f" https://{API_HOST}:{api.port}/user | tee api.json",
                },
                {
                    "name": "send it elsewhere",
                    "run": f'curl -sSk --max-time 20 -H "Authorization: Bearer $GITHUB_TOKEN"'
                    f" https://{OTHER_HOST}:{other.port}/collect",
                },
                {"name": "print the environment", "run": "env | sort | tee env.txt"},
            ],
        },
        tmp_path,
    )
    provider = LocalSandboxProvider(workers.home / "sandboxes", broker_upstream_ca=test_ca)
    client = await workers.start(providers={"local": provider})
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    result = await handle.result()
    assert result.status == "completed", result

    assert api.requests[-1]["headers"]["Authorization"] == f"Bearer {VALUE}"  # type: ignore[index]
    sent_elsewhere = other.requests[-1]["headers"]["Authorization"]  # type: ignore[index]
    assert isinstance(sent_elsewhere, str) and sent_elsewhere.startswith("Bearer tardigrade-brokered-")
    placeholder = sent_elsewhere.split()[1]
    history = await history_json(client, handle.id)
    assert not holds_value(history.encode())
    assert re.search(r"authorized\W+true", history), "the api step's output (in history) says it was authorized"
    assert f"GITHUB_TOKEN={placeholder}" in history, "a step that prints its environment shows the placeholder"
    workspace = tmp_path / "final"
    SnapshotEngine(open_store(result.store)).restore(result.final_snapshot, workspace)
    assert f"GITHUB_TOKEN={placeholder}" in (workspace / "workspace" / "env.txt").read_text()
    assert files_holding_value(Path(local_store.removeprefix("file://"))) == []
    assert files_holding_value(workspace) == []
    assert files_holding_value(workers.home) == []  # sandboxes' folders, logs, caches on the worker


# -- declaring, resolving and refusing brokered secrets ------------------------------------------------------------


@pytest.mark.parametrize(
    ("secrets", "says"),
    [
        ([{"name": "GITHUB_TOKEN", "hosts": []}], "hosts"),
        ([{"name": "GITHUB_TOKEN", "hosts": ["https://api.github.com/"]}], "a URL or path is not a host"),
        ([{"name": "GITHUB_TOKEN", "hosts": ["api.github.com:443"]}], "ports are not part of a host rule"),
        ([{"name": "GITHUB_TOKEN"}], "hosts"),
        (["GITHUB_TOKEN", {"name": "GITHUB_TOKEN", "hosts": ["api.github.com"]}], "listed more than once"),
        ([{"name": "bad-name", "hosts": ["api.github.com"]}], "name"),
    ],
)
def test_bad_brokered_secrets_are_refused_with_a_clear_message(secrets: list[object], says: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_pipeline({"name": "p", "manifest": {"secrets": secrets}, "steps": [{"name": "a", "run": "true"}]})
    message = str(refused.value)
    assert "secrets" in message and says in message, message


def test_both_forms_load_and_the_redactor_masks_values_not_placeholders(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = parse_pipeline(
        {
            "name": "p",
            "manifest": {"secrets": ["PLAIN_TOKEN", {"name": "GITHUB_TOKEN", "hosts": ["API.github.com", "*.x.org"]}]},
            "steps": [{"name": "a", "run": "true"}],
        }
    )
    assert pipeline.manifest.secret_names == ["PLAIN_TOKEN", "GITHUB_TOKEN"]
    assert pipeline.manifest.brokered_secrets == [
        SecretForHosts(name="GITHUB_TOKEN", hosts=["api.github.com", "*.x.org"])
    ]
    monkeypatch.setenv("PLAIN_TOKEN", "plain-" + uuid.uuid4().hex)
    monkeypatch.setenv("GITHUB_TOKEN", VALUE)
    resolved = resolve_secrets(pipeline.manifest.secrets)
    assert set(resolved.plain) == {"PLAIN_TOKEN"} and [b.name for b in resolved.brokered] == ["GITHUB_TOKEN"]
    assert VALUE not in repr(resolved.brokered)
    placeholder = new_placeholder()
    redactor = Redactor(resolved.values)
    assert redactor.text(f"{placeholder} {VALUE} {resolved.plain['PLAIN_TOKEN']}") == f"{placeholder} *** ***"


async def test_remote_providers_refuse_brokered_secrets() -> None:
    """E2B and Modal sandboxes cannot reach the worker's proxy: a brokered secret fails the step, naming why."""
    from tardigrade.sandboxes.e2b import E2BSandbox
    from tardigrade.sandboxes.modal import ModalSandbox

    resolved = ResolvedSecrets({}, (HostSecret("GITHUB_TOKEN", VALUE, (API_HOST,)),))
    for cls in (E2BSandbox, ModalSandbox):
        sandbox = object.__new__(cls)  # the refusal comes before anything of a live sandbox is touched
        with pytest.raises(ApplicationError) as refused:
            await resolved.env_for(sandbox)
        assert refused.value.type == "SecretBrokeringUnavailable" and refused.value.non_retryable
        assert cls.provider in str(refused.value) and "local provider" in str(refused.value)
        assert VALUE not in str(refused.value)


async def test_brokering_needs_bubblewrap(tmp_path: Path) -> None:
    """Without bubblewrap a command would share the worker's network: brokering refuses instead."""
    provider = LocalSandboxProvider(tmp_path / "sandboxes", bwrap=False)
    try:
        sandbox = await provider.create(SandboxSpec(isolation="preferred"))
        with pytest.raises(IsolationUnavailable, match="bubblewrap"):
            await sandbox.broker_secrets([HostSecret("GITHUB_TOKEN", VALUE, (API_HOST,))])
    finally:
        await provider.close()


@pytest.mark.parametrize(
    ("network_policy", "rule"),
    [({"modes": ["off", "internet"]}, "network.modes"), ({"hosts": ["*.example.com"]}, "network.hosts")],
)
def test_the_worker_policy_treats_brokered_hosts_as_an_allowlist(network_policy: dict[str, object], rule: str) -> None:
    """A brokered secret opens its hosts to the sandbox (through the proxy): a worker that allows no allowlists,
    or only some hosts, refuses it before any step, naming the secret's field."""
    applied = AppliedPolicy.for_worker(
        WorkerPolicy.model_validate({"network": network_policy}), state_dirs=[], own_stores=[]
    )
    secrets = ["PLAIN", SecretForHosts(name="GITHUB_TOKEN", hosts=["api.github.com"])]
    with pytest.raises(PolicyViolation) as refused:
        applied.check_brokered(secrets, NetworkRule("off"))
    assert refused.value.field == "manifest.secrets[1].hosts" and refused.value.rule == rule
    applied.check_brokered(["PLAIN"], NetworkRule("off"))  # plain names open nothing
    applied.check_brokered(secrets, NetworkRule("internet"))  # already reaches every public host


@needs_curl
async def test_an_agent_tool_call_reaches_the_api_with_the_value_and_sees_only_the_placeholder(
    brokered_sandbox: tuple[LocalSandbox, dict[str, str]],
    hosts: tuple[LoopbackHost, LoopbackHost, Path],
    tmp_path: Path,
) -> None:
    """The issue's test through the agent's exec tool: what the model reads back holds the placeholder at most."""
    sandbox, env = brokered_sandbox
    api, _, _ = hosts
    activities = SandboxActivities(
        shared_queue="shared", host_queue="host", state_dir=tmp_path / "state", providers={"local": sandbox._provider}
    )
    run = tool_run(activities, sandbox._provider, sandbox, tmp_path, env, [VALUE])
    command = (
        f'curl -sS --max-time 20 -H "Authorization: Bearer $GITHUB_TOKEN" https://{API_HOST}:{api.port}/user;'
        f' curl -sS --max-time 20 -H "X-Token: $GITHUB_TOKEN" https://{API_HOST}:{api.port}/echo; env'
    )
    output = await ActivityEnvironment().run(run.call, "exec", json.dumps({"command": command}))
    assert output.ok, output.text
    assert '"authorized": true' in output.text
    assert f"GITHUB_TOKEN={env['GITHUB_TOKEN']}" in output.text
    assert api.requests[-1]["headers"]["X-Token"] == VALUE  # type: ignore[index]
    assert not holds_value(output.text.encode()) and not holds_value(output.preview.encode())


@needs_curl
async def test_brokering_with_internet_access(tmp_path: Path, hosts: tuple[LoopbackHost, LoopbackHost, Path]) -> None:
    """``network: true`` (slirp4netns) plus a brokered secret: clients that use the proxy get the value added;
    a direct connection (no proxy) reaches nothing internal, and would carry the placeholder anyway."""
    api, _, test_ca = hosts
    provider = LocalSandboxProvider(tmp_path / "sandboxes", broker_upstream_ca=test_ca)
    try:
        policy = NetworkPolicy(reachable=[f"{API_HOST}:{api.port}"])
        sandbox = await provider.create(SandboxSpec(network=NetworkRule.parse(True), network_policy=policy))
        env = await sandbox.broker_secrets([HostSecret("GITHUB_TOKEN", VALUE, (API_HOST,))])
        url = f"https://{API_HOST}:{api.port}/user"
        done = await sandbox.exec(
            f'curl -sS --max-time 20 -H "Authorization: Bearer $GITHUB_TOKEN" {url}', env=env, timeout=60
        )
        assert done.exit_code == 0, done.output_tail
        assert json.loads(done.output_tail)["authorized"] is True
        done = await sandbox.exec(f"curl -sS --noproxy '*' --max-time 5 {url}", env=env, timeout=60)
        assert done.exit_code != 0, "a direct connection to the worker's loopback must fail"
    finally:
        await provider.close()
