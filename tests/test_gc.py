"""Garbage collection: what it deletes, what it keeps, and that it is safe next to a concurrent writer."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.snapshots.gc import GcError, GcPolicy, load_epochs
from tardigrade.sandboxes.stores import FileStore, open_store


def objects(store_root: Path, prefix: str) -> set[str]:
    return {p.name for p in (store_root / prefix).rglob("*") if p.is_file()}


def snap(engine: SnapshotEngine, ws: Path, cache: Path, **labels: str) -> str:
    return engine.create(ws, cache_path=cache, labels={"pipeline": "p", **labels}).id


NO_GRACE = GcPolicy(keep_last=1, keep_within=0, grace=0)


def test_two_phase_collection_keeps_the_last_and_deletes_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "store"
    engine = SnapshotEngine(FileStore(root), scratch_dir=tmp_path / "scratch")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "stable.txt").write_text("same in every snapshot")
    ids = []
    for i in range(4):
        (ws / "changing.bin").write_bytes(os.urandom(2000) + bytes([i]))
        ids.append(snap(engine, ws, tmp_path / "cache"))
        time.sleep(0.01)
    packs_before = objects(root, "packs")

    first = engine.collect_garbage(NO_GRACE, now=time.time() + 1)
    assert sorted(first.records_deleted) == sorted(ids[:3]) and first.snapshots_kept == 1
    # The first pack also holds stable.txt, which the kept snapshot still uses: only two packs are garbage.
    assert first.packs_condemned == 2 and first.packs_deleted == 0, "phase one only condemns"
    assert objects(root, "packs") == packs_before
    assert [r.id for r in engine.list()] == [ids[3]]

    second = engine.collect_garbage(NO_GRACE, now=time.time() + 2)
    assert second.packs_deleted == 2 and second.trees_deleted == 3
    assert len(objects(root, "packs")) == len(packs_before) - 2
    assert engine.verify(ids[3]).ok, "what is kept is intact"
    engine.restore(ids[3], tmp_path / "out")
    assert (tmp_path / "out" / "stable.txt").read_text() == "same in every snapshot"
    assert [e.deleted for e in load_epochs(engine.store)] == [True]


def test_a_writer_never_reuses_a_condemned_pack(tmp_path: Path) -> None:
    """The race plain mark-and-sweep loses: dedupe would point a new snapshot at a pack about to be deleted."""
    root = tmp_path / "store"
    gc_side = SnapshotEngine(FileStore(root), scratch_dir=tmp_path / "scratch-gc")
    writer = SnapshotEngine(FileStore(root), scratch_dir=tmp_path / "scratch-writer")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("alpha" * 100)
    snap(writer, ws, tmp_path / "cache-1")
    (ws / "a.txt").write_text("beta" * 100)
    snap(writer, ws, tmp_path / "cache-1")
    report = gc_side.collect_garbage(NO_GRACE, now=time.time() + 1)
    assert report.packs_condemned == 1  # the pack holding "alpha"

    # Another sandbox writes "alpha" again: the writer's dedupe index knows exactly where "alpha" is stored.
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("alpha" * 100)
    info = writer.create(other, cache_path=tmp_path / "cache-2", labels={"pipeline": "p"})
    assert info.stats and info.stats.bytes_new == 500, "stored again rather than pointing at the condemned pack"

    gc_side.collect_garbage(GcPolicy(keep_last=5, keep_within=0, grace=0), now=time.time() + 2)
    assert writer.verify(info.id).ok


def test_a_snapshot_written_while_the_collector_marks_does_not_lose_its_data(tmp_path: Path) -> None:
    """The window every mark-and-sweep has: a snapshot written after the marks were taken, reusing a pack the
    sweep is about to delete. The epoch a grace period earlier told the writer not to reuse that pack."""
    from tardigrade.sandboxes.snapshots.gc import collect_garbage

    root = tmp_path / "store"
    engine = SnapshotEngine(FileStore(root), scratch_dir=tmp_path / "scratch")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("alpha" * 100)
    snap(engine, ws, tmp_path / "cache")
    (ws / "a.txt").write_text("beta" * 100)
    snap(engine, ws, tmp_path / "cache")
    t0 = time.time() + 1
    engine.collect_garbage(NO_GRACE, now=t0)  # condemns the pack that holds "alpha"

    written: list[str] = []

    def marks_while_a_writer_writes(snapshot_id: str) -> set[str]:
        if not written:
            other = tmp_path / "other"
            other.mkdir()
            (other / "a.txt").write_text("alpha" * 100)
            written.append(engine.create(other, cache_path=tmp_path / "cache-other").id)  # unlabeled: not "p"
        return {ref.pack for entry in engine.entries(snapshot_id) for ref in entry.chunks}

    report = collect_garbage(engine.store, NO_GRACE, tree_packs=marks_while_a_writer_writes, now=t0 + 1)
    assert report.packs_deleted == 1
    assert engine.verify(written[0]).ok, "the new snapshot must not point at the pack that was just deleted"


def test_an_unchanged_file_in_a_condemned_pack_is_stored_again(tmp_path: Path) -> None:
    """The stat cache says 'unchanged, reuse its chunks' - but its pack was condemned since."""
    root = tmp_path / "store"
    engine = SnapshotEngine(FileStore(root), scratch_dir=tmp_path / "scratch")
    old_ws, new_ws = tmp_path / "old", tmp_path / "new"
    old_ws.mkdir()
    new_ws.mkdir()
    (old_ws / "keep.txt").write_text("kept by the old sandbox only")
    snap(engine, old_ws, tmp_path / "cache-old")
    time.sleep(0.01)
    (new_ws / "x.txt").write_text("newer run")
    snap(engine, new_ws, tmp_path / "cache-new")  # the pipeline's newest snapshot: keep_last=1 keeps only this
    engine.collect_garbage(NO_GRACE, now=time.time() + 1)
    (old_ws / "more.txt").write_text("the old sandbox goes on")
    info = engine.create(old_ws, cache_path=tmp_path / "cache-old", labels={"pipeline": "p"})
    assert info.stats and info.stats.files_read == 2
    engine.collect_garbage(GcPolicy(keep_last=5, keep_within=0, grace=0), now=time.time() + 2)
    assert engine.verify(info.id).ok


def test_dry_run_and_the_lock(tmp_path: Path) -> None:
    root = tmp_path / "store"
    engine = SnapshotEngine(FileStore(root), scratch_dir=tmp_path / "scratch")
    ws = tmp_path / "ws"
    ws.mkdir()
    for i in range(3):
        (ws / "f").write_text(str(i))
        snap(engine, ws, tmp_path / "cache")
    before = {p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts}
    report = engine.collect_garbage(GcPolicy(keep_last=1, keep_within=0, grace=0, dry_run=True), now=time.time() + 1)
    assert len(report.records_deleted) == 2
    assert {p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts} == before

    engine.store.put("gc/lock", b'{"token": "someone", "expires": 9999999999}')
    with pytest.raises(GcError, match="another garbage collection holds gc/lock"):
        engine.collect_garbage(NO_GRACE)


def _writer(store_url: str, ws: str, cache: str, scratch: str, rounds: int, out: str) -> None:
    engine = SnapshotEngine(open_store(store_url), scratch_dir=Path(scratch))
    ids = []
    contents = [os.urandom(3000) for _ in range(5)]
    for i in range(rounds):
        # Contents come back after the snapshots that stored them were dropped: dedupe then points at packs
        # the collector has condemned - the race this protocol exists for.
        for j in range(3):
            Path(ws, f"hot{j}.bin").write_bytes(contents[(i // 2 + j) % len(contents)])
        if i % 7 == 0:
            Path(ws, f"cold{i}.bin").write_bytes(os.urandom(5000))
        time.sleep(0.02)
        ids.append(engine.create(ws, cache_path=Path(cache), labels={"pipeline": "p"}).id)
    Path(out).write_text("\n".join(ids))


def _collector(store_url: str, scratch: str, stop_file: str, out: str) -> None:
    engine = SnapshotEngine(open_store(store_url), scratch_dir=Path(scratch))
    runs = deleted = 0
    while not Path(stop_file).exists():
        report = engine.collect_garbage(GcPolicy(keep_last=2, keep_within=0, grace=0.3))
        runs += 1
        deleted += report.packs_deleted
        time.sleep(0.05)
    Path(out).write_text(f"{runs} {deleted}")


def test_collection_running_beside_a_writer_never_breaks_a_kept_snapshot(tmp_path: Path) -> None:
    store_url = (tmp_path / "store").as_uri()
    ws = tmp_path / "ws"
    ws.mkdir()
    ctx = multiprocessing.get_context("spawn")
    writer = ctx.Process(
        target=_writer,
        args=(store_url, str(ws), str(tmp_path / "cache"), str(tmp_path / "sw"), 120, str(tmp_path / "ids")),
    )
    collector = ctx.Process(
        target=_collector, args=(store_url, str(tmp_path / "sc"), str(tmp_path / "stop"), str(tmp_path / "gc"))
    )
    writer.start()
    collector.start()
    writer.join(120)
    (tmp_path / "stop").touch()
    collector.join(60)
    assert writer.exitcode == 0 and collector.exitcode == 0
    runs, deleted = map(int, (tmp_path / "gc").read_text().split())
    assert runs > 5 and deleted > 0, "the collector really ran and really deleted packs"

    engine = SnapshotEngine(open_store(store_url), scratch_dir=tmp_path / "check")
    last = (tmp_path / "ids").read_text().split()[-1]
    for record in engine.list():
        assert engine.verify(record.id).ok, f"kept snapshot {record.id} lost data"
    assert engine.verify(last).ok
    engine.restore(last, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in ws.iterdir())
