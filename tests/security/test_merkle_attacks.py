"""Attacks on tardigrade-tree/2 (snapshots/merkle.py) beyond the crafted objects of test_snapshot_merkle.py: a
worker's local `.folders` file (the folder listings kept next to a cached tree) that is truncated or belongs to
another tree must never make a checkpoint wrong or stuck."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.snapshots.crypto import Encryption, new_key
from tardigrade.sandboxes.snapshots.gc import GcPolicy
from tardigrade.sandboxes.stores import FileStore
from tests.test_snapshot_merkle import fresh


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[SnapshotEngine]:
    e = SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch", encryption=None)
    e.merkle_from_bytes = 0  # tree/2 however small the workspace
    yield e
    e.close()


def walked_id(engine: SnapshotEngine, tmp_path: Path, ws: Path, name: str) -> str:
    """The snapshot id a worker with nothing cached gives the folder."""
    walker = fresh(engine, tmp_path, name)
    try:
        return walker.create(ws).id
    finally:
        walker.close()


def folders_file(engine: SnapshotEngine, snapshot_id: str) -> Path:
    return engine.scratch / "trees" / engine.identity / f"{snapshot_id}.folders"


def two_snapshots(engine: SnapshotEngine, ws: Path, cache: Path) -> tuple[str, str]:
    """``a/f`` is "one" in the first snapshot and "two" in the second."""
    (ws / "a").mkdir(parents=True)
    (ws / "a" / "f").write_text("one\n")
    (ws / "top").write_text("0\n")
    first = engine.create(ws, cache_path=cache)
    time.sleep(1.1)  # past the stat cache's racy window
    (ws / "a" / "f").write_text("two\n")
    second = engine.create(ws, cache_path=cache, parent=first.id, changes=ChangeSet(frozenset({"a/f"})))
    return first.id, second.id


@pytest.mark.parametrize("damage", ["truncated", "empty", "not json", "another tree's"])
def test_a_damaged_or_foreign_folders_file_never_makes_a_checkpoint_wrong(
    engine: SnapshotEngine, tmp_path: Path, damage: str
) -> None:
    """The next checkpoint splices its parent's listings of untouched folders from the `.folders` file: one cut
    short by a full disk, or one of another tree (the parent's own parent, whose ``a`` listing says ``a/f`` is
    "one"), must be noticed and read again from the store, so the checkpoint is the tree a whole walk gives."""
    ws, cache = tmp_path / "ws", tmp_path / "cache"
    first, second = two_snapshots(engine, ws, cache)
    damaged = folders_file(engine, second)
    good = damaged.read_bytes()
    damaged.unlink()
    if damage == "truncated":
        damaged.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        damaged.write_bytes(b"")
    elif damage == "not json":
        damaged.write_bytes(b"\0" * 64)
    else:
        damaged.write_bytes(folders_file(engine, first).read_bytes())
    time.sleep(1.1)
    (ws / "top").write_text("1\n")  # the change is elsewhere: the parent's listing of `a` is reused
    third = engine.create(ws, cache_path=cache, parent=second, changes=ChangeSet(frozenset({"top"})))
    assert third.id == walked_id(engine, tmp_path, ws, "walker")
    reader = fresh(engine, tmp_path, "reader")
    reader.restore(third.id, tmp_path / "out")
    reader.close()
    assert (tmp_path / "out" / "a" / "f").read_text() == "two\n"


def test_a_foreign_folders_file_never_loses_a_kept_snapshots_listings_to_gc(
    engine: SnapshotEngine, tmp_path: Path
) -> None:
    """GC marks a kept tree's listing packs from its `.folders` file: one of another tree (naming that tree's
    listing of ``a``) must not get the kept snapshot's own listing of ``a`` condemned and deleted."""
    ws, cache = tmp_path / "ws", tmp_path / "cache"
    first, second = two_snapshots(engine, ws, cache)
    folders_file(engine, second).unlink()
    folders_file(engine, second).write_bytes(folders_file(engine, first).read_bytes())
    kept = GcPolicy(keep_last=1, keep_within=0, grace=0)
    engine.collect_garbage(kept, now=time.time() + 1)
    engine.collect_garbage(kept, now=time.time() + 2)
    reader = fresh(engine, tmp_path, "reader")
    reader.restore(second, tmp_path / "out")
    reader.close()
    assert (tmp_path / "out" / "a" / "f").read_text() == "two\n"


def test_encrypted_listings_leave_no_name_readable_in_the_store(tmp_path: Path) -> None:
    """With encryption on, folder listings are blobs in packs like file contents: encrypted, so no folder or file
    name reaches the store in plain text, and another worker with the key assembles and restores the tree."""
    enc = Encryption(base64.b64decode(new_key()))
    engine = SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "s", encryption=enc)
    engine.merkle_from_bytes = 0
    ws = tmp_path / "ws"
    (ws / "secret-folder" / "inner-secret").mkdir(parents=True)
    (ws / "secret-folder" / "inner-secret" / "secret-name.txt").write_text("x\n")
    info = engine.create(ws)
    assert engine.folders_of(info.id), "stored as tardigrade-tree/2"
    for o in engine.raw_store.list(""):
        data = engine.raw_store.get(o.key)
        assert b"secret" not in data, o.key
    engine.close()
    reader = SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "r", encryption=enc)
    reader.restore(info.id, tmp_path / "out")
    reader.close()
    assert (tmp_path / "out" / "secret-folder" / "inner-secret" / "secret-name.txt").read_text() == "x\n"
