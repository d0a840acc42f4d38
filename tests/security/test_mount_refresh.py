"""Refreshing a read-write data mount whose folder the sandbox has been writing into.

The local provider binds an ``rw`` mount's folder on the worker into the sandbox, so the sandbox can put anything
there - in particular symlinks to host paths. A refresh (every rollback does one, to undo the mount's writes)
makes the folder equal the source again: it must replace what the sandbox planted, never write, create or delete
anything through it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.manifest import Mount
from tardigrade.sandboxes.mounts import open_source
from tardigrade.sandboxes.provider import SandboxSpec


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[LocalSandbox]:
    provider = LocalSandboxProvider(tmp_path / "sandboxes")
    assert provider.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    yield await provider.create(SandboxSpec())
    await provider.close()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "dataset"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.csv").write_text("a\n")
    (root / "top.csv").write_text("top\n")
    return root


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A host folder the sandbox should never be able to make the worker touch."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "keep.txt").write_text("host data\n")
    return folder


async def sh(sandbox: LocalSandbox, command: str) -> str:
    result = await sandbox.exec(command, env={}, timeout=30)
    assert result.exit_code == 0, result.output_tail
    return result.output_tail.decode()


async def refresh(sandbox: LocalSandbox, mount: Mount) -> None:
    await sandbox.mount(0, mount, open_source(mount, 0))


RW = "/home/sandbox/scratch"


async def test_a_folder_swapped_for_a_symlink_is_not_written_through(
    sandbox: LocalSandbox, dataset: Path, victim: Path
) -> None:
    mount = Mount(source=dataset.as_uri(), path=RW, mode="rw")
    await refresh(sandbox, mount)
    await sh(sandbox, f"rm -rf ~/scratch/sub && ln -s {victim} ~/scratch/sub")
    (dataset / "sub" / "b.csv").write_text("b\n")  # something new to download, too
    await refresh(sandbox, mount)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"], "the refresh wrote through the symlink"
    assert (victim / "keep.txt").read_text() == "host data\n"
    out = await sh(sandbox, "test -d ~/scratch/sub && test ! -L ~/scratch/sub && cat ~/scratch/sub/*.csv")
    assert out == "a\nb\n", "the mount is back to its source"


async def test_a_file_swapped_for_a_symlink_is_replaced_not_followed(
    sandbox: LocalSandbox, dataset: Path, victim: Path
) -> None:
    mount = Mount(source=dataset.as_uri(), path=RW, mode="rw")
    await refresh(sandbox, mount)
    await sh(sandbox, f"ln -sf {victim}/keep.txt ~/scratch/top.csv")
    await refresh(sandbox, mount)
    assert (victim / "keep.txt").read_text() == "host data\n"
    assert await sh(sandbox, "test ! -L ~/scratch/top.csv && cat ~/scratch/top.csv") == "top\n"


async def test_cleaning_up_deletes_planted_symlinks_not_what_they_point_at(
    sandbox: LocalSandbox, dataset: Path, victim: Path
) -> None:
    mount = Mount(source=dataset.as_uri(), path=RW, mode="rw")
    await refresh(sandbox, mount)
    await sh(sandbox, f"ln -s {victim} ~/scratch/planted && mkdir -p ~/scratch/new && ln -s {victim} ~/scratch/new/l")
    await refresh(sandbox, mount)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    listing = await sh(sandbox, "cd ~/scratch && find . -mindepth 1 | sort")
    assert listing.split() == ["./sub", "./sub/a.csv", "./top.csv"], listing
