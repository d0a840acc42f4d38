"""Item 7 of the security issue, remote side: downloads out of a remote sandbox are bounded on the worker's disk.

The listing and the tar of changed files are helper files the sandbox produces; root inside it (a hostile image)
can make either any size. They were downloaded whole before anything looked at them: a 2 GiB sparse file in the
sandbox became 2 GiB on the worker's disk. Now each is sized in the sandbox first and refused past what it could
legitimately need (the tar: the sizes the listing announced; the listing: `MAX_LISTING_BYTES`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tardigrade.sandboxes.errors import SandboxError
from tardigrade.sandboxes.remote import RemoteSandbox
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tests.security.test_remote_mirror import SELECTION, engine, remote  # noqa: F401 - fixtures

HUGE = 2 << 30


def grow_after(sandbox: RemoteSandbox, doing_prefix: str, path_of: str) -> None:
    """After the helper command ``doing_prefix`` ran, root in the sandbox makes its output file HUGE (sparse)."""
    run_root = sandbox._run_root

    async def hostile_run_root(script: str, doing: str, *, timeout: float = 600) -> str:
        out = await run_root(script, doing, timeout=timeout)
        if doing.startswith(doing_prefix):
            target = script.rsplit(path_of, 1)[1].split()[0].rstrip(";")
            await run_root(f"truncate -s {HUGE} {target}", "growing a helper file", timeout=timeout)
        return out

    sandbox._run_root = hostile_run_root  # type: ignore[method-assign]


def largest_file(root: Path) -> int:
    return max((p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file()), default=0)


async def test_a_huge_listing_is_refused_before_it_is_downloaded(
    remote: RemoteSandbox,  # noqa: F811
    engine: SnapshotEngine,  # noqa: F811
) -> None:
    grow_after(remote, "listing ", ": > ")
    started = time.monotonic()
    with pytest.raises(SandboxError, match=r"listing .* more than"):
        await remote.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert time.monotonic() - started < 30
    assert largest_file(remote.state) < 64 << 20


async def test_a_huge_archive_of_changed_files_is_refused_before_it_is_downloaded(
    remote: RemoteSandbox,  # noqa: F811
    engine: SnapshotEngine,  # noqa: F811
) -> None:
    await remote.exec("echo hello > a.txt", env={}, timeout=60)
    grow_after(remote, "packing changed files", " -cf ")
    started = time.monotonic()
    with pytest.raises(SandboxError, match=r"archive of changed files .* more than"):
        await remote.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert time.monotonic() - started < 30
    assert largest_file(remote.state) < 64 << 20


@pytest.mark.parametrize("make", ["mkfifo pipe", "ln -s /dev/zero pipe"], ids=["fifo", "device-symlink"])
async def test_read_file_on_a_fifo_or_device_is_refused_promptly(
    remote: RemoteSandbox,  # noqa: F811
    make: str,
) -> None:
    """A FIFO with no writer made the read wait forever (the step's heartbeats kept it alive); a device never ends."""
    await remote.exec(make, env={}, timeout=60)
    started = time.monotonic()
    with pytest.raises(SandboxError, match="FIFO, socket or device"):
        await asyncio.wait_for(remote.read_file("pipe", limit=1 << 20), 30)
    assert time.monotonic() - started < 15
    await remote.exec("printf hello > ok", env={}, timeout=60)
    assert await remote.read_file("ok", limit=10) == b"hello", "regular files still read"
