"""Taking a snapshot: walk a folder, store what changed, write the tree last.

Files whose stat matches the stat cache are not read; their tree lines are reused byte for byte. Changed files
are read once, hashed and packed (large ones cut into content-defined chunks, so an edit stores only the chunks
around it). The tree is written only after every pack it references is durably stored, and the snapshot record
only after the tree, so a crash at any point leaves either the old snapshots or the new one - never a tree that
points at missing data.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
import os
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
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
from tardigrade.sandboxes.snapshots.hinted import Kept, _fresh, _plan, check_changes, hinted_walk, parent_footer
from tardigrade.sandboxes.snapshots.ingest import LargeFiles, read_small, store_chunked, store_small
from tardigrade.sandboxes.snapshots.packs import KnownBlobs, PackWriter
from tardigrade.sandboxes.snapshots.splice import (
    Cut,
    ParentTree,
    SideFooter,
    Unspliceable,
    build_side,
    cache_path_of,
    count_packs,
    plan_cuts,
    record_splittable,
    removed_lines,
    span,
    splice_singles,
    write_spliced,
)
from tardigrade.sandboxes.snapshots.statcache import (
    NO_FINGERPRINT,
    NO_WALK,
    RACY_PREFIX,
    CachedFile,
    StatCacheCursor,
    StatCacheWriter,
    cache_key,
    cache_line,
    stat_key,
)
from tardigrade.sandboxes.snapshots.walk import Walker
from tardigrade.sandboxes.snapshots.walkfile import differing, load_walk, record_walk, walk_path
from tardigrade.sandboxes.stores.base import ObjectStore

LARGE_FILE = 1 << 20  # files from this size on are cut into chunks
CHUNK_AVG, CHUNK_MIN, CHUNK_MAX = 512 << 10, 256 << 10, 2 << 20  # a one-byte edit stores ~0.8 MiB
MAX_HELD_BACK = 20_000  # entries waiting for their pack to seal; past this the pack is sealed early
MAX_WALK_KEPT = 100_000  # walked entries kept between the fingerprint pass and the snapshot pass
MAX_WALK_LINES = 2_000_000  # walks recorded for the next snapshot's diff (walkfile.py): ~60 bytes each in memory
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
    spliced: bool = False  # the tree is the parent's with only the hinted paths replaced (splice.py)
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

    def __init__(self, body: Path, writer: PackWriter, cache: StatCacheWriter | None, side: Path | None = None) -> None:
        self._body_path = body
        self._body = open(body, "wb")  # noqa: SIM115 - closed in finish()
        # The digest records go to a side file too (splice.py): the next checkpoint splices them, not recomputes.
        self._side_path = side
        self._side = open(side, "wb") if side is not None else None  # noqa: SIM115 - closed in finish()
        self._packs: Counter[str] = Counter()
        self._files = self._hardlinks = 0
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
            self._files += item.kind == t.FILE
        elif isinstance(item, CachedFile):
            self._lines.append(item.tree_line + b"\n")
            self._digests.append(item.digest_record())
            self._files += 1
            if self._cache is not None:
                if item.racy:
                    self._cache.add_racy_line(item.path, item.line)
                else:
                    self._cache.add_line(item.line)
        else:
            if item.chunks:
                item.chunks = [self._writer.resolve(c) for c in item.chunks]
            line = t.encode_entry(item)
            self._lines.append(line + b"\n")
            self._digests.append(t.entry_digest_record(item))
            self._files += item.kind == t.FILE
            self._hardlinks += item.kind == t.HARDLINK
            if self._cache is not None and item.kind == t.FILE and key:
                self._cache.add(item.path, key, item.hash, item.mode, line)
        self.count += 1
        if len(self._lines) >= 4096:
            self._flush()

    def _flush(self) -> None:
        block, digests = b"".join(self._lines), b"".join(self._digests)
        if self._side is not None:
            if record_splittable(digests, len(self._digests)):
                self._side.write(digests)
                self._packs += count_packs(block)
            else:  # a symlink target with a newline: this tree cannot be spliced
                self._side.close()
                self._side = None
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
        """Called when a pack seals: emit the held entries that can now name their packs, in order (a large file
        still being read on the writer's feeder thread, ingest.py, keeps itself and what follows held)."""
        held, self._held = self._held, []
        for i, (item, key) in enumerate(held):
            if isinstance(item, t.Entry) and self._writer.open_pack_has(item.chunks):
                self._held = held[i:]
                return
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
        snapshot_id = self._hash.hexdigest()
        if self._side is not None:
            size = self._body_path.stat().st_size
            side = SideFooter(snapshot_id, size, self.count, self._files, total_bytes, self._hardlinks, self._packs)
            self._side.write(side.encode())
            self._side.close()
        return snapshot_id, digest

    @property
    def side(self) -> tuple[Path, frozenset[str]] | None:
        """After `finish`: the side file and the packs the tree names, unless the tree cannot be spliced."""
        if self._side is None or self._side_path is None:
            return None
        return self._side_path, frozenset(self._packs)

    def abort(self) -> None:
        self._body.close()
        if self._side is not None:
            self._side.close()


def _read_file(
    root_fd: int,
    path: str,
    st: os.stat_result,
    writer: PackWriter,
    chunker: pyfastcdc.FastCDC,
    *,
    now: bool = False,
    hash_pool: Executor | None = None,
) -> t.Entry:
    """Read one regular file into blobs. Retries once if it changes under us, then gives up loudly.

    A large file is read on the writer's feeder thread while the walk goes on (ingest.py): its entry comes back
    at once as a placeholder the tree builder holds until the thread completed it (``now``: read it here, with
    its whole-file hash on ``hash_pool`` if given)."""
    if st.st_size >= LARGE_FILE and not now:
        if writer.feeder is None:
            read_now = functools.partial(_read_file, now=True)
            same = functools.partial(pyfastcdc.FastCDC, chunker.avg_size, min_size=chunker.min_size)
            writer.feeder = LargeFiles(writer, read_now, functools.partial(same, max_size=chunker.max_size))
        assert isinstance(writer.feeder, LargeFiles)
        return writer.feeder.submit(root_fd, path, st)
    for _ in range(2):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        try:
            if st.st_size < LARGE_FILE:
                data = read_small(fd, st.st_size)
                chunks, content_hash = store_small(data, writer)
                size = len(data)
            else:
                chunks, size, content_hash = store_chunked(fd, writer, chunker, hash_pool)
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

    def __init__(self, selection: Selection, keep: bool = False) -> None:
        """``keep``: also keep the lines hashed, for the walk file (walkfile.py)."""
        self._hash = blake3.blake3(repr(selection.to_json()).encode())
        self._parts: list[str] = []
        self._kept: list[bytes] | None = [] if keep else None
        self.count = 0

    def add(self, path: str, st: os.stat_result) -> None:
        self._parts.append(f"{path}\0{st.st_mode}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}\n")
        self.count += 1
        if len(self._parts) >= 4096:
            self._drain()

    def _drain(self) -> None:
        block = "".join(self._parts).encode("utf-8", "surrogateescape")
        self._hash.update(block)
        if self._kept is not None:
            self._kept.append(block)
        self._parts = []

    def drop_lines(self) -> None:
        self._kept = None

    def lines(self) -> bytes:
        """The lines hashed so far (with ``keep``)."""
        self._drain()
        return b"".join(self._kept or ())

    def hexdigest(self) -> str:
        self._drain()
        return self._hash.hexdigest()


@dataclass
class Scan:
    fingerprint: str
    walked: list[tuple[str, os.stat_result, bool]] | None  # None: too large to hold, walked again when needed
    lines: bytes | None  # the fingerprint's lines, for the walk file (walkfile.py), unless there are too many
    count: int


def _scan(root: str, selection: Selection) -> Scan:
    """Walk once for the fingerprint, keeping the walk for reuse unless it is too large to hold."""
    fingerprint = Fingerprint(selection, keep=True)
    kept: list[tuple[str, os.stat_result, bool]] | None = []
    for item in Walker(root, selection):
        fingerprint.add(item[0], item[1])
        if kept is not None:
            kept.append(item)
            if len(kept) > MAX_WALK_KEPT:
                kept = None  # walk again later rather than hold it all
        if fingerprint.count == MAX_WALK_LINES:
            fingerprint.drop_lines()
    lines = fingerprint.lines() if fingerprint.count < MAX_WALK_LINES else None
    return Scan(fingerprint.hexdigest(), kept, lines, fingerprint.count)


def scratch_file(scratch: Path, prefix: str) -> Path:
    """A new empty file in the scratch folder, by name only: its descriptor is closed at once (whoever writes it
    opens it again), so nothing stays open if the caller forgets it - unlinking it is still the caller's job."""
    fd, name = tempfile.mkstemp(dir=scratch, prefix=prefix)
    os.close(fd)
    return Path(name)


Publish = Callable[[str, Path, "tuple[Path, frozenset[str]] | None"], bool]


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
    publish: Publish,
    tree_exists: Callable[[str], bool],
    gc_epochs: Sequence[Epoch] = (),
    encryption: Encryption | None = None,
    store_id: str | None = None,
    avoid_packs: frozenset[str] = frozenset(),
    changes: ChangeSet | None = None,
    parent: tuple[str, Path] | None = None,
    parent_side: Path | None = None,
    trees_dir: Path | None = None,
) -> CreateResult:
    """Store everything under ``root`` that ``selection`` covers.

    ``publish(snapshot_id, tree_body, side)`` stores the tree once all packs are stored and returns whether it
    wrote it (False: an identical tree already existed); ``side`` is the tree's side file and the packs it names
    (splice.py), or None. The stat cache is replaced only after that succeeded. The
    stat cache belongs to ``store_id`` (the store's identity; its URL by default); files it describes with
    chunks in ``avoid_packs`` (packs found missing from the store) are read again.

    With ``changes`` and ``parent`` (its id and verified tree file), only the listed paths are looked at and every
    other entry is the parent's (see hinted.py); what needs a full walk after all falls back to one. With the
    parent's ``parent_side`` file (kept next to its cached tree, rebuilt if missing), the new tree is the parent's
    spliced (splice.py): what the hint does not list is copied as bytes, not processed entry by entry. Without a
    hint, ``trees_dir`` (where verified trees are cached, with their side files) lets a walk splice the last
    snapshot's tree the same way, with only the paths whose stat changed (walkfile.py).
    """
    if changes is not None and parent is not None:
        check_changes(changes)
        footer = parent_footer(parent[1])
        if footer.get("format") == t.FORMAT and footer.get("selection") == selection.to_json():
            try:
                if parent_side is not None and isinstance(footer.get("digest"), str):
                    spliced = _create_spliced(
                        store, root, selection, known, scratch, publish, gc_epochs, encryption, avoid_packs,
                        changes, (parent[0], parent[1], parent_side, str(footer["digest"])),
                    )  # fmt: skip
                    if spliced is not None:
                        return spliced
                return _create(
                    store, root, selection, known, cache_path, scratch, publish, tree_exists, gc_epochs,
                    encryption, store_id, avoid_packs, (changes, parent),
                )  # fmt: skip
            except _NeedsWalk as e:
                log.info("snapshot of %s walks the whole folder: %s", root, e)
    return _create(
        store, root, selection, known, cache_path, scratch, publish, tree_exists, gc_epochs, encryption, store_id,
        avoid_packs, None, trees_dir,
    )  # fmt: skip


def _create(
    store: ObjectStore,
    root: str,
    selection: Selection,
    known: KnownBlobs,
    cache_path: Path | None,
    scratch: Path,
    publish: Publish,
    tree_exists: Callable[[str], bool],
    gc_epochs: Sequence[Epoch],
    encryption: Encryption | None,
    store_id: str | None,
    avoid_packs: frozenset[str],
    hint: tuple[ChangeSet, tuple[str, Path]] | None,
    trees_dir: Path | None = None,
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
        scan: Scan | None = None
        if hint is not None:
            # Kept entries are not checked against the stat cache: none may use a pack any GC condemned.
            avoid = avoid.union(*(e.packs for e in gc_epochs))
            (changes, (parent_id, parent_tree)) = hint
            fingerprint, walked = NO_FINGERPRINT, hinted_walk(root, selection, changes, parent_tree, parent_id)
        else:
            scan = _scan(root, selection)
            fingerprint, walked = scan.fingerprint, scan.walked
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
        if scan is not None and cache_path is not None and trees_dir is not None and not news:
            spliced = _create_walk_spliced(
                store, root, selection, known, scratch, publish, gc_epochs, encryption, avoid_packs, cache_path,
                cursor, scan, trees_dir, since_ns, store_id or store.url,
            )  # fmt: skip
            if spliced is not None:
                return spliced
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
            side = Path(f"{body}.side")
            release.callback(side.unlink, missing_ok=True)
            builder = TreeBuilder(body, writer, cache_out, side)
            try:
                rewalk = Fingerprint(selection, keep=True)
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
            stats.tree_written = publish(snapshot_id, body, builder.side)
            if cache_out is not None:
                if walked is None:
                    # Not a third walk after the tree was built: a file changed since would get the new stat in
                    # the fingerprint but the old content in the tree, and the next snapshot would reuse it whole.
                    fingerprint = rewalk.hexdigest()
                    # The tree was built from this second walk: it is the one to record for the next diff.
                    scan = Scan(fingerprint, None, rewalk.lines() if rewalk.count < MAX_WALK_LINES else None,
                                rewalk.count)  # fmt: skip
                if scan is not None and scan.lines is not None and cache_path is not None:
                    recorded = record_walk(walk_path(cache_path), scan.lines, scan.count, cache_out.racy_paths)
                    cache_out.walk = recorded or NO_WALK
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


def _open_parent(body: Path, side: Path, snapshot_id: str, digest: str) -> ParentTree:
    """The parent's tree with its side file; a side file missing or not matching is rebuilt from the tree once."""
    try:
        return ParentTree(body, side, snapshot_id, digest)
    except (Unspliceable, FileNotFoundError) as e:
        log.info("side file of tree %s rebuilt: %s", snapshot_id, e)
    if not build_side(body, snapshot_id, digest, side):
        raise Unspliceable(f"tree {snapshot_id} cannot be spliced (a record spans lines, or its digest differs)")
    return ParentTree(body, side, snapshot_id, digest)


def _fresh_entry(
    root_fd: int,
    path: str,
    st: os.stat_result,
    ancestor: bool,
    writer: PackWriter,
    chunker: pyfastcdc.FastCDC,
    stats: CreateStats,
) -> t.Entry | None:
    """The entry a full walk would make of one walked path (see `_store_walk`), reading a file whole."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return t.Entry(path, t.DIR, mode & MODE_MASK, 0 if ancestor else st.st_mtime_ns)
    if stat.S_ISLNK(mode):
        return t.Entry(path, t.SYMLINK, mtime_ns=st.st_mtime_ns, link=os.readlink(path, dir_fd=root_fd))
    if stat.S_ISREG(mode):
        if st.st_nlink > 1:
            raise _NeedsWalk(f"{path!r} has hard links")
        stats.files_read += 1
        return _read_file(root_fd, path, st, writer, chunker, now=True)  # its entry is needed complete, here
    if len(stats.skipped_special) < 20:
        stats.skipped_special.append(path)
    return None


def _target(path: str, subtrees: set[str], ancestors: dict[str, os.stat_result]) -> str:
    """The planned path a fresh path belongs to: itself (a listed path or a folder on the way) or its subtree."""
    if path in ancestors or path in subtrees:
        return path
    cut = path.rfind("/")
    while cut > 0 and path[:cut] not in subtrees:
        cut = path.rfind("/", 0, cut)
    return path[:cut]


def _create_spliced(
    store: ObjectStore,
    root: str,
    selection: Selection,
    known: KnownBlobs,
    scratch: Path,
    publish: Publish,
    gc_epochs: Sequence[Epoch],
    encryption: Encryption | None,
    avoid_packs: frozenset[str],
    changes: ChangeSet,
    parent_of: tuple[str, Path, Path, str],
) -> CreateResult | None:
    """A hinted snapshot made by splicing the parent's tree (splice.py): only the listed paths are stat-ed, read and
    encoded; the rest of the tree and of the digest records are copied as byte ranges. None when the parent cannot
    be spliced (hard links, a pack garbage collection condemned or found missing, an inconsistent side file):
    nothing was read then, and the caller takes the entry-by-entry path."""
    started = time.monotonic()
    parent_id, parent_tree, parent_side, parent_digest = parent_of
    root = root.rstrip("/") or "/"
    parent = _spliceable_parent(parent_tree, parent_side, parent_id, parent_digest, avoid_packs, gc_epochs)
    if parent is None:
        return None
    stats = CreateStats()
    with contextlib.ExitStack() as release:
        release.callback(parent.close)
        subtrees, ancestors = _plan(root, selection, changes)
        try:
            cuts, where = plan_cuts(parent, [(p, True) for p in subtrees] + [(p, False) for p in ancestors])
        except Unspliceable as e:
            log.info("snapshot of %s is not spliced: %s", root, e)
            return None
        walked = ((path, st, ancestor, where[_target(path, subtrees, ancestors)])
                  for path, st, ancestor in _fresh(root, selection, subtrees, ancestors))  # fmt: skip
        done = _splice(store, root, selection, known, scratch, publish, encryption, parent, cuts, walked, release,
                       stats)  # fmt: skip
        if done is None:
            return None
        snapshot_id, digest, _ = done
    stats.seconds = time.monotonic() - started
    return CreateResult(snapshot_id, digest, stats)


def _spliceable_parent(
    tree: Path, side: Path, parent_id: str, digest: str, avoid_packs: frozenset[str], gc_epochs: Sequence[Epoch]
) -> ParentTree | None:
    try:
        parent = _open_parent(tree, side, parent_id, digest)
    except (Unspliceable, OSError) as e:
        log.info("snapshot is not spliced onto %s: %s", parent_id, e)
        return None
    # Kept lines are not looked at one by one: the parent as a whole must use no pack that is being deleted.
    avoid = avoid_packs.union(*(e.packs for e in gc_epochs))
    if parent.footer.hardlinks or not avoid.isdisjoint(parent.footer.packs):
        parent.close()
        return None
    return parent


Fresh = tuple[t.Entry, os.stat_result]


def _splice(
    store: ObjectStore,
    root: str,
    selection: Selection,
    known: KnownBlobs,
    scratch: Path,
    publish: Publish,
    encryption: Encryption | None,
    parent: ParentTree,
    cuts: list[Cut],
    walked: Iterable[tuple[str, os.stat_result, bool, int]],
    release: contextlib.ExitStack,
    stats: CreateStats,
) -> tuple[str, str, list[tuple[Fresh, bytes]]] | None:
    """Store the walked paths (each with the index of the cut it goes into, in canonical order) and publish the
    parent's tree with the cuts replaced by them. Returns (id, digest, each fresh entry with its stat and tree line),
    or None if the removed lines do not match the side file (before anything is read)."""
    side = parent.footer
    try:
        removed, removed_packs, old_chunks = removed_lines(parent, cuts)
    except Unspliceable as e:
        log.info("snapshot of %s is not spliced: %s", root, e)
        return None
    for ref in old_chunks:
        known.add(ref)  # an edited large file's old chunks are the likeliest to recur
    writer = PackWriter(store, known, encryption=encryption)
    release.callback(writer.close)
    chunker = pyfastcdc.FastCDC(CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX)
    fresh: list[tuple[int, Fresh]] = []
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for path, st, ancestor, index in walked:
            entry = _fresh_entry(root_fd, path, st, ancestor, writer, chunker, stats)
            if entry is not None:
                fresh.append((index, (entry, st)))
    except _NeedsWalk:
        writer.finish()  # what was read is stored for the walk to reuse
        raise
    finally:
        os.close(root_fd)
    writer.finish()
    added: Counter[str] = Counter()
    files = total = 0
    splittable = True
    out: list[tuple[Fresh, bytes]] = []
    for i, (index, (entry, st)) in enumerate(fresh):
        if i and index < fresh[i - 1][0]:
            raise _NeedsWalk("fresh entries out of their parent's order")  # never expected: a walk is right
        entry.chunks = [writer.resolve(c) for c in entry.chunks]
        line = t.encode_entry(entry)
        record = t.entry_digest_record(entry)
        splittable = splittable and record.count(b"\n") == 1
        cuts[index].lines.append(line + b"\n")
        cuts[index].records.append(record)
        added += count_packs(line)
        out.append(((entry, st), line))
        if entry.kind == t.FILE:
            files += 1
            total += entry.size
    entries = side.entries - removed.entries + len(fresh)
    stats.bytes = side.total - removed.bytes + total
    body, side_out = scratch_file(scratch, "tree-"), scratch_file(scratch, "side-")
    release.callback(body.unlink, missing_ok=True)
    release.callback(side_out.unlink, missing_ok=True)
    selection_json = selection.to_json()
    snapshot_id, digest = write_spliced(
        parent, cuts, body, side_out, lambda d: t.footer(entries, stats.bytes, d, selection_json)
    )
    packs = side.packs - removed_packs + added
    footer = SideFooter(
        snapshot_id, body.stat().st_size, entries, side.files - removed.files + files, stats.bytes, 0, packs
    )
    with open(side_out, "ab") as f:
        f.write(footer.encode())
    stats.tree_written = publish(snapshot_id, body, (side_out, frozenset(packs)) if splittable else None)
    stats.spliced = True
    stats.entries = entries
    stats.files_unchanged = side.files - removed.files
    stats.bytes_new = writer.stats.bytes_raw
    stats.bytes_stored = writer.stats.bytes_stored
    stats.packs = writer.stats.packs
    return snapshot_id, digest, out


def _create_walk_spliced(
    store: ObjectStore,
    root: str,
    selection: Selection,
    known: KnownBlobs,
    scratch: Path,
    publish: Publish,
    gc_epochs: Sequence[Epoch],
    encryption: Encryption | None,
    avoid_packs: frozenset[str],
    cache_path: Path,
    cursor: StatCacheCursor,
    scan: Scan,
    trees_dir: Path,
    since_ns: int,
    store_id: str,
) -> CreateResult | None:
    """A walking snapshot that processes only what the walk found changed: its lines against the last snapshot's
    walk file (walkfile.py) as two sets give the paths whose stat differs, appeared or vanished (plus the racy
    ones); those are read and spliced into the last snapshot's tree, and into the stat cache. None when that is
    not possible (no walk file, the tree not cached here, hard links, condemned packs): the caller walks as before."""
    started = time.monotonic()
    parent_id = cursor.snapshot
    if scan.lines is None or not parent_id or cursor.walk == NO_WALK:
        return None
    old = load_walk(walk_path(cache_path), cursor.walk)
    if old is None:
        return None
    old_walk, racy = old
    if scan.lines.count(b"\n") != scan.count:
        return None  # a path with a newline: the lines do not split by path
    old_part, new_part = differing(old_walk, scan.lines)
    new_set = set(new_part.split(b"\n"))
    changed = new_set.symmetric_difference(old_part.split(b"\n"))
    changed.discard(b"")
    paths = {_walk_line_path(line) for line in changed}
    # Only what this walk saw is stat-ed again (it never went through a symlink); the rest is gone.
    in_walk = {_walk_line_path(line) for line in changed if line in new_set} | (racy - paths)
    tree = trees_dir / parent_id
    try:
        footer = parent_footer(tree)
    except OSError:
        return None
    digest = footer.get("digest")
    if not isinstance(digest, str) or footer.get("format") != t.FORMAT:
        return None
    if footer.get("selection") != selection.to_json():
        return None
    parent = _spliceable_parent(tree, trees_dir / f"{parent_id}.side", parent_id, digest, avoid_packs, gc_epochs)
    if parent is None:
        return None
    stats = CreateStats()
    with contextlib.ExitStack() as release:
        release.callback(parent.close)
        try:
            old_cache = cursor.mapped()
        except (OSError, ValueError):
            return None
        release.callback(old_cache.close)
        walked = _restat(root, selection, in_walk)
        cache_lines: dict[str, bytes] = {}
        still_racy: list[str] = []
        try:
            for path in sorted(racy - paths):
                # Same stat, but recorded within a timestamp tick of its snapshot: only the content can tell.
                item = walked.get(path)
                recheck = _recheck(root, old_cache, cursor.header_end, path, item[1], since_ns) if item else None
                stats.files_rechecked += item is not None
                if recheck is None:
                    paths.add(path)
                    continue
                cache_lines[path] = recheck
                if b"\t" + RACY_PREFIX.encode() in recheck:
                    still_racy.append(path)
            cuts, where = plan_cuts(parent, [(p, False) for p in paths])
        except Unspliceable as e:
            log.info("snapshot of %s is not spliced: %s", root, e)
            return None
        items = sorted((walked[p] for p in paths if p in walked), key=lambda item: t.sort_key(item[0]))
        try:
            done = _splice(
                store, root, selection, known, scratch, publish, encryption, parent, cuts,
                ((path, st, ancestor, where[path]) for path, st, ancestor in items), release, stats,
            )  # fmt: skip
        except _NeedsWalk as e:
            log.info("snapshot of %s walks the whole folder: %s", root, e)
            return None
        if done is None:
            return None
        snapshot_id, digest, fresh = done
        # The stat cache, spliced the same way: the lines of the changed paths replaced by their files' new lines.
        cache_out = StatCacheWriter(cache_path, store_id)
        release.callback(cache_out.abort)
        cache_lines.update(dict.fromkeys(paths, b""))
        for path in still_racy:
            cache_out.racy_paths.append(path)
            cache_out.racy = True
        for (entry, st), line in fresh:
            if entry.kind == t.FILE:
                key = cache_key(st, since_ns)
                cache_lines[entry.path] = cache_line(entry.path, key, entry.hash, entry.mode, line)
                if key.startswith(RACY_PREFIX):
                    cache_out.racy_paths.append(entry.path)
                    cache_out.racy = True
        splice_singles(old_cache, cursor.header_end, len(old_cache), cache_path_of, cache_lines, cache_out.write_raw)
        cache_out.gc_seen = max([cursor.gc_seen, *(e.created for e in gc_epochs)])
        cache_out.walk = record_walk(walk_path(cache_path), scan.lines, scan.count, cache_out.racy_paths) or NO_WALK
        cache_out.commit(snapshot_id, scan.fingerprint, digest, stats.entries, stats.bytes)
    stats.seconds = time.monotonic() - started
    return CreateResult(snapshot_id, digest, stats)


def _walk_line_path(line: bytes) -> str:
    return line.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _restat(root: str, selection: Selection, paths: set[str]) -> dict[str, tuple[str, os.stat_result, bool]]:
    """What a walk yields for these paths (found by the walk just taken), stat-ed again: the walk is not held in
    memory. A path gone since is left out (then it is removed); one changed since has its line in the walk file
    differ from its stat, so the next snapshot reads it again."""
    found = {}
    for path in paths:
        try:
            st = os.lstat(f"{root}/{path}")
        except (FileNotFoundError, NotADirectoryError):
            continue
        found[path] = (path, st, not selection.covers(path))
    return found


def _recheck(root: str, cache: mmap.mmap, start: int, path: str, st: os.stat_result, since_ns: int) -> bytes | None:
    """The stat-cache line of a racy file hashed again and found unchanged, under its new stat key; None if its
    content changed (or the cache has no line for it): then it is read as changed."""
    lo, hi = span(cache, len(cache), cache_path_of, path, False, start)
    fields = cache[lo:hi].rstrip(b"\n").split(b"\t", 4)
    if lo == hi or len(fields) != 5 or not stat.S_ISREG(st.st_mode):
        return None
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        content_hash = _hash_file(root_fd, path, st)
    except OSError:
        return None
    finally:
        os.close(root_fd)
    if content_hash is None or content_hash.encode() != fields[2]:
        return None
    return cache_line(path, cache_key(st, since_ns), content_hash, int(fields[3], 8), fields[4])
