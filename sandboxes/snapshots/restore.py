"""Restoring a snapshot: make a folder equal a tree, writing only what differs.

The same code does a full restore (into an empty folder) and a rollback (of a live workspace to the snapshot it
started from). It merges a walk of the folder against the tree: what the tree lacks is deleted, what differs is
rewritten, what matches - by the stat cache, or failing that by hashing the local file - is left alone.

Safety: the whole tree is validated before anything is touched (paths stay inside the target, nothing beneath a
symlink). Every write then goes through folder descriptors opened one component at a time with O_NOFOLLOW
(sandboxes/safe_folders.py), so even a symlink planted in the folder cannot redirect a write outside it. Anything
outside the selection (caches that are excluded, data mounts) is never deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import blake3

from tardigrade.sandboxes.errors import UnsafeTree
from tardigrade.sandboxes.safe_folders import SafeFolders, remove_at
from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.create import MODE_MASK, Fingerprint
from tardigrade.sandboxes.snapshots.crypto import Encryption
from tardigrade.sandboxes.snapshots.packs import BlobFetcher
from tardigrade.sandboxes.snapshots.statcache import StatCacheCursor, StatCacheWriter, cache_key, stat_key
from tardigrade.sandboxes.snapshots.walk import Walker
from tardigrade.sandboxes.stores.base import ObjectStore


@dataclass
class RestoreStats:
    files_written: int = 0
    bytes_written: int = 0
    files_kept: int = 0
    deleted: int = 0
    links_made: int = 0
    seconds: float = 0.0


def _folders(root: str, snapshot_id: str) -> SafeFolders:
    return SafeFolders(root, unsafe=lambda path, reason: UnsafeTree(snapshot_id, path, reason))


def _remove(folders: SafeFolders, path: str, is_dir: bool) -> None:
    parent, name = folders.parent_of(path)
    if is_dir:
        remove_at(parent, name)
        folders.forget()
    else:
        os.unlink(name, dir_fd=parent)


def _hash_local(folders: SafeFolders, path: str) -> str:
    parent, name = folders.parent_of(path)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        hasher = blake3.blake3()
        while block := os.read(fd, 1 << 20):
            hasher.update(block)
        return hasher.hexdigest()
    finally:
        os.close(fd)


class _Plan:
    """Files and links to write after the merge pass, spooled to disk so memory stays bounded."""

    def __init__(self, scratch: Path) -> None:
        fd, name = tempfile.mkstemp(dir=scratch, prefix="restore-")
        self.path = Path(name)
        try:
            self._out: IO[bytes] = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self.files = 0
        self.links = 0

    def add(self, entry: t.Entry) -> None:
        self._out.write(t.encode_entry(entry) + b"\n")
        if entry.kind == t.FILE:
            self.files += 1
        else:
            self.links += 1

    def entries(self, kind: str) -> Generator[t.Entry, None, None]:
        """The planned entries of one kind. Holds the spool open until exhausted or closed: wrap a loop that may
        stop early in `contextlib.closing`."""
        self._out.flush()
        with open(self.path, "rb") as f:
            for line in f:
                entry = t.decode_entry(line)
                if entry.kind == kind:
                    yield entry

    def close(self) -> None:
        self._out.close()
        self.path.unlink(missing_ok=True)


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
) -> RestoreStats:
    """Make ``root`` (within ``selection``) equal the verified, uncompressed tree at ``tree_path``. The stat cache
    is kept for ``store_id`` (the store's identity; its URL by default)."""
    started = time.monotonic()
    _validate(snapshot_id, tree_path)
    stats = RestoreStats()
    dirs: list[tuple[str, int, int]] = []  # (path, mode, mtime) to settle last, deepest first
    with contextlib.ExitStack() as release:  # on success, error and cancellation alike
        folders = _folders(root, snapshot_id)
        release.callback(folders.close)
        plan = _Plan(scratch)
        release.callback(plan.close)
        _merge(store, snapshot_id, tree_path, root, selection, cache_path, folders, plan, dirs, stats, store_id)
        _write_files(store, snapshot_id, folders, plan, stats, encryption)
        with contextlib.closing(plan.entries(t.HARDLINK)) as links:
            for entry in links:
                try:
                    folders.hardlink(entry.link, entry.path)
                except FileNotFoundError:  # the validator checks order, not that the target is one of its files
                    raise UnsafeTree(
                        snapshot_id, entry.path, f"is a hard link to {entry.link!r}, which the tree does not hold"
                    ) from None
                stats.links_made += 1
        for path, mode, mtime in reversed(dirs):
            parent, name = folders.parent_of(path)
            os.chmod(name, mode, dir_fd=parent)
            if mtime:
                os.utime(name, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
    if cache_path is not None:
        _rebuild_cache(store_id or store.url, snapshot_id, tree_path, root, selection, cache_path)
    stats.seconds = time.monotonic() - started
    return stats


def tree_entries(tree_path: Path, snapshot_id: str = "") -> Generator[t.Entry, None, None]:
    """Entries of an uncompressed tree file (the footer line is skipped). Each line is type-checked: a tree comes
    from a store, so a malformed one is `UnsafeTree`, never a raw KeyError or TypeError."""
    with open(tree_path, "rb") as f:
        for line in f:
            if line.startswith(b'{"p"'):
                yield t.parse_entry(snapshot_id or tree_path.name, line)


def read_footer(tree_path: Path, snapshot_id: str = "") -> dict[str, object]:
    """The tree's last line; `UnsafeTree` unless it is a JSON object with the footer's fields."""
    with open(tree_path, "rb") as f:
        f.seek(max(0, os.path.getsize(tree_path) - 65536))
        last = f.read().rsplit(b"\n", 1)[-1]
    try:
        footer = json.loads(last)
    except ValueError:
        footer = None
    if not (
        isinstance(footer, dict)
        and all(type(footer.get(k)) is int for k in ("entries", "bytes"))
        and isinstance(footer.get("digest"), str)
    ):
        raise UnsafeTree(snapshot_id or tree_path.name, "", "tree has no valid footer")
    return footer


def _validate(snapshot_id: str, tree_path: Path) -> None:
    footer = read_footer(tree_path, snapshot_id)
    if footer.get("format") != t.FORMAT:
        raise UnsafeTree(snapshot_id, "", f"tree format {footer.get('format')!r} is not {t.FORMAT!r}")
    validator = t.TreeValidator(snapshot_id)
    count = 0
    for entry in tree_entries(tree_path, snapshot_id):
        validator.check(entry)
        count += 1
    if count != footer.get("entries"):
        raise UnsafeTree(snapshot_id, "", f"tree lists {count} entries but its footer says {footer.get('entries')}")


def _covered(entries: Generator[t.Entry, None, None], selection: Selection) -> Generator[t.Entry, None, None]:
    """The tree entries inside ``selection``'s roots, and the folders leading to them."""
    roots = set(selection.roots)
    try:
        if "" in roots:
            yield from entries
            return
        above = {root.rsplit("/", i)[0] for root in roots for i in range(1, root.count("/") + 1)}
        for entry in entries:
            parts = entry.path.split("/")
            if entry.path in above or any("/".join(parts[:i]) in roots for i in range(1, len(parts) + 1)):
                yield entry
    finally:
        entries.close()


def _merge(
    store: ObjectStore,
    snapshot_id: str,
    tree_path: Path,
    root: str,
    selection: Selection,
    cache_path: Path | None,
    folders: SafeFolders,
    plan: _Plan,
    dirs: list[tuple[str, int, int]],
    stats: RestoreStats,
    store_id: str | None = None,
) -> None:
    walker = Walker(root, selection)
    cursor = StatCacheCursor(cache_path, store_id or store.url)
    # Holds the tree file open: closed below, even if the merge stops early. A selection narrower than the tree's
    # (a rollback of only the paths an attempt changed, bubblewrap.py) restores only what it covers.
    target = _covered(tree_entries(tree_path), selection)
    try:
        have = next(walker, None)
        want = next(target, None)
        while have is not None or want is not None:
            have_key = t.sort_key(have[0]) if have is not None else None
            want_key = t.sort_key(want.path) if want is not None else None
            if want is None or (
                have is not None and have_key is not None and want_key is not None and have_key < want_key
            ):
                assert have is not None
                path, st, ancestor = have
                if not ancestor:  # a folder we only passed through is not ours to delete
                    if stat.S_ISDIR(st.st_mode):
                        walker.prune()
                    _remove(folders, path, stat.S_ISDIR(st.st_mode))
                    stats.deleted += 1
                have = next(walker, None)
                continue
            if have is None or have_key != want_key:
                _create(folders, want, plan, dirs)
                want = next(target, None)
                continue
            path, st, ancestor = have
            if ancestor and not (want.kind == t.DIR and stat.S_ISDIR(st.st_mode)):
                raise UnsafeTree(snapshot_id, path, "would replace a folder that holds paths outside the selection")
            if not _matches(folders, cursor, want, st, path):
                if stat.S_ISDIR(st.st_mode):
                    walker.prune()
                if not (stat.S_ISDIR(st.st_mode) and want.kind == t.DIR):
                    _remove(folders, path, stat.S_ISDIR(st.st_mode))
                    stats.deleted += 1
                _create(folders, want, plan, dirs)
            else:
                if want.kind == t.DIR:
                    dirs.append((want.path, want.mode, want.mtime_ns))
                    if st.st_mode & 0o700 != 0o700:  # so we can write into it; the final mode is set last
                        parent, name = folders.parent_of(path)
                        os.chmod(name, 0o700 | stat.S_IMODE(st.st_mode), dir_fd=parent)
                elif want.kind == t.FILE:
                    stats.files_kept += 1
                    _settle_file(folders, want, st)
            have = next(walker, None)
            want = next(target, None)
    finally:
        target.close()
        cursor.close()


def _matches(folders: SafeFolders, cursor: StatCacheCursor, want: t.Entry, st: os.stat_result, path: str) -> bool:
    """Whether the existing node can stay (mode and mtime are fixed up separately)."""
    if want.kind == t.DIR:
        return stat.S_ISDIR(st.st_mode)
    if want.kind == t.SYMLINK:
        if not stat.S_ISLNK(st.st_mode):
            return False
        parent, name = folders.parent_of(path)
        return os.readlink(name, dir_fd=parent) == want.link
    if want.kind == t.HARDLINK:
        return False  # cheap to remake, and checking needs the target's inode
    if not stat.S_ISREG(st.st_mode) or st.st_size != want.size or st.st_nlink > 1:
        return False
    cached = cursor.seek(path)
    if cached is not None and cached.stat_key == stat_key(st):
        return cached.hash == want.hash
    return _hash_local(folders, path) == want.hash


def _settle_file(folders: SafeFolders, want: t.Entry, st: os.stat_result) -> None:
    if stat.S_IMODE(st.st_mode) == want.mode and st.st_mtime_ns == want.mtime_ns:
        return
    parent, name = folders.parent_of(want.path)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        os.fchmod(fd, want.mode & MODE_MASK)
        os.utime(fd, ns=(want.mtime_ns, want.mtime_ns))
    finally:
        os.close(fd)


def _create(folders: SafeFolders, want: t.Entry, plan: _Plan, dirs: list[tuple[str, int, int]]) -> None:
    if want.kind == t.DIR:
        parent, name = folders.parent_of(want.path)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
        dirs.append((want.path, want.mode & MODE_MASK, want.mtime_ns))
    elif want.kind == t.SYMLINK:
        parent, name = folders.parent_of(want.path)
        os.symlink(want.link, name, dir_fd=parent)
        os.utime(name, ns=(want.mtime_ns, want.mtime_ns), dir_fd=parent, follow_symlinks=False)
    else:
        plan.add(want)


def _write_files(
    store: ObjectStore,
    snapshot_id: str,
    folders: SafeFolders,
    plan: _Plan,
    stats: RestoreStats,
    encryption: Encryption | None,
) -> None:
    fetcher = BlobFetcher(store, snapshot_id, encryption=encryption)
    # Two readers of the plan and the fetcher's generator, which owns a thread pool: a failed write must close
    # them now, not whenever garbage collection gets to them.
    with contextlib.ExitStack() as release:
        planned = release.enter_context(contextlib.closing(plan.entries(t.FILE)))
        wanted = ((ref, entry.path) for entry in planned for ref in entry.chunks)
        release.callback(wanted.close)
        blobs = release.enter_context(contextlib.closing(fetcher.fetch(wanted, path_of=lambda p: p)))
        files = release.enter_context(contextlib.closing(plan.entries(t.FILE)))
        for entry in files:
            parent, name = folders.parent_of(entry.path)
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
            finally:
                os.close(fd)
            stats.files_written += 1
            stats.bytes_written += entry.size


def _rebuild_cache(
    store_id: str, snapshot_id: str, tree_path: Path, root: str, selection: Selection, cache_path: Path
) -> None:
    """Record the stat of every restored file so the next snapshot or rollback need not read it."""
    writer = StatCacheWriter(cache_path, store_id)
    fingerprint = Fingerprint(selection)
    # A restored file's mtime is the tree's, so a later rewrite moves it unless it was that fresh already: the
    # mtime alone tells which files are racy here (ctime is the restore's own, and would mark all of them).
    since_ns = time.time_ns()
    try:
        with contextlib.closing(tree_entries(tree_path)) as entries:  # the walk may end before the tree does
            files = (e for e in entries if e.kind == t.FILE)
            want = next(files, None)
            for path, st, _ in Walker(root, selection):
                fingerprint.add(path, st)
                while want is not None and t.sort_key(want.path) < t.sort_key(path):
                    want = next(files, None)
                if want is not None and want.path == path and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    writer.add(path, cache_key(st, since_ns, ctime=False), want.hash, want.mode, t.encode_entry(want))
    except BaseException:
        writer.abort()
        raise
    footer = read_footer(tree_path)
    # The next snapshot of an untouched folder can now reuse this snapshot whole.
    writer.commit(
        snapshot_id,
        fingerprint.hexdigest(),
        str(footer["digest"]),
        int(str(footer["entries"])),
        int(str(footer["bytes"])),
    )
