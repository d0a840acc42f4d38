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
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import blake3

from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.snapshots.createbase import (
    CreateInputs,
    CreateResult,
    CreateStats,
    NeedsWalk,
    Publish,
    Scan,
    scratch_file,
)
from tardigrade.sandboxes.snapshots.crypto import Encryption
from tardigrade.sandboxes.snapshots.gc import Epoch
from tardigrade.sandboxes.snapshots.hinted import Kept, check_changes, hinted_walk, parent_footer
from tardigrade.sandboxes.snapshots.packs import KnownBlobs, PackWriter
from tardigrade.sandboxes.snapshots.reading import (
    CHUNK_AVG,
    CHUNK_MAX,
    CHUNK_MIN,
    LARGE_FILE,
    MODE_MASK,
    _hash_file,
    _read_file,
    new_chunker,
)
from tardigrade.sandboxes.snapshots.splice import SideFooter, count_packs, record_splittable
from tardigrade.sandboxes.snapshots.spliced import create_spliced, create_walk_spliced
from tardigrade.sandboxes.snapshots.statcache import (
    NO_FINGERPRINT,
    NO_WALK,
    CachedFile,
    StatCacheCursor,
    StatCacheWriter,
    cache_key,
    cache_line,
    fingerprint_hasher,
    fingerprint_part,
    stat_key,
)
from tardigrade.sandboxes.snapshots.walk import Walker
from tardigrade.sandboxes.snapshots.walkfile import record_walk, walk_path
from tardigrade.sandboxes.stores.base import ObjectStore

# Other modules and tests import these from here, where they used to live.
__all__ = [
    "CHUNK_AVG",
    "CHUNK_MAX",
    "CHUNK_MIN",
    "LARGE_FILE",
    "MAX_WALK_KEPT",
    "MODE_MASK",
    "CreateResult",
    "CreateStats",
    "Publish",
    "TreeBuilder",
    "_read_file",
    "create_snapshot",
    "scratch_file",
]

MAX_HELD_BACK = 20_000  # entries waiting for their pack to seal; past this the pack is sealed early
MAX_WALK_KEPT = 100_000  # walked entries kept between the fingerprint pass and the snapshot pass
MAX_WALK_LINES = 2_000_000  # walks recorded for the next snapshot's diff (walkfile.py): ~60 bytes each in memory
log = logging.getLogger("tardigrade.snapshots")


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
        self._hash = fingerprint_hasher(selection)
        self._parts: list[str] = []
        self._kept: list[bytes] | None = [] if keep else None
        self.count = 0

    def add(self, path: str, st: os.stat_result) -> None:
        self._parts.append(fingerprint_part(path, st))
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
    entries no pack of ``avoid`` (`NeedsWalk` otherwise)."""
    chunker = new_chunker()
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
                        raise NeedsWalk(f"{path!r} has hard links")
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
    except NeedsWalk:
        writer.finish()  # what was read is stored for the walk to reuse, not left in a pack never uploaded
        raise
    finally:
        os.close(root_fd)
    writer.finish()
    return builder.finish(stats.bytes, selection)


def _keep(kept: Kept, avoid: frozenset[str], builder: TreeBuilder, stats: CreateStats) -> None:
    """An entry of the parent that the hint says is unchanged."""
    if kept.kind == t.HARDLINK:
        raise NeedsWalk(f"the parent tree has hard links ({kept.path!r})")
    if kept.kind == t.FILE:
        if avoid and any(pack in avoid for pack in kept.packs()):
            raise NeedsWalk(f"{kept.path!r} uses a pack garbage collection condemned")
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

    ``publish(flat_id, tree_body, side, spliced)`` stores the tree once all packs are stored and returns the snapshot id
    and whether it wrote the tree object (False: an identical tree already existed) as `Published`; ``flat_id`` is
    the hash of the flat body, ``side`` the body's side file and the packs it names (splice.py), or None, and
    ``spliced`` what a spliced body can differ from its parent in (createbase.Spliced), or None. The stat
    cache is replaced only after that succeeded. The stat cache belongs to ``store_id`` (the store's identity; its
    URL by default); files it describes with chunks in ``avoid_packs`` (packs found missing from the store) are
    read again.

    With ``changes`` and ``parent`` (its id and verified tree file), only the listed paths are looked at and every
    other entry is the parent's (see hinted.py); what needs a full walk after all falls back to one. With the
    parent's ``parent_side`` file (kept next to its cached tree, rebuilt if missing), the new tree is the parent's
    spliced (splice.py): what the hint does not list is copied as bytes, not processed entry by entry. Without a
    hint, ``trees_dir`` (where verified trees are cached, with their side files) lets a walk splice the last
    snapshot's tree the same way, with only the paths whose stat changed (walkfile.py).
    """
    inputs = CreateInputs(
        store, root, selection, known, scratch, publish, gc_epochs, encryption, avoid_packs, store_id or store.url
    )
    if changes is not None and parent is not None:
        check_changes(changes)
        footer = parent_footer(parent[1])
        if footer.get("format") == t.FORMAT and footer.get("selection") == selection.to_json():
            try:
                if parent_side is not None and isinstance(footer.get("digest"), str):
                    spliced = create_spliced(
                        inputs, changes, (parent[0], parent[1], parent_side, str(footer["digest"]))
                    )
                    if spliced is not None:
                        return spliced
                return _create(inputs, cache_path, tree_exists, (changes, parent))
            except NeedsWalk as e:
                log.info("snapshot of %s walks the whole folder: %s", root, e)
    return _create(inputs, cache_path, tree_exists, None, trees_dir)


def _create(
    inputs: CreateInputs,
    cache_path: Path | None,
    tree_exists: Callable[[str], bool],
    hint: tuple[ChangeSet, tuple[str, Path]] | None,
    trees_dir: Path | None = None,
) -> CreateResult:
    started = time.monotonic()
    root, selection, gc_epochs = inputs.root, inputs.selection, inputs.gc_epochs
    since_ns = time.time_ns()  # every stat is taken after this: files changed within a tick of it are racy
    stats = CreateStats()
    # Everything opened below is released by this stack on success, on error and on cancellation alike: a worker
    # takes hundreds of thousands of snapshots in its life, and one descriptor kept per snapshot kills it.
    with contextlib.ExitStack() as release:
        cursor = StatCacheCursor(cache_path, inputs.store_id)
        release.callback(cursor.close)
        # Garbage collection the stat cache has not taken into account: its packs must not be reused blindly.
        news = [e for e in gc_epochs if e.created > cursor.gc_seen]
        avoid = frozenset().union(inputs.avoid_packs, *(e.packs for e in news))
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
            spliced = create_walk_spliced(inputs, cache_path, cursor, scan, trees_dir, since_ns)
            if spliced is not None:
                return spliced
        writer = PackWriter(inputs.store, inputs.known, encryption=inputs.encryption)
        release.callback(writer.close)
        body = scratch_file(inputs.scratch, "tree-")
        release.callback(body.unlink, missing_ok=True)
        # A hinted snapshot neither reads nor rewrites the stat cache (that would cost what the workspace holds):
        # the listed paths are read anyway, and the old cache stays true for the next walk - its lines map a
        # stat to a content, and files changed since show another stat.
        cache_out = StatCacheWriter(cache_path, inputs.store_id) if cache_path is not None and hint is None else None
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
                    inputs.known,
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
            # The stored tree's id is the snapshot id (for tardigrade-tree/2 not the flat body's hash): it is what
            # the stat cache and the result name.
            published = inputs.publish(snapshot_id, body, builder.side, None)
            snapshot_id = published.snapshot_id
            stats.tree_written = published.written
            stats.tree_blobs, stats.tree_bytes = published.tree_blobs, published.tree_bytes
            stats.tree_deduped = published.tree_deduped
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
