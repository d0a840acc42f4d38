"""Row 11 of the security review: inputs that are small on the way in and enormous once parsed.

A YAML "billion laughs" file, a pack blob whose reference claims a huge raw length, a zstd frame whose header
promises far more than its reference, and a 32 KB tree that inflates to a gigabyte before its hash can be checked.
Each must end as the product's own error (PipelineError, SnapshotCorrupt, UnsafeTree) within a small memory and
disk bound - not a MemoryError, a full disk or a hung client.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import blake3
import pytest
import zstandard

from tardigrade.pipeline import MAX_YAML_NODES, PipelineError, load_pipeline
from tardigrade.sandboxes.errors import SnapshotCorrupt, SnapshotError, UnsafeTree
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.snapshots.packs import BlobFetcher
from tardigrade.sandboxes.snapshots.tree import CODEC_ZSTD, ChunkRef
from tardigrade.sandboxes.store_keys import pack_key, tree_key
from tardigrade.sandboxes.stores import FileStore

MiB = 1 << 20


@pytest.fixture
def engine(tmp_path: Path) -> SnapshotEngine:
    return SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch")


# -- YAML -----------------------------------------------------------------------------------------------------


def laughs(levels: int, fan: int = 9) -> str:
    text = "name: lol\nsteps: [{name: a, run: 'true'}]\nx0: &x0 " + json.dumps(["lol"] * fan) + "\n"
    for i in range(1, levels + 1):
        text += f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * fan) + "]\n"
    return text


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    """9 levels of 9 aliases: 387 million strings once expanded. Today's loader returns shared references without
    complaint, and whatever expands them next (serializing the client's workflow input) runs out of memory."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(laughs(9))
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"bomb\.yaml: the YAML expands to more than"):
        load_pipeline(bomb)
    assert time.monotonic() - started < 2


def test_a_small_fan_of_aliases_still_loads(tmp_path: Path) -> None:
    """Anchors are legitimate YAML (shared env blocks): a modest use of them must keep working."""
    ok = tmp_path / "ok.yaml"
    ok.write_text(
        "name: anchors\nmanifest: {env: &env {A: '1', B: '2'}}\n"
        "steps:\n  - {name: a, run: 'true', env: *env}\n  - {name: b, run: 'true', env: *env}\n"
    )
    loaded = load_pipeline(ok)
    assert loaded.pipeline.steps[1].env == {"A": "1", "B": "2"}


def test_a_self_referencing_alias_and_deep_nesting_are_pipeline_errors(tmp_path: Path) -> None:
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("name: c\nsteps: &s [{name: a, run: 'true', env: {X: *s}}]\n")
    with pytest.raises(PipelineError, match="cycle"):
        load_pipeline(cyclic)
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: d\nsteps: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(PipelineError, match=r"deep\.yaml"):
        load_pipeline(deep)


def test_the_bound_counts_expanded_values_not_aliases(tmp_path: Path) -> None:
    """Just past the bound with few aliases is refused; the same values written out are the same size."""
    levels = 1
    while 9 ** (levels + 1) <= MAX_YAML_NODES:
        levels += 1
    (tmp_path / "under.yaml").write_text(laughs(levels - 1))
    with pytest.raises(PipelineError, match="unknown key"):  # loads, then fails validation on the x* keys
        load_pipeline(tmp_path / "under.yaml")
    (tmp_path / "over.yaml").write_text(laughs(levels + 1))
    with pytest.raises(PipelineError, match="expands to more than"):
        load_pipeline(tmp_path / "over.yaml")


def test_a_huge_pipeline_file_is_refused_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("name: big\nsteps: [{name: a, run: 'true'}]\n#" + "x" * (9 * MiB) + "\n")
    with pytest.raises(PipelineError, match="pipeline files are at most"):
        load_pipeline(big)


# -- packs ----------------------------------------------------------------------------------------------------


def plant_pack(store: FileStore, data: bytes) -> str:
    pack = blake3.blake3(data).hexdigest()
    store.put(pack_key(pack), data)
    return pack


def fetch_one(store: FileStore, ref: ChunkRef) -> bytes:
    out = list(BlobFetcher(store, "0" * 64).fetch([(ref, "victim.bin")], path_of=lambda p: p))
    return bytes(out[0][1])


def test_a_huge_raw_length_is_a_corrupt_object_not_a_memory_error(tmp_path: Path) -> None:
    """A frame without a content size, read under a reference claiming 32 TiB: today zstd is asked for a 32 TiB
    output buffer (MemoryError)."""
    store = FileStore(tmp_path / "store")
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"tiny")
    pack = plant_pack(store, frame)
    ref = ChunkRef(blake3.blake3(b"tiny").hexdigest(), pack, 0, len(frame), 1 << 45, CODEC_ZSTD)
    with pytest.raises(SnapshotCorrupt, match=r"victim\.bin.*impossible (size|range)"):
        fetch_one(store, ref)


def test_a_frame_promising_more_than_its_reference_is_cut_off_early(tmp_path: Path) -> None:
    """256 MiB of zeros compress to a few KB; the reference says 5 bytes. Today the whole 256 MiB is inflated into
    memory (the frame's header wins over max_output_size) before the length check."""
    store = FileStore(tmp_path / "store")
    compressor = zstandard.ZstdCompressor(level=1)
    frame = compressor.compress(bytes(256 * MiB))
    assert len(frame) < 64 * 1024
    pack = plant_pack(store, frame)
    ref = ChunkRef(blake3.blake3(b"hello").hexdigest(), pack, 0, len(frame), 5, CODEC_ZSTD)
    tracemalloc.start()
    try:
        with pytest.raises(SnapshotCorrupt, match=r"victim\.bin.*hash check"):
            fetch_one(store, ref)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"reading a 5-byte blob peaked at {peak / MiB:.0f} MiB"


def test_a_tree_with_a_huge_chunk_is_refused_before_restore(engine: SnapshotEngine, tmp_path: Path) -> None:
    """The tree's size check (size == sum of raw lengths) holds for a crafted 32 TiB chunk: the bound must be on
    each chunk."""
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"tiny")
    pack = plant_pack(engine.store, frame)  # type: ignore[arg-type]
    h = blake3.blake3(b"tiny").hexdigest()
    entry = {"p": "f", "k": "f", "m": 0o644, "t": 0, "s": 1 << 45, "h": h, "c": [[h, pack, 0, len(frame), 1 << 45, 1]]}
    body = json.dumps(entry).encode() + b"\n"
    body += json.dumps(
        {"format": "tardigrade-tree/1", "entries": 1, "bytes": 0, "digest": "x", "selection": {}}
    ).encode()
    snapshot_id = blake3.blake3(body).hexdigest()
    engine.store.put(tree_key(snapshot_id), zstandard.ZstdCompressor().compress(body))
    target = tmp_path / "target"
    with pytest.raises(UnsafeTree, match="impossible size"):
        engine.restore(snapshot_id, target)
    assert not target.exists() or not any(target.iterdir())


# -- trees ----------------------------------------------------------------------------------------------------


def test_a_tree_bomb_is_cut_off_before_filling_the_disk(engine: SnapshotEngine, tmp_path: Path) -> None:
    """A tree object of a few KB that inflates to 1 GiB. Its id may even be the hash of those bytes (anyone can
    compute it), so the hash check alone cannot save us: it comes after 1 GiB has been written to scratch."""
    size = 1 << 30
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(16 * MiB)
    hasher = blake3.blake3()
    parts = []
    for _ in range(size // len(zeros)):
        parts.append(compressor.compress(zeros))
        hasher.update(zeros)
    parts.append(compressor.flush())
    bomb = b"".join(parts)
    assert len(bomb) < 64 * 1024, len(bomb)
    snapshot_id = hasher.hexdigest()
    engine.store.put(tree_key(snapshot_id), bomb)

    scratch = tmp_path / "scratch"
    started = time.monotonic()
    with pytest.raises(SnapshotCorrupt, match="inflates past"), engine.open_tree(snapshot_id):
        pass
    assert time.monotonic() - started < 5
    assert not any(p.name.endswith(".tree") for p in scratch.rglob("*")), "the partial tree is removed"


def test_a_malformed_tree_line_is_unsafe_tree_not_a_key_error(engine: SnapshotEngine, tmp_path: Path) -> None:
    for bad in (
        b'{"p":"a"}',  # no kind
        b'{"p":"a","k":"f","m":"rw","t":0,"s":0,"h":"","c":[]}',  # mode is text
        b'{"p":"a","k":"f","m":420,"t":0,"s":1,"h":"","c":[["x"]]}',  # a chunk of one field
        b'{"p":["a"],"k":"d"}',  # path is a list
        b'{"p":"a","k":"d","t":1e400}',  # mtime a float
    ):
        body = (
            bad + b"\n" + json.dumps({"format": "tardigrade-tree/1", "entries": 1, "bytes": 0, "digest": "x"}).encode()
        )
        snapshot_id = blake3.blake3(body).hexdigest()
        engine.store.put(tree_key(snapshot_id), zstandard.ZstdCompressor().compress(body))
        with pytest.raises(SnapshotError):
            engine.restore(snapshot_id, tmp_path / "target")
        with pytest.raises(SnapshotError):
            list(engine.entries(snapshot_id))


@pytest.mark.parametrize(
    "entry",
    [{"p": "l", "k": "l", "t": 0, "l": "x" * 5000}, {"p": "n" * 300, "k": "d", "t": 0, "m": 0o755}],
    ids=["long-link-target", "long-name"],
)
def test_names_the_filesystem_cannot_hold_are_unsafe_tree_not_os_error(
    engine: SnapshotEngine, tmp_path: Path, entry: dict[str, object]
) -> None:
    body = json.dumps(entry).encode() + b"\n"
    body += json.dumps({"format": "tardigrade-tree/1", "entries": 1, "bytes": 0, "digest": "x"}).encode()
    snapshot_id = blake3.blake3(body).hexdigest()
    engine.store.put(tree_key(snapshot_id), zstandard.ZstdCompressor().compress(body))
    with pytest.raises(UnsafeTree, match=r"longer than|valid target"):
        engine.restore(snapshot_id, tmp_path / "target")
