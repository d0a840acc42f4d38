"""The local provider's isolation, for real: bubblewrap namespaces, a clean environment, a read-only host."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider, destroy_like_a_crash
from tardigrade.sandboxes.errors import IsolationUnavailable, SandboxError, SandboxLost
from tardigrade.sandboxes.provider import SandboxSpec
from tests.conftest import wait_for


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[LocalSandboxProvider]:
    p = LocalSandboxProvider(tmp_path / "sandboxes")
    assert p.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    yield p
    await p.close()


async def sh(sandbox: LocalSandbox, command: str, **kw: object) -> tuple[int, str]:
    result = await sandbox.exec(command, env=kw.pop("env", {}), timeout=kw.pop("timeout", 30), **kw)  # type: ignore[arg-type]
    return result.exit_code, result.output_tail.decode()


def marked_processes(mark: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if mark in " ".join(p.info["cmdline"] or [])]


async def test_commands_run_as_an_unprivileged_user_in_a_clean_environment(
    provider: LocalSandboxProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_ONLY_SECRET", "must-not-leak")
    sandbox = await provider.create(SandboxSpec())
    code, out = await sh(sandbox, "id -u; pwd; echo HOME=$HOME; env", env={"GIVEN": "yes"})
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "1000" and lines[1] == "/workspace" and lines[2] == "HOME=/home/sandbox"
    assert "GIVEN=yes" in out and "WORKER_ONLY_SECRET" not in out and "must-not-leak" not in out
    code, out = await sh(sandbox, "grep CapEff /proc/self/status")
    assert out.split()[1] == "0000000000000000", "no capabilities"


async def test_the_host_is_read_only_and_mostly_invisible(provider: LocalSandboxProvider, tmp_path: Path) -> None:
    sandbox = await provider.create(SandboxSpec())
    code, _ = await sh(sandbox, "touch /usr/evil")
    assert code != 0 and not Path("/usr/evil").exists()
    code, out = await sh(sandbox, f"ls {tmp_path} /root /work 2>&1; test -e /etc/shadow && echo shadow-visible")
    assert "shadow-visible" not in out and "No such file" in out
    code, _ = await sh(sandbox, "echo hi > /workspace/ok && echo hi > ~/ok")
    assert (
        code == 0 and (sandbox.fs / "workspace" / "ok").exists() and (sandbox.fs / "home" / "sandbox" / "ok").exists()
    )


async def test_tmp_is_private_to_each_command(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(SandboxSpec())
    mark = uuid.uuid4().hex
    assert (await sh(sandbox, f"echo x > /tmp/{mark}"))[0] == 0
    assert (await sh(sandbox, f"test -e /tmp/{mark}"))[0] != 0
    assert not Path(f"/tmp/{mark}").exists()


async def test_network_is_off_unless_the_pipeline_allows_it(provider: LocalSandboxProvider) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    probe = (
        f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')\""
    )
    try:
        closed = await provider.create(SandboxSpec(network=False))
        code, out = await sh(closed, probe)
        assert code != 0 and "connected" not in out
        if shutil.which("slirp4netns"):  # true: the internet, never the worker (tests/security/test_network.py)
            opened = await provider.create(SandboxSpec(network=True))
            code, out = await sh(opened, probe)
            assert code != 0 and "connected" not in out
    finally:
        listener.close()


async def test_a_timeout_kills_the_whole_process_tree(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(SandboxSpec())
    mark = "31.4159"
    result = await sandbox.exec(f"sleep {mark} & sleep {mark} & sleep {mark}", env={}, timeout=1)
    assert result.timed_out
    # Killed processes take a moment to go on a loaded machine; unkilled ones would sleep 31 s.
    await wait_for(lambda: marked_processes(mark) == [], timeout=15)


async def test_cancelling_a_command_kills_it(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(SandboxSpec())
    mark = "27.1828"
    task = asyncio.create_task(sandbox.exec(f"sleep {mark}", env={}, timeout=60))
    await wait_for(lambda: marked_processes(mark), timeout=30)  # bubblewrap can take seconds to start under load
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: marked_processes(mark) == [], timeout=15)  # an unkilled one would sleep 27 s


async def test_output_is_streamed_and_the_tail_is_bounded(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(SandboxSpec())
    chunks: list[bytes] = []
    result = await sandbox.exec("seq 100000", env={}, timeout=30, on_output=chunks.append, tail_bytes=100)
    assert (
        result.output_bytes == sum(len(c) for c in chunks) == len(b"".join(f"{i}\n".encode() for i in range(1, 100001)))
    )
    assert len(result.output_tail) == 100 and result.output_tail.endswith(b"99999\n100000\n")
    assert result.log_path and Path(result.log_path).stat().st_size == result.output_bytes


async def test_a_destroyed_sandbox_is_reported_lost(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(SandboxSpec())

    async def destroy_soon() -> None:
        await asyncio.sleep(0.3)
        await destroy_like_a_crash(sandbox)

    killer = asyncio.create_task(destroy_soon())
    with pytest.raises(SandboxLost, match="folder on the worker is gone"):
        await sandbox.exec("sleep 10", env={}, timeout=30)
    await killer
    with pytest.raises(SandboxLost):
        await provider.attach(sandbox.id)


async def test_file_helpers_refuse_symlinks_out_of_the_sandbox(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, "ln -s /etc escape")
    with pytest.raises(SandboxError, match="symlink"):
        await sandbox.write_file("escape/evil", b"x")
    with pytest.raises(SandboxError, match="symlink"):
        await sandbox.read_file("escape/passwd")
    await sandbox.write_file("fine/ok.txt", b"ok")
    assert await sandbox.read_file("/workspace/fine/ok.txt") == b"ok"


async def test_isolation_required_refuses_without_bubblewrap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    provider = LocalSandboxProvider(tmp_path / "sb", bwrap=False)
    with pytest.raises(IsolationUnavailable, match="apt-get install -y bubblewrap"):
        await provider.create(SandboxSpec(isolation="required"))
    with caplog.at_level(logging.WARNING):
        sandbox = await provider.create(SandboxSpec(isolation="preferred"))
    assert "UNISOLATED" in caplog.text
    code, out = await sh(sandbox, "echo $WORKSPACE; pwd")
    assert code == 0 and out.split() == [str(sandbox.fs / "workspace")] * 2
    await provider.close()


async def test_sandboxes_of_a_dead_worker_are_swept_at_startup(tmp_path: Path) -> None:
    root = tmp_path / "sb"
    dead = LocalSandboxProvider(root, worker_id="dead-worker")
    sandbox = await dead.create(SandboxSpec())
    dead._lock_file.close()  # the process "dies" without cleaning up: its lock is released by the kernel
    alive = LocalSandboxProvider(root, worker_id="alive-worker")
    assert alive.removed_orphans == 1 and not sandbox.dir.exists()
    keep = await alive.create(SandboxSpec())
    third = LocalSandboxProvider(root, worker_id="third")
    assert third.removed_orphans == 0 and keep.dir.exists(), "a live worker's sandboxes are left alone"
    await alive.close()
    await third.close()
    assert os.listdir(root) == [".workers"] or sorted(os.listdir(root)) == [".workers"]
