"""Spliced snapshots: the parent's tree copied as byte ranges, with only the changed paths' lines replaced.

Two ways in, one splice (`_splice`): a ChangeSet names the paths (`create_spliced`), or a walk's stats compared
with the last walk's find them (`create_walk_spliced`, walkfile.py). Either way only those paths are stat-ed, read
and encoded, so a checkpoint costs what changed, not what the workspace holds. Each returns None (having read
nothing it would lose) when the parent cannot be spliced, and create.py takes the entry-by-entry path instead;
`NeedsWalk` means a full walk is needed after all. The tree bytes and digest are those a full walk would make.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import stat
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pyfastcdc

from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.snapshots.createbase import (
    CreateInputs,
    CreateResult,
    CreateStats,
    NeedsWalk,
    Scan,
    scratch_file,
)
from tardigrade.sandboxes.snapshots.hinted import _fresh, _plan, parent_footer
from tardigrade.sandboxes.snapshots.packs import PackWriter
from tardigrade.sandboxes.snapshots.reading import MODE_MASK, _hash_file, _read_file, new_chunker
from tardigrade.sandboxes.snapshots.splice import (
    Cut,
    ParentTree,
    SideFooter,
    Unspliceable,
    build_side,
    cache_path_of,
    count_packs,
    plan_cuts,
    removed_lines,
    span,
    splice_singles,
    write_spliced,
)
from tardigrade.sandboxes.snapshots.statcache import (
    NO_WALK,
    RACY_PREFIX,
    StatCacheCursor,
    StatCacheWriter,
    cache_key,
    cache_line,
)
from tardigrade.sandboxes.snapshots.walkfile import differing, load_walk, record_walk, walk_path

log = logging.getLogger("tardigrade.snapshots")


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
            raise NeedsWalk(f"{path!r} has hard links")
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


def create_spliced(
    inputs: CreateInputs, changes: ChangeSet, parent_of: tuple[str, Path, Path, str]
) -> CreateResult | None:
    """A hinted snapshot made by splicing the parent's tree (splice.py): only the listed paths are stat-ed, read and
    encoded; the rest of the tree and of the digest records are copied as byte ranges. None when the parent cannot
    be spliced (hard links, a pack garbage collection condemned or found missing, an inconsistent side file):
    nothing was read then, and the caller takes the entry-by-entry path."""
    started = time.monotonic()
    parent_id, parent_tree, parent_side, parent_digest = parent_of
    inputs = dataclasses.replace(inputs, root=inputs.root.rstrip("/") or "/")
    root, selection = inputs.root, inputs.selection
    parent = _spliceable_parent(parent_tree, parent_side, parent_id, parent_digest, inputs)
    if parent is None:
        return None
    stats = CreateStats()
    with contextlib.ExitStack() as release:
        release.callback(parent.close)
        subtrees, ancestors = _plan(root, selection, changes)
        targets = [(p, True) for p in subtrees] + [(p, False) for p in ancestors]
        try:
            cuts, where = plan_cuts(parent, targets)
        except Unspliceable as e:
            log.info("snapshot of %s is not spliced: %s", root, e)
            return None
        walked = ((path, st, ancestor, where[_target(path, subtrees, ancestors)])
                  for path, st, ancestor in _fresh(root, selection, subtrees, ancestors))  # fmt: skip
        done = _splice(inputs, parent, cuts, walked, release, stats, targets)
        if done is None:
            return None
        snapshot_id, digest, _ = done
    stats.seconds = time.monotonic() - started
    return CreateResult(snapshot_id, digest, stats)


def _spliceable_parent(tree: Path, side: Path, parent_id: str, digest: str, inputs: CreateInputs) -> ParentTree | None:
    try:
        parent = _open_parent(tree, side, parent_id, digest)
    except (Unspliceable, OSError) as e:
        log.info("snapshot is not spliced onto %s: %s", parent_id, e)
        return None
    # Kept lines are not looked at one by one: the parent as a whole must use no pack that is being deleted.
    avoid = inputs.avoid_packs.union(*(e.packs for e in inputs.gc_epochs))
    if parent.footer.hardlinks or not avoid.isdisjoint(parent.footer.packs):
        parent.close()
        return None
    return parent


Fresh = tuple[t.Entry, os.stat_result]


def _splice(
    inputs: CreateInputs,
    parent: ParentTree,
    cuts: list[Cut],
    walked: Iterable[tuple[str, os.stat_result, bool, int]],
    release: contextlib.ExitStack,
    stats: CreateStats,
    targets: list[tuple[str, bool]],
) -> tuple[str, str, list[tuple[Fresh, bytes]]] | None:
    """Store the walked paths (each with the index of the cut it goes into, in canonical order) and publish the
    parent's tree with the cuts replaced by them (``targets``: the (path, whole subtree?) pairs the cuts were planned
    from). Returns (id, digest, each fresh entry with its stat and tree line),
    or None if the removed lines do not match the side file (before anything is read)."""
    root, known, scratch = inputs.root, inputs.known, inputs.scratch
    side = parent.footer
    try:
        removed, removed_packs, old_chunks = removed_lines(parent, cuts)
    except Unspliceable as e:
        log.info("snapshot of %s is not spliced: %s", root, e)
        return None
    for ref in old_chunks:
        known.add(ref)  # an edited large file's old chunks are the likeliest to recur
    writer = PackWriter(inputs.store, known, encryption=inputs.encryption)
    release.callback(writer.close)
    chunker = new_chunker()
    fresh: list[tuple[int, Fresh]] = []
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for path, st, ancestor, index in walked:
            entry = _fresh_entry(root_fd, path, st, ancestor, writer, chunker, stats)
            if entry is not None:
                fresh.append((index, (entry, st)))
    except NeedsWalk:
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
            raise NeedsWalk("fresh entries out of their parent's order")  # never expected: a walk is right
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
    selection_json = inputs.selection.to_json()
    snapshot_id, digest = write_spliced(
        parent, cuts, body, side_out, lambda d: t.footer(entries, stats.bytes, d, selection_json)
    )
    packs = side.packs - removed_packs + added
    footer = SideFooter(
        snapshot_id, body.stat().st_size, entries, side.files - removed.files + files, stats.bytes, 0, packs
    )
    with open(side_out, "ab") as f:
        f.write(footer.encode())
    side_of = (side_out, frozenset(packs)) if splittable else None
    published = inputs.publish(snapshot_id, body, side_of, (parent.snapshot_id, targets))
    snapshot_id = published.snapshot_id  # the stored tree's id (merkle.py), not the flat body's hash
    stats.tree_written = published.written
    stats.tree_blobs, stats.tree_bytes = published.tree_blobs, published.tree_bytes
    stats.tree_deduped = published.tree_deduped
    stats.spliced = True
    stats.entries = entries
    stats.files_unchanged = side.files - removed.files
    stats.bytes_new = writer.stats.bytes_raw
    stats.bytes_stored = writer.stats.bytes_stored
    stats.packs = writer.stats.packs
    return snapshot_id, digest, out


def create_walk_spliced(
    inputs: CreateInputs, cache_path: Path, cursor: StatCacheCursor, scan: Scan, trees_dir: Path, since_ns: int
) -> CreateResult | None:
    """A walking snapshot that processes only what the walk found changed: its lines against the last snapshot's
    walk file (walkfile.py) as two sets give the paths whose stat differs, appeared or vanished (plus the racy
    ones); those are read and spliced into the last snapshot's tree, and into the stat cache. None when that is
    not possible (no walk file, the tree not cached here, hard links, condemned packs): the caller walks as before."""
    started = time.monotonic()
    root, selection = inputs.root, inputs.selection
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
    parent = _spliceable_parent(tree, trees_dir / f"{parent_id}.side", parent_id, digest, inputs)
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
            walked_items = ((path, st, ancestor, where[path]) for path, st, ancestor in items)
            done = _splice(inputs, parent, cuts, walked_items, release, stats, [(p, False) for p in paths])
        except NeedsWalk as e:
            log.info("snapshot of %s walks the whole folder: %s", root, e)
            return None
        if done is None:
            return None
        snapshot_id, digest, fresh = done
        # The stat cache, spliced the same way: the lines of the changed paths replaced by their files' new lines.
        cache_out = StatCacheWriter(cache_path, inputs.store_id)
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
        cache_out.gc_seen = max([cursor.gc_seen, *(e.created for e in inputs.gc_epochs)])
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
