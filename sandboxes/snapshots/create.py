"""Taking a snapshot: walk a folder, store what changed, write the tree last.

Files whose stat matches the stat cache are not read; their tree lines are reused byte for byte. Changed files
are read once, hashed and packed (large ones cut into content-defined chunks, so an edit stores only the chunks
around it). The tree is written only after every pack it references is durably stored, and the snapshot record
only after the tree, so a crash at any point leaves either the old snapshots or the new one - never a tree that
points at missing data.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pyfastcdc

from tardigrade.sandboxes.errors import WorkspaceChanged
from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.crypto import Encryption
from tardigrade.sandboxes.snapshots.gc import Epoch
from tardigrade.sandboxes.snapshots.packs import KnownBlobs, PackWriter, blob_hash
from tardigrade.sandboxes.snapshots.statcache import CachedFile, StatCacheCursor, StatCacheWriter, stat_key
from tardigrade.sandboxes.snapshots.walk import Walker
from tardigrade.sandboxes.stores.base import ObjectStore

LARGE_FILE = 1 << 20  # files from this size on are cut into chunks
CHUNK_AVG, CHUNK_MIN, CHUNK_MAX = 512 << 10, 256 << 10, 2 << 20  # a one-byte edit stores ~0.8 MiB
MAX_HELD_BACK = 20_000  # entries waiting for their pack to seal; past this the pack is sealed early
MAX_WALK_KEPT = 100_000  # walked entries kept between the fingerprint pass and the snapshot pass
MODE_MASK = 0o1777  # setuid/setgid are never recorded: a restored file must not gain privileges on the host


@dataclass
class CreateStats:
    entries: int = 0
    bytes: int = 0  # logical size of all files
    files_read: int = 0
    files_unchanged: int = 0
    skipped_special: list[str] = field(default_factory=list)  # sockets, fifos, devices (first few)
    bytes_new: int = 0
    bytes_stored: int = 0
    packs: int = 0
    tree_written: bool = False
    seconds: float = 0.0


@dataclass
class CreateResult:
    snapshot_id: str
    digest: str
    stats: CreateStats


class TreeBuilder:
    """Collects the tree body, the digest and the new stat cache, holding back entries whose pack is open.

    An unchanged file arrives as its cached line and is passed through without being parsed or re-encoded:
    that is what makes a snapshot of an unchanged workspace cost little more than the walk."""

    def __init__(self, body: Path, writer: PackWriter, cache: StatCacheWriter | None) -> None:
        self._body = open(body, "wb")  # noqa: SIM115 - closed in finish()
        self._lines: list[bytes] = []  # buffered, hashed and written in blocks
        self._digests: list[bytes] = []
        self._hash = blake3.blake3()
        self._digest = blake3.blake3()
        self._writer = writer
        self._cache = cache
        self._held: list[tuple[t.Entry | CachedFile, str]] = []  # (entry or cached file, stat key)
        self.count = 0
        writer.on_seal = self.release

    def _emit(self, item: t.Entry | CachedFile, key: str) -> None:
        if isinstance(item, CachedFile):
            self._lines.append(item.tree_line + b"\n")
            self._digests.append(item.digest_record())
            if self._cache is not None:
                self._cache.add_line(item.line)
        else:
            if item.chunks:
                item.chunks = [self._writer.resolve(c) for c in item.chunks]
            line = t.encode_entry(item)
            self._lines.append(line + b"\n")
            self._digests.append(t.entry_digest_record(item))
            if self._cache is not None and item.kind == t.FILE and key:
                self._cache.add(item.path, key, item.hash, item.mode, line)
        self.count += 1
        if len(self._lines) >= 4096:
            self._flush()

    def _flush(self) -> None:
        block, digests = b"".join(self._lines), b"".join(self._digests)
        self._lines, self._digests = [], []
        self._body.write(block)
        self._hash.update(block)
        self._digest.update(digests)

    def add_entry(self, entry: t.Entry, key: str = "") -> None:
        self._hold_or_emit(entry, key, self._writer.open_pack_has(entry.chunks))

    def add_cached(self, cached: CachedFile) -> None:
        self._hold_or_emit(cached, cached.stat_key, False)

    def _hold_or_emit(self, item: t.Entry | CachedFile, key: str, needs_open_pack: bool) -> None:
        # Order matters: once one entry waits for its pack, everything after it waits too.
        if self._held or needs_open_pack:
            self._held.append((item, key))
            if len(self._held) >= MAX_HELD_BACK:
                self._writer.seal()
        else:
            self._emit(item, key)

    def release(self) -> None:
        """Called when a pack seals: every held entry can now name its pack."""
        held, self._held = self._held, []
        for item, key in held:
            self._emit(item, key)

    def finish(self, total_bytes: int, selection: Selection) -> tuple[str, str]:
        """Call after the pack writer finished: every pack is sealed, so nothing needs holding back."""
        self.release()
        self._flush()
        digest = self._digest.hexdigest()
        footer = t.footer(self.count, total_bytes, digest, selection.to_json())
        self._body.write(footer)
        self._hash.update(footer)
        self._body.close()
        return self._hash.hexdigest(), digest

    def abort(self) -> None:
        self._body.close()


def _read_file(root_fd: int, path: str, st: os.stat_result, writer: PackWriter, chunker: pyfastcdc.FastCDC) -> t.Entry:
    """Read one regular file into blobs. Retries once if it changes under us, then gives up loudly."""
    for _ in range(2):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        try:
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
                if st.st_size < LARGE_FILE:
                    data = f.read()
                    content_hash = blob_hash(data)
                    # Unencrypted, a small file's blob id is its content hash: no need to hash it twice.
                    blob = content_hash if writer.encryption is None else None
                    chunks = [writer.add(data, blob)] if data else []
                    size = len(data)
                else:
                    hasher = blake3.blake3()  # fed 512 KiB at a time: threads would cost more than they save
                    chunks, size = [], 0
                    # FastCDC reuses its buffer between chunks (the pack writer copies what it keeps): reusing
                    # memory beats fresh blocks, whose page faults cost more than the copy on these machines.
                    for chunk in chunker.cut_stream(f):
                        hasher.update(chunk.data)
                        chunks.append(writer.add(chunk.data))
                        size += chunk.length
                    content_hash = hasher.hexdigest()
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if size == after.st_size and after.st_mtime_ns == st.st_mtime_ns and size == st.st_size:
            return t.Entry(
                path, t.FILE, st.st_mode & MODE_MASK, st.st_mtime_ns, size, content_hash or t.EMPTY_HASH, chunks
            )
        st = after
    raise WorkspaceChanged(f"file {path!r} kept changing while it was snapshotted; is a process still writing it?")


def _uses(cached: CachedFile, packs: frozenset[str]) -> bool:
    return any(ref.pack in packs for ref in t.decode_entry(cached.tree_line).chunks)


class Fingerprint:
    """A hash over every walked path and its stat: equal to the one the stat cache recorded means the folder is
    exactly as it was at the last snapshot or restore, and the whole tree can be reused without looking further."""

    def __init__(self, selection: Selection) -> None:
        self._hash = blake3.blake3(repr(selection.to_json()).encode())
        self._parts: list[str] = []

    def add(self, path: str, st: os.stat_result) -> None:
        self._parts.append(f"{path}\0{st.st_mode}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}\n")
        if len(self._parts) >= 4096:
            self._drain()

    def _drain(self) -> None:
        self._hash.update("".join(self._parts).encode("utf-8", "surrogateescape"))
        self._parts = []

    def hexdigest(self) -> str:
        self._drain()
        return self._hash.hexdigest()


def _scan(root: str, selection: Selection) -> tuple[str, list[tuple[str, os.stat_result, bool]] | None]:
    """Walk once for the fingerprint, keeping the walk for reuse unless it is too large to hold."""
    fingerprint = Fingerprint(selection)
    kept: list[tuple[str, os.stat_result, bool]] | None = []
    for item in Walker(root, selection):
        fingerprint.add(item[0], item[1])
        if kept is not None:
            kept.append(item)
            if len(kept) > MAX_WALK_KEPT:
                kept = None  # walk again later rather than hold it all
    return fingerprint.hexdigest(), kept


def scratch_file(scratch: Path, prefix: str) -> Path:
    """A new empty file in the scratch folder, by name only: its descriptor is closed at once (whoever writes it
    opens it again), so nothing stays open if the caller forgets it - unlinking it is still the caller's job."""
    fd, name = tempfile.mkstemp(dir=scratch, prefix=prefix)
    os.close(fd)
    return Path(name)


def _store_walk(
    root: str,
    selection: Selection,
    walked: list[tuple[str, os.stat_result, bool]] | None,
    cursor: StatCacheCursor,
    avoid: frozenset[str],
    known: KnownBlobs,
    writer: PackWriter,
    builder: TreeBuilder,
    stats: CreateStats,
    rewalk: Fingerprint,
) -> tuple[str, str]:
    """Feed every walked path to the tree builder, storing the files that changed; returns (snapshot id, digest)
    once every pack is durably stored and the tree body is complete. A walk taken here (the first was too large
    to keep) goes into ``rewalk``: the cache's fingerprint must be of the very stats its lines record."""
    chunker = pyfastcdc.FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)
    hardlinks: dict[tuple[int, int], str] = {}
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for path, st, ancestor in walked if walked is not None else Walker(root, selection):
            if walked is None:
                rewalk.add(path, st)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                # Folders walked only to reach a root keep no mtime: it changes with things we do not cover.
                builder.add_entry(t.Entry(path, t.DIR, mode & MODE_MASK, 0 if ancestor else st.st_mtime_ns))
            elif stat.S_ISLNK(mode):
                link = os.readlink(path, dir_fd=root_fd)
                builder.add_entry(t.Entry(path, t.SYMLINK, mtime_ns=st.st_mtime_ns, link=link))
            elif stat.S_ISREG(mode):
                if st.st_nlink > 1:
                    first = hardlinks.setdefault((st.st_dev, st.st_ino), path)
                    if first != path:
                        builder.add_entry(t.Entry(path, t.HARDLINK, link=first))
                        continue
                stats.bytes += st.st_size
                key = stat_key(st)
                cached = cursor.seek(path)
                if cached is not None and cached.stat_key == key and not (avoid and _uses(cached, avoid)):
                    stats.files_unchanged += 1
                    builder.add_cached(cached)
                    continue
                if cached is not None:
                    # The old version's chunks are the likeliest to recur (an edit in a large file).
                    for ref in t.decode_entry(cached.tree_line).chunks:
                        known.add(ref)
                stats.files_read += 1
                builder.add_entry(_read_file(root_fd, path, st, writer, chunker), key)
            elif len(stats.skipped_special) < 20:
                stats.skipped_special.append(path)
    finally:
        os.close(root_fd)
    writer.finish()
    return builder.finish(stats.bytes, selection)


def create_snapshot(
    store: ObjectStore,
    root: str,
    *,
    selection: Selection,
    known: KnownBlobs,
    cache_path: Path | None,
    scratch: Path,
    publish: Callable[[str, Path], bool],
    tree_exists: Callable[[str], bool],
    gc_epochs: Sequence[Epoch] = (),
    encryption: Encryption | None = None,
    store_id: str | None = None,
    avoid_packs: frozenset[str] = frozenset(),
) -> CreateResult:
    """Store everything under ``root`` that ``selection`` covers.

    ``publish(snapshot_id, tree_body)`` stores the tree once all packs are stored and returns whether it wrote
    it (False: an identical tree already existed). The stat cache is replaced only after that succeeded. The
    stat cache belongs to ``store_id`` (the store's identity; its URL by default); files it describes with
    chunks in ``avoid_packs`` (packs found missing from the store) are read again.
    """
    started = time.monotonic()
    stats = CreateStats()
    # Everything opened below is released by this stack on success, on error and on cancellation alike: a worker
    # takes hundreds of thousands of snapshots in its life, and one descriptor kept per snapshot kills it.
    with contextlib.ExitStack() as release:
        cursor = StatCacheCursor(cache_path, store_id or store.url)
        release.callback(cursor.close)
        # Garbage collection the stat cache has not taken into account: its packs must not be reused blindly.
        news = [e for e in gc_epochs if e.created > cursor.gc_seen]
        avoid = frozenset().union(avoid_packs, *(e.packs for e in news))
        fingerprint, walked = _scan(root, selection)
        if (
            cursor.snapshot
            and cursor.digest
            and cursor.fingerprint == fingerprint
            and not news
            and not avoid
            and tree_exists(cursor.snapshot)
        ):
            # Nothing changed since the last snapshot or restore: same tree, nothing to read or write.
            stats.entries, stats.bytes = cursor.entries, cursor.bytes
            stats.seconds = time.monotonic() - started
            return CreateResult(cursor.snapshot, cursor.digest, stats)
        writer = PackWriter(store, known, encryption=encryption)
        release.callback(writer.close)
        body = scratch_file(scratch, "tree-")
        release.callback(body.unlink, missing_ok=True)
        cache_out = StatCacheWriter(cache_path, store_id or store.url) if cache_path is not None else None
        try:
            if cache_out is not None:
                cache_out.gc_seen = max([cursor.gc_seen, *(e.created for e in gc_epochs)])
            builder = TreeBuilder(body, writer, cache_out)
            try:
                rewalk = Fingerprint(selection)
                snapshot_id, digest = _store_walk(
                    root, selection, walked, cursor, avoid, known, writer, builder, stats, rewalk
                )
            except BaseException:
                builder.abort()
                raise
            stats.tree_written = publish(snapshot_id, body)
            if cache_out is not None:
                if walked is None:
                    # Not a third walk after the tree was built: a file changed since would get the new stat in
                    # the fingerprint but the old content in the tree, and the next snapshot would reuse it whole.
                    fingerprint = rewalk.hexdigest()
                cache_out.commit(snapshot_id, fingerprint, digest, builder.count, stats.bytes)
        except BaseException:
            if cache_out is not None:
                cache_out.abort()
            raise
    stats.entries = builder.count
    stats.bytes_new = writer.stats.bytes_raw
    stats.bytes_stored = writer.stats.bytes_stored
    stats.packs = writer.stats.packs
    stats.seconds = time.monotonic() - started
    return CreateResult(snapshot_id, digest, stats)
