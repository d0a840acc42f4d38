"""Reading files for a snapshot on two cores (snapshots/ingest.py, packs.py): what is compressed, what is not,
and what a failure on one of the helper threads leaves behind (nothing: no thread, no descriptor, no tree)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pyfastcdc
import pytest

from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.snapshots.create import CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, LARGE_FILE, _read_file
from tardigrade.sandboxes.snapshots.index import BlobIndex
from tardigrade.sandboxes.snapshots.ingest import LargeFiles
from tardigrade.sandboxes.snapshots.packs import PackWriter
from tardigrade.sandboxes.snapshots.tree import CODEC_RAW, CODEC_ZSTD
from tardigrade.sandboxes.stores import FileStore

HELPER_THREADS = ("snapshot-large-files", "snapshot-file-hash", "pack-upload")
TEXT = b"".join(
    b"def handler_%d(request):\n    return {'status': %d, 'body': request.body}\n" % (i, i) for i in range(400)
)


def helper_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(HELPER_THREADS)}


def open_fds() -> set[tuple[str, str]]:
    """This process's descriptors and what they point at. Sockets are left out: a Temporal client an earlier test
    in this worker process left behind may reconnect at any moment, on a thread of its own."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
        if not target.startswith("socket:"):
            fds.add((fd, target))
    return fds


def assert_nothing_left(before_fds: set[tuple[str, str]], before_threads: set[threading.Thread]) -> None:
    """No helper thread and no descriptor that was not there before. Only new ones count: the garbage collector
    may close a descriptor an earlier test's object held, or a helper thread of one may end, meanwhile."""
    assert helper_threads() - before_threads == set()
    assert open_fds() - before_fds == set()


def text(size: int) -> bytes:
    return (TEXT * (size // len(TEXT) + 1))[:size]


def codecs(engine: SnapshotEngine, snapshot_id: str) -> dict[str, set[int]]:
    return {e.path: {c.codec for c in e.chunks} for e in engine.entries(snapshot_id) if e.chunks}


def test_compression_is_used_where_it_pays_and_skipped_where_it_does_not(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    files = {
        "code.py": text(10_000),  # small text: compressed
        "random.bin": os.urandom(10_000),  # small, incompressible: stored as it is
        "tiny-random.bin": os.urandom(5_000),  # too small to sample: compression is tried and refused
        "archive.zip": os.urandom(600_000) + text(20_000),  # random start, a little text: raw
        "big-text.log": text(3 << 20),  # large and compressible: every chunk compressed
        "big-random.bin": os.urandom(3 << 20),  # large and random: every chunk raw
        "empty": b"",
    }
    for name, data in files.items():
        (ws / name).write_bytes(data)
    engine = SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch")
    info = engine.create(ws)
    assert codecs(engine, info.id) == {
        "code.py": {CODEC_ZSTD},
        "random.bin": {CODEC_RAW},
        "tiny-random.bin": {CODEC_RAW},
        "archive.zip": {CODEC_RAW},
        "big-text.log": {CODEC_ZSTD},
        "big-random.bin": {CODEC_RAW},
    }
    assert info.stats is not None
    raw = sum(len(d) for d in files.values())
    random_bytes = 10_000 + 5_000 + 620_000 + (3 << 20)
    # Text shrinks a lot; random data is stored once, at its own size, never bigger.
    assert random_bytes <= info.stats.bytes_stored < random_bytes + 0.2 * (raw - random_bytes)
    engine.restore(info.id, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == files


def test_the_sample_decides_without_compressing_everything(tmp_path: Path) -> None:
    writer = PackWriter(FileStore(tmp_path / "store"), BlobIndex(FileStore(tmp_path / "store"), None))
    try:
        noise = os.urandom(2 << 20)
        assert writer.encode(noise)[1] == CODEC_RAW and writer.encode(noise)[0] is noise  # no copy, no frame
        stored, codec = writer.encode(text(2 << 20))
        assert codec == CODEC_ZSTD and len(stored) < (2 << 20) // 10
        # A compressible sample cannot make random data bigger: the result is checked again.
        stored, codec = writer.encode(text(64 << 10) + noise)
        assert codec == CODEC_RAW and len(stored) == (64 << 10) + len(noise)
    finally:
        writer.close()


def test_large_and_small_files_interleaved_round_trip_in_tree_order(tmp_path: Path) -> None:
    """Large files are read on their own thread while the walk stores small ones; the tree keeps its order and
    the digest does not depend on which thread got there first."""
    ws = tmp_path / "ws"
    for d in range(6):
        (ws / f"d{d}").mkdir(parents=True)
        for f in range(30):
            (ws / f"d{d}" / f"s{f:02}.txt").write_bytes(text(200 + 37 * f) + b"%d" % d)
        for f in range(2):
            # 40 MiB of large files in all: packs seal on the large-file thread while small files still come
            (ws / f"d{d}" / f"l{f}.bin").write_bytes(os.urandom(3 * LARGE_FILE + 4096 * (d + f)))
    digests = set()
    for run in range(2):
        engine = SnapshotEngine(FileStore(tmp_path / f"store{run}"), scratch_dir=tmp_path / f"scratch{run}")
        info = engine.create(ws)
        digests.add(info.digest)
        paths = [e.path for e in engine.entries(info.id)]
        assert len(paths) == 6 * 33
        out = tmp_path / f"out{run}"
        engine.restore(info.id, out)
        for path in ws.rglob("*"):
            if path.is_file():
                assert (out / path.relative_to(ws)).read_bytes() == path.read_bytes(), path
    assert len(digests) == 1


def test_a_large_file_that_vanishes_before_it_is_read_fails_cleanly(tmp_path: Path) -> None:
    """The large-file thread's error reaches the walk; closing leaves no thread and no descriptor behind."""
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("a.bin", "b.bin", "c.bin", "d.bin", "e.bin", "f.bin"):
        (ws / name).write_bytes(os.urandom(LARGE_FILE + 1))
    stats = {name: os.stat(ws / name) for name in ("a.bin", "b.bin", "c.bin", "d.bin", "e.bin", "f.bin")}
    (ws / "b.bin").unlink()  # walked, then gone
    before_fds, before_threads = open_fds(), helper_threads()
    store = FileStore(tmp_path / "store")
    writer = PackWriter(store, BlobIndex(store, None))
    root_fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    try:
        chunker = pyfastcdc.FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)
        with pytest.raises(FileNotFoundError, match=r"b\.bin"):
            for name, st in stats.items():
                entry = _read_file(root_fd, name, st, writer, chunker)
                assert writer.open_pack_has(entry.chunks)  # a placeholder until the thread has read it
            writer.finish()
    finally:
        os.close(root_fd)
        writer.close()
    assert isinstance(writer.feeder, LargeFiles)
    assert_nothing_left(before_fds, before_threads)


def test_a_store_failing_on_an_upload_thread_fails_the_snapshot_cleanly(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "big.bin").write_bytes(os.urandom(40 << 20))  # packs seal on the large-file thread
    for i in range(50):
        (ws / f"small{i}.txt").write_bytes(text(5000 + i))
    engine = SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch")
    engine.create(tmp_path / "scratch")  # warm: the engine's own lasting resources exist before we count
    before_fds, before_threads = open_fds(), helper_threads()
    tmp = tmp_path / "store" / ".tmp"
    tmp.rmdir()
    tmp.write_bytes(b"")  # every pack write now fails (ENOTDIR), on the upload threads
    objects = {o.key for o in engine.store.list("")}
    with pytest.raises(NotADirectoryError):
        engine.create(ws)
    assert_nothing_left(before_fds, before_threads)
    assert {o.key for o in engine.store.list("")} == objects  # no tree, no record, no pack: nothing half-done
    tmp.unlink()
    tmp.mkdir()
    info = engine.create(ws)  # and the engine is fine once the store is
    engine.restore(info.id, tmp_path / "out")
    assert (tmp_path / "out" / "big.bin").read_bytes() == (ws / "big.bin").read_bytes()
