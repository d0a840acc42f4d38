"""Taking a snapshot: walk a folder, store what changed, write the tree last.

Files whose stat matches the stat cache are not read; their tree lines are reused byte for byte. Changed files
are read once, hashed and packed (large ones cut into content-defined chunks, so an edit stores only the chunks
around it). The tree is written only after every pack it references is durably stored, and the snapshot record
only after the tree, so a crash at any point leaves either the old snapshots or the new one - never a tree that
points at missing data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pyfastcdc

from tardigrade.sandboxes.errors import WorkspaceChanged
from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.snapshots.crypto import Encryption
from tardigrade.sandboxes.snapshots.gc import Epoch
from tardigrade.sandboxes.snapshots.hinted import Kept, check_changes, hinted_walk, parent_footer
from tardigrade.sandboxes.snapshots.packs import KnownBlobs, PackWriter, blob_hash
from tardigrade.sandboxes.snapshots.statcache import (
    NO_FINGERPRINT,
    CachedFile,
    StatCacheCursor,
    StatCacheWriter,
    cache_key,
    cache_line,
    stat_key,
)
from tardigrade.sandboxes.snapshots.walk import Walker
from tardigrade.sandboxes.stores.base import ObjectStore

LARGE_FILE = 1 << 20  # files from this size on are cut into chunks
CHUNK_AVG, CHUNK_MIN, CHUNK_MAX = 512 << 10, 256 << 10, 2 << 20  # a one-byte edit stores ~0.8 MiB
MAX_HELD_BACK = 20_000  # entries waiting for their pack to seal; past this the pack is sealed early
MAX_WALK_KEPT = 100_000  # walked entries kept between the fingerprint pass and the snapshot pass
log = logging.getLogger("tardigrade.snapshots")
MODE_MASK = 0o1777  # setuid/setgid are never recorded: a restored file must not gain privileges on the host


@dataclass
class CreateStats:
    entries: int = 0
    bytes: int = 0  # logical size of all files
    files_read: int = 0
    files_unchanged: int = 0
    files_rechecked: int = 0  # stat unchanged but too fresh to trust (statcache.RACY_NS): hashed again
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
        self._held: list[tuple[t.Entry | CachedFile | Kept, str]] = []  # (entry or cached file, stat key)
        self.count = 0
        writer.on_seal = self.release

    def _emit(self, item: t.Entry | CachedFile | Kept, key: str) -> None:
        if isinstance(item, Kept):
            self._lines.append(item.line + b"\n")
            self._digests.append(item.digest_record())
        elif isinstance(item, CachedFile):
            self._lines.append(item.tree_line + b"\n")
            self._digests.append(item.digest_record())
            if self._cache is not None:
                self._cache.add_line(item.line)
                self._cache.racy = self._cache.racy or item.racy
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

    def add_kept(self, kept: Kept) -> None:
        """A parent's entry, as it was (its packs are sealed long ago); no stat-cache line goes with it."""
        self._hold_or_emit(kept, "", False)

    def _hold_or_emit(self, item: t.Entry | CachedFile | Kept, key: str, needs_open_pack: bool) -> None:
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


def _hash_file(root_fd: int, path: str, st: os.stat_result) -> str | None:
    """The content hash of a file whose stat is unchanged but too fresh to vouch for it (see statcache.py), or
    None if it changed while being read (then it is read as changed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        hasher = blake3.blake3()
        size = 0
        while block := os.read(fd, 1 << 20):
            hasher.update(block)
            size += len(block)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if size != st.st_size or stat_key(after) != stat_key(st):
        return None
    return hasher.hexdigest() if size else t.EMPTY_HASH


def _rechecked(cached: CachedFile, key: str) -> CachedFile:
    """The cached file, found unchanged by hashing, recorded again under ``key`` (still racy, or now settled)."""
    fields = cached.fields
    line = cache_line(cached.path, key, cached.hash, int(fields[3], 8), fields[4])
    return CachedFile(cached.path, key, cached.hash, line, [fields[0], key.encode(), fields[2], fields[3], fields[4]])


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


class _NeedsWalk(Exception):
    """A hinted snapshot met what only a full walk gets right (hard links, packs GC condemned): walk after all."""


def _store_walk(
    root: str,
    selection: Selection,
    walked: Iterable[tuple[str, os.stat_result, bool] | Kept] | None,
    cursor: StatCacheCursor,
    avoid: frozenset[str],
    known: KnownBlobs,
    writer: PackWriter,
    builder: TreeBuilder,
    stats: CreateStats,
    rewalk: Fingerprint,
    since_ns: int,
    hinted: bool = False,
) -> tuple[str, str]:
    """Feed every walked path to the tree builder, storing the files that changed; returns (snapshot id, digest)
    once every pack is durably stored and the tree body is complete. A walk taken here (the first was too large
    to keep) goes into ``rewalk``: the cache's fingerprint must be of the very stats its lines record. A hinted
    walk also yields `Kept` entries of the parent, passed on as they are; it must yield no hard links, and its kept
    entries no pack of ``avoid`` (`_NeedsWalk` otherwise)."""
    chunker = pyfastcdc.FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)
    hardlinks: dict[tuple[int, int], str] = {}
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for item in walked if walked is not None else Walker(root, selection):
            if isinstance(item, Kept):
                _keep(item, avoid, builder, stats)
                continue
            path, st, ancestor = item
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
                    if hinted:
                        raise _NeedsWalk(f"{path!r} has hard links")
                    first = hardlinks.setdefault((st.st_dev, st.st_ino), path)
                    if first != path:
                        builder.add_entry(t.Entry(path, t.HARDLINK, link=first))
                        continue
                stats.bytes += st.st_size
                key = cache_key(st, since_ns)
                cached = cursor.seek(path)
                if cached is not None and cached.matches(stat_key(st)) and not (avoid and _uses(cached, avoid)):
                    if not cached.racy:
                        stats.files_unchanged += 1
                        builder.add_cached(cached)
                        continue
                    # Same stat, but recorded within a timestamp tick of its snapshot: only the content can tell.
                    stats.files_rechecked += 1
                    if _hash_file(root_fd, path, st) == cached.hash:
                        stats.files_unchanged += 1
                        builder.add_cached(_rechecked(cached, key))
                        continue
                if cached is not None:
                    # The old version's chunks are the likeliest to recur (an edit in a large file).
                    for ref in t.decode_entry(cached.tree_line).chunks:
                        known.add(ref)
                stats.files_read += 1
                builder.add_entry(_read_file(root_fd, path, st, writer, chunker), key)
            elif len(stats.skipped_special) < 20:
                stats.skipped_special.append(path)
    except _NeedsWalk:
        writer.finish()  # what was read is stored for the walk to reuse, not left in a pack never uploaded
        raise
    finally:
        os.close(root_fd)
    writer.finish()
    return builder.finish(stats.bytes, selection)


def _keep(kept: Kept, avoid: frozenset[str], builder: TreeBuilder, stats: CreateStats) -> None:
    """An entry of the parent that the hint says is unchanged."""
    if kept.kind == t.HARDLINK:
        raise _NeedsWalk(f"the parent tree has hard links ({kept.path!r})")
    if kept.kind == t.FILE:
        if avoid and any(pack in avoid for pack in kept.packs()):
            raise _NeedsWalk(f"{kept.path!r} uses a pack garbage collection condemned")
        stats.files_unchanged += 1
        stats.bytes += kept.size()
    builder.add_kept(kept)


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
    changes: ChangeSet | None = None,
    parent: tuple[str, Path] | None = None,
) -> CreateResult:
    """Store everything under ``root`` that ``selection`` covers.

    ``publish(snapshot_id, tree_body)`` stores the tree once all packs are stored and returns whether it wrote
    it (False: an identical tree already existed). The stat cache is replaced only after that succeeded. The
    stat cache belongs to ``store_id`` (the store's identity; its URL by default); files it describes with
    chunks in ``avoid_packs`` (packs found missing from the store) are read again.

    With ``changes`` and ``parent`` (its id and verified tree file), only the listed paths are looked at and every
    other entry is the parent's (see hinted.py); what needs a full walk after all falls back to one.
    """
    if changes is not None and parent is not None:
        check_changes(changes)
        footer = parent_footer(parent[1])
        if footer.get("format") == t.FORMAT and footer.get("selection") == selection.to_json():
            try:
                return _create(
                    store, root, selection, known, cache_path, scratch, publish, tree_exists, gc_epochs,
                    encryption, store_id, avoid_packs, (changes, parent),
                )  # fmt: skip
            except _NeedsWalk as e:
                log.info("snapshot of %s walks the whole folder: %s", root, e)
    return _create(
        store, root, selection, known, cache_path, scratch, publish, tree_exists, gc_epochs, encryption, store_id,
        avoid_packs, None,
    )  # fmt: skip


def _create(
    store: ObjectStore,
    root: str,
    selection: Selection,
    known: KnownBlobs,
    cache_path: Path | None,
    scratch: Path,
    publish: Callable[[str, Path], bool],
    tree_exists: Callable[[str], bool],
    gc_epochs: Sequence[Epoch],
    encryption: Encryption | None,
    store_id: str | None,
    avoid_packs: frozenset[str],
    hint: tuple[ChangeSet, tuple[str, Path]] | None,
) -> CreateResult:
    started = time.monotonic()
    since_ns = time.time_ns()  # every stat is taken after this: files changed within a tick of it are racy
    stats = CreateStats()
    # Everything opened below is released by this stack on success, on error and on cancellation alike: a worker
    # takes hundreds of thousands of snapshots in its life, and one descriptor kept per snapshot kills it.
    with contextlib.ExitStack() as release:
        cursor = StatCacheCursor(cache_path, store_id or store.url)
        release.callback(cursor.close)
        # Garbage collection the stat cache has not taken into account: its packs must not be reused blindly.
        news = [e for e in gc_epochs if e.created > cursor.gc_seen]
        avoid = frozenset().union(avoid_packs, *(e.packs for e in news))
        walked: Iterable[tuple[str, os.stat_result, bool] | Kept] | None
        if hint is not None:
            # Kept entries are not checked against the stat cache: none may use a pack any GC condemned.
            avoid = avoid.union(*(e.packs for e in gc_epochs))
            (changes, (parent_id, parent_tree)) = hint
            fingerprint, walked = NO_FINGERPRINT, hinted_walk(root, selection, changes, parent_tree, parent_id)
        else:
            fingerprint, walked = _scan(root, selection)
        if (
            hint is None
            and cursor.snapshot
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
        # A hinted snapshot neither reads nor rewrites the stat cache (that would cost what the workspace holds):
        # the listed paths are read anyway, and the old cache stays true for the next walk - its lines map a
        # stat to a content, and files changed since show another stat.
        cache_out = (
            StatCacheWriter(cache_path, store_id or store.url) if cache_path is not None and hint is None else None
        )
        if hint is not None:
            cursor = StatCacheCursor(None, "")
        try:
            if cache_out is not None:
                cache_out.gc_seen = max([cursor.gc_seen, *(e.created for e in gc_epochs)])
            builder = TreeBuilder(body, writer, cache_out)
            try:
                rewalk = Fingerprint(selection)
                snapshot_id, digest = _store_walk(
                    root,
                    selection,
                    walked,
                    cursor,
                    avoid,
                    known,
                    writer,
                    builder,
                    stats,
                    rewalk,
                    since_ns,
                    hint is not None,
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
