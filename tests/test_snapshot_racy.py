"""The racy-git case: a file rewritten with the same size within one timestamp tick of the snapshot that recorded
it keeps an identical stat, so the stat cache alone cannot tell. Files that fresh are re-hashed next time."""

from __future__ import annotations

import time
from pathlib import Path

from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.snapshots.statcache import stat_key
from tardigrade.sandboxes.stores import FileStore


def _engine(tmp_path: Path) -> SnapshotEngine:
    return SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch", encryption=None)


def _same_stat_rewrite(cache: Path, target: Path, content: bytes) -> None:
    """Rewrite ``target`` with same-size ``content`` and make the cache see the very stat it recorded, as happens
    when the rewrite lands within the timestamp tick of the snapshot's stat (the kernel's clock is coarse: ctime
    and mtime do not move). Only the stat fields are swapped; whatever else the cache wrote stays."""
    before = target.stat()
    target.write_bytes(content)
    after = target.stat()
    old_key, new_key = stat_key(before).encode(), stat_key(after).encode()
    data = cache.read_bytes()
    assert data.count(old_key) == 1, "the cache records the file's stat once"
    cache.write_bytes(data.replace(old_key, new_key))


def test_a_same_stat_rewrite_right_after_a_snapshot_is_not_missed(tmp_path: Path) -> None:
    engine, ws, cache = _engine(tmp_path), tmp_path / "ws", tmp_path / "cache"
    ws.mkdir()
    target = ws / "f.txt"
    target.write_bytes(b"A" * 100)
    (ws / "old.txt").write_bytes(b"old")
    first = engine.create(ws, cache_path=cache)
    _same_stat_rewrite(cache, target, b"B" * 100)
    second = engine.create(ws, cache_path=cache, parent=first.id)
    assert second.id != first.id, "the rewrite was missed: the cache vouched for a file written in its own tick"
    engine.restore(second.id, tmp_path / "out")
    assert (tmp_path / "out" / "f.txt").read_bytes() == b"B" * 100
    engine.close()


def test_fresh_files_are_rehashed_once_and_then_trusted(tmp_path: Path) -> None:
    engine, ws, cache = _engine(tmp_path), tmp_path / "ws", tmp_path / "cache"
    ws.mkdir()
    for i in range(5):
        (ws / f"f{i}").write_text(f"file {i}\n")
    first = engine.create(ws, cache_path=cache)
    again = engine.create(ws, cache_path=cache, parent=first.id)
    assert again.id == first.id and again.stats is not None
    # Unchanged content: nothing read as changed and nothing stored, but each fresh file was hashed again.
    assert (again.stats.files_read, again.stats.files_rechecked, again.stats.bytes_new) == (0, 5, 0)
    time.sleep(1.2)  # out of the racy window: the next snapshot's cache may vouch for them
    settled = engine.create(ws, cache_path=cache, parent=first.id)
    assert settled.stats is not None and settled.stats.files_rechecked == 5
    quiet = engine.create(ws, cache_path=cache, parent=first.id)
    assert quiet.id == first.id and quiet.stats is not None
    assert (quiet.stats.files_read, quiet.stats.files_rechecked) == (0, 0)
    engine.close()


def test_a_restored_file_with_a_fresh_mtime_is_rehashed_after_a_same_stat_rewrite(tmp_path: Path) -> None:
    engine, ws, cache = _engine(tmp_path), tmp_path / "ws", tmp_path / "cache"
    ws.mkdir()
    target = ws / "f.txt"
    target.write_bytes(b"A" * 100)
    first = engine.create(ws)
    out = tmp_path / "out"
    engine.restore(first.id, out, cache_path=cache)
    _same_stat_rewrite(cache, out / "f.txt", b"C" * 100)
    second = engine.create(out, cache_path=cache, parent=first.id)
    assert second.id != first.id
    engine.close()
