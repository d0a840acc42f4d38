"""Overlay upper layers (sandboxes/overlay.py) in real bubblewrap: the ChangeSet a step's upper layer yields, a
checkpoint through the overlay equal to one taken by walking, a rollback that drops exactly the attempt, an upper
layer crafted to escape or mislead the merge, and the fallbacks."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.overlay import OverlayLayers, probe
from tardigrade.sandboxes.provider import SandboxSpec
from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.stores import FileStore

EVERYTHING = Selection(roots=("workspace", "home/sandbox"))

SETUP = """
mkdir -p d/sub keep moved_dir/inner ro && echo a > d/sub/f && echo same > keep/s && echo m > mod
echo gone > del && echo r > ren && echo k > kind_file && mkdir kind_dir && echo x > kind_dir/x
echo i > moved_dir/inner/i && ln -s /etc/passwd link && echo c > chm && echo h > ~/h && echo hm > ~/hmod
"""
STEP = """
echo new > new && echo changed >> mod && rm del && mv ren renamed && rm kind_file && mkdir kind_file
echo y > kind_file/y && rm -r kind_dir && echo now-a-file > kind_dir && mv moved_dir moved_to
ln -sfn /usr relinked && chmod 600 chm && echo n > d/sub/n && echo more >> ~/hmod && rm ~/h
"""
STEP_CHANGES = {
    "workspace/new", "workspace/mod", "workspace/del", "workspace/ren", "workspace/renamed", "workspace/kind_file",
    "workspace/kind_dir", "workspace/moved_dir", "workspace/moved_to", "workspace/relinked", "workspace/chm",
    "workspace/d/sub/n", "home/sandbox/hmod", "home/sandbox/h",
}  # fmt: skip


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[LocalSandboxProvider]:
    p = LocalSandboxProvider(tmp_path / "sandboxes", worker_id="overlay")
    assert p.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    assert p.overlay, f"this kernel refuses unprivileged overlayfs: {probe(p.bwrap)}"
    yield p
    await p.close()


@pytest.fixture
async def walking(tmp_path: Path) -> AsyncIterator[LocalSandboxProvider]:
    p = LocalSandboxProvider(tmp_path / "walking", worker_id="walking", overlay=False)
    yield p
    await p.close()


@pytest.fixture
def engine(tmp_path: Path) -> SnapshotEngine:
    return SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch")


async def sh(sandbox: LocalSandbox, command: str) -> str:
    result = await sandbox.exec(command, env={}, timeout=60)
    assert result.exit_code == 0, result.output_tail.decode()
    return result.output_tail.decode()


async def checkpoint(sandbox: LocalSandbox, engine: SnapshotEngine, parent: str | None = None) -> str:
    info = await sandbox.snapshot(engine, selection=EVERYTHING, parent=parent, labels={})
    return info.id


async def pending(sandbox: LocalSandbox, parent: str) -> ChangeSet | None:
    await asyncio.to_thread(sandbox._settle)
    return sandbox._changes_since(parent, EVERYTHING)


def listing(root: Path) -> dict[str, tuple[str, int, str]]:
    out: dict[str, tuple[str, int, str]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes().hex())
    return out


async def test_the_upper_layer_yields_exactly_the_paths_a_step_changed(
    provider: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, SETUP)
    base = await checkpoint(sandbox, engine)
    assert sandbox.overlay is not None and not sandbox.overlay.has_changes()
    await sh(sandbox, STEP)
    assert not sandbox.overlay.has_changes(), "merged when each command ends: fs/ is what the commands saw"
    changes = await pending(sandbox, base)
    assert changes is not None and set(changes.paths) == STEP_CHANGES
    assert not sandbox.overlay.has_changes()
    # The merged folder is what the commands saw: no whiteouts, no overlay markers left behind.
    ws = sandbox.fs / "workspace"
    assert (ws / "kind_dir").read_text() == "now-a-file\n" and (ws / "kind_file" / "y").is_file()
    assert not (ws / "del").exists() and not (ws / "moved_dir").exists() and (ws / "moved_to/inner/i").is_file()
    assert os.readlink(ws / "relinked") == "/usr" and stat.S_IMODE((ws / "chm").stat().st_mode) == 0o600
    for folder, dirs, files in os.walk(sandbox.fs):
        for name in dirs + files:
            st = os.lstat(Path(folder) / name)
            assert not stat.S_ISCHR(st.st_mode), f"a whiteout was left at {folder}/{name}"
            if not stat.S_ISLNK(st.st_mode):
                assert not [x for x in os.listxattr(Path(folder) / name) if x.startswith("user.overlay.")]
    # The next step starts from the merged state, through a fresh overlay.
    assert (await sh(sandbox, "cat kind_dir mod; ls moved_to/inner")).split() == ["now-a-file", "m", "changed", "i"]


async def test_a_checkpoint_through_the_overlay_equals_one_taken_by_walking(
    provider: LocalSandboxProvider, walking: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    over, walk = await provider.create(SandboxSpec()), await walking.create(SandboxSpec())
    assert over.overlay is not None and walk.overlay is None
    parents: dict[str, str | None] = {"over": None, "walk": None}
    digests: dict[str, str] = {}
    last = "rm -r moved_to d && mkdir d && echo back > d/f && chmod 555 ro && chmod 750 /workspace"
    for script in (SETUP, STEP, last):
        for name, sandbox in (("over", over), ("walk", walk)):
            await sh(sandbox, script)
            info = await sandbox.snapshot(engine, selection=EVERYTHING, parent=parents[name], labels={})
            parents[name], digests[name] = info.id, info.digest
        assert digests["over"] == digests["walk"], f"the snapshots differ after {script!r}"
    assert listing(over.fs) == listing(walk.fs)


async def test_a_rollback_drops_exactly_the_failed_attempt(
    provider: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, SETUP)
    base = await checkpoint(sandbox, engine)
    before = listing(sandbox.fs)
    # An attempt that changed one file rewrites that file; one that changed nothing rewrites nothing, walks nothing.
    for attempt, rewritten in (("echo half-done >> mod", 1), ("true", 0), ("true", 0)):
        await sh(sandbox, attempt)
        stats = await sandbox.restore(engine, base, selection=EVERYTHING)
        assert (stats.files_written, stats.files_kept) == (rewritten, 0), "nothing else is looked at"
        assert listing(sandbox.fs) == before
        assert (await sh(sandbox, "cat mod")) == "m\n", "the attempt's write is gone from what commands see"
    # Creations, deletions, kind changes and the file tools' writes of a whole failed step, all undone.
    await sh(sandbox, STEP)
    # A file the worker wrote itself (an agent tool) is merged into fs/: the rollback restores properly then.
    await sandbox.write_file("/workspace/tool/t.txt", b"tool")
    assert await sandbox.read_file("/workspace/new") == b"new\n", "the file tools see what commands wrote"
    await sandbox.restore(engine, base, selection=EVERYTHING)
    assert listing(sandbox.fs) == before
    # After a rollback the next checkpoint knows what changed again.
    await sh(sandbox, "echo after > after")
    changes = await pending(sandbox, base)
    assert changes is not None and set(changes.paths) == {"workspace/after"}


async def test_file_tools_write_what_the_commands_see_and_the_checkpoint_counts_them(
    provider: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, "mkdir d && echo one > d/f")
    base = await checkpoint(sandbox, engine)
    await sh(sandbox, "echo two > d/f")
    await sandbox.write_file("/workspace/d/f", b"three")  # over the command's write, not under it
    await sandbox.make_dirs("/workspace/made/deep")
    assert (await sh(sandbox, "cat d/f; ls made")) == "threedeep\n"
    changes = await pending(sandbox, base)
    assert changes is not None and {"workspace/d/f", "workspace/made", "workspace/made/deep"} <= changes.paths


async def test_a_crafted_upper_layer_cannot_escape_or_mislead_the_merge(tmp_path: Path) -> None:
    """What the sandbox could leave in its upper layer (and worse: written straight into it), merged by the worker."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep")
    fs = tmp_path / "sb" / "fs"
    layers = OverlayLayers(tmp_path / "sb", fs)
    layers.prepare()
    lower, upper = fs / "workspace", layers.areas[0].upper
    (lower / "dir").mkdir()
    (lower / "dir" / "kept").write_text("kept")
    (lower / "escape").symlink_to(outside)  # a lower symlink to outside, with an upper folder over it
    (lower / "sibling").write_text("sibling")
    (lower / "ro").mkdir()
    (lower / "ro" / "old").write_text("old")
    os.chmod(lower / "ro", 0o555)

    (upper / "escape").mkdir()
    (upper / "escape" / "victim").write_text("overwritten?")
    (upper / "dir").mkdir()  # copied up, not opaque: a file in it with the opaque marker changes nothing
    (upper / "dir" / "marked").write_text("m")
    os.setxattr(upper / "dir" / "marked", "user.overlay.opaque", b"y")
    os.setxattr(upper / "dir" / "marked", "user.overlay.whiteout", b"y")
    (upper / "link").symlink_to("/etc")  # moved as a link, never followed
    (upper / "...").write_text("dots")
    (upper / "a..b").write_text("dots")
    os.mknod(upper / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # a device, not a whiteout
    (upper / "newdir").mkdir()
    os.mknod(upper / "newdir" / "stray", stat.S_IFCHR, 0)  # a whiteout with nothing under it
    os.setxattr(upper / "newdir", "user.overlay.opaque", b"y")
    (upper / "ro").mkdir()
    os.chmod(upper / "ro", 0o555)
    os.mknod(upper / "ro" / "old", stat.S_IFCHR, 0)
    deep = upper
    for _ in range(40):
        deep = deep / "n"
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("leaf")

    changes = layers.merge()

    assert (outside / "victim").read_text() == "keep" and sorted(os.listdir(outside)) == ["victim"]
    assert (lower / "escape").is_dir() and not (lower / "escape").is_symlink()
    assert (lower / "escape" / "victim").read_text() == "overwritten?"
    assert (lower / "dir" / "kept").read_text() == "kept" and (lower / "dir" / "marked").read_text() == "m"
    assert not [x for x in os.listxattr(lower / "dir" / "marked") if x.startswith("user.overlay.")]
    assert os.readlink(lower / "link") == "/etc" and (lower / "sibling").read_text() == "sibling"
    assert (lower / "...").read_text() == "dots" and (lower / "a..b").read_text() == "dots"
    assert stat.S_ISCHR((lower / "null").lstat().st_mode), "only a 0:0 device is a whiteout"
    assert os.listdir(lower / "newdir") == [] and not os.listxattr(lower / "newdir")
    assert os.listdir(lower / "ro") == [] and stat.S_IMODE((lower / "ro").stat().st_mode) == 0o555
    assert (deep.relative_to(upper) / "leaf").as_posix() in {p.removeprefix("workspace/") for p in changes} or (
        "workspace/n" in changes
    )
    assert (lower / deep.relative_to(upper) / "leaf").read_text() == "leaf"
    assert changes >= {"workspace/escape", "workspace/dir/marked", "workspace/link", "workspace/ro/old"}
    assert "workspace/dir" not in changes and "workspace/sibling" not in changes
    assert os.listdir(upper) == []


async def test_a_sandbox_cannot_forge_overlay_markers_through_its_mount(
    provider: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, "mkdir d && echo keep > d/kept")
    base = await checkpoint(sandbox, engine)
    forge = (
        "import os\n"
        "for n in ('user.overlay.opaque', 'user.overlay.redirect'):\n"
        "    try: os.setxattr('d', n, b'y'); print('set', n)\n"
        "    except OSError as e: print('refused', n, e.errno)\n"
        "open('d/new', 'w').write('n')\n"
    )
    await sandbox.write_file("/workspace/forge.py", forge.encode())
    await checkpoint(sandbox, engine, parent=base)  # the tool's write is checkpointed
    await sh(sandbox, "python3 forge.py")
    await pending(sandbox, base)
    assert sorted(os.listdir(sandbox.fs / "workspace" / "d")) == ["kept", "new"], "the lower folder was not replaced"
    assert (await sh(sandbox, "cat d/kept")) == "keep\n"


async def test_fallbacks_walk_where_no_overlay_is_possible(tmp_path: Path, engine: SnapshotEngine) -> None:
    assert probe("/nonexistent/bwrap") is not None, "a failed probe says why"
    unisolated = LocalSandboxProvider(tmp_path / "plain", worker_id="plain", bwrap=False)
    try:
        assert not unisolated.overlay
        sandbox = await unisolated.create(SandboxSpec(isolation="preferred"))
        assert sandbox.overlay is None
        await sh(sandbox, "echo x > $WORKSPACE/x")
        base = await checkpoint(sandbox, engine)
        await sh(sandbox, "echo y > $WORKSPACE/x")
        assert sandbox._changes_since(base, EVERYTHING) is None, "no overlay: the checkpoint walks"
        info = await sandbox.snapshot(engine, selection=EVERYTHING, parent=base, labels={})
        assert info.id != base
    finally:
        await unisolated.close()


async def test_a_command_started_while_another_runs_stays_on_the_folder_and_the_checkpoint_walks(
    provider: LocalSandboxProvider, walking: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    sandbox, reference = await provider.create(SandboxSpec()), await walking.create(SandboxSpec())
    bases = [await checkpoint(s, engine) for s in (sandbox, reference)]
    for s in (sandbox, reference):
        await asyncio.gather(sh(s, "sleep 1; echo slow > slow"), sh(s, "sleep 0.2; echo fast > fast"))
    assert (await sh(sandbox, "cat slow fast")) == "slow\nfast\n"
    assert sandbox._changes_since(bases[0], EVERYTHING) is None, "untracked writes: the next checkpoint walks"
    infos = [
        await s.snapshot(engine, selection=EVERYTHING, parent=b, labels={})
        for s, b in zip((sandbox, reference), bases, strict=True)
    ]
    assert infos[0].digest == infos[1].digest


async def test_commands_mount_volatile_overlays_one_after_another(
    provider: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    """Each command mounts both areas as volatile overlays (no sync of the upper layer at its end: the checkpoint
    is what is durable). overlayfs marks a volatile mount's work folder and refuses the next mount on it: the mark
    is cleared before each command, so every later command still gets its overlay and sees the earlier ones."""
    sandbox = await provider.create(SandboxSpec())
    assert sandbox.overlay is not None
    mounts = await sh(sandbox, "grep -E ' /(workspace|home/sandbox) ' /proc/self/mountinfo")
    assert mounts.count(",fsync=volatile,") == 2 and mounts.count(" - overlay ") == 2, mounts
    assert all((area.work / "work/incompat/volatile").exists() for area in sandbox.overlay.areas)
    for n in range(3):
        await sh(sandbox, f"echo {n} >> log && echo {n} >> ~/log")
    assert await sh(sandbox, "cat log ~/log") == "0\n1\n2\n0\n1\n2\n"
    parent = await checkpoint(sandbox, engine)
    await sh(sandbox, "echo 3 >> log")
    assert await pending(sandbox, parent) == ChangeSet(frozenset({"workspace/log"})), "the upper layer still counts"
