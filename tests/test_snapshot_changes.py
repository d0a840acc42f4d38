"""Snapshots from a `ChangeSet` hint: only the listed paths are looked at, the rest is the parent's tree.

Each case compares the hinted snapshot with a full walk of the same folder: the trees must be identical (same id,
same digest). A hint that leaves a change out may miss that change, never produce a tree naming missing data."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.store_keys import pack_key
from tardigrade.sandboxes.stores import FileStore


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[SnapshotEngine]:
    e = SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch", encryption=None)
    yield e
    e.close()


def workspace(root: Path) -> Path:
    (root / "src" / "pkg").mkdir(parents=True)
    for i in range(20):
        (root / "src" / "pkg" / f"m{i:02}.py").write_text(f"x = {i}\n")
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / "docs").mkdir()
    (root / "docs" / "a.md").write_text("# a\n")
    (root / "empty").mkdir()
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    os.symlink("src/main.py", root / "link")
    (root / "top.txt").write_text("top\n")
    return root


def same_as_walk(engine: SnapshotEngine, ws: Path, parent: str, paths: set[str], tmp_path: Path) -> str:
    hinted = engine.create(ws, parent=parent, changes=ChangeSet(frozenset(paths)), cache_path=tmp_path / "cache")
    walked = engine.create(ws)
    assert (hinted.id, hinted.digest) == (walked.id, walked.digest), "the hinted tree differs from a walk's"
    return hinted.id


CASES: dict[str, tuple[Callable[[Path], None], set[str]]] = {
    "create": (lambda ws: (ws / "src" / "pkg" / "new.py").write_text("new\n"), {"src/pkg/new.py"}),
    "modify": (lambda ws: (ws / "src" / "pkg" / "m03.py").write_text("changed = True\n"), {"src/pkg/m03.py"}),
    "delete": (lambda ws: (ws / "docs" / "a.md").unlink(), {"docs/a.md"}),
    "mode": (lambda ws: (ws / "run.sh").chmod(0o700), {"run.sh"}),
    "file becomes folder": (
        lambda ws: ((ws / "top.txt").unlink(), (ws / "top.txt").mkdir(), (ws / "top.txt" / "in").write_text("i")),
        {"top.txt"},
    ),
    "folder becomes file": (lambda ws: (shutil.rmtree(ws / "docs"), (ws / "docs").write_text("flat")), {"docs"}),
    "file becomes symlink": (lambda ws: ((ws / "top.txt").unlink(), os.symlink("/etc", ws / "top.txt")), {"top.txt"}),
    "folder renamed": (lambda ws: (ws / "src").rename(ws / "lib"), {"src", "lib"}),
    "listed but unchanged": (lambda ws: None, {"src/pkg/m05.py", "docs", "nope/never/existed"}),
    "deleted folder": (lambda ws: shutil.rmtree(ws / "src"), {"src"}),
    "new nested folder, only its file listed": (
        lambda ws: ((ws / "new" / "deep").mkdir(parents=True), (ws / "new" / "deep" / "x").write_text("x")),
        {"new/deep/x"},
    ),
    "listed path beneath a file": (lambda ws: (ws / "top.txt").write_text("longer top\n"), {"top.txt/below"}),
    "listed path beneath a symlink": (lambda ws: None, {"link/etc/passwd", "link"}),
    "nothing listed": (lambda ws: None, set()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hinted_snapshot_equals_a_full_walk(engine: SnapshotEngine, tmp_path: Path, case: str) -> None:
    ws = workspace(tmp_path / "ws")
    parent = engine.create(ws, cache_path=tmp_path / "cache")
    change, paths = CASES[case]
    change(ws)
    snapshot_id = same_as_walk(engine, ws, parent.id, paths, tmp_path)
    assert engine.verify(snapshot_id).ok


def test_a_hinted_snapshot_stats_only_what_is_listed(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    parent = engine.create(ws, cache_path=tmp_path / "cache")
    (ws / "src" / "pkg" / "m03.py").write_text("changed = True\n")
    (ws / "docs" / "a.md").write_text("# unlisted edit\n")  # the hint leaves it out: the parent's stays
    info = engine.create(ws, parent=parent.id, changes=ChangeSet(frozenset({"src/pkg/m03.py"})))
    assert info.stats is not None and info.stats.files_read == 1
    out = tmp_path / "out"
    engine.restore(info.id, out)
    assert (out / "src" / "pkg" / "m03.py").read_text() == "changed = True\n"
    assert (out / "docs" / "a.md").read_text() == "# a\n", "an unlisted change is the hint's to report"
    assert engine.verify(info.id).ok
    # A full walk afterwards still sees the unlisted edit: the stat cache never vouched for it.
    walked = engine.create(ws, cache_path=tmp_path / "cache")
    engine.restore(walked.id, out)
    assert (out / "docs" / "a.md").read_text() == "# unlisted edit\n"


def test_successive_hints_chain_like_walks(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    parent = engine.create(ws, cache_path=tmp_path / "cache").id
    for step in range(4):
        (ws / "src" / "pkg" / f"step{step}.py").write_text(f"step = {step}\n")
        (ws / "src" / "pkg" / f"m{step:02}.py").unlink()
        listed = {f"src/pkg/step{step}.py", f"src/pkg/m{step:02}.py"}
        parent = same_as_walk(engine, ws, parent, listed, tmp_path)


def test_hard_links_fall_back_to_a_walk(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    parent = engine.create(ws, cache_path=tmp_path / "cache")
    os.link(ws / "top.txt", ws / "docs" / "hard.txt")
    same_as_walk(engine, ws, parent.id, {"docs/hard.txt"}, tmp_path)
    (ws / "docs" / "hard.txt").unlink()
    (ws / "top.txt").write_text("no longer linked\n")
    same_as_walk(engine, ws, parent.id, {"docs/hard.txt", "top.txt"}, tmp_path)


def test_selection_applies_to_listed_paths(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    selection = Selection(roots=("src",), excludes=("**/*.log",))
    parent = engine.create(ws, selection=selection)
    (ws / "src" / "pkg" / "debug.log").write_text("noise")
    (ws / "docs" / "b.md").write_text("outside the selection")
    (ws / "src" / "extra.py").write_text("x")
    listed = ChangeSet(frozenset({"src/pkg/debug.log", "docs/b.md", "src/extra.py"}))
    hinted = engine.create(ws, selection=selection, parent=parent.id, changes=listed)
    assert hinted.id == engine.create(ws, selection=selection).id
    # A parent taken with another selection cannot stand in for this walk: the hint is not used.
    other = engine.create(ws, selection=Selection(roots=("docs",)), parent=parent.id, changes=listed)
    assert other.id == engine.create(ws, selection=Selection(roots=("docs",))).id


def test_a_lying_hint_never_names_missing_data(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    parent = engine.create(ws)
    # Every pack the parent's files live in disappears from the store (an operator, a lifecycle rule).
    for pack in {ref.pack for entry in engine.entries(parent.id) for ref in entry.chunks}:
        (tmp_path / "store" / pack_key(pack)).unlink()
    (ws / "docs" / "c.md").write_text("c\n")
    info = engine.create(ws, parent=parent.id, changes=ChangeSet(frozenset({"docs/c.md"})))
    report = engine.verify(info.id)
    assert report.ok, report.problems
    out = tmp_path / "out"
    engine.restore(info.id, out)
    assert (out / "src" / "pkg" / "m07.py").read_text() == "x = 7\n"


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc", "a/./b", "a//b", "", "a\0b"])
def test_a_malformed_hint_is_refused_with_its_path_named(engine: SnapshotEngine, tmp_path: Path, bad: str) -> None:
    ws = workspace(tmp_path / "ws")
    parent = engine.create(ws)
    with pytest.raises(ValueError, match="ChangeSet path"):
        engine.create(ws, parent=parent.id, changes=ChangeSet(frozenset({bad})))


def test_a_hint_with_an_unreadable_parent_walks_the_folder(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    info = engine.create(ws, parent="0" * 64, changes=ChangeSet(frozenset({"top.txt"})))
    assert info.id == engine.create(ws).id


def test_kept_entries_with_odd_names_are_carried_exactly(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    odd = ['quote"d', "back\\slash", "new\nline", "tab\there", "ünï✓", os.fsdecode(b"bad-\xff-utf8")]
    for name in odd:
        (ws / "docs" / name).write_bytes(os.fsencode(name))
        (ws / "src" / name).mkdir()
        (ws / "src" / name / "in.txt").write_text("inside")
    parent = engine.create(ws, cache_path=tmp_path / "cache")
    (ws / "docs" / "a.md").write_text("# edited\n")
    (ws / "src" / odd[0] / "in.txt").write_text("edited inside")
    same_as_walk(engine, ws, parent.id, {"docs/a.md", f"src/{odd[0]}/in.txt"}, tmp_path)
