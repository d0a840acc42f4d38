"""Row 11 of the security review: what the worker leaves on its own disk.

Exec logs (a command's full output, kept until the activity stores it) were written raw and 0644 into the
sandbox's state folder: a step that echoes its secret left it readable by every local user, for as long as the
worker kept the file. The embedded Temporal server's SQLite file - every run's history - was 0644 too. Logs are
masked before a byte reaches the disk and created 0600; the server's folder is 0700 and its files 0600.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tardigrade.activities.sandbox import SandboxActivities
from tardigrade.activities.secrets import Redactor
from tardigrade.devserver import EmbeddedTemporal
from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.exec_log import ExecLog
from tardigrade.sandboxes.provider import SandboxSpec
from tests.security.helpers import tool_run

SECRET = "tok-9f8e7d6c5b4a39281706"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The usual 022: anything not made private on purpose comes out world-readable."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[tuple[LocalSandboxProvider, LocalSandbox]]:
    provider = LocalSandboxProvider(tmp_path / "sandboxes")
    assert provider.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    yield provider, await provider.create(SandboxSpec())
    await provider.close()


def logs_of(sandbox: LocalSandbox) -> list[Path]:
    return sorted(sandbox.state.rglob("exec-*.log"))


async def test_a_step_log_never_holds_a_secret_and_is_private(
    sandbox: tuple[LocalSandboxProvider, LocalSandbox], loose_umask: None
) -> None:
    _, box = sandbox
    # Enough output that the activity keeps the log; the secret also straddles the pipe's 64 KiB reads.
    command = 'head -c 65530 /dev/zero | tr "\\0" x; echo "$TOKEN"; i=0'
    command += '; while [ $i -lt 50 ]; do echo "$TOKEN"; i=$((i+1)); done'
    result = await box.exec(command, env={"TOKEN": SECRET}, timeout=30, tail_bytes=64, mask=Redactor([SECRET]))
    assert result.exit_code == 0 and result.log_path
    log = Path(result.log_path)
    assert mode(log) == 0o600, oct(mode(log))
    data = log.read_bytes()
    assert SECRET.encode() not in data, "the secret reached the worker's disk"
    assert SECRET[:8].encode() not in data and SECRET[-8:].encode() not in data, "part of the secret reached the disk"
    assert data.count(b"***") >= 51, "each occurrence is masked, the output is otherwise kept"


async def test_a_tool_exec_log_never_holds_a_secret(
    sandbox: tuple[LocalSandboxProvider, LocalSandbox], tmp_path: Path, loose_umask: None
) -> None:
    """Through the agent's exec tool: a long output is cut for the model, and its log kept on disk until stored."""
    provider, box = sandbox
    activities = SandboxActivities(
        shared_queue="shared", host_queue="host", state_dir=tmp_path / "state", providers={"local": provider}
    )
    run = tool_run(activities, provider, box, tmp_path, secrets={"TOKEN": SECRET})
    seen: list[bytes] = []
    real_exec = box.exec

    async def watching_exec(*args: object, **kwargs: object) -> object:
        result = await real_exec(*args, **kwargs)  # type: ignore[arg-type]
        if result.log_path and Path(result.log_path).exists():
            seen.append(Path(result.log_path).read_bytes())
            assert mode(Path(result.log_path)) == 0o600
        return result

    box.exec = watching_exec  # type: ignore[method-assign]
    await run.call("exec", '{"command": "seq 1 20000; echo $TOKEN; seq 1 20000"}')
    assert seen, "the exec left a log to inspect"
    assert all(SECRET.encode() not in data for data in seen), "the raw log held the secret"


def test_an_exec_log_stops_growing_at_its_limit(tmp_path: Path) -> None:
    log = ExecLog(tmp_path / "exec-x.log", Redactor([SECRET]), limit=1000)
    for _ in range(100):
        log.write(b"y" * 100)
    log.close()
    data = (tmp_path / "exec-x.log").read_bytes()
    assert data.startswith(b"y" * 1000) and b"was not kept" in data and len(data) < 1100


async def test_the_embedded_servers_files_are_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loose_umask: None
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    monkeypatch.setenv("TARDIGRADE_HOME", str(home))
    for case in ("new", "left 0644 by an older version"):
        server = EmbeddedTemporal(ui=False)
        try:
            await server.start()
            server.write_state_file()
            assert mode(home) == 0o700, f"{case}: {oct(mode(home))}"
            files = sorted(p for p in home.iterdir() if p.is_file())
            names = {p.name for p in files}
            assert {"temporal.db", "temporal.db.lock", "temporal-server.log", "server.json"} <= names, names
            loose = {p.name: oct(mode(p)) for p in files if mode(p) & 0o077}
            assert not loose, f"{case}: readable by other users: {loose}"
        finally:
            server.stop()
        for p in home.iterdir():
            p.chmod(0o644 if p.is_file() else 0o755)
        home.chmod(0o755)
