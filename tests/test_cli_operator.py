"""The commands an operator reaches for, against the real dev server and real workers: `run --wait` with its
progress, Ctrl-C and no-worker hints, `list`, `logs` (live and from the store), `cancel`, snapshot prefixes and
listings, and connection settings from Temporal's client config - including TLS and an API key, through a
TLS-terminating proxy in front of the dev server."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tardigrade.client import connect
from tests.conftest import REPO, Cli, WorkerProcess
from tests.test_cli_failures import one_line


def write_pipeline(tmp_path: Path, name: str, steps: list[dict[str, Any]], **extra: Any) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "steps": steps, **extra}))
    return path


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc.stdout


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- run --wait ------------------------------------------------------------------------------------------------


def test_run_wait_shows_id_link_and_progress_and_numbers_steps_from_one(
    cli: Cli, temporal_address: str, tmp_path: Path, worker_processes: Callable[..., WorkerProcess]
) -> None:
    queue = unique("wait")
    worker_processes(queue, "w").host_queue()
    name = unique("numbers")
    store = (tmp_path / "store").as_uri()
    path = write_pipeline(
        tmp_path,
        name,
        [{"name": "first", "run": "echo 1 > one.txt"}, {"name": "second", "run": "echo 2 > two.txt"}],
        manifest={"files": [{"path": "seed.txt", "content": "seed"}]},
    )
    args = ("--address", temporal_address)
    env = {"TARDIGRADE_WEB_UI": "http://ui.example:8233"}
    out = ok(cli("run", str(path), *args, "--task-queue", queue, "--store", store, "--wait", env=env)).splitlines()
    workflow_id = out[0].split()[1]
    assert out[0] == f"started {workflow_id} on task queue {queue}"
    assert out[1] == f"  Web UI: http://ui.example:8233/namespaces/default/workflows/{workflow_id}"
    assert out[2:4] == ["  step  1/2 · first ✓", "  step  2/2 · second ✓"]
    assert f"{workflow_id}: completed, 2/2 steps" in "\n".join(out)

    result = json.loads(ok(cli("result", workflow_id, *args, "--json")))
    assert [c["step"] for c in result["checkpoints"]] == ["seed", 1, 2]
    status = ok(cli("status", workflow_id, *args))
    assert "completed, 2/2 steps" in status

    listing = ok(cli("snapshot", "ls", "--store", store, "--pipeline", name)).splitlines()
    assert listing[0].split() == ["ID", "CREATED", "PIPELINE", "RUN", "STEP", "FILES", "SIZE"]
    rows = [line.split() for line in listing[1:]]
    # id, date, time, pipeline, run, step, files, size: the Manifest's files, the state after setup, and 2 steps
    assert sorted(r[5] for r in rows) == ["1", "2", "seed", "seed"], listing
    assert all(r[1][:2] == "20" and r[3] == name and r[4] in (workflow_id, "-") for r in rows), listing
    run_rows = ok(cli("snapshot", "ls", "--store", store, "--run", workflow_id)).splitlines()[1:]
    assert len(run_rows) == 3 and all(workflow_id in r for r in run_rows)
    assert "no snapshots with pipeline=nope" in ok(cli("snapshot", "ls", "--store", store, "--pipeline", "nope"))

    final = result["final_snapshot"]
    short = final[:12]
    assert any(r.startswith(short) for r in run_rows), "ls shows ids as 12-character prefixes"
    verified = ok(cli("snapshot", "verify", short[:6], "--store", store))
    assert verified.startswith(f"{final}: OK")
    restored = tmp_path / "restored"
    ok(cli("snapshot", "restore", short, str(restored), "--store", store))
    assert (restored / "workspace" / "two.txt").read_text() == "2\n"


def _read_lines(stream: Any, into: list[tuple[float, str]]) -> threading.Thread:
    def pump() -> None:
        for line in iter(stream.readline, ""):
            into.append((time.monotonic(), line.rstrip("\n")))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _wait_for_line(lines: list[tuple[float, str]], fragment: str, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for at, line in list(lines):
            if fragment in line:
                return at
        time.sleep(0.1)
    raise AssertionError(f"no line with {fragment!r} in {lines}")


# The CLI as `python -m tardigrade.cli` runs it, with Ctrl-C handled as in a terminal. A pytest started in the
# background by a script (`pytest ... &`, as CI runners and stress loops do) ignores SIGINT, every child inherits
# that, and Python then never raises KeyboardInterrupt: the command would wait for ever (seen: 3 of 3 such runs).
CLI_WITH_CTRL_C = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
    " runpy.run_module('tardigrade.cli', run_name='__main__', alter_sys=True)"
)


def test_run_wait_without_a_worker_says_so_and_ctrl_c_says_how_to_follow(
    cli: Cli, temporal_address: str, tmp_path: Path
) -> None:
    queue = unique("nobody")
    path = write_pipeline(tmp_path, unique("orphan"), [{"name": "one", "run": "true"}])
    home = tmp_path / "home"
    argv = ["run", str(path), "--address", temporal_address, "--task-queue", queue, "--wait"]
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI_WITH_CTRL_C, *argv],
        cwd=REPO,
        # A command that hangs after Ctrl-C dumps its threads' stacks on SIGABRT, so the failure says where.
        env={**os.environ, "TARDIGRADE_HOME": str(home), "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[tuple[float, str]] = []
    err: list[tuple[float, str]] = []
    threads = [_read_lines(proc.stdout, out), _read_lines(proc.stderr, err)]
    _wait_for_line(out, "started ")
    _wait_for_line(err, f"no worker is polling task queue '{queue}'")
    workflow_id = out[0][1].split()[1]
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        proc.wait()
        for thread in threads:
            thread.join(timeout=5)
        pytest.fail("still running 30 s after Ctrl-C; its output:\n" + "\n".join(line for _, line in out + err))
    assert code == 130
    for thread in threads:
        thread.join(timeout=5)
    said = "\n".join(line for _, line in err)
    assert "Traceback" not in said
    assert f"run {workflow_id} goes on without this command" in said
    assert f"tardigrade logs {workflow_id} --follow --address {temporal_address}" in said
    assert f"tardigrade cancel {workflow_id} --address {temporal_address}" in said

    # The run is still there, waiting; `cancel` asks it to stop.
    running = json.loads(ok(cli("list", "--address", temporal_address, "--status", "running", "--json")))
    assert workflow_id in [r["workflow_id"] for r in running]
    assert "cancellation requested" in ok(cli("cancel", workflow_id, "--address", temporal_address))
    assert asyncio.run(_cancel_requested(temporal_address, workflow_id))


async def _cancel_requested(address: str, workflow_id: str) -> bool:
    client = await connect(address)
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.HasField("workflow_execution_cancel_requested_event_attributes"):
            return True
    return False


# -- list ------------------------------------------------------------------------------------------------------


def test_list_filters_by_pipeline_and_status(
    cli: Cli, temporal_address: str, tmp_path: Path, worker_processes: Callable[..., WorkerProcess]
) -> None:
    queue = unique("list")
    worker_processes(queue, "w").host_queue()
    done_name, waiting_name = unique("listed-done"), unique("listed-waiting")
    args = ("--address", temporal_address)
    done = write_pipeline(tmp_path, done_name, [{"name": "one", "run": "true"}])
    done_id = json.loads(ok(cli("run", str(done), *args, "--task-queue", queue, "--wait", "--json")))["workflow_id"]
    waiting = write_pipeline(tmp_path, waiting_name, [{"name": "one", "run": "true"}])
    waiting_id = json.loads(ok(cli("run", str(waiting), *args, "--task-queue", unique("none"), "--json")))[
        "workflow_id"
    ]

    def listed(*filters: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(ok(cli("list", *args, *filters, "--json")))
        return rows

    deadline = time.monotonic() + 30  # visibility may trail the run by a moment
    while time.monotonic() < deadline and not listed("--pipeline", done_name, "--status", "completed"):
        time.sleep(0.3)
    rows = listed("--pipeline", done_name)
    assert [(r["workflow_id"], r["status"], r["steps"]) for r in rows] == [(done_id, "completed", 1)]
    assert [r["workflow_id"] for r in listed("--pipeline", waiting_name, "--status", "running")] == [waiting_id]
    assert listed("--pipeline", waiting_name, "--status", "completed") == []
    assert len(listed("--limit", "1")) == 1

    table = ok(cli("list", *args, "--pipeline", done_name)).splitlines()
    assert table[0].split() == ["WORKFLOW", "ID", "PIPELINE", "STATUS", "STARTED", "DURATION"]
    assert table[1].split()[:3] == [done_id, done_name, "completed"]
    assert "no runs with pipeline=nope" in ok(cli("list", *args, "--pipeline", "nope"))


# -- logs ------------------------------------------------------------------------------------------------------


def test_logs_follow_prints_a_step_live_and_the_full_log_from_the_store(
    cli: Cli, temporal_address: str, tmp_path: Path, worker_processes: Callable[..., WorkerProcess]
) -> None:
    queue = unique("logs")
    worker_processes(queue, "w", {"LOG_TOKEN": "hunter2-secret"}).host_queue()
    path = write_pipeline(
        tmp_path,
        unique("logs"),
        [
            # 12 s of ticks: the follower (a Python process started after the run) may take seconds to attach on a
            # loaded machine, and must still see the step running for a while after.
            {"name": "ticks", "run": 'for i in $(seq 12); do echo "tick $i $LOG_TOKEN"; sleep 1; done'},
            {"name": "long", "run": "seq 1 5000"},
        ],
        manifest={"secrets": ["LOG_TOKEN"]},
        timeouts={"heartbeat": "2s"},
    )
    args = ("--address", temporal_address)
    store = (tmp_path / "store").as_uri()
    workflow_id = json.loads(ok(cli("run", str(path), *args, "--task-queue", queue, "--store", store, "--json")))[
        "workflow_id"
    ]
    follower = subprocess.Popen(
        [sys.executable, "-m", "tardigrade.cli", "logs", workflow_id, "--follow", *args],
        cwd=REPO,
        env={**os.environ, "TARDIGRADE_HOME": str(tmp_path / "home")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[tuple[float, str]] = []
    reader = _read_lines(follower.stdout, lines)
    first_tick = _wait_for_line(lines, "tick 1")
    step_end = _wait_for_line(lines, "── exit 0")
    assert step_end - first_tick > 2, "the first ticks were printed while the step still ran"
    assert follower.wait(timeout=90) == 0, follower.stderr.read() if follower.stderr else ""
    reader.join(timeout=5)
    text = [line for _, line in lines]
    ticks = [line for line in text if line.startswith("tick")]
    assert ticks == [f"tick {i} ***" for i in range(1, 13)], "each line once, in order, the secret masked"
    assert "hunter2-secret" not in "\n".join(text)
    assert text[-1] == f"── run {workflow_id} completed"
    numbers = text[text.index("── step 2/2 · long ──") + 1 : -2]
    assert numbers == [str(i) for i in range(1, 5001)], "the whole output, read back from the store"

    # Afterwards, one step alone: only its output on stdout (the headers go to stderr).
    long_step = cli("logs", workflow_id, *args, "--step", "2")
    assert ok(long_step) == "".join(f"{i}\n" for i in range(1, 5001))
    assert "── step 2/2 · long ──" in long_step.stderr
    first = ok(cli("logs", workflow_id, *args, "--step", "1"))
    assert first.splitlines() == ticks


# -- connection settings from Temporal's client config ---------------------------------------------------------


def test_a_profile_file_and_temporal_variables_reach_the_dev_server(
    cli: Cli, temporal_address: str, tmp_path: Path
) -> None:
    name = unique("profiled")
    config = tmp_path / "temporal.toml"
    config.write_text(
        f'[profile.default]\naddress = "127.0.0.1:1"\n\n[profile.local]\naddress = "{temporal_address}"\n'
        'namespace = "default"\n'
    )
    path = write_pipeline(tmp_path, name, [{"name": "one", "run": "true"}])
    started = json.loads(
        ok(cli("run", str(path), "--config-file", str(config), "--profile", "local", "--task-queue", "x", "--json"))
    )
    rows = json.loads(ok(cli("list", "--config-file", str(config), "--profile", "local", "--pipeline", name, "--json")))
    assert [r["workflow_id"] for r in rows] == [started["workflow_id"]]
    # The same through the environment, as Temporal's own tools read it.
    env = {"TEMPORAL_CONFIG_FILE": str(config), "TEMPORAL_PROFILE": "local"}
    assert (
        json.loads(ok(cli("list", "--pipeline", name, "--json", env=env)))[0]["workflow_id"] == started["workflow_id"]
    )
    ok(cli("list", "--json", env={"TEMPORAL_ADDRESS": temporal_address}))
    # The default profile points nowhere: the message says where the address came from.
    one_line(cli("list", "--config-file", str(config)), "127.0.0.1:1 (from profile 'default')")
    one_line(cli("list", env={"TEMPORAL_ADDRESS": "127.0.0.1:1"}), "(from TEMPORAL_ADDRESS)")


class TlsProxy:
    """TLS (with ALPN h2) in front of the plaintext dev server, recording the HTTP/2 headers clients send, so a test
    can see that TLS settings and the API key really reached the wire."""

    def __init__(self, upstream: str, folder: Path) -> None:
        self.upstream_host, _, port = upstream.rpartition(":")
        self.upstream_port = int(port)
        self.ca, cert, key = _certificates(folder)
        self.headers: list[dict[str, str]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cert, key), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self, cert: Path, key: Path) -> None:
        import ssl

        asyncio.set_event_loop(self._loop)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        context.set_alpn_protocols(["h2"])

        async def start() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, inspect=True), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, inspect: bool = False) -> None:
        frames = _HeaderFrames(self.headers) if inspect else None
        try:
            while data := await reader.read(65536):
                if frames is not None:
                    frames.feed(data)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


class _HeaderFrames:
    """Just enough HTTP/2 to read the header blocks a client sends (HPACK-decoded)."""

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(self, sink: list[dict[str, str]]) -> None:
        import hpack

        self.decoder = hpack.Decoder()
        self.buffer = b""
        self.block = b""
        self.sink = sink
        self.preface_seen = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        if not self.preface_seen:
            if len(self.buffer) < len(self.PREFACE):
                return
            self.buffer = self.buffer[len(self.PREFACE) :]
            self.preface_seen = True
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                return
            kind, flags, payload = self.buffer[3], self.buffer[4], self.buffer[9 : 9 + length]
            self.buffer = self.buffer[9 + length :]
            if kind == 0x1:  # HEADERS: strip padding and priority
                if flags & 0x8:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & 0x20:
                    payload = payload[5:]
                self.block = payload
            elif kind == 0x9:  # CONTINUATION
                self.block += payload
            else:
                continue
            if flags & 0x4:  # END_HEADERS
                decoded = self.decoder.decode(self.block)
                self.sink.append({str(k): str(v) for k, v in decoded})


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost/127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tardigrade test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture
def tls_proxy(temporal_address: str, tmp_path: Path) -> Iterator[TlsProxy]:
    proxy = TlsProxy(temporal_address, tmp_path)
    yield proxy
    proxy.close()


def test_tls_and_an_api_key_from_a_profile_reach_the_server(cli: Cli, tls_proxy: TlsProxy, tmp_path: Path) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text(
        f'[profile.cloud]\naddress = "{tls_proxy.address}"\nnamespace = "default"\napi_key = "tardigrade-test-key"\n'
        f'[profile.cloud.tls]\nserver_name = "localhost"\nserver_ca_cert_path = "{tls_proxy.ca}"\n\n'
        f'[profile.untrusted]\naddress = "{tls_proxy.address}"\n[profile.untrusted.tls]\nserver_name = "localhost"\n'
    )
    ok(cli("list", "--config-file", str(config), "--profile", "cloud", "--json"))
    sent = [h for h in tls_proxy.headers if h.get(":path", "").startswith("/temporal.api.workflowservice")]
    assert sent, "requests went through the TLS endpoint"
    assert all(h.get("authorization") == "Bearer tardigrade-test-key" for h in sent)
    # The same settings from TEMPORAL_* variables.
    env = {
        "TEMPORAL_ADDRESS": tls_proxy.address,
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(tls_proxy.ca),
        "TEMPORAL_TLS_SERVER_NAME": "localhost",
        "TEMPORAL_API_KEY": "from-the-environment",
    }
    ok(cli("list", "--json", env=env))
    assert tls_proxy.headers[-1].get("authorization") == "Bearer from-the-environment"
    # Without the CA the server's certificate is not trusted; without TLS the server hangs up.
    one_line(cli("list", "--config-file", str(config), "--profile", "untrusted"), "TLS certificate is not trusted")
    one_line(cli("list", "--address", tls_proxy.address), f"cannot reach Temporal at {tls_proxy.address}")


def test_live_output_is_redacted_and_cut_on_character_boundaries() -> None:
    """What a running step's heartbeats carry (`logs --follow` prints it): never a secret, even one split across
    chunks, never half a character, and offsets that say exactly which bytes of the redacted output it holds."""
    from tardigrade.activities.contract import LIVE_TAIL_BYTES
    from tardigrade.activities.sandbox import LiveOutput
    from tardigrade.activities.secrets import Redactor

    live = LiveOutput(Redactor(["s3cr3t-value"]))
    for chunk in (b"key=s3cr", b"3t-value ", "é".encode()[:1]):
        live.feed(chunk)
    progress = live.progress()
    # The last len(secret) - 1 bytes are held back: they may be the start of a secret split across chunks.
    assert progress.tail == "" and progress.tail_end == 0 and progress.output_bytes == 18
    live.feed("é".encode()[1:] + "ü".encode() * LIVE_TAIL_BYTES)
    progress = live.progress()
    data = progress.tail.encode()
    assert "\ufffd" not in progress.tail, "no character cut in two at either end"
    assert len(data) == progress.tail_end - progress.tail_start <= LIVE_TAIL_BYTES
    full = "key=*** é".encode() + "ü".encode() * LIVE_TAIL_BYTES
    assert full[progress.tail_start : progress.tail_end] == data
