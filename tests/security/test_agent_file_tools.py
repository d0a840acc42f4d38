"""An agent's read_file / write_file / make_dirs against a local sandbox whose files the sandbox itself shaped.

The tools run on the worker, in its event loop, on paths inside the sandbox's folder - which the sandbox's
processes write as they like. A FIFO, a socket or a device there must be refused at once with an error that says
what it is (the worker's event loop serves every other activity: one blocked ``open()`` freezes the worker), a
huge file must be read only as far as asked, and a symlink anywhere on the path must never make the worker read,
write or create anything outside the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tardigrade.activities.sandbox import SandboxActivities
from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.errors import SandboxError
from tardigrade.sandboxes.limits import Limits
from tardigrade.sandboxes.provider import SandboxSpec
from tests.security.helpers import tool_run

T = TypeVar("T")


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[LocalSandbox]:
    provider = LocalSandboxProvider(tmp_path / "sandboxes")
    assert provider.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    # Room for the 200G sparse files these tests plant (a sandbox's default disk limit is 20GiB).
    yield await provider.create(SandboxSpec(limits=Limits(disk=1 << 40)))
    await provider.close()


async def sh(sandbox: LocalSandbox, command: str) -> str:
    result = await sandbox.exec(command, env={}, timeout=30)
    assert result.exit_code == 0, result.output_tail
    return result.output_tail.decode()


# The longest the event loop may seem to stall while a call is refused: a loop blocked in open() stalls until the
# unblocker fires; a loaded 2-core machine can deschedule a healthy one for a few hundred ms.
STALL_BOUND = 2.0


@contextlib.contextmanager
def unblocker(fifo: Path, after: float = 8.0) -> Iterator[threading.Event]:
    """If the code under test blocks in open() on ``fifo`` (freezing the event loop, so no asyncio timeout can
    fire), open the other end from a thread after ``after`` seconds so the test ends - and report that it had to.
    A blocked open() waits forever, so ``after`` is long (a refusal that is merely slow on a loaded machine must not
    count as blocked), but shorter than `responsive`'s timeout (so an open() blocked on a thread is released too)."""
    fired = threading.Event()
    done = threading.Event()

    def watch() -> None:
        if not done.wait(after):
            fired.set()
            # Opening both ends wakes a blocked open(); closing at once makes the read see EOF, the write EPIPE.
            os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield fired
    finally:
        done.set()
        thread.join()


async def responsive(call: Awaitable[T]) -> tuple[T | BaseException, float]:
    """Run ``call`` while a ticker measures the longest time the event loop was unavailable."""
    longest = 0.0
    stop = asyncio.Event()

    async def tick() -> None:
        nonlocal longest
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.02)
    try:
        result: Any = await asyncio.wait_for(call, 10)
    except Exception as e:
        result = e
    finally:
        stop.set()
        await ticker
    return result, longest


# -- row 5: FIFOs, sockets and devices must not block the worker --------------------------------------------------


async def test_read_file_on_a_fifo_is_refused_promptly_without_freezing_the_worker(sandbox: LocalSandbox) -> None:
    await sh(sandbox, "mkfifo pipe")
    with unblocker(sandbox.fs / "workspace" / "pipe") as fired:
        outcome, stalled = await responsive(sandbox.read_file("pipe", limit=100))
    assert not fired.is_set(), "read_file blocked the event loop in open() on a FIFO"
    assert isinstance(outcome, SandboxError) and "FIFO" in str(outcome) and "pipe" in str(outcome), outcome
    assert stalled < STALL_BOUND


async def test_write_file_on_a_fifo_is_refused_promptly_without_freezing_the_worker(sandbox: LocalSandbox) -> None:
    await sh(sandbox, "mkfifo pipe")
    with unblocker(sandbox.fs / "workspace" / "pipe") as fired:
        outcome, stalled = await responsive(sandbox.write_file("pipe", b"hello"))
    assert not fired.is_set(), "write_file blocked the event loop in open() on a FIFO"
    assert isinstance(outcome, SandboxError) and "FIFO" in str(outcome), outcome
    assert stalled < STALL_BOUND
    assert stat.S_ISFIFO(os.lstat(sandbox.fs / "workspace" / "pipe").st_mode), "left as it was"


async def test_a_socket_in_the_sandbox_is_refused_with_a_clear_error(sandbox: LocalSandbox) -> None:
    await sh(sandbox, "python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('sock')\"")
    for call in (sandbox.read_file("sock"), sandbox.write_file("sock", b"x")):
        outcome, _ = await responsive(call)
        assert isinstance(outcome, SandboxError) and "socket" in str(outcome), outcome


async def test_a_device_node_is_refused(sandbox: LocalSandbox) -> None:
    """A sandbox cannot make device nodes (no CAP_MKNOD in its user namespace), but a folder restored or shared
    from elsewhere might hold one: reading /dev/zero-alikes must not be how the worker learns that."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(sandbox.fs / "workspace" / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    outcome, _ = await responsive(sandbox.read_file("zero", limit=1 << 20))
    assert isinstance(outcome, SandboxError) and "device" in str(outcome), outcome


async def test_a_huge_sparse_file_is_read_only_as_far_as_asked(sandbox: LocalSandbox) -> None:
    await sh(sandbox, "truncate -s 200G huge")
    outcome, stalled = await responsive(sandbox.read_file("huge", limit=1 << 20))
    assert outcome == b"\0" * (1 << 20)
    assert stalled < STALL_BOUND


# -- row 9: no folder is created on the host through a planted symlink --------------------------------------------


async def test_write_file_creates_no_folder_through_a_planted_symlink(sandbox: LocalSandbox, tmp_path: Path) -> None:
    host = tmp_path / "host-folder"
    host.mkdir()
    await sh(sandbox, f"ln -s {host} escape")
    with pytest.raises(SandboxError, match="symlink"):
        await sandbox.write_file("escape/made/by/the/worker/evil.txt", b"x")
    assert list(host.iterdir()) == [], "the worker created folders on the host through the symlink"


async def test_make_dirs_creates_no_folder_through_a_planted_symlink(sandbox: LocalSandbox, tmp_path: Path) -> None:
    host = tmp_path / "host-folder"
    host.mkdir()
    await sh(sandbox, f"mkdir -p a && ln -s {host} a/escape")
    with pytest.raises(SandboxError, match="symlink"):
        await sandbox.make_dirs("a/escape/new")
    assert list(host.iterdir()) == []


async def test_a_symlink_as_the_file_itself_is_neither_read_nor_written(sandbox: LocalSandbox, tmp_path: Path) -> None:
    secret = tmp_path / "worker-secret.txt"
    secret.write_text("worker only")
    await sh(sandbox, f"ln -s {secret} link")
    with pytest.raises(SandboxError, match="symlink"):
        await sandbox.read_file("link")
    with pytest.raises(SandboxError, match="symlink"):
        await sandbox.write_file("link", b"overwritten")
    assert secret.read_text() == "worker only"


async def test_apply_patch_refuses_a_huge_file_and_reads_only_a_bounded_part(
    sandbox: LocalSandbox, tmp_path: Path
) -> None:
    """A sandbox can make a sparse file of any size in an instant; the patch tool must not read it all."""
    provider = LocalSandboxProvider(tmp_path / "other")  # only for SandboxActivities' bookkeeping
    activities = SandboxActivities(
        shared_queue="shared", host_queue="host", state_dir=tmp_path / "state", providers={"local": provider}
    )
    await sh(sandbox, "truncate -s 200G huge.txt")
    asked: list[int | None] = []
    read = sandbox.read_file

    async def recording_read(path: str, *, limit: int | None = None) -> bytes:
        asked.append(limit)
        return await read(path, limit=limit)

    sandbox.read_file = recording_read  # type: ignore[method-assign]
    run = tool_run(activities, provider, sandbox, tmp_path)
    patch = "*** Begin Patch\n*** Update File: huge.txt\n@@\n-a\n+b\n*** End Patch"
    started = time.monotonic()
    output = await run.call("apply_patch", json.dumps({"patch": patch}))
    assert not output.ok and "larger than" in output.text, output.text
    assert time.monotonic() - started < 5
    assert asked and all(limit is not None and limit <= 64 << 20 for limit in asked), asked
    await provider.close()


async def test_ordinary_files_still_work(sandbox: LocalSandbox) -> None:
    await sandbox.write_file("new/deep/file.txt", b"hello", mode=0o755)
    assert await sandbox.read_file("/workspace/new/deep/file.txt") == b"hello"
    assert await sandbox.read_file("new/deep/file.txt", limit=2) == b"he"
    assert await sh(sandbox, "stat -c %a new/deep/file.txt; cat new/deep/file.txt") == "755\nhello"
    await sandbox.write_file("new/deep/file.txt", b"hi")
    assert await sandbox.read_file("new/deep/file.txt") == b"hi", "rewritten, not appended"
    await sandbox.make_dirs("~/.config/tool")
    assert (sandbox.fs / "home" / "sandbox" / ".config" / "tool").is_dir()
    with pytest.raises(FileNotFoundError):
        await sandbox.read_file("missing.txt")
    with pytest.raises(IsADirectoryError):
        await sandbox.read_file("new")
