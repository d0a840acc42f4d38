"""Fuzzing the pack reader: blob references and pack bytes an attacker with write access to the store controls.

A pack holds real blobs (raw and zstd, with and without a content size in the frame header, one a zstd bomb), and
the fuzzer rewrites references (offsets, lengths, raw lengths, codecs, hashes) and flips, cuts and splices the
stored bytes. The property: every blob the reader hands out matches its hash, and everything else is a
`SnapshotCorrupt` naming the file - never another exception type, never more than a small bound of memory
(traced with tracemalloc; zstd's own buffers are bounded by the window cap, its output is Python bytes).
"""

from __future__ import annotations

import contextlib
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from tardigrade.sandboxes.errors import SnapshotCorrupt
from tardigrade.sandboxes.snapshots.packs import BlobFetcher
from tardigrade.sandboxes.snapshots.tree import CODEC_ENCRYPTED, CODEC_RAW, CODEC_ZSTD, ChunkRef
from tardigrade.sandboxes.store_keys import pack_key
from tardigrade.sandboxes.stores import FileStore, StoreError
from tests.security.fuzz_settings import fuzz_settings

MiB = 1 << 20
MEMORY_BOUND = 48 * MiB  # a batch is at most 4 MiB stored and a blob at most 8 MiB raw; a few of each in flight


class Pack:
    def __init__(self, base: Path) -> None:
        self.store = FileStore(base / "store")
        plain = [b"hello world\n" * 50, bytes(range(256)) * 40, b"", b"x"]
        self.blobs: list[tuple[bytes, ChunkRef]] = []
        parts: list[bytes] = []
        offset = 0
        frames = [
            (plain[0], zstandard.ZstdCompressor().compress(plain[0]), CODEC_ZSTD),
            (plain[1], zstandard.ZstdCompressor(write_content_size=False).compress(plain[1]), CODEC_ZSTD),
            (plain[2], b"", CODEC_RAW),
            (plain[3], plain[3], CODEC_RAW),
            (b"", zstandard.ZstdCompressor(level=1).compress(bytes(64 * MiB)), CODEC_ZSTD),  # a bomb
        ]
        for raw, stored, codec in frames:
            ref = ChunkRef(blake3.blake3(raw).hexdigest(), "", offset, len(stored), len(raw), codec)
            self.blobs.append((raw, ref))
            parts.append(stored)
            offset += len(stored)
        self.data = b"".join(parts)

    def put(self, data: bytes) -> str:
        name = blake3.blake3(data).hexdigest()
        self.store.put(pack_key(name), data)
        return name


@pytest.fixture(scope="module")
def pack() -> Iterator[Pack]:
    with tempfile.TemporaryDirectory(prefix="fuzz-pack-") as base:
        yield Pack(Path(base))


BIG = st.sampled_from([1 << 23, (1 << 23) + 1, 1 << 31, 1 << 45, 1 << 63, -1, -(1 << 40)])


@st.composite
def mutated_pack(draw: st.DrawFn, pack: Pack) -> bytes:
    data = bytearray(pack.data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "splice"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))) :]
        else:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(max_size=64))
    return bytes(data)


@st.composite
def refs(draw: st.DrawFn, pack: Pack, pack_name: str) -> list[ChunkRef]:
    out = []
    for _raw, ref in draw(st.lists(st.sampled_from(pack.blobs), min_size=1, max_size=6)):
        fields = list(ref._replace(pack=pack_name))
        for _ in range(draw(st.integers(0, 2))):
            i = draw(st.sampled_from([0, 2, 3, 4, 5]))
            if i == 0:
                fields[0] = draw(st.sampled_from([b[1].blob for b in pack.blobs] + ["0" * 64]))
            elif i == 5:
                fields[5] = draw(st.sampled_from([CODEC_RAW, CODEC_ZSTD, CODEC_ENCRYPTED, 2, 0x11, -1]))
            else:
                fields[i] = draw(st.integers(0, len(pack.data) + 10) | BIG)
        out.append(ChunkRef(*fields))  # type: ignore[arg-type]
    return out


@fuzz_settings(examples=120, deadline_ms=5000)
@given(data=st.data())
def test_the_pack_reader_returns_verified_blobs_or_snapshot_corrupt_in_bounded_memory(
    pack: Pack, data: st.DataObject
) -> None:
    name = pack.put(data.draw(mutated_pack(pack)))
    wanted = data.draw(refs(pack, name))
    fetcher = BlobFetcher(pack.store, "0" * 64)
    tracemalloc.start()
    try:
        got = []
        blobs = fetcher.fetch(((r, f"f{i}") for i, r in enumerate(wanted)), lambda p: p)
        try:
            with contextlib.closing(blobs):
                for ref, (path, raw) in zip(wanted, blobs, strict=False):
                    got.append((ref, path, bytes(raw)))
        except StoreError:
            pass  # a short read of a truncated pack: the store's own error, naming the object
        except SnapshotCorrupt as e:
            assert e.path is not None and e.path.startswith("f"), "the error names the file"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for ref, _, raw in got:
        assert len(raw) == ref.raw_length and blake3.blake3(raw).hexdigest() == ref.blob
    assert peak < MEMORY_BOUND, f"reading {len(wanted)} blobs peaked at {peak / MiB:.0f} MiB"
