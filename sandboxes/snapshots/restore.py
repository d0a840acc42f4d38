"""Restoring a snapshot: make a folder equal a tree, writing only what differs.

The same code does a full restore (into an empty folder) and a rollback (of a live workspace to the snapshot it
started from). It merges one walk of the folder against one pass over the tree: what the tree lacks is deleted,
what differs is rewritten, what matches is left alone. A file whose stat and tree line are the ones the stat cache
recorded is kept without parsing its line; otherwise its content hash decides. The new stat cache is written in
the same pass (files written afterwards are spliced in), so a rollback reads the tree once and walks once.

With a `ChangeSet` (the paths an attempt may have changed, which the overlay knows), only those paths and the
folders leading to them are looked at: the tree is binary-searched for them, so a rollback costs what changed.

Safety: a tree is validated whole before a full merge first uses it (paths stay inside the target, nothing
beneath a symlink, canonical order); the verdict is kept on the verified tree file in the worker's cache (an
extended attribute), so a tree restored again and again is checked once. A ChangeSet restore of a tree not yet
validated validates, in order, every line it acts on (and falls back to the full merge on anything unexpected): a
tree our own checkpoint just wrote is not read whole to roll back one file. Every write goes through folder
descriptors opened one component at a time with O_NOFOLLOW (sandboxes/safe_folders.py), so even a symlink planted
in the folder cannot redirect a write outside it. Anything outside the selection (caches that are excluded, data
mounts) is never deleted.

Beside it: tree_check.py (validating a tree once, reading its lines by position) and restore_spools.py (what the
merge keeps on disk: the writes to make, the new stat cache, the walk fingerprint).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import stat
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from tardigrade.sandboxes.errors import UnsafeTree
from tardigrade.sandboxes.safe_folders import SafeFolders, remove_at
from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.snapshots.create import MODE_MASK
from tardigrade.sandboxes.snapshots.crypto import Encryption
from tardigrade.sandboxes.snapshots.hinted import check_changes
from tardigrade.sandboxes.snapshots.packs import BlobFetcher
from tardigrade.sandboxes.snapshots.restore_spools import AfterFingerprint, CacheSpool, Plan
from tardigrade.sandboxes.snapshots.statcache import (
    CachedFile,
    StatCacheCursor,
    StatCacheWriter,
    cache_key,
    stat_key,
)
from tardigrade.sandboxes.snapshots.tree_check import (
    TreeShape,
    bound_to,
    check_tree,
    head_canonical,
    head_parsed,
    known_shape,
    line_head,
    read_footer,
    tree_entries,
)
from tardigrade.sandboxes.snapshots.walk import Walker, walks_to
from tardigrade.sandboxes.stores.base import ObjectStore

log = logging.getLogger(__name__)

# The engine and tests import the tree checks from here too (they lived here before tree_check.py).
__all__ = ["RestoreStats", "TreeShape", "check_tree", "read_footer", "restore_tree", "tree_entries"]

Have = tuple[str, os.stat_result, bool]  # a walked path, its lstat, and whether it was walked only to reach a root
Want = tuple[str, str, bytes]  # a tree entry's path, kind and line


@dataclass
class RestoreStats:
    files_written: int = 0
    bytes_written: int = 0
    files_kept: int = 0
    deleted: int = 0
    links_made: int = 0
    seconds: float = 0.0
    paths_hinted: int = 0  # with a ChangeSet: the subtrees restored (0: the whole folder was merged)


def _tree_lines(tree_path: Path, head: Callable[[bytes], tuple[str, str]]) -> Generator[Want, None, None]:
    with open(tree_path, "rb") as f:
        for line in f:
            if line.startswith(b'{"p"'):
                path, kind = head(line)
                yield path, kind, line


def _covered(wants: Generator[Want, None, None], selection: Selection) -> Generator[Want, None, None]:
    """The tree entries inside ``selection``'s roots, and the folders leading to them."""
    roots = set(selection.roots)
    try:
        above = {root.rsplit("/", i)[0] for root in roots for i in range(1, root.count("/") + 1)}
        for want in wants:
            parts = want[0].split("/")
            if want[0] in above or any("/".join(parts[:i]) in roots for i in range(1, len(parts) + 1)):
                yield want
    finally:
        wants.close()


def _readable(line: bytes, *, parse: bool = False) -> tuple[str, str]:
    """Path and kind of a line found by position; with ``parse``, checked against what JSON makes of it (lines
    acted on are checked by the caller)."""
    head = line_head(line)
    if parse and head is not None:
        try:
            parsed: tuple[str, str] | None = head_parsed(line)
        except (ValueError, KeyError, TypeError, AttributeError):
            parsed = None
        head = head if parsed == head else None
    if head is None:
        raise _NeedsFullRestore("the tree has a line that cannot be read by position")
    return head


class _SortedTree:
    """Binary search over the lines of a tree in canonical order (mapped, never read whole): the entries of one
    subtree cost a few probes and the lines they span. A line it cannot read is `_NeedsFullRestore`."""

    def __init__(self, tree_path: Path) -> None:
        with open(tree_path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._end = self._map.rfind(b"\n") + 1  # the footer starts here

    def close(self) -> None:
        self._map.close()

    def _first_at_or_after(self, key: list[str]) -> int:
        m, lo, hi = self._map, 0, self._end
        while lo < hi:  # lo and hi are line starts
            mid = (lo + hi) // 2
            start = m.rfind(b"\n", lo, mid) + 1 or lo
            stop = m.find(b"\n", start) + 1
            if t.sort_key(_readable(m[start:stop], parse=True)[0]) < key:
                lo = stop
            else:
                hi = start
        return lo

    def lookup(self, path: str) -> Want | None:
        at = self._first_at_or_after(t.sort_key(path))
        if at >= self._end:
            return None
        line = self._map[at : self._map.find(b"\n", at) + 1]
        found, kind = _readable(line)
        return (found, kind, line) if found == path else None

    def subtree(self, path: str) -> Iterator[Want]:
        """``path``'s entry and every entry beneath it, in order."""
        m, at, prefix = self._map, self._first_at_or_after(t.sort_key(path)), path + "/"
        while at < self._end:
            stop = m.find(b"\n", at) + 1
            line = m[at:stop]
            found, kind = _readable(line)
            if found != path and not found.startswith(prefix):
                return
            yield found, kind, line
            at = stop


# -- the merge ------------------------------------------------------------------------------------------------


class _SubtreeWalk(Iterator[Have]):
    """The walk of one changed path: the path itself, then (if it is a folder and not pruned) what lies beneath."""

    def __init__(self, root: str, selection: Selection, path: str, st: os.stat_result | None) -> None:
        self._root, self._selection, self._path = root, selection, path
        self._first: Have | None = (path, st, False) if st is not None else None
        self._below: Walker | None = None
        self._pending = st is not None and stat.S_ISDIR(st.st_mode)

    def prune(self) -> None:
        if self._below is not None:
            self._below.prune()
        else:
            self._pending = False

    def __next__(self) -> Have:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._pending:
            self._pending = False
            self._below = Walker(self._root, self._selection, start=self._path)
        if self._below is None:
            raise StopIteration
        return next(self._below)


class _Restorer:
    """One restore: the merge of walks against tree entries, then the writes it planned."""

    def __init__(
        self,
        store: ObjectStore,
        snapshot_id: str,
        root: str,
        scratch: Path,
        encryption: Encryption | None,
        release: contextlib.ExitStack,
    ) -> None:
        self.store, self.snapshot_id, self.root, self.encryption = store, snapshot_id, root, encryption
        self.since_ns = time.time_ns()  # every stat below is taken after this: fresher files are racy
        self.stats = RestoreStats()
        self.folders = SafeFolders(root, unsafe=lambda path, reason: UnsafeTree(snapshot_id, path, reason))
        release.callback(self.folders.close)
        self.plan = Plan(scratch)
        release.callback(self.plan.close)
        # Folders to settle last, deepest first: (path, mode, mtime, their lstat before, or None if made here).
        self.dirs: list[tuple[str, int, int, os.stat_result | None]] = []
        self.touched: set[str] = set()  # folders whose entries the restore changed: their mtime is set again
        self.fingerprint: AfterFingerprint | None = None  # told the stat of each file and symlink made

    def _touch(self, path: str) -> None:
        self.touched.add(path.rpartition("/")[0])

    def merge(
        self,
        walk: Iterator[Have],
        prune: Callable[[], None],
        wants: Iterator[Want],
        parse: Callable[[bytes], t.Entry],
        cursor: StatCacheCursor | None = None,
        cache: CacheSpool | None = None,
        fingerprint: AfterFingerprint | None = None,
    ) -> None:
        """Make what ``walk`` yields equal what ``wants`` lists (both in canonical order)."""
        sort_key = t.sort_key
        have = next(walk, None)
        want = next(wants, None)
        while have is not None or want is not None:
            if have is not None and want is not None and have[0] == want[0]:
                path, st, ancestor = have
                kind = want[1]
                if kind == t.FILE and cursor is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    cached = cursor.seek(path)
                    if cached is not None and cached.tree_line + b"\n" == want[2] and cached.stat_key == stat_key(st):
                        # The stat cache vouches for this very file holding this very entry: nothing to do.
                        self.stats.files_kept += 1
                        if cache is not None:
                            cache.out.write(cached.line)
                        if fingerprint is not None:
                            fingerprint.add(path, st)
                        have, want = next(walk, None), next(wants, None)
                        continue
                else:
                    cached = None
                self._same_path(have, parse(want[2]), cached, prune, cache, fingerprint)
                have, want = next(walk, None), next(wants, None)
            elif want is None or (have is not None and sort_key(have[0]) < sort_key(want[0])):
                assert have is not None
                path, st, ancestor = have
                if ancestor:  # a folder we only passed through is not ours to delete
                    if fingerprint is not None:
                        fingerprint.later(path)
                else:
                    if stat.S_ISDIR(st.st_mode):
                        prune()
                    self._remove(path, stat.S_ISDIR(st.st_mode))
                have = next(walk, None)
            else:
                entry = parse(want[2])
                self._create(entry, cache)
                if fingerprint is not None:
                    fingerprint.later(entry.path)
                want = next(wants, None)

    def _same_path(
        self,
        have: Have,
        want: t.Entry,
        cached: CachedFile | None,
        prune: Callable[[], None],
        cache: CacheSpool | None,
        fingerprint: AfterFingerprint | None,
    ) -> None:
        path, st, ancestor = have
        is_dir = stat.S_ISDIR(st.st_mode)
        if ancestor and not (want.kind == t.DIR and is_dir):
            raise UnsafeTree(self.snapshot_id, path, "would replace a folder that holds paths outside the selection")
        content = self._matches(want, st, path, cached)
        if content is None:
            if is_dir:
                prune()
            if not (is_dir and want.kind == t.DIR):
                self._remove(path, is_dir)
            self._create(want, cache)
            if fingerprint is not None:
                fingerprint.later(path)
        elif want.kind == t.DIR:
            self._keep_dir(want, st)
            if fingerprint is not None:
                fingerprint.later(path)
        elif want.kind == t.FILE:
            self.stats.files_kept += 1
            settled = self._settle_file(want, st)
            if cache is not None:
                # Untouched: ``st`` was taken before the hash, so a later write shows in it. Settled here: the
                # stat is taken after the hash, so a write in between would hide behind it; its ctime is ours
                # and fresh, which marks it racy (hashed again by the next snapshot, that file only).
                key = cache_key(settled or st, self.since_ns)
                cache.add(path, key, content, want.mode, t.encode_entry(want))
            if fingerprint is not None:
                if settled is None:
                    fingerprint.add(path, st)
                else:
                    fingerprint.later(path)
                    fingerprint.made(path, settled)
        elif fingerprint is not None:
            fingerprint.add(path, st)

    def _keep_dir(self, want: t.Entry, st: os.stat_result) -> None:
        """A folder that stays: settled last (deepest first) if its mode or mtime differ or its entries change."""
        before: os.stat_result | None = st
        if st.st_mode & 0o700 != 0o700:  # so we can write into it; the final mode is set last
            parent, name = self.folders.parent_of(want.path)
            os.chmod(name, 0o700 | stat.S_IMODE(st.st_mode), dir_fd=parent)
            before = None
        self.dirs.append((want.path, want.mode & MODE_MASK, want.mtime_ns, before))

    def _matches(self, want: t.Entry, st: os.stat_result, path: str, cached: CachedFile | None) -> str | None:
        """Whether the existing node can stay (mode and mtime are fixed up separately): for a file, its content
        hash; "" for anything else that can stay; None if it must be replaced."""
        if want.kind == t.DIR:
            return "" if stat.S_ISDIR(st.st_mode) else None
        if want.kind == t.SYMLINK:
            if not stat.S_ISLNK(st.st_mode):
                return None
            parent, name = self.folders.parent_of(path)
            return "" if os.readlink(name, dir_fd=parent) == want.link else None
        if want.kind == t.HARDLINK:
            return None  # cheap to remake, and checking needs the target's inode
        if not stat.S_ISREG(st.st_mode) or st.st_size != want.size or st.st_nlink > 1:
            return None
        if cached is not None and cached.stat_key == stat_key(st):
            return want.hash if cached.hash == want.hash else None
        return want.hash if self._hash_local(path) == want.hash else None

    def _hash_local(self, path: str) -> str:
        parent, name = self.folders.parent_of(path)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            hasher = blake3.blake3()
            while block := os.read(fd, 1 << 20):
                hasher.update(block)
            return hasher.hexdigest()
        finally:
            os.close(fd)

    def _settle_file(self, want: t.Entry, st: os.stat_result) -> os.stat_result | None:
        """Give a kept file the tree's mode and mtime; its new stat, or None if it had them already."""
        if stat.S_IMODE(st.st_mode) == want.mode & MODE_MASK and st.st_mtime_ns == want.mtime_ns:
            return None
        parent, name = self.folders.parent_of(want.path)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.fchmod(fd, want.mode & MODE_MASK)
            os.utime(fd, ns=(want.mtime_ns, want.mtime_ns))
            return os.fstat(fd)
        finally:
            os.close(fd)

    def _remove(self, path: str, is_dir: bool) -> None:
        parent, name = self.folders.parent_of(path)
        if is_dir:
            remove_at(parent, name)
            self.folders.forget()
        else:
            os.unlink(name, dir_fd=parent)
        self.stats.deleted += 1
        self._touch(path)

    def _create(self, want: t.Entry, cache: CacheSpool | None) -> None:
        self._touch(want.path)
        if want.kind == t.DIR:
            parent, name = self.folders.parent_of(want.path)
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
            self.dirs.append((want.path, want.mode & MODE_MASK, want.mtime_ns, None))
        elif want.kind == t.SYMLINK:
            parent, name = self.folders.parent_of(want.path)
            os.symlink(want.link, name, dir_fd=parent)
            os.utime(name, ns=(want.mtime_ns, want.mtime_ns), dir_fd=parent, follow_symlinks=False)
            if self.fingerprint is not None:
                self.fingerprint.made(want.path, os.stat(name, dir_fd=parent, follow_symlinks=False))
        else:
            self.plan.add(want)
            if cache is not None and want.kind == t.FILE:
                cache.out.write(CacheSpool.PLACEHOLDER)
                cache.placeholders += 1

    # -- after the merge ----------------------------------------------------------------------------------------

    def finish(self, cache: CacheSpool | None) -> None:
        self._write_files(cache)
        with contextlib.closing(self.plan.entries(t.HARDLINK)) as links:
            for entry, _ in links:
                try:
                    self.folders.hardlink(entry.link, entry.path)
                except FileNotFoundError:  # the validator checks order, not that the target is one of its files
                    raise UnsafeTree(
                        self.snapshot_id, entry.path, f"is a hard link to {entry.link!r}, which the tree does not hold"
                    ) from None
                self.stats.links_made += 1
        if self.fingerprint is not None and self.stats.links_made:
            # Each link changes its inode's ctime and link count: what every name of it looks like after the last.
            with contextlib.closing(self.plan.entries(t.HARDLINK)) as links:
                for entry, _ in links:
                    for path in (entry.path, entry.link):
                        parent, name = self.folders.parent_of(path)
                        self.fingerprint.made(path, os.stat(name, dir_fd=parent, follow_symlinks=False))
        for path, mode, mtime, before in reversed(self.dirs):
            if (
                before is not None
                and path not in self.touched
                and stat.S_IMODE(before.st_mode) == mode
                and (not mtime or before.st_mtime_ns == mtime)
            ):
                continue  # as the tree has it, and nothing inside it was added or removed
            parent, name = self.folders.parent_of(path)
            os.chmod(name, mode, dir_fd=parent)
            if mtime:
                os.utime(name, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)

    def _write_files(self, cache: CacheSpool | None) -> None:
        if not self.plan.files:
            return
        fetcher = BlobFetcher(self.store, self.snapshot_id, encryption=self.encryption)
        # Two readers of the plan and the fetcher's generator, which owns a thread pool: a failed write must close
        # them now, not whenever garbage collection gets to them.
        with contextlib.ExitStack() as release:
            planned = release.enter_context(contextlib.closing(self.plan.entries(t.FILE)))
            wanted = ((ref, entry.path) for entry, _ in planned for ref in entry.chunks)
            release.callback(wanted.close)
            blobs = release.enter_context(contextlib.closing(fetcher.fetch(wanted, path_of=lambda p: p)))
            files = release.enter_context(contextlib.closing(self.plan.entries(t.FILE)))
            for entry, line in files:
                parent, name = self.folders.parent_of(entry.path)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(name, flags, 0o600, dir_fd=parent)
                try:
                    for _ in entry.chunks:
                        _, data = next(blobs)
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view) :]
                    os.fchmod(fd, entry.mode & MODE_MASK)
                    os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
                    if cache is not None:
                        # mtime is the tree's, so a later rewrite moves it unless it was that fresh already: ctime
                        # (the restore's own) would mark every restored file racy.
                        written = os.fstat(fd)
                        key = cache_key(written, self.since_ns, ctime=False)
                        cache.add_written(entry.path, key, entry.hash, entry.mode, line)
                        if self.fingerprint is not None:
                            self.fingerprint.made(entry.path, written)
                finally:
                    os.close(fd)
                self.stats.files_written += 1
                self.stats.bytes_written += entry.size


class _NeedsFullRestore(Exception):
    """The hint does not fit what is on disk (a folder on the way replaced, say): merge the whole folder."""


# -- entry points ---------------------------------------------------------------------------------------------


def restore_tree(
    store: ObjectStore,
    snapshot_id: str,
    tree_path: Path,
    root: str,
    *,
    selection: Selection,
    cache_path: Path | None,
    scratch: Path,
    encryption: Encryption | None = None,
    store_id: str | None = None,
    changes: ChangeSet | None = None,
) -> RestoreStats:
    """Make ``root`` (within ``selection``) equal the verified, uncompressed tree at ``tree_path`` (a file of the
    caller's own cache: the validator's verdict is kept on it). The stat cache is kept for ``store_id`` (the
    store's identity; its URL by default).

    ``changes``: the paths that may differ from the tree (see changes.py). Only they, and the folders leading to
    them, are restored; the stat cache is left as it is (its lines map stats to contents, and what is rewritten
    here gets a new stat). A path that changed but is not listed stays changed: that is the hint's contract.
    Without a canonical tree, with hard links, or when the disk does not fit the hint, the whole folder is merged.
    """
    started = time.monotonic()
    stats: RestoreStats | None = None
    if changes is not None:
        check_changes(changes)
        if _may_hint(snapshot_id, tree_path):
            try:
                stats = _restore_changes(store, snapshot_id, tree_path, root, selection, scratch, encryption, changes)
            except _NeedsFullRestore as e:
                log.info("restore of %s merges the whole folder: %s", root, e)
    if stats is None:
        shape = check_tree(snapshot_id, tree_path)
        stats = _restore_all(
            store, snapshot_id, tree_path, root, selection, cache_path, scratch, encryption, store_id, shape
        )
    stats.seconds = time.monotonic() - started
    return stats


def _restore_all(
    store: ObjectStore,
    snapshot_id: str,
    tree_path: Path,
    root: str,
    selection: Selection,
    cache_path: Path | None,
    scratch: Path,
    encryption: Encryption | None,
    store_id: str | None,
    shape: TreeShape,
) -> RestoreStats:
    """One walk of the folder merged against one pass over the tree, writing the new stat cache as it goes."""
    owner = store_id or store.url
    with contextlib.ExitStack() as release:  # on success, error and cancellation alike
        restorer = _Restorer(store, snapshot_id, root, scratch, encryption, release)
        cursor = StatCacheCursor(cache_path, owner) if cache_path is not None else None
        if cursor is not None:
            release.callback(cursor.close)
        cache = fingerprint = None
        if cache_path is not None:
            cache = CacheSpool(scratch)
            release.callback(cache.close)
            fingerprint = AfterFingerprint(root.rstrip("/") or "/", selection, scratch)
            release.callback(fingerprint.close)
        restorer.fingerprint = fingerprint
        walker = Walker(root, selection)
        wants = _tree_lines(tree_path, head_canonical if shape.canonical else head_parsed)
        if "" not in selection.roots:
            wants = _covered(wants, selection)
        release.callback(wants.close)  # holds the tree file open, even if the merge stops early
        restorer.merge(walker, walker.prune, wants, t.decode_entry, cursor, cache, fingerprint)
        restorer.finish(cache)
        if cache is not None and cache_path is not None and fingerprint is not None:
            footer = read_footer(tree_path)
            writer = StatCacheWriter(cache_path, owner)
            try:
                cache.commit(writer)
                walk_fingerprint = fingerprint.hexdigest()
                writer.racy = writer.racy or not fingerprint.vouches
                # The next snapshot of an untouched folder can now reuse this snapshot whole.
                writer.commit(
                    snapshot_id,
                    walk_fingerprint,
                    str(footer["digest"]),
                    int(str(footer["entries"])),
                    int(str(footer["bytes"])),
                )
            except BaseException:
                writer.abort()
                raise
    return restorer.stats


def _may_hint(snapshot_id: str, tree_path: Path) -> bool:
    """Whether a ChangeSet restore can work on this tree: one in our format, without hard links (remaking one
    name of a shared inode needs the others), whose lines can be read by position. A tree not validated yet is not
    validated whole for it (that would cost what the tree holds): every line the restore uses is validated in
    order instead, and anything unexpected falls back to the full merge, which validates first."""
    shape = known_shape(snapshot_id, tree_path)
    if shape is not None:
        return shape.canonical and not shape.hardlinks
    if read_footer(tree_path, snapshot_id).get("format") != t.FORMAT:
        return False
    bound = bound_to(snapshot_id, tree_path)
    try:
        found = os.getxattr(tree_path, _LINKS_ATTR)
    except OSError:
        found = b""
    if found[2:] == bound and found[:2] in (b"0:", b"1:"):
        return found[:2] == b"0:"
    links = _has_hardlinks(tree_path)
    with contextlib.suppress(OSError):
        os.setxattr(tree_path, _LINKS_ATTR, (b"1:" if links else b"0:") + bound)
    return not links


#: Extended attribute on a cached tree file: whether a byte scan found hard links in it ("1") or not ("0"), and
#: for which file (`bound_to`).
_LINKS_ATTR = "user.tardigrade.hardlinks"


def _has_hardlinks(tree_path: Path) -> bool:
    """Whether any line of the tree is a hard link, by a byte scan in C, a few MiB at a time (a path cannot hold
    the pattern: its quotes are escaped)."""
    needle = b'"k":"h"'
    keep = len(needle) - 1
    buf = bytearray(4 << 20)
    view, have = memoryview(buf), 0
    with open(tree_path, "rb", buffering=0) as f:
        while n := f.readinto(view[have:]):
            end = have + n
            if buf.find(needle, 0, end) >= 0:
                return True
            tail = bytes(buf[max(0, end - keep) : end])  # a match may straddle two reads
            buf[: len(tail)] = tail
            have = len(tail)
    return False


def _hinted_roots(changes: ChangeSet, selection: Selection) -> list[str]:
    """The changed paths a walk of ``selection`` would reach (a changed folder above a root stands for the root),
    none beneath another, in canonical order."""
    wanted = set()
    for path in changes.paths:
        if selection.covers(path):
            wanted.add(path)
        else:
            wanted.update(r for r in selection.roots if r.startswith(path + "/"))
    roots: list[str] = []
    for path in sorted(wanted, key=t.sort_key):
        if roots and path.startswith(roots[-1] + "/"):
            continue
        if walks_to(selection, path):
            roots.append(path)
    return roots


def _restore_changes(
    store: ObjectStore,
    snapshot_id: str,
    tree_path: Path,
    root: str,
    selection: Selection,
    scratch: Path,
    encryption: Encryption | None,
    changes: ChangeSet,
) -> RestoreStats:
    """Restore only the changed paths and the folders leading to them, finding them in the tree by binary search."""
    validator = t.TreeValidator(snapshot_id)

    def use(line: bytes) -> t.Entry:
        """A line the restore acts on, validated in tree order (all of them are, subtree after subtree)."""
        try:
            entry = t.parse_entry(snapshot_id, line)
            validator.check(entry)
        except UnsafeTree as e:
            raise _NeedsFullRestore(str(e)) from None
        if line_head(line) != (entry.path, entry.kind) or entry.kind == t.HARDLINK:
            raise _NeedsFullRestore(f"{entry.path!r} is not spelled as this restore reads it, or is a hard link")
        return entry

    with contextlib.ExitStack() as release:
        restorer = _Restorer(store, snapshot_id, root, scratch, encryption, release)
        tree = _SortedTree(tree_path)
        release.callback(tree.close)
        walk_root = root.rstrip("/") or "/"
        seen: dict[str, bool] = {}  # folder on the way -> whether paths beneath it can exist on disk
        for path in _hinted_roots(changes, selection):
            if not _reach(restorer, tree, path, seen, use):
                continue
            st = _lstat_at(restorer.folders, path)
            walk = _SubtreeWalk(walk_root, selection, path, st)
            restorer.merge(walk, walk.prune, tree.subtree(path), use)
            restorer.stats.paths_hinted += 1
        restorer.finish(None)
    return restorer.stats


def _lstat_at(folders: SafeFolders, path: str) -> os.stat_result | None:
    """lstat of ``path``, whose folders are known to be real folders (never through a symlink); None if there is
    nothing there, or there cannot be (a hint may name a path no folder could hold, such as a too long name)."""
    parent, name = folders.parent_of(path)
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ENAMETOOLONG, errno.EINVAL):
            return None
        raise


def _reach(
    restorer: _Restorer, tree: _SortedTree, path: str, seen: dict[str, bool], use: Callable[[bytes], t.Entry]
) -> bool:
    """Make the folders on the way to ``path`` what the tree says (creating missing ones); whether ``path`` can be
    restored (False: the tree has no folder there and neither has the disk, so nothing lies beneath)."""
    parts = path.split("/")
    for i in range(1, len(parts)):
        folder = "/".join(parts[:i])
        known = seen.get(folder)
        if known is not None:
            if not known:
                return False
            continue
        want = tree.lookup(folder)
        entry = use(want[2]) if want is not None else None
        st = _lstat_at(restorer.folders, folder)
        on_disk = st is not None and stat.S_ISDIR(st.st_mode)
        if want is None or want[1] != t.DIR:
            if on_disk and want is not None:
                raise _NeedsFullRestore(f"{folder!r} is a folder the tree does not have there")
            seen[folder] = on_disk  # nothing of the tree beneath; what is on disk there may need deleting
            if not on_disk:
                return False
            continue
        assert entry is not None
        if st is None:
            restorer._create(entry, None)
        elif not on_disk:
            raise _NeedsFullRestore(f"{folder!r} is no longer a folder, and the hint does not say so")
        else:
            restorer._keep_dir(entry, st)
        seen[folder] = True
    return True
