"""Snapshots at scale: chunk-level dedupe, packing of small files, and crash safety under SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.snapshots.create import CHUNK_MAX
from tardigrade.sandboxes.stores import FileStore, open_store
from tests.conftest import REPO


def stored_objects(engine: SnapshotEngine) -> list[str]:
    return [o.key for o in engine.store.list("") if not o.key.startswith("gc/")]


def test_a_one_byte_edit_in_a_200_mib_file_stores_at_most_two_chunks(store_url: str, tmp_path: Path) -> None:
    engine = SnapshotEngine(open_store(store_url), scratch_dir=tmp_path / "scratch")
    ws = tmp_path / "ws"
    ws.mkdir()
    big = ws / "big.bin"
    with open(big, "wb") as f:
        for _ in range(200):
            f.write(os.urandom(1 << 20))
    first = engine.create(ws, cache_path=tmp_path / "cache")
    assert first.stats and first.stats.bytes_new == 200 << 20

    with open(big, "r+b") as f:
        f.seek(123_456_789)
        byte = f.read(1)
        f.seek(123_456_789)
        f.write(bytes([byte[0] ^ 0xFF]))
    second = engine.create(ws, cache_path=tmp_path / "cache")
    stats = second.stats
    assert stats is not None and stats.files_read == 1
    chunks_written = len([1 for e in engine.entries(second.id) for c in e.chunks]) - len(
        {c.blob for e in engine.entries(first.id) for c in e.chunks}
        & {c.blob for e in engine.entries(second.id) for c in e.chunks}
    )
    assert chunks_written <= 2, f"{chunks_written} chunks stored for a one-byte edit"
    # Content-defined chunks of random data are up to CHUNK_MAX long, so two of them bound what an edit stores.
    assert stats.bytes_new <= 2 * CHUNK_MAX, f"{stats.bytes_new} bytes stored for a one-byte edit"
    engine.restore(second.id, tmp_path / "out")
    assert (tmp_path / "out" / "big.bin").read_bytes()[123_456_789] == byte[0] ^ 0xFF


def test_ten_thousand_small_files_make_a_handful_of_objects(store_url: str, tmp_path: Path) -> None:
    engine = SnapshotEngine(open_store(store_url), scratch_dir=tmp_path / "scratch")
    ws = tmp_path / "ws"
    for d in range(100):
        (ws / f"d{d:03}").mkdir(parents=True)
        for f in range(100):
            (ws / f"d{d:03}" / f"f{f:03}.txt").write_text(f"row {d} {f}\n" * 20)
    info = engine.create(ws)
    objects = stored_objects(engine)
    assert info.entries == 10_100
    assert len(objects) <= 50, f"{len(objects)} objects for 10,000 files: {sorted(objects)[:10]}..."
    out = tmp_path / "out"
    engine.restore(info.id, out)
    assert (out / "d042" / "f007.txt").read_text() == "row 42 7\n" * 20


KILLER = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
engine = SnapshotEngine(open_store({store!r}), scratch_dir=Path({scratch!r}))
print("ready", flush=True)
engine.create({ws!r}, cache_path=Path({cache!r}))
print("done", flush=True)
"""


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_killing_a_snapshot_at_any_point_never_leaves_a_dangling_tree(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store_url = (tmp_path / "store").as_uri() if kind == "file" else request.getfixturevalue("store_url_s3")
    ws = tmp_path / "ws"
    ws.mkdir()
    rng = random.Random(7)
    for i in range(300):
        (ws / f"f{i:03}.bin").write_bytes(os.urandom(rng.randint(1_000, 200_000)))
    (ws / "big.bin").write_bytes(os.urandom(40 << 20))
    script = tmp_path / "snap.py"
    script.write_text(
        KILLER.format(
            repo=str(REPO),
            store=store_url,
            scratch=str(tmp_path / "scratch"),
            ws=str(ws),
            cache=str(tmp_path / "cache"),
        )
    )
    checker = SnapshotEngine(open_store(store_url), scratch_dir=tmp_path / "checker")
    kills = completed = attempt = 0
    # At least 8 rounds, and more until 3 of them were cut: how many a random delay cuts depends on how fast this
    # machine snapshots (an idle fast one finishes a cached snapshot before most kills land).
    while attempt < 8 or (kills < 3 and attempt < 40):
        attempt += 1
        # Change something each round so every attempt has new data to write.
        (ws / f"f{attempt:03}.bin").write_bytes(os.urandom(50_000))
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=os.environ)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        else:
            completed += 1
        # The invariant: every tree in the store can be fully restored; no tree points at missing data.
        for info in checker.store.list("trees/"):
            snapshot_id = info.key.rsplit("/", 1)[-1]
            report = SnapshotEngine(checker.store, scratch_dir=tmp_path / f"v{attempt}").verify(snapshot_id)
            assert report.ok, f"after a kill, tree {snapshot_id} is broken: {report.problems}"
    assert kills >= 3, "the test must actually interrupt snapshots"
    # And a snapshot taken afterwards (reusing whatever survived) is complete.
    final = SnapshotEngine(open_store(store_url), scratch_dir=tmp_path / "scratch").create(
        ws, cache_path=tmp_path / "cache"
    )
    assert checker.verify(final.id).ok
    checker.restore(final.id, tmp_path / "out")
    assert (tmp_path / "out" / "big.bin").read_bytes() == (ws / "big.bin").read_bytes()


@pytest.fixture
def store_url_s3(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/kill-test"


def test_file_store_leaves_no_partial_object_under_a_final_name(tmp_path: Path) -> None:
    """Deferred writes are invisible until flushed: a crash before flush leaves only temporary files."""
    store = FileStore(tmp_path / "store")
    store.put_deferred("packs/ab/abc", [b"x" * 1000])
    assert not store.exists("packs/ab/abc")
    store.flush()
    assert store.get("packs/ab/abc") == b"x" * 1000
