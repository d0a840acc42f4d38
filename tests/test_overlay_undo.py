"""The overlay's undo log (sandboxes/overlay_undo.py) in real bubblewrap: a failed attempt rolled back by renaming
its originals back, compared with what the engine's own restore makes of the same folder, byte for byte (content,
modes, times, hard links); without the store; across several commands that change the same paths, files that
become folders and back, hard links, hostile names; interrupted at every step; and what it must leave alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.errors import SandboxError
from tardigrade.sandboxes.overlay import probe
from tardigrade.sandboxes.provider import SandboxSpec
from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import FileStore

EVERYTHING = Selection(roots=("workspace", "home/sandbox"))

SETUP = r"""
mkdir -p d/sub keep ro deep/a/b/c gone/x && echo orig > d/f && echo a > d/sub/s && echo k > keep/k && echo m > mod
echo link > hl1 && ln hl1 hl2 && ln -s d dl && echo x > ro/x && chmod 555 ro && echo k > kind && mkdir kindd
echo y > kindd/y && echo deep > deep/a/b/c/f && echo g > gone/x/g && chmod 750 deep/a && echo h > ~/h
python3 -c "
for n in [b'new\nline', b'-rf', b'...', b' sp ', b'\xff\xfe']: open(n, 'w').write('hostile')"
"""
# Two commands of one attempt: the second changes again much of what the first changed.
ATTEMPT = [
    r"""
echo changed >> mod && rm d/f && echo new > d/new && rm kind && mkdir kind && echo in > kind/in
rm -r kindd && echo file > kindd && echo more >> hl1 && rm hl2 && chmod 755 ro && echo y > ro/x && chmod 555 ro
echo deeper > deep/a/b/c/f && mv -- -rf renamed && printf z > 'new
line' && chmod 700 /workspace && touch -d 2001-01-01 keep && echo hh >> ~/h && rm dl && ln -s /etc dl
""",
    r"""
echo again >> mod && rm -r d && mkdir d && echo back > d/f && rm -r kind && echo file-again > kind
rm kindd && mkdir kindd && echo y2 > kindd/y && rm -r deep gone && mkdir gone && ln mod mod-link
python3 -c "open(b'\xff\xfe', 'a').write('more')" && mkdir -p newdir/n && echo n > newdir/n/n
""",
]


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[LocalSandboxProvider]:
    p = LocalSandboxProvider(tmp_path / "sandboxes", worker_id="undo")
    assert p.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    assert p.overlay, f"this kernel refuses unprivileged overlayfs: {probe(p.bwrap)}"
    yield p
    await p.close()


@pytest.fixture
def engine(tmp_path: Path) -> SnapshotEngine:
    return SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch")


async def sh(sandbox: LocalSandbox, command: str) -> str:
    result = await sandbox.exec(command, env={}, timeout=60)
    assert result.exit_code == 0, result.output_tail.decode()
    return result.output_tail.decode()


def state(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Everything a snapshot records of a folder, and more: kind, mode, content, link target, mtime, which hard
    links share a file."""
    out: dict[bytes, tuple[object, ...]] = {}
    first_name: dict[int, bytes] = {}
    base = os.fsencode(root)
    for folder, dirs, files in os.walk(base):
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                with open(path, "rb") as f:
                    data = f.read()
                same = first_name.setdefault(st.st_ino, rel) if st.st_nlink > 1 else rel
                out[rel] = ("file", stat.S_IMODE(st.st_mode), data, st.st_mtime_ns, st.st_nlink, same)
    return out


def engine_rollback(engine: SnapshotEngine, snapshot_id: str, fs: Path, into: Path, selection: Selection) -> Path:
    """What the engine's own restore makes of a copy of ``fs``: the reference a rollback must equal."""
    subprocess.run(["cp", "-a", str(fs), str(into)], check=True)
    engine.restore(snapshot_id, into, selection=selection)
    return into


async def checkpoint(sandbox: LocalSandbox, engine: SnapshotEngine, selection: Selection = EVERYTHING) -> str:
    return (await sandbox.snapshot(engine, selection=selection, parent=None, labels={})).id


async def test_a_rollback_renames_the_originals_back_without_the_store_and_equals_a_restore(
    provider: LocalSandboxProvider, engine: SnapshotEngine, tmp_path: Path
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, SETUP)
    base = await checkpoint(sandbox, engine)
    for command in ATTEMPT:
        await sh(sandbox, command)
    reference = state(engine_rollback(engine, base, sandbox.fs, tmp_path / "reference", EVERYTHING))
    assert state(sandbox.fs) != reference, "the attempt changed something"
    store = tmp_path / "store"
    store.rename(tmp_path / "store-away")  # the rollback must not read it
    try:
        stats = await sandbox.restore(engine, base, selection=EVERYTHING)
    finally:
        (tmp_path / "store-away").rename(store)
    assert state(sandbox.fs) == reference
    assert 0 < stats.files_written <= 20 and stats.bytes_written == 0 and stats.files_kept == 0
    # The same tree, times and all: a fresh full walk gives the checkpoint's very id.
    walked = await sandbox.snapshot(engine, selection=EVERYTHING, parent=None, labels={})
    assert walked.id == base
    # The next attempt starts from it, sees it through a fresh overlay, and its checkpoint knows what changed.
    assert sandbox.overlay is not None and not (sandbox.overlay.root / "undo").exists()
    assert (await sh(sandbox, "cat mod d/f hl2; readlink dl; ls -a gone/x; cat kind kindd/y")).split() == [
        "m", "orig", "link", "d", ".", "..", "g", "k", "y"
    ]  # fmt: skip


async def test_a_folder_kept_aside_is_the_original_not_the_attempts_version(
    provider: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, "mkdir -p d/e && echo orig > d/f && echo e > d/e/g && echo k > k")
    base = await checkpoint(sandbox, engine)
    await sh(sandbox, "echo changed > d/f && echo new > d/e/new && echo k2 > k")
    await sh(sandbox, "rm -r d && echo k3 > k && echo now-a-file > d")  # the same paths again
    assert sandbox.overlay is not None
    kept = sandbox.overlay.undo.folder
    originals = {p.relative_to(kept).as_posix(): p.read_text() for p in kept.rglob("*") if p.is_file()}
    assert sorted(originals.values()) == ["e\n", "k\n", "orig\n"], "each original once, none of the attempt's"
    await sandbox.restore(engine, base, selection=EVERYTHING)
    assert (await sh(sandbox, "cat d/f d/e/g k; ls d/e")).split() == ["orig", "e", "k", "g"]


async def test_an_undo_stopped_at_any_step_falls_back_to_a_full_restore(
    provider: LocalSandboxProvider, engine: SnapshotEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, SETUP)
    base = await checkpoint(sandbox, engine)
    assert sandbox.overlay is not None
    expected = state(sandbox.fs)
    step = 0
    while True:
        for command in ATTEMPT:
            await sh(sandbox, command)
        calls = 0

        def kill(doing: str, at: int = step) -> None:
            nonlocal calls
            calls += 1
            if calls == at + 1:
                raise OSError(f"killed before {doing}")

        sandbox.overlay.undo.fault = kill
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            stats = await sandbox.restore(engine, base, selection=EVERYTHING)
        sandbox.overlay.undo.fault = None
        assert state(sandbox.fs) == expected, f"stopped at step {step}"
        if calls <= step:  # ran to the end: every interruption point has been tried
            assert stats.files_kept == 0 and "in full" not in caplog.text
            break
        assert "restoring the snapshot in full" in caplog.text and stats.files_kept > 0
        step += 1
    assert step > 15, "the attempt is undone in many steps"


async def test_a_merge_that_fails_midway_makes_the_rollback_restore_in_full(
    provider: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, SETUP)
    base = await checkpoint(sandbox, engine)
    expected = state(sandbox.fs)
    assert sandbox.overlay is not None
    await sh(sandbox, ATTEMPT[0])

    def fail(doing: str) -> None:
        if doing.startswith("set aside workspace/d"):
            raise OSError("no space left on device")

    sandbox.overlay.undo.fault = fail
    with pytest.raises(SandboxError, match="no space left"):
        await sandbox.exec(ATTEMPT[1], env={}, timeout=60)
    sandbox.overlay.undo.fault = None
    stats = await sandbox.restore(engine, base, selection=EVERYTHING)
    assert state(sandbox.fs) == expected and stats.files_kept > 0, "a full restore, not a half-kept log"


async def test_the_rollback_leaves_what_the_selection_leaves_and_the_file_tools_writes_come_from_the_store(
    provider: LocalSandboxProvider, engine: SnapshotEngine, tmp_path: Path
) -> None:
    selection = Selection(roots=("workspace",), excludes=("**/.cache", "workspace/build/**"))
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, "mkdir -p src/.cache build keep/.cache && echo c | tee src/.cache/c keep/.cache/c > src/s")
    base = await checkpoint(sandbox, engine, selection)
    attempts = [
        # outside the selection, and excluded: left as the attempt made them; the rest undone by renames
        (["echo h2 > ~/h && echo c2 > src/.cache/c && mkdir -p build/o && echo o > build/o/o && echo s2 > src/s"],
         False),
        # a folder holding an excluded path deleted: only the store can keep the excluded part as it is
        (["echo c3 > keep/.cache/c && rm -r src && echo k > keep/k"], True),
        # the agent's file tools between commands: what they wrote comes back from the store
        (["echo s3 > src/s", "tool", "echo again > tool.txt && echo k4 > keep/k"], True),
    ]  # fmt: skip
    for n, (commands, needs_store) in enumerate(attempts):
        for command in commands:
            if command == "tool":
                await sandbox.write_file("/workspace/tool.txt", b"tool")
                await sandbox.write_file("/workspace/src/s", b"tool-s")
                await sandbox.make_dirs("/workspace/made/deep")
            else:
                await sh(sandbox, command)
        reference = state(engine_rollback(engine, base, sandbox.fs, tmp_path / f"reference-{n}", selection))
        stats = await sandbox.restore(engine, base, selection=selection)
        assert state(sandbox.fs) == reference, f"attempt {n}"
        assert (stats.bytes_written > 0 or stats.deleted > 0) == needs_store or n == 0, f"attempt {n}: {stats}"
    assert (sandbox.fs / "home/sandbox/h").read_text() == "h2\n" and (sandbox.fs / "workspace/build/o/o").exists()
    assert (sandbox.fs / "workspace/keep/.cache/c").read_text() == "c3\n", "excluded: as the attempt left it"


async def test_the_kept_originals_are_out_of_the_sandboxs_sight_and_a_checkpoint_drops_them(
    provider: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, "echo secret-original > undo-probe-file && mkdir undo-probe-dir")
    base = await checkpoint(sandbox, engine)
    await sh(sandbox, "rm -r undo-probe-file undo-probe-dir")
    assert sandbox.overlay is not None
    kept = sandbox.overlay.undo.folder
    assert sorted(p.read_text() for p in kept.iterdir() if p.is_file()) == ["secret-original\n"]
    seen = await sh(
        sandbox,
        "find / -path /proc -prune -o -path /usr -prune -o -name 'undo-probe*' -print 2>/dev/null;"
        " grep -rl secret-original /workspace /home /tmp /etc /dev 2>/dev/null; true",
    )
    assert seen == "", f"the sandbox sees the kept originals: {seen}"
    # A checkpoint commits the attempt: the originals go, and a rollback to it keeps the deletion.
    after = (await sandbox.snapshot(engine, selection=EVERYTHING, parent=base, labels={})).id
    assert not kept.exists()
    await sh(sandbox, "echo x > x")
    await sandbox.restore(engine, after, selection=EVERYTHING)
    assert sorted(os.listdir(sandbox.fs / "workspace")) == []
    for leftover in sandbox.overlay.root.glob("trash-*"):
        shutil.rmtree(leftover, ignore_errors=True)  # a background deletion may still run; not what is tested


async def test_a_file_tool_write_through_a_hard_link_is_rolled_back_under_every_name(
    provider: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, "echo original > a && ln a b && ln a c")
    base = await checkpoint(sandbox, engine)
    await sh(sandbox, "rm c")  # its original (the shared file) is kept aside
    await sandbox.write_file("/workspace/b", b"written in place, so under a and c too")
    await sandbox.restore(engine, base, selection=EVERYTHING)
    assert (await sh(sandbox, "cat a b c")).split() == ["original"] * 3
    assert os.stat(sandbox.fs / "workspace/a").st_nlink == 3


async def test_a_rollback_while_a_command_still_writes_undoes_what_it_merged_and_drops_the_rest(
    provider: LocalSandboxProvider, engine: SnapshotEngine
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, SETUP)
    base = await checkpoint(sandbox, engine)
    expected = state(sandbox.fs)
    await sh(sandbox, ATTEMPT[0])  # merged: in the undo log
    running = asyncio.ensure_future(
        sandbox.exec("echo late >> mod && rm -r d && mkdir q && touch q/started && sleep 60", env={}, timeout=90)
    )
    assert sandbox.overlay is not None
    upper = sandbox.overlay.areas[0].upper
    for _ in range(1500):  # 30 s: bubblewrap can take seconds to start on a loaded machine
        if (upper / "q" / "started").exists():
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the command did not start writing")
    await sandbox.restore(engine, base, selection=EVERYTHING)
    await running  # killed by the rollback
    assert state(sandbox.fs) == expected
    walked = await sandbox.snapshot(engine, selection=EVERYTHING, parent=None, labels={})
    assert walked.id == base


@pytest.mark.parametrize("root", ["workspace/src", "workspace/a/b"])
async def test_a_rollback_under_a_narrow_selection_touches_only_what_a_restore_would(
    provider: LocalSandboxProvider, engine: SnapshotEngine, tmp_path: Path, root: str
) -> None:
    selection = Selection(roots=(root,))
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, "mkdir -p src a/b keep && echo s > src/s && echo b > a/b/b && echo o > a/o && echo k > keep/k")
    base = await checkpoint(sandbox, engine, selection)
    attempts = [
        "rm -r src keep && mkdir src && echo s2 > src/s && echo new > new",
        "rm -r a && mkdir -p a/b && echo x > a/b/x && echo o2 > a/o",  # a folder on the way to a root replaced
        "echo b2 > a/b/b && echo o3 > a/o && chmod 700 a",
    ]
    for n, command in enumerate(attempts):
        await sh(sandbox, command)
        reference = state(engine_rollback(engine, base, sandbox.fs, tmp_path / f"reference-{n}", selection))
        await sandbox.restore(engine, base, selection=selection)
        assert state(sandbox.fs) == reference, f"attempt {n}"


def _undo_log_lines(tmp: Path, folders: int) -> int:
    """Lines of sandboxes/overlay_undo.py run to record what a merge does when a command first changes a file in
    each of ``folders`` folders and then deletes them all, the same calls in the same order as
    `OverlayLayers.merge`, on real files."""
    from tardigrade.sandboxes import overlay_undo
    from tardigrade.sandboxes.overlay_undo import UndoLog

    fs = tmp / "fs"
    (tmp / "overlay").mkdir(parents=True)
    (fs / "workspace").mkdir(parents=True)
    for i in range(folders):
        (fs / f"workspace/d{i}").mkdir()
        (fs / f"workspace/d{i}/f").write_text("original")
    log = UndoLog(tmp / "overlay", fs)
    log.reset(keep=True)
    lines = 0
    source = overlay_undo.__file__

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        nonlocal lines
        if frame.f_code.co_filename != source:
            return None
        if event == "line":
            lines += 1
        return tracer

    workspace = os.open(fs / "workspace", os.O_RDONLY | os.O_DIRECTORY)
    sys.settrace(tracer)
    try:
        log.note_folder(workspace, "workspace")
        for i in range(folders):  # the first command: each d{i}/f replaced
            d = os.open(f"d{i}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=workspace)
            log.note_folder(d, f"workspace/d{i}")
            assert log.set_aside(d, "f", f"workspace/d{i}/f")
            (Path(f"/proc/self/fd/{d}") / "f").write_text("changed")
            os.close(d)
        for i in range(folders):  # the second: rm -r d*
            assert log.set_aside(workspace, f"d{i}", f"workspace/d{i}")
    finally:
        sys.settrace(None)
        log.close()
        os.close(workspace)
    assert sorted(os.listdir(fs / "workspace")) == [] and len(log) == folders + 1
    undone = log.rollback(EVERYTHING)
    assert undone is not None and undone.put_back == folders
    assert {p.read_text() for p in (fs / "workspace").glob("*/f")} == {"original"}
    assert len(list((fs / "workspace").iterdir())) == folders
    return lines


def test_recording_a_merge_is_linear_in_what_it_changes_never_quadratic(tmp_path: Path) -> None:
    """A command that changes a file in each of thousands of folders and then deletes the folders must not make
    the worker's merge quadratic (3,000 folders took the worker half a minute). Counted in lines run, not timed."""
    small, large = _undo_log_lines(tmp_path / "small", 200), _undo_log_lines(tmp_path / "large", 800)
    assert large < 5 * small, f"4x the folders cost {large / small:.1f}x the work ({small} -> {large} lines)"


class _EngineThatWaits(SnapshotEngine):
    """A real engine whose create returns only once ``go`` is set: what a command that ends while a checkpoint is
    being written does to the sandbox, made certain instead of a matter of timing."""

    def __init__(self, store: FileStore, scratch: Path, go: threading.Event) -> None:
        super().__init__(store, scratch_dir=scratch)
        self.go = go

    def create(self, *args: Any, **kwargs: Any) -> Any:
        info = super().create(*args, **kwargs)
        assert self.go.wait(60), "the command did not end"
        return info


async def test_a_command_that_ends_while_a_checkpoint_is_written_is_never_taken_as_checkpointed(
    provider: LocalSandboxProvider, engine: SnapshotEngine, tmp_path: Path
) -> None:
    sandbox = await provider.create(SandboxSpec())
    await sh(sandbox, "echo k > keep")
    base = await checkpoint(sandbox, engine)
    go = threading.Event()
    waiting = _EngineThatWaits(FileStore(tmp_path / "store"), tmp_path / "scratch-2", go)
    # The command must still run when the checkpoint's walk is done (`_EngineThatWaits` then waits for its end):
    # its sleep leaves the walk of this small workspace seconds, enough on a loaded machine too.
    for n, command in enumerate(["sleep 3 && echo late > late", "sleep 3 && rm keep"]):
        running = asyncio.ensure_future(sandbox.exec(command, env={}, timeout=60))
        running.add_done_callback(lambda _: go.set())
        await asyncio.sleep(0.3)  # the command runs on the overlay when the checkpoint starts
        during = (await sandbox.snapshot(waiting, selection=EVERYTHING, parent=base, labels={})).id
        assert (await running).exit_code == 0
        go.clear()
        # What the command merged after the walk is in fs/ but not in `during`: the next checkpoint must see it,
        after = (await sandbox.snapshot(engine, selection=EVERYTHING, parent=during, labels={})).id
        assert after != during, f"command {n}: its changes were taken as part of the checkpoint before"
        engine.restore(after, tmp_path / f"after-{n}", selection=EVERYTHING)
        assert sorted(os.listdir(tmp_path / f"after-{n}/workspace")) == [["keep", "late"], ["late"]][n]
        # and a rollback to `during` must undo it.
        await sh(sandbox, "echo x > x")
        await sandbox.restore(engine, during, selection=EVERYTHING)
        engine.restore(during, tmp_path / f"during-{n}", selection=EVERYTHING)
        assert state(sandbox.fs / "workspace") == state(tmp_path / f"during-{n}/workspace"), f"command {n}"
        await sandbox.restore(engine, after, selection=EVERYTHING)
        base = after


async def test_rollback_checkpoint_rollback_and_back_to_an_older_checkpoint(
    provider: LocalSandboxProvider, engine: SnapshotEngine, tmp_path: Path
) -> None:
    sandbox = await provider.create(SandboxSpec())
    assert sandbox.overlay is not None
    await sh(sandbox, SETUP)
    first = await checkpoint(sandbox, engine)
    first_state = state(sandbox.fs)
    await sh(sandbox, ATTEMPT[0])
    await sandbox.restore(engine, first, selection=EVERYTHING)
    assert state(sandbox.fs) == first_state
    await sh(sandbox, ATTEMPT[0])
    await sandbox.write_file("/workspace/d/tool", b"tool")
    second = (await sandbox.snapshot(engine, selection=EVERYTHING, parent=first, labels={})).id
    assert not sandbox.overlay.undo.folder.exists() and len(sandbox.overlay.undo) == 0
    second_state = state(sandbox.fs)
    for n, target in enumerate([second, second, first, first]):
        await sh(sandbox, "echo z >> mod && rm -rf keep gone d && mkdir -p new/y && echo q > new/y/q && chmod 700 ro")
        await sh(sandbox, "rm -r new/y && echo nn > new/y && touch -d 2002-02-02 kindd && ln -sf /x hl1 && mkdir d")
        reference = state(engine_rollback(engine, target, sandbox.fs, tmp_path / f"reference-{n}", EVERYTHING))
        stats = await sandbox.restore(engine, target, selection=EVERYTHING)
        assert state(sandbox.fs) == reference == (second_state if target == second else first_state), f"{n}"
        assert (stats.files_kept > 0) == (n == 2), f"{n}: a full restore only when going back past a checkpoint"
        assert len(sandbox.overlay.undo) == 0 and not sandbox.overlay.undo.folder.exists()
    walked = await sandbox.snapshot(engine, selection=EVERYTHING, parent=None, labels={})
    assert walked.id == first


DEEP = "python3 -c \"import os\nfor _ in range(1500): os.mkdir('a'); os.chdir('a')\nopen('f', 'w').write('x')\""


async def test_a_tree_nested_deeper_than_python_recursion_is_still_destroyed(tmp_path: Path) -> None:
    """Folders nested 1,500 deep (more than Python's recursion limit) must not stop the worker deleting the
    sandbox: shutil.rmtree recursed, raised RecursionError, and left the folder on the worker's disk."""
    provider = LocalSandboxProvider(tmp_path / "sandboxes", worker_id="deep", overlay=False)
    try:
        sandbox = await provider.create(SandboxSpec())
        await sh(sandbox, DEEP)
        await sandbox.destroy()
        assert not sandbox.dir.exists()
    finally:
        await provider.close()
        # Never leave such a tree behind: pytest's own clean-up of old temporary folders recurses too.
        subprocess.run(["rm", "-rf", str(tmp_path / "sandboxes")], check=True)


def test_remove_tree_deletes_any_depth_never_follows_a_symlink_and_bears_a_second_deletion(tmp_path: Path) -> None:
    from tardigrade.sandboxes.remove_tree import remove_tree

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("kept")
    root = tmp_path / "trees"
    root.mkdir()
    for tree in ("one", "two"):
        deep = root / tree
        for _ in range(1500):  # deeper than Python's recursion limit
            deep.mkdir()
            (deep / "f").write_text("x")
            (deep / "to-outside").symlink_to(outside)
            os.mkfifo(deep / "fifo")
            deep = deep / "a"
        deep.mkdir()
        for n in range(0, 1500, 100):  # folders a step left read-only
            os.chmod(root / tree / "/".join(["a"] * n), 0o555)
    parent = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree(parent, "one")
        # Two deletions of one tree at once (a destroyed sandbox, a background drop inside it): both finish.
        threads = [threading.Thread(target=remove_tree, args=(parent, "two")) for _ in range(2)]
        errors: list[BaseException] = []
        threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment,misc]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            threading.excepthook = threading.__excepthook__  # type: ignore[assignment]
        remove_tree(parent, "missing")
        left = os.listdir(root)
    finally:
        os.close(parent)
        subprocess.run(["rm", "-rf", str(root)], check=True)  # pytest's clean-up of old folders recurses
    assert errors == [] and left == [] and (outside / "keep").read_text() == "kept"


async def test_when_the_undo_log_declines_only_the_changed_paths_are_restored_however_many(
    provider: LocalSandboxProvider, engine: SnapshotEngine, tmp_path: Path
) -> None:
    """The undo log declines when a deleted folder held an excluded path (only the store can keep that part as it
    is): the rollback then restores the attempt's paths by the engine's ChangeSet restore, which looks up each path
    in the tree instead of walking the sandbox, and makes what a full restore makes; thousands of paths too (the
    4,096-path cap sent those to a full restore)."""
    selection = Selection(roots=("workspace",), excludes=("**/.cache",))
    sandbox = await provider.create(SandboxSpec())
    await sh(
        sandbox,
        "mkdir -p big keep/.cache keep2/.cache other && echo c | tee keep/.cache/c keep2/.cache/c > keep/k"
        " && for i in $(seq 300); do echo $i > other/$i; done"
        " && python3 -c \"[open(f'big/{i}', 'w').write(str(i)) for i in range(5000)]\"",
    )
    base = await checkpoint(sandbox, engine, selection)
    attempts = [
        "echo c2 > keep/.cache/c && rm -r keep && echo n > new && echo 1x > other/1",
        "rm -r keep2 && python3 -c \"[open(f'big/{i}', 'a').write('x') for i in range(5000)]\" && rm other/2",
    ]
    for n, command in enumerate(attempts):
        await sh(sandbox, command)
        reference = state(engine_rollback(engine, base, sandbox.fs, tmp_path / f"reference-{n}", selection))
        stats = await sandbox.restore(engine, base, selection=selection)
        assert state(sandbox.fs) == reference, f"attempt {n}"
        assert stats.paths_hinted > 0, f"attempt {n}: the changed paths, not a walk of the folder: {stats}"
        assert stats.files_kept == 0, f"attempt {n}: an untouched file was looked at: {stats}"
    walked = await sandbox.snapshot(engine, selection=selection, parent=None, labels={})
    assert walked.id == base


@contextlib.contextmanager
def few_descriptors(limit: int = 1024) -> Iterator[None]:
    """A worker's usual default descriptor limit, for what must not hold one descriptor per level of a tree."""
    import resource

    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, limits[0]), limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


@pytest.mark.parametrize("where", ["new", "copied-up"])
async def test_folders_nested_deeper_than_python_recursion_merge_checkpoint_and_roll_back(
    provider: LocalSandboxProvider, engine: SnapshotEngine, tmp_path: Path, where: str
) -> None:
    """A command nesting folders 1,500 deep (more than Python's recursion limit, and more descriptors than a
    worker's default 1,024 if each level held its own): the merge recursed, raised RecursionError, and the step
    failed with "Report this". "new": the whole chain is the upper layer's (scrubbed, then renamed in);
    "copied-up": the chain is the checkpoint's and only its deepest file changes (merged level by level)."""
    sandbox = await provider.create(SandboxSpec())
    walk = {"selection": EVERYTHING, "parent": None, "labels": {}}
    try:
        if where == "copied-up":
            await sh(sandbox, DEEP)
        base = await checkpoint(sandbox, engine)
        with few_descriptors():  # the command's end merges its upper layer
            await sh(sandbox, DEEP.replace("os.mkdir('a'); ", "" if where == "copied-up" else "os.mkdir('a'); "))
        after = await sandbox.snapshot(engine, selection=EVERYTHING, parent=base, labels={})
        assert after.id != base and after.id == (await sandbox.snapshot(engine, **walk)).id, "merged = walked"
        # Another attempt, rolled back by the undo log, then back past the checkpoint (from the store).
        with few_descriptors():
            await sh(sandbox, DEEP.replace("os.mkdir('a'); ", "").replace("'x'", "'y'") + " && echo z > z")
        await sandbox.restore(engine, after.id, selection=EVERYTHING)
        assert (await sandbox.snapshot(engine, **walk)).id == after.id
        await sandbox.restore(engine, base, selection=EVERYTHING)
        assert (await sandbox.snapshot(engine, **walk)).id == base
    finally:
        await sandbox.destroy()
        subprocess.run(["rm", "-rf", str(tmp_path / "sandboxes")], check=True)
