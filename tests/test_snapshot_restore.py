"""Rollbacks through the engine: one pass over the tree, a stat cache that stays usable, and ChangeSet restores.

A restore with a `ChangeSet` (the paths an attempt may have changed, which the overlay knows) must leave exactly
the workspace a full restore leaves, while looking at nothing else; a lying ChangeSet may leave a change in place
(the hint's contract) but never writes outside the workspace, never fails to restore what it does list, and never
touches the store.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
import zstandard

from tardigrade.sandboxes.errors import SnapshotError
from tardigrade.sandboxes.snapshots import Selection, SnapshotEngine
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.snapshots.crypto import Encryption, new_key
from tardigrade.sandboxes.snapshots.restore import TreeShape, check_tree
from tardigrade.sandboxes.store_keys import tree_key
from tardigrade.sandboxes.stores import FileStore


@pytest.fixture
def engine(tmp_path: Path) -> SnapshotEngine:
    return SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch")


def listing(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Kind, permission bits, mtime (folders and files) and content or link target of everything under root."""
    out: dict[str, tuple[str, int, int, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", 0, 0, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns, "")
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, blake3.blake3(path.read_bytes()).hexdigest())
    return out


def make_workspace(root: Path) -> Path:
    (root / "src" / "pkg").mkdir(parents=True)
    for i in range(30):
        (root / "src" / "pkg" / f"m{i:02}.py").write_text(f"x = {i}\n")
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(os.urandom(300_000))
    (root / "empty" / "nested").mkdir(parents=True)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "locked").mkdir()
    (root / "locked" / "inside.txt").write_text("read-only folder")
    (root / "locked").chmod(0o555)
    os.symlink("src/main.py", root / "link")
    (root / 'odd name\twith"quote\\').write_text("escaped in the tree")
    return root


def age(ws: Path) -> None:
    """Past the racy window (statcache.RACY_NS): files stat-ed within a second of their change are hashed again,
    and a stat cache holding such files never vouches for the whole folder."""
    for path in [*ws.rglob("*"), ws]:
        os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9), follow_symlinks=False)
    time.sleep(1.1)  # ctimes cannot be set back


# Each attempt edits the workspace and returns the paths it changed, as the overlay would report them.
def edit_file(ws: Path) -> set[str]:
    (ws / "src" / "pkg" / "m07.py").write_text("x = 'half-written'\n")
    return {"src/pkg/m07.py"}


def same_size_rewrite(ws: Path) -> set[str]:
    (ws / "src" / "pkg" / "m08.py").write_text("x = 9\n")
    return {"src/pkg/m08.py"}


def delete_and_add(ws: Path) -> set[str]:
    (ws / "src" / "pkg" / "m01.py").unlink()
    (ws / "src" / "pkg" / "new.py").write_text("new\n")
    return {"src/pkg/m01.py", "src/pkg/new.py"}


def new_nested_folders(ws: Path) -> set[str]:
    (ws / "build" / "a" / "b").mkdir(parents=True)
    (ws / "build" / "a" / "b" / "out.o").write_bytes(b"\0" * 100)
    return {"build", "build/a", "build/a/b", "build/a/b/out.o"}


def type_changes(ws: Path) -> set[str]:
    shutil.rmtree(ws / "empty")
    (ws / "empty").write_text("now a file")
    (ws / "link").unlink()
    (ws / "link").mkdir()
    (ws / "link" / "x").write_text("a folder where a symlink was")
    (ws / "run.sh").unlink()
    os.symlink("/etc/passwd", ws / "run.sh")
    return {"empty", "link", "link/x", "run.sh"}


def removed_tree_and_modes(ws: Path) -> set[str]:
    (ws / "locked").chmod(0o755)
    shutil.rmtree(ws / "src" / "pkg")
    (ws / "data" / "big.bin").chmod(0o600)
    return {"locked", "src/pkg", "data/big.bin"}


def big_file_and_odd_name(ws: Path) -> set[str]:
    with open(ws / "data" / "big.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"changed")
    (ws / 'odd name\twith"quote\\').write_text("other")
    return {"data/big.bin", 'odd name\twith"quote\\'}


def write_in_readonly_folder(ws: Path) -> set[str]:
    (ws / "locked").chmod(0o755)
    (ws / "locked" / "inside.txt").write_text("changed")
    (ws / "locked" / "extra").write_text("added")
    (ws / "locked").chmod(0o555)
    return {"locked/inside.txt", "locked/extra"}


ATTEMPTS: list[Callable[[Path], set[str]]] = [
    edit_file,
    same_size_rewrite,
    delete_and_add,
    new_nested_folders,
    type_changes,
    removed_tree_and_modes,
    big_file_and_odd_name,
    write_in_readonly_folder,
]


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=lambda f: f.__name__)
def test_a_changeset_restore_leaves_exactly_what_a_full_restore_leaves(
    engine: SnapshotEngine, tmp_path: Path, attempt: Callable[[Path], set[str]]
) -> None:
    hinted, full = make_workspace(tmp_path / "hinted"), tmp_path / "full"
    info = engine.create(hinted, cache_path=tmp_path / "cache")
    shutil.copytree(hinted, full, symlinks=True)
    expected = listing(hinted)

    changed = attempt(hinted)
    assert attempt(full) == changed
    stats = engine.restore(info.id, hinted, changes=ChangeSet(frozenset(changed)))
    engine.restore(info.id, full)

    assert stats.paths_hinted > 0, "the ChangeSet restore merged the whole folder instead"
    listed = [
        p
        for p, (kind, *_) in expected.items()
        if kind == "file" and any(p == c or p.startswith(c + "/") for c in changed)
    ]
    assert stats.files_kept <= len(listed), "a ChangeSet restore looked at files nobody changed"
    assert listing(hinted) == listing(full) == expected
    assert engine.create(hinted).id == info.id  # a full walk, reading everything: the same tree, mtimes included


def test_a_changeset_restore_looks_only_at_the_listed_paths(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    info = engine.create(ws)
    (ws / "src" / "pkg" / "m03.py").write_text("changed, listed")
    (ws / "src" / "pkg" / "m04.py").write_text("changed, not listed")
    (ws / "data" / "stray").write_text("added, not listed")

    stats = engine.restore(info.id, ws, changes=ChangeSet(frozenset({"src/pkg/m03.py"})))
    assert (stats.files_written, stats.deleted, stats.paths_hinted) == (1, 1, 1)
    assert (ws / "src" / "pkg" / "m03.py").read_text() == "x = 3\n"
    # The hint's contract: what it does not list is taken as unchanged, and left alone.
    assert (ws / "src" / "pkg" / "m04.py").read_text() == "changed, not listed"
    assert (ws / "data" / "stray").exists()

    engine.restore(info.id, ws)  # a full restore finds and undoes the rest
    assert engine.create(ws).id == info.id


def test_a_lying_changeset_never_writes_outside_the_workspace(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    outside = tmp_path / "outside"
    (outside / "pkg").mkdir(parents=True)
    (outside / "pkg" / "m05.py").write_text("worker file")
    (outside / "main.py").write_text("worker file")
    info = engine.create(ws)
    before = listing(outside)

    # The attempt swaps folders for symlinks out of the workspace, and the hint names only paths beneath them.
    shutil.rmtree(ws / "src")
    os.symlink(str(outside), ws / "src")
    (ws / "data").rename(tmp_path / "data-moved")
    os.symlink("../outside", ws / "data")
    (outside / "secret").write_text("worker file")
    os.symlink(str(outside), ws / "escape")  # a path the tree does not have at all
    before = listing(outside)
    lies = {"src/pkg/m05.py", "src/main.py", "data/big.bin", "src/pkg/nothing/deeper", "escape/secret", "escape/new"}
    with contextlib.suppress(SnapshotError):  # refusing is fine; writing through the symlink is not
        engine.restore(info.id, ws, changes=ChangeSet(frozenset(lies)))
    assert listing(outside) == before, "the restore wrote outside its target"
    assert {p.name for p in tmp_path.iterdir()} <= {"data-moved", "outside", "scratch", "store", "ws"}
    # Whatever the hint left, a full restore (the rollback's fallback) brings the snapshot back, and the store is
    # intact: every object is still there and verifies.
    engine.restore(info.id, ws)
    assert engine.create(ws).id == info.id
    assert engine.verify(info.id).ok


def test_changeset_paths_are_checked(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    info = engine.create(ws)
    for bad in ("../etc/passwd", "/etc/passwd", "src/../../x", "", "a\0b"):
        with pytest.raises(ValueError, match="ChangeSet path"):
            engine.restore(info.id, ws, changes=ChangeSet(frozenset({bad})))


def test_a_changeset_restore_within_a_selection(engine: SnapshotEngine, tmp_path: Path) -> None:
    root = tmp_path / "fs"
    ws = make_workspace(root / "workspace")
    (ws / ".cache").mkdir()
    (ws / ".cache" / "kept").write_text("excluded")
    (root / "home").mkdir()
    (root / "home" / "notes").write_text("not covered")
    selection = Selection(roots=("workspace",), excludes=("**/.cache",))
    info = engine.create(root, selection=selection)

    (ws / "src" / "main.py").write_text("changed")
    (ws / ".cache" / "kept").write_text("excluded, changed")
    (root / "home" / "notes").write_text("outside the selection, changed")
    changed = {"workspace/src/main.py", "workspace/.cache/kept", "home/notes", "workspace"}
    stats = engine.restore(info.id, root, selection=selection, changes=ChangeSet(frozenset(changed)))
    assert stats.paths_hinted == 1  # "workspace" stands for everything beneath it
    assert (ws / "src" / "main.py").read_text() == "print('hi')\n"
    assert (ws / ".cache" / "kept").read_text() == "excluded, changed"
    assert (root / "home" / "notes").read_text() == "outside the selection, changed"
    assert engine.create(root, selection=selection).id == info.id


def test_a_tree_with_hard_links_restores_whole_even_with_a_changeset(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    os.link(ws / "src" / "main.py", ws / "main-again.py")
    info = engine.create(ws)
    expected = listing(ws)
    (ws / "src" / "main.py").unlink()
    (ws / "src" / "main.py").write_text("changed")
    stats = engine.restore(info.id, ws, changes=ChangeSet(frozenset({"src/main.py"})))
    assert stats.paths_hinted == 0  # merged whole: remaking one name of a shared inode needs the others
    assert listing(ws) == expected
    assert os.stat(ws / "src" / "main.py").st_ino == os.stat(ws / "main-again.py").st_ino


def test_a_rollback_keeps_the_stat_cache_whole(engine: SnapshotEngine, tmp_path: Path) -> None:
    """After a walking rollback, the next snapshot of the untouched folder reuses the snapshot without reading or
    even listing a file again: the cache written during the merge vouches for the folder as the restore left it."""
    ws, cache = make_workspace(tmp_path / "ws"), tmp_path / "cache"
    age(ws)
    info = engine.create(ws, cache_path=cache)
    for attempt in (edit_file, delete_and_add, new_nested_folders, type_changes, write_in_readonly_folder):
        attempt(ws)
        stats = engine.restore(info.id, ws, cache_path=cache)
        assert stats.files_written + stats.deleted >= 1
        again = engine.create(ws, cache_path=cache)
        assert again.id == info.id
        assert again.stats is not None
        assert (again.stats.files_read, again.stats.files_unchanged) == (0, 0), attempt.__name__  # whole reuse
    # And a file changed after the rollback is still seen.
    (ws / "src" / "pkg" / "m09.py").write_text("x = 10\n")
    changed = engine.create(ws, cache_path=cache)
    assert changed.id != info.id and changed.stats is not None and changed.stats.files_read == 1


def test_a_rollback_hashes_only_files_the_cache_cannot_vouch_for(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws, cache = make_workspace(tmp_path / "ws"), tmp_path / "cache"
    info = engine.create(ws, cache_path=cache)
    edit_file(ws)
    stats = engine.restore(info.id, ws, cache_path=cache)
    assert (stats.files_written, stats.deleted) == (1, 1)
    # Every other file was kept on its stat alone (the cache vouched for it), none hashed or rewritten.
    assert stats.files_kept == len([p for p in ws.rglob("*") if p.is_file() and not p.is_symlink()]) - 1
    assert engine.create(ws).id == info.id


def plant(engine: SnapshotEngine, lines: list[bytes]) -> str:
    """Store a tree of these lines as a crafted (or older) writer would: its id is its hash, so it verifies."""
    body = b"\n".join(lines)
    snapshot_id = blake3.blake3(body).hexdigest()
    engine.store.put(tree_key(snapshot_id), zstandard.ZstdCompressor().compress(body))
    return snapshot_id


def test_a_tree_spelled_another_way_restores_the_same(engine: SnapshotEngine, tmp_path: Path) -> None:
    """Another writer's spacing: every line is parsed instead of read by position, with the same result."""
    ws = make_workspace(tmp_path / "ws")
    info = engine.create(ws)
    with engine.open_tree(info.id) as tree:
        *entries, footer = tree.read_bytes().split(b"\n")
    respelled = [json.dumps(json.loads(line), separators=(", ", ": ")).encode() for line in entries]
    other = plant(engine, [*respelled, footer])
    expected = listing(ws)
    for attempt in (edit_file, delete_and_add, type_changes):
        changed = attempt(ws)
        stats = engine.restore(other, ws, changes=ChangeSet(frozenset(changed)))
        assert stats.paths_hinted > 0
        assert listing(ws) == expected
    with engine.open_tree(other) as tree:
        assert check_tree(other, tree) == TreeShape(canonical=True, hardlinks=False)
    edit_file(ws)
    engine.restore(other, ws)
    assert listing(ws) == expected


def test_a_line_with_a_repeated_key_is_restored_as_the_validator_read_it(
    engine: SnapshotEngine, tmp_path: Path
) -> None:
    """JSON takes a repeated key's last value; a reader picking the path from the line's start would see another
    path than the one validated. Such a tree is not canonical, so every line of it is parsed."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "b.txt").write_text("content")
    info = engine.create(ws)
    with engine.open_tree(info.id) as tree:
        [line, footer] = tree.read_bytes().split(b"\n")
    forged = line[:-1] + b',"p":"c.txt"}'  # validated (and restored) as c.txt; its first "p" says b.txt
    other = plant(engine, [forged, footer])
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.txt").write_text("changed")
    # Not validated yet: the ChangeSet restore finds the line by position, sees it is not what it says, and merges.
    engine.restore(other, out, changes=ChangeSet(frozenset({"c.txt"})))
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]
    assert (out / "c.txt").read_text() == "content"
    (out / "c.txt").write_text("changed")
    engine.restore(other, out, changes=ChangeSet(frozenset({"c.txt"})))  # validated now: known not canonical
    assert (out / "c.txt").read_text() == "content"
    engine.restore(other, out)
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]


def test_a_changeset_restore_of_an_encrypted_snapshot(tmp_path: Path) -> None:
    key = Encryption(base64.b64decode(new_key()))
    engine = SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch", encryption=key)
    ws = make_workspace(tmp_path / "ws")
    info = engine.create(ws)
    expected = listing(ws)
    changed = big_file_and_odd_name(ws) | edit_file(ws)
    stats = engine.restore(info.id, ws, changes=ChangeSet(frozenset(changed)))
    assert stats.paths_hinted == 3 and stats.files_written == 3
    assert listing(ws) == expected
