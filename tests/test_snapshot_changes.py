"""Snapshots from a `ChangeSet` hint: only the listed paths are looked at, the rest is the parent's tree.

Each case compares the hinted snapshot with a full walk of the same folder: the trees must be identical (same id,
same digest). A hint that leaves a change out may miss that change, never produce a tree naming missing data."""

from __future__ import annotations

import os
import random
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


def same_as_walk(
    engine: SnapshotEngine, ws: Path, parent: str, paths: set[str], tmp_path: Path, spliced: bool = True
) -> str:
    hinted = engine.create(ws, parent=parent, changes=ChangeSet(frozenset(paths)), cache_path=tmp_path / "cache")
    walked = engine.create(ws)
    assert (hinted.id, hinted.digest) == (walked.id, walked.digest), "the hinted tree differs from a walk's"
    assert hinted.stats is not None and hinted.stats.spliced == spliced, "spliced" if not spliced else "not spliced"
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
    same_as_walk(engine, ws, parent.id, {"docs/hard.txt"}, tmp_path, spliced=False)
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


# -- splicing the parent's tree (splice.py): the side file next to each cached tree -----------------------------


def side_file(engine: SnapshotEngine, snapshot_id: str) -> Path:
    return engine.scratch / "trees" / engine.identity / f"{snapshot_id}.side"


def tamper_record(side: Path) -> None:
    """Change one content hash inside the side file's records, keeping its length and its footer."""
    data = bytearray(side.read_bytes())
    at = data.index(b"\0f\0") + 3
    at = data.index(b"\0", at) + 1  # the content hash follows the mode
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    side.write_bytes(bytes(data))


def tamper_footer(side: Path) -> None:
    """Claim one entry more in the footer, keeping the records (a footer written by someone else)."""
    data = side.read_bytes()
    cut = data.rfind(b"\n") + 1
    side.write_bytes(data[:cut] + data[cut:].replace(b'"entries":', b'"entries":1', 1))


SIDE_DAMAGE: dict[str, Callable[[SnapshotEngine, str], None]] = {
    "deleted": lambda e, sid: side_file(e, sid).unlink(),
    "a record changed": lambda e, sid: tamper_record(side_file(e, sid)),
    "footer claims another count": lambda e, sid: tamper_footer(side_file(e, sid)),
    "truncated": lambda e, sid: side_file(e, sid).write_bytes(side_file(e, sid).read_bytes()[:-40]),
    "empty": lambda e, sid: side_file(e, sid).write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(SIDE_DAMAGE))
def test_a_damaged_side_file_is_rebuilt_from_the_tree(engine: SnapshotEngine, tmp_path: Path, damage: str) -> None:
    ws = workspace(tmp_path / "ws")
    parent = engine.create(ws, cache_path=tmp_path / "cache")
    assert side_file(engine, parent.id).exists(), "a walk leaves the side file of its tree"
    SIDE_DAMAGE[damage](engine, parent.id)
    (ws / "src" / "pkg" / "m03.py").write_text("changed = True\n")
    (ws / "docs" / "new.md").write_text("new\n")
    same_as_walk(engine, ws, parent.id, {"src/pkg/m03.py", "docs/new.md"}, tmp_path)


def test_a_side_file_of_another_tree_is_not_used(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    parent = engine.create(ws, cache_path=tmp_path / "cache")
    (ws / "top.txt").write_text("other\n")
    other = engine.create(ws, cache_path=tmp_path / "cache")
    shutil.copyfile(side_file(engine, other.id), side_file(engine, parent.id))
    (ws / "top.txt").write_text("top\n")
    (ws / "docs" / "a.md").write_text("# b\n")
    same_as_walk(engine, ws, parent.id, {"top.txt", "docs/a.md"}, tmp_path)


def test_a_parent_fetched_from_the_store_is_spliced_after_one_pass(tmp_path: Path) -> None:
    """Another worker's parent: its tree comes from the store without a side file, which is built from it."""
    ws = workspace(tmp_path / "ws")
    first = SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch1", encryption=None)
    parent = first.create(ws).id
    first.close()
    engine = SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch2", encryption=None)
    try:
        (ws / "src" / "pkg" / "m09.py").unlink()
        same_as_walk(engine, ws, parent, {"src/pkg/m09.py"}, tmp_path)
        assert side_file(engine, parent).exists()
    finally:
        engine.close()


def test_a_symlink_target_with_a_newline_is_not_spliced(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    os.symlink("two\nlines", ws / "docs" / "odd-link")
    parent = engine.create(ws, cache_path=tmp_path / "cache")
    assert not side_file(engine, parent.id).exists(), "its digest records cannot be bisected by line"
    (ws / "top.txt").write_text("changed\n")
    same_as_walk(engine, ws, parent.id, {"top.txt"}, tmp_path, spliced=False)


def test_a_parent_using_a_pack_condemned_by_gc_is_not_spliced(engine: SnapshotEngine, tmp_path: Path) -> None:
    from tardigrade.sandboxes.snapshots.gc import Epoch

    ws = workspace(tmp_path / "ws")
    parent = engine.create(ws, cache_path=tmp_path / "cache")
    packs = frozenset(ref.pack for entry in engine.entries(parent.id) for ref in entry.chunks)
    epoch = Epoch(id="e1", created=1.0, packs=packs, trees=frozenset(), deleted=False)
    engine.store.put(epoch.key, epoch.to_json())  # a GC run condemned them: they are deleted after its grace period
    (ws / "top.txt").write_text("changed\n")
    info = engine.create(ws, parent=parent.id, changes=ChangeSet(frozenset({"top.txt"})))
    assert info.stats is not None and not info.stats.spliced
    assert not packs & {ref.pack for entry in engine.entries(info.id) for ref in entry.chunks}


NAMES = ["a", "a-b", "a.b", "a b", "ab", "b", "Z", "ü", 'q"t', "n\nl", "z"]


def test_random_changes_splice_exactly_like_walks(engine: SnapshotEngine, tmp_path: Path) -> None:
    """Names that sort differently by bytes and by components ('a-b' before 'a/b' as bytes, after as paths),
    nested folders, deletions of whole subtrees and kind changes, over a chain of spliced snapshots."""
    import random

    rng = random.Random(12)
    ws = tmp_path / "ws"
    ws.mkdir()
    parent = engine.create(ws, cache_path=tmp_path / "cache").id
    for _step in range(25):
        listed: set[str] = set()
        for _ in range(rng.randint(1, 4)):
            path = "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, 3)))
            target = ws / path
            listed.add(path)
            action = rng.choice(["file", "file", "folder", "delete", "symlink"])
            if any(p.is_symlink() or p.is_file() for p in target.parents if p != ws and ws in p.parents):
                continue  # beneath a file or symlink: nothing can be made there
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            if action == "file":
                target.write_text(f"{path} {rng.random()}")
            elif action == "folder":
                (target / rng.choice(NAMES)).mkdir(parents=True)
            elif action == "symlink":
                os.symlink(rng.choice(NAMES[:-2]), target)  # a target with a newline is never spliced
        parent = same_as_walk(engine, ws, parent, listed, tmp_path)


# -- walking snapshots splice too: the walk's stats against the last walk's (walkfile.py) ----------------------


def random_step(rng: random.Random, ws: Path, names: list[str]) -> None:
    for _ in range(rng.randint(1, 4)):
        path = "/".join(rng.choice(names) for _ in range(rng.randint(1, 3)))
        target = ws / path
        if any(p.is_symlink() or p.is_file() for p in target.parents if p != ws and ws in p.parents):
            continue
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        action = rng.choice(["file", "file", "folder", "delete", "symlink", "mode"])
        if action in ("file", "mode"):
            target.write_text(f"{path} {rng.random()}")
            if action == "mode":
                target.chmod(0o755)
        elif action == "folder":
            (target / rng.choice(names)).mkdir(parents=True)
        elif action == "symlink":
            os.symlink(rng.choice(NAMES[:-2]), target)


@pytest.mark.parametrize("names", [[*NAMES[:-2], "z"], NAMES], ids=["odd names", "a name with a newline"])
def test_walking_snapshots_splice_exactly_like_full_walks(
    engine: SnapshotEngine, tmp_path: Path, names: list[str]
) -> None:
    """A name with a newline cannot be a line of the walk file: those walks are not spliced, still right."""
    rng = random.Random(7)
    ws = workspace(tmp_path / "ws")
    cache = tmp_path / "cache"
    engine.create(ws, cache_path=cache)
    spliced = 0
    for _step in range(30):
        random_step(rng, ws, names)
        walked = engine.create(ws, cache_path=cache)
        full = engine.create(ws)  # no stat cache: every file read, every entry built
        assert (walked.id, walked.digest) == (full.id, full.digest), "the spliced walk differs from a full one"
        assert walked.stats is not None
        spliced += walked.stats.spliced
        again = engine.create(ws, cache_path=cache)
        assert again.id == full.id and again.stats is not None and again.stats.files_read == 0
    if "n\nl" not in names:
        assert spliced >= 25, f"only {spliced} of 30 walking snapshots were spliced"


def test_a_walking_snapshot_reads_only_what_changed(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    cache = tmp_path / "cache"
    engine.create(ws, cache_path=cache)
    (ws / "src" / "pkg" / "m04.py").write_text("x = 'four'\n")
    (ws / "docs" / "a.md").unlink()
    info = engine.create(ws, cache_path=cache)
    assert info.stats is not None and info.stats.spliced and info.stats.files_read == 1
    out = tmp_path / "out"
    engine.restore(info.id, out)
    assert (out / "src" / "pkg" / "m04.py").read_text() == "x = 'four'\n" and not (out / "docs" / "a.md").exists()


WALK_DAMAGE: dict[str, Callable[[Path], None]] = {
    "deleted": lambda walk: walk.unlink(),
    "a stat changed": lambda walk: walk.write_bytes(walk.read_bytes().replace(b"\0", b"\0" + b"1", 1)),
    "a line dropped": lambda walk: walk.write_bytes(walk.read_bytes().split(b"\n", 1)[1]),
}


@pytest.mark.parametrize("damage", list(WALK_DAMAGE))
def test_a_damaged_walk_file_is_not_trusted(engine: SnapshotEngine, tmp_path: Path, damage: str) -> None:
    ws = workspace(tmp_path / "ws")
    cache = tmp_path / "cache"
    engine.create(ws, cache_path=cache)
    WALK_DAMAGE[damage](tmp_path / "cache.walk")
    (ws / "src" / "pkg" / "m04.py").write_text("x = 'four'\n")
    walked = engine.create(ws, cache_path=cache)
    assert walked.stats is not None and not walked.stats.spliced
    assert walked.id == engine.create(ws).id


def test_a_folder_swapped_for_a_symlink_is_never_read_through(engine: SnapshotEngine, tmp_path: Path) -> None:
    """The last walk saw docs/a.md; now docs is a symlink to a folder outside holding an a.md. The walking splice
    must drop docs/a.md, never stat or read it through the symlink."""
    ws = workspace(tmp_path / "ws")
    cache = tmp_path / "cache"
    engine.create(ws, cache_path=cache)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.md").write_text("secret outside the workspace\n")
    shutil.rmtree(ws / "docs")
    os.symlink(outside, ws / "docs")
    walked = engine.create(ws, cache_path=cache)
    assert walked.stats is not None and walked.stats.spliced
    assert walked.id == engine.create(ws).id
    assert "docs/a.md" not in {entry.path for entry in engine.entries(walked.id)}
