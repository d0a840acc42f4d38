"""Every failure an operator can expect prints one line that says what to do, exits 2, and never a traceback.

Each case runs the real `tardigrade` command in a subprocess, as a user would, against the real dev server where
one is needed; `--debug` is the only way to a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, Cli, WorkerProcess, free_port


def one_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The command failed the expected way: exit 2, one `error:` line on stderr naming each fragment."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    message = proc.stderr.strip()
    assert "\n" not in message, message
    assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


PIPELINE = "name: {name}\nsteps:\n  - {{name: hello, run: echo hello}}\n"


def pipeline_file(tmp_path: Path, name: str = "failures") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(PIPELINE.format(name=name))
    return path


# -- Temporal out of reach ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "run", "list", "logs", "cancel", "result", "worker"])
def test_an_unreachable_server_is_one_line(cli: Cli, tmp_path: Path, command: str) -> None:
    args = {"run": [str(pipeline_file(tmp_path))], "list": [], "worker": []}.get(command, ["some-run"])
    started = time.monotonic()
    proc = cli(command, *args, "--address", "127.0.0.1:1")
    one_line(proc, "cannot reach Temporal at 127.0.0.1:1", "connection refused", "tardigrade server")
    assert time.monotonic() - started < 20


def test_a_host_that_does_not_resolve_is_one_line(cli: Cli) -> None:
    one_line(cli("status", "x", "--address", "no-such-host.invalid:7233"), "does not resolve")


def test_debug_shows_the_traceback(cli: Cli) -> None:
    proc = cli("--debug", "status", "x", "--address", "127.0.0.1:1")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    proc = cli("status", "x", "--address", "127.0.0.1:1", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_a_silent_server_times_out_in_one_line(cli: Cli) -> None:
    """Something that accepts connections but never speaks gRPC: no 30-second hang, no transport dump."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        started = time.monotonic()
        proc = cli("list", "--address", f"127.0.0.1:{port}")
    one_line(proc, f"cannot reach Temporal at 127.0.0.1:{port}")
    assert time.monotonic() - started < 25


# -- runs that are not there, or cannot answer ---------------------------------------------------------------------


def test_unknown_runs_are_one_line(cli: Cli, temporal_address: str) -> None:
    for command in ("status", "result", "logs", "cancel"):
        one_line(cli(command, "no-such-run", "--address", temporal_address), "no-such-run", "tardigrade list")


def test_an_unknown_namespace_is_one_line(cli: Cli, temporal_address: str) -> None:
    one_line(cli("list", "--address", temporal_address, "--namespace", "no-such-ns"), "'no-such-ns' does not exist")


def test_status_of_a_run_without_a_worker_says_so_at_once(cli: Cli, temporal_address: str, tmp_path: Path) -> None:
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    started = cli("run", str(pipeline_file(tmp_path)), "--address", temporal_address, "--task-queue", queue, "--json")
    assert started.returncode == 0, started.stderr
    workflow_id = json.loads(started.stdout)["workflow_id"]
    began = time.monotonic()
    proc = cli("status", workflow_id, "--address", temporal_address)
    one_line(proc, "no worker polls its task queue", f"tardigrade worker --task-queue {queue}")
    # A 3 s query after a Python start and three calls: 5 s on an idle machine, up to twice that on a loaded one.
    assert time.monotonic() - began < 20, "no 30-second wait for a query nobody answers"
    one_line(cli("logs", workflow_id, "--address", temporal_address, "--step", "7"), "--step must be between 1 and 1")
    done = cli("cancel", workflow_id, "--address", temporal_address)
    assert done.returncode == 0 and "cancellation requested" in done.stdout, done.stderr


def test_cancelling_a_finished_run_is_one_line(
    cli: Cli, temporal_address: str, tmp_path: Path, worker_processes: Callable[..., WorkerProcess]
) -> None:
    queue = f"cancel-done-{uuid.uuid4().hex[:8]}"
    worker_processes(queue, "w").host_queue()
    done = cli(
        "run", str(pipeline_file(tmp_path)), "--address", temporal_address, "--task-queue", queue, "--wait", "--json"
    )
    assert done.returncode == 0, done.stderr
    workflow_id = json.loads(done.stdout)["workflow_id"]
    one_line(cli("cancel", workflow_id, "--address", temporal_address), "already completed", "nothing to cancel")


def test_a_run_id_that_exists_is_one_line(cli: Cli, temporal_address: str, tmp_path: Path) -> None:
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    args = ("run", str(pipeline_file(tmp_path)), "--address", temporal_address, "--task-queue", queue)
    workflow_id = f"dup-{uuid.uuid4().hex[:8]}"
    assert cli(*args, "--id", workflow_id).returncode == 0
    one_line(cli(*args, "--id", workflow_id), f"a run with id {workflow_id!r} already exists", "pick another --id")


# -- connection settings ---------------------------------------------------------------------------------------


def test_bad_client_config_is_one_line(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text('[profile.default]\naddress = "127.0.0.1:1"\n')
    one_line(cli("list", "--config-file", str(tmp_path / "missing.toml")), "missing.toml does not exist")
    one_line(cli("list", "--config-file", str(config), "--profile", "nope"), "profile 'nope'", "not found")
    broken = tmp_path / "broken.toml"
    broken.write_text("this is [ not toml\n")
    one_line(cli("list", "--config-file", str(broken)), "profile 'default'")
    tls = tmp_path / "tls.toml"
    tls.write_text(
        '[profile.default]\naddress = "127.0.0.1:1"\n[profile.default.tls]\nserver_ca_cert_path = "/no/ca.pem"\n'
    )
    one_line(cli("list", "--config-file", str(tls)), "cannot read TLS file /no/ca.pem")


# -- files and stores -------------------------------------------------------------------------------------------


def test_a_bad_pipeline_file_is_one_line(cli: Cli, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    one_line(cli("run", str(missing), "--address", "127.0.0.1:1"), str(missing))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps: [{name: a, run: b, retries: many}]\n")
    one_line(cli("run", str(bad), "--address", "127.0.0.1:1"), "steps[0].retries")


def test_snapshot_commands_refuse_a_missing_store_and_create_nothing(cli: Cli, tmp_path: Path) -> None:
    store = tmp_path / "no" / "such" / "store"
    for args in (("ls",), ("verify", "abcd"), ("restore", "abcd", str(tmp_path / "out")), ("gc", "--no-live-check")):
        one_line(cli("snapshot", *args, "--store", str(store)), f"there is no snapshot store at {store}")
        assert not store.exists() and not (tmp_path / "out").exists()


def test_snapshot_ids_that_are_malformed_missing_or_ambiguous(cli: Cli, tmp_path: Path) -> None:
    store = tmp_path / "store"
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    created = cli("snapshot", "create", str(folder), "--store", store.as_uri())
    assert created.returncode == 0, created.stderr
    snapshot_id = created.stdout.strip()

    one_line(cli("snapshot", "verify", "xyz!", "--store", str(store)), "'xyz!' is not a snapshot id")
    one_line(cli("snapshot", "verify", "abc", "--store", str(store)), "at least 4")
    other = "0" if snapshot_id[0] != "0" else "1"
    # What used to say CORRUPT: a well-formed id of a snapshot that is not there.
    one_line(cli("snapshot", "verify", other * 8, "--store", str(store)), f"no snapshot starting with {other * 8}")
    one_line(cli("snapshot", "verify", other * 64, "--store", str(store)), f"no snapshot {other * 64}")
    target = tmp_path / "restored"
    one_line(cli("snapshot", "restore", other * 64, str(target), "--store", str(store)), "tardigrade snapshot ls")
    assert not target.exists(), "a failed restore leaves no folder behind"

    # Two trees whose ids share a prefix (planted: real ones would need ~65,000 snapshots to collide on 4 digits).
    for twin in ("abcd" + "0" * 60, "abcd" + "1" * 60):
        (store / "trees" / "ab").mkdir(parents=True, exist_ok=True)
        (store / "trees" / "ab" / twin).write_bytes(b"")
    one_line(cli("snapshot", "verify", "abcd", "--store", str(store)), "abcd is ambiguous", "2 snapshots")


def test_a_second_server_on_the_same_database_is_refused(cli: Cli, tmp_path: Path) -> None:
    home = tmp_path / "server-home"
    env = {"TARDIGRADE_HOME": str(home)}
    first = subprocess.Popen(
        [sys.executable, "-m", "tardigrade.cli", "server", "--port", str(free_port()), "--ui-port", str(free_port())],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None
        line = first.stdout.readline()  # printed once the server answers
        assert "Temporal dev server on" in line, line + (first.stderr.read() if first.poll() is not None else "")
        state = json.loads((home / "server.json").read_text())
        again = cli("server", "--port", str(free_port()), env=env)
        one_line(again, "another Temporal dev server already uses", f"pid {state['pid']}", state["address"])
        assert json.loads((home / "server.json").read_text()) == state, "the first server's state file is intact"
        stopped = cli("server", "--stop", env=env)
        assert stopped.returncode == 0 and f"pid {state['pid']}" in stopped.stdout, stopped.stderr
        assert first.wait(timeout=30) == 0
    finally:
        if first.poll() is None:
            first.terminate()
            first.wait(timeout=30)
    one_line(cli("server", "--stop", env=env), "no `tardigrade server` is running")
