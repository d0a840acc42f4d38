"""Blobs in packs: how file contents are written to and read back from an object store.

A blob is one small file or one content-defined chunk of a large file, named by the BLAKE3 hash of its raw bytes.
Blobs are compressed (zstd, unless a sample shows they will not shrink) and appended to a pack of up to
`PACK_TARGET` bytes, so ten thousand small files become a handful of store writes. A pack is named by the hash
of its index - the list of its blobs' hashes, offsets, lengths and codecs, plus a nonce - a Merkle name that is
known the moment the pack is sealed, without hashing its bytes again. The pack is uploaded in the background
while the next one fills; next to it goes ``index/<pack>`` (those exact index bytes, so it verifies against the
name), which lets later snapshots find existing blobs without reading packs.

Reads are batched: neighbouring blobs of one pack come back in one ranged read, a few batches are fetched ahead
in parallel, and every blob is checked against its hash before a byte of it is used.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import blake3
import zstandard

from tardigrade.sandboxes.errors import SnapshotCorrupt
from tardigrade.sandboxes.snapshots.crypto import Encryption, EncryptionError
from tardigrade.sandboxes.snapshots.tree import (
    CODEC_ENCRYPTED,
    CODEC_RAW,
    CODEC_ZSTD,
    MAX_BLOB_BYTES,
    MAX_PACK_OFFSET,
    MAX_STORED_BYTES,
    ChunkRef,
)
from tardigrade.sandboxes.store_keys import index_key, pack_key
from tardigrade.sandboxes.stores.base import ObjectMissing, ObjectStore

PACK_TARGET = 16 << 20
MAX_WINDOW = 1 << 23  # zstd levels up to 19 use at most an 8 MiB window; a frame asking for more is refused
SAMPLE = 16 << 10  # bytes test-compressed to decide whether a chunk is worth compressing
SMALL_SAMPLE = 4 << 10  # the same for a small file (whole files up to twice this are just compressed)
MIN_SAVING = 0.92  # store raw unless compression gets the sample below this fraction
MAX_UPLOADS_IN_FLIGHT = 2

T = TypeVar("T")


def blob_hash(data: bytes | bytearray | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


def file_hash(path: Path) -> str:
    """BLAKE3 of a file's bytes, read 1 MiB at a time (a tree object, an output file)."""
    hasher = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()


def pack_index(refs: list[ChunkRef]) -> bytes:
    """The index of a pack; its hash is the pack's name.

    It carries a random nonce, so two packs never share a name even with identical content: a writer storing a
    blob again (say, because its old pack is condemned by garbage collection) must get a new object, not find
    the condemned one "already there"."""
    blobs = sorted([r.blob, r.offset, r.length, r.raw_length, r.codec] for r in refs)
    index = {"format": "tardigrade-pack/1", "nonce": secrets.token_hex(8), "blobs": blobs}
    return json.dumps(index, separators=(",", ":")).encode()


class KnownBlobs(Protocol):
    """Where blobs the store already holds live (see `BlobIndex` in snapshots/index.py)."""

    def get(self, blob: str) -> ChunkRef | None: ...

    def add(self, ref: ChunkRef) -> None: ...

    def add_pack(self, pack: str, refs: list[ChunkRef]) -> None: ...


@dataclass
class PackStats:
    packs: int = 0
    blobs_new: int = 0
    blobs_reused: int = 0
    bytes_raw: int = 0  # new content, before compression
    bytes_stored: int = 0  # new content as written to the store


class WriterClosed(Exception):
    """A blob was added after `PackWriter.close` (a feeder thread still reading when the snapshot failed)."""


class Feeder(Protocol):
    """Something that adds blobs from threads of its own (ingest.LargeFiles): the writer waits for it before the
    last seal and stops it when closed."""

    def drain(self) -> None: ...

    def close(self) -> None: ...


class PackWriter:
    """Appends blobs to the open pack; seals and uploads full packs in the background.

    Thread-safe: the snapshot's walk adds small files while a `Feeder` thread adds the chunks of large ones, so
    the two use both cores. References to blobs in the still-open pack carry a placeholder pack name (``"~3"``)
    until the pack is sealed; `resolve` swaps in the real name. Callers hold back entries until `open_pack_has`
    is false for them; `on_seal` is called (on the thread that calls `add`, `seal` or `poll`) when a pack sealed.
    """

    def __init__(
        self, store: ObjectStore, known: KnownBlobs, *, level: int = 3, encryption: Encryption | None = None
    ) -> None:
        self.store = store
        self.known = known
        self.encryption = encryption
        #: How blobs are named: the plain content hash, or a keyed one when encrypting (see crypto.py).
        self.blob_id = encryption.blob_id if encryption else blob_hash
        self.stats = PackStats()
        self._level = level
        self._local = threading.local()
        self._lock = threading.Lock()  # the open pack, the sealed names, the stats, the upload list
        self._parts: list[bytes | memoryview] = []  # the open pack, never concatenated in memory
        self._size = 0
        self._open: dict[str, ChunkRef] = {}  # blobs in the open pack, with a placeholder pack name
        self._seq = 0
        self._sealed: dict[str, str] = {}
        self._written: list[tuple[str, list[ChunkRef]]] = []
        self._pool = ThreadPoolExecutor(MAX_UPLOADS_IN_FLIGHT, thread_name_prefix="pack-upload")
        self._uploads: list[Future[None]] = []
        self._upload_slots = threading.BoundedSemaphore(MAX_UPLOADS_IN_FLIGHT)
        self._seals_unannounced = False
        self._closed = False
        self._owner = threading.get_ident()  # the thread that walks: the only one that may call `on_seal`
        self.feeder: Feeder | None = None
        self.on_seal: Callable[[], None] | None = None

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self._level)
        return c

    def encode(self, data: bytes | memoryview) -> tuple[bytes | memoryview, int]:
        """Compress if worth it. A sample of random-looking data is cheap to try and saves compressing it all:
        the first `SAMPLE` bytes of a chunk, the first `SMALL_SAMPLE` of a small file (already-compressed files -
        images, archives, wheels - give up within their first few KiB)."""
        if not data:
            return data, CODEC_RAW
        c = self._compressor()
        sample = SAMPLE if len(data) > SAMPLE else SMALL_SAMPLE if len(data) > 2 * SMALL_SAMPLE else 0
        if sample and len(c.compress(data[:sample])) > sample * MIN_SAVING:
            return data, CODEC_RAW
        packed = c.compress(data)
        if len(packed) > len(data) * MIN_SAVING:
            return data, CODEC_RAW
        return packed, CODEC_ZSTD

    def add(self, data: bytes | memoryview, blob: str | None = None) -> ChunkRef:
        """Store one blob (or find it already stored) and return where it lives. Any thread may call it."""
        if self._closed:  # a feeder thread reading a large file stops here, not at the file's end
            raise WriterClosed("the snapshot was stopped")
        blob = blob or self.blob_id(data)
        ref = self._open.get(blob) or self.known.get(blob)
        if ref is not None:
            with self._lock:
                self.stats.blobs_reused += 1
            return ref
        stored, codec = self.encode(data)  # outside the lock: this is what the two threads do at once
        if self.encryption is not None:
            stored, codec = self.encryption.encrypt(stored), codec | CODEC_ENCRYPTED
        if isinstance(stored, memoryview):
            stored = bytes(stored)  # the caller's buffer may be reused (a chunker's window)
        with self._lock:
            ref = self._open.get(blob)  # another thread may have stored it meanwhile
            if ref is None:
                ref = ChunkRef(blob, f"~{self._seq}", self._size, len(stored), len(data), codec)
                self._parts.append(stored)
                self._size += len(stored)
                self._open[blob] = ref
                self.stats.blobs_new += 1
                self.stats.bytes_raw += len(data)
                self.stats.bytes_stored += len(stored)
            full = self._size >= PACK_TARGET
        if full:
            self._seal_open()
        if self._seals_unannounced and threading.get_ident() == self._owner:
            self.poll()
        return ref

    def open_pack_has(self, refs: Iterable[ChunkRef]) -> bool:
        """Whether any of these blobs is in a pack not sealed yet (so its name is not known yet). A `Feeder`'s
        entry still being read carries a placeholder of its own, never sealed, until it is complete."""
        return any(r.pack.startswith("~") and r.pack not in self._sealed for r in refs)

    def resolve(self, ref: ChunkRef) -> ChunkRef:
        if ref.pack.startswith("~"):
            sealed = self._sealed.get(ref.pack)
            if sealed is not None:
                return ref._replace(pack=sealed)
        return ref

    def poll(self) -> None:
        """Call `on_seal` if a pack sealed since the last call (packs a `Feeder` fills seal on its thread)."""
        if self._seals_unannounced:
            self._seals_unannounced = False
            if self.on_seal is not None:
                self.on_seal()

    def seal(self) -> None:
        """Wait for the feeder, close the open pack and start its upload; then `on_seal`. Blocks while too many
        uploads are in flight."""
        if self.feeder is not None:
            self.feeder.drain()
        self._seal_open()
        self.poll()

    def _seal_open(self) -> None:
        with self._lock:
            if not self._parts:
                return
            index = pack_index(list(self._open.values()))
            pack = blob_hash(index)
            refs = [ref._replace(pack=pack) for ref in self._open.values()]
            for ref in refs:
                self.known.add(ref)
            self._written.append((pack, refs))
            parts = self._parts
            self._parts, self._size, self._open = [], 0, {}
            self.stats.packs += 1
            self._sealed[f"~{self._seq}"] = pack
            self._seq += 1
            self._seals_unannounced = True
        # Bounded memory: at most this many packs wait for their upload (the next seal blocks here until one is
        # done), and an upload's error surfaces here rather than after everything was read.
        self._upload_slots.acquire()
        with self._lock:
            failed = next((f for f in self._uploads if f.done() and not f.cancelled() and f.exception()), None)
        if failed is not None:
            self._upload_slots.release()
            failed.result()
        try:
            future = self._pool.submit(self._upload, pack, parts, index)
        except BaseException:
            self._upload_slots.release()
            raise
        future.add_done_callback(lambda _: self._upload_slots.release())
        with self._lock:
            self._uploads.append(future)

    def _upload(self, pack: str, parts: list[bytes | memoryview], index: bytes) -> None:
        self.store.put_deferred(pack_key(pack), parts)
        # The index goes after the pack it describes, so an index never names a missing pack.
        self.store.put_deferred(index_key(pack), [index])

    def finish(self) -> None:
        """Seal the open pack and wait until every pack is durably stored. Raises the first error (of the feeder
        or an upload)."""
        try:
            self.seal()
            for f in self._uploads:
                f.result()
            self.store.flush()
            for pack, refs in self._written:  # durable now: safe to offer for dedupe across runs
                self.known.add_pack(pack, refs)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the feeder and the upload threads (after `finish`, or instead of it when the snapshot failed):
        uploads already running complete, queued ones are dropped. Safe to call more than once."""
        self._closed = True
        try:
            if self.feeder is not None:
                self.feeder.close()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


class BlobUndecodable(Exception):
    """A blob's stored bytes cannot be turned back into the raw bytes its reference promises (corrupt or crafted);
    callers report it as `SnapshotCorrupt` with the snapshot and path."""


def inflate(stored: bytes | memoryview, limit: int) -> bytes:
    """zstd-decompress at most ``limit`` + 1 bytes: a frame that claims (or holds) more than its reference says
    is found out after ``limit`` + 1 bytes, not after allocating what its header claims. The window is capped too,
    so a crafted frame cannot make the decoder reserve more than `MAX_WINDOW` of memory."""
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_reader(stored) as reader:
            while len(out) <= limit and (block := reader.read(min(limit + 1 - len(out), 1 << 20))):
                out += block
    except zstandard.ZstdError as e:
        raise BlobUndecodable(f"cannot be decoded ({e})") from None
    return bytes(out)


def decode_blob(ref: ChunkRef, stored: bytes | memoryview, encryption: Encryption | None = None) -> bytes | memoryview:
    """The raw bytes of a blob. Raises `BlobUndecodable` (sizes out of bounds, a bad frame, an unknown codec) or
    `EncryptionError`; the caller still checks the result's length and hash against the reference."""
    codec = ref.codec
    if not (0 <= ref.raw_length <= MAX_BLOB_BYTES and len(stored) <= MAX_STORED_BYTES):
        raise BlobUndecodable(f"claims an impossible size for blob {ref.blob[:16]}... (at most {MAX_BLOB_BYTES})")
    if codec & CODEC_ENCRYPTED:
        if encryption is None:
            raise EncryptionError(f"blob {ref.blob[:16]}... is encrypted; set TARDIGRADE_ENCRYPTION_KEY to read it")
        stored, codec = encryption.decrypt(stored, f"blob {ref.blob[:16]}..."), codec & ~CODEC_ENCRYPTED
    if codec == CODEC_RAW:
        return stored if isinstance(stored, bytes) else memoryview(stored)  # no copy: the caller only reads it
    if codec == CODEC_ZSTD:
        return inflate(stored, ref.raw_length)
    raise BlobUndecodable(f"uses an unknown codec {ref.codec}")


@dataclass
class _Batch(Generic[T]):
    pack: str
    start: int
    end: int
    items: list[tuple[ChunkRef, T]]


class BlobFetcher:
    """Reads blobs in the order asked, a few ranged reads ahead, verifying each against its hash."""

    def __init__(
        self,
        store: ObjectStore,
        snapshot_id: str,
        *,
        encryption: Encryption | None = None,
        batch_bytes: int = 4 << 20,
        gap_bytes: int = 1 << 20,
        ahead: int = 3,
    ) -> None:
        self.store = store
        self.snapshot_id = snapshot_id
        self.encryption = encryption
        self.blob_id = encryption.blob_id if encryption else blob_hash
        self.batch_bytes = batch_bytes
        self.gap_bytes = gap_bytes
        self.ahead = ahead

    def _batches(self, refs: Iterable[tuple[ChunkRef, T]]) -> Iterator[_Batch[T]]:
        batch: _Batch[T] | None = None
        for ref, ctx in refs:
            end = ref.offset + ref.length
            if (
                batch is not None
                and ref.pack == batch.pack
                and batch.end <= ref.offset <= batch.end + self.gap_bytes
                and end - batch.start <= self.batch_bytes
            ):
                batch.end = end
                batch.items.append((ref, ctx))
                continue
            if batch is not None:
                yield batch
            batch = _Batch(ref.pack, ref.offset, end, [(ref, ctx)])
        if batch is not None:
            yield batch

    def _fetch(self, batch: _Batch[T], path_of: Callable[[T], str | None]) -> list[tuple[T, bytes | memoryview]]:
        key = pack_key(batch.pack)
        for ref, ctx in batch.items:  # before reading: a crafted reference must not size the read or the output
            if not (
                0 <= ref.offset <= MAX_PACK_OFFSET
                and 0 <= ref.length <= MAX_STORED_BYTES
                and 0 <= ref.raw_length <= MAX_BLOB_BYTES
            ):
                raise SnapshotCorrupt(
                    self.snapshot_id,
                    path_of(ctx),
                    key,
                    f"is referenced with an impossible range for blob {ref.blob[:16]}...",
                )
        try:
            data = self.store.get_range(key, batch.start, batch.end - batch.start)
        except ObjectMissing:
            raise SnapshotCorrupt(self.snapshot_id, path_of(batch.items[0][1]), key, "is missing") from None
        out = []
        view = memoryview(data)
        for ref, ctx in batch.items:
            stored = view[ref.offset - batch.start : ref.offset - batch.start + ref.length]
            try:
                raw = decode_blob(ref, stored, self.encryption)
            except BlobUndecodable as e:
                raise SnapshotCorrupt(self.snapshot_id, path_of(ctx), key, str(e)) from None
            except EncryptionError as e:
                raise SnapshotCorrupt(self.snapshot_id, path_of(ctx), key, str(e)) from None
            if len(raw) != ref.raw_length or self.blob_id(raw) != ref.blob:
                raise SnapshotCorrupt(
                    self.snapshot_id, path_of(ctx), key, f"is corrupt: blob {ref.blob[:16]}... fails its hash check"
                )
            out.append((ctx, raw))
        return out

    def fetch(
        self, refs: Iterable[tuple[ChunkRef, T]], path_of: Callable[[T], str | None] = lambda _: None
    ) -> Generator[tuple[T, bytes | memoryview], None, None]:
        """Yield ``(context, raw bytes)`` for each ``(ref, context)`` in order. The generator owns a thread pool:
        close it (`contextlib.closing`) if you may stop reading before the end."""
        with ThreadPoolExecutor(self.ahead, thread_name_prefix="blob-fetch") as pool:
            pending: list[Future[list[tuple[T, bytes | memoryview]]]] = []
            batches = self._batches(refs)
            try:
                for batch in batches:
                    pending.append(pool.submit(self._fetch, batch, path_of))
                    if len(pending) > self.ahead:
                        yield from pending.pop(0).result()
                while pending:
                    yield from pending.pop(0).result()
            finally:
                for f in pending:
                    f.cancel()
