"""The undo log of one overlay attempt: rolling a failed attempt back by renames, reading nothing from the store.

When `OverlayLayers.merge` (sandboxes/overlay.py) is about to replace or delete a node of the sandbox's folder
(``fs/``), the node is first moved aside - one rename into ``overlay/undo/``, on the same filesystem and outside
anything a command binds - and a record says where it went. A path that did not exist is recorded as "remove on
undo", and a folder merged into keeps its mode and times. Only a path's first change in an attempt is recorded:
later changes, and everything below a recorded path, replace what the attempt itself made, never an original.
Rolling the attempt back is undoing the records newest first: O(what it changed) renames. A checkpoint commits
the attempt by throwing the originals away (one rename now, the deletion in a background thread).

Records are written (in memory) before their rename. A local sandbox never outlives its worker process (a restarted
worker deletes its predecessor's sandboxes), so nothing has to survive a crash; within the process, any failure
while recording or undoing marks the log broken, and the caller restores from the store instead: the folder is
taken as rolled back only when every record was undone.

What a rollback may touch is what the engine's restore would (sandboxes/selection.py): a record outside the
selection, or excluded by it, is left as the attempt made it; a folder on the way to a root gets its mode back but
keeps its times; a record whose subtree holds an excluded path, or that replaced a folder on the way to a root,
makes the log decline (the caller then restores the changed paths from the store, `rollback_roots`). Paths the
worker's file tools wrote into ``fs/`` are not undone here (a write truncates in place): they are listed for the
caller to restore from the store, and a merge deletes them rather than keeping them aside.

Disk: the originals kept aside do not count toward the sandbox's disk limit. Each is a node of ``fs/`` as it was
when the attempt started (before a folder is moved aside, whatever the attempt changed inside it is undone in
place), each is kept at most once per attempt, so together they never exceed what ``fs/`` held at the attempt's
start: a state that passed the disk check at its checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tardigrade.sandboxes.remove_tree import remove_folder
from tardigrade.sandboxes.safe_folders import DIR_FLAGS, SafeFolders, lstat_at, remove_at
from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots.walk import walks_to

log = logging.getLogger(__name__)

_SAVED, _CREATED, _FOLDER = "saved", "created", "folder"


class UndoFailed(Exception):
    """Undoing the attempt stopped part-way: the sandbox's folder must be restored from the store."""


@dataclass(frozen=True)
class _Record:
    kind: str  # _SAVED: the original is the undo folder's ``slot``; _CREATED: remove on undo; _FOLDER: times + mode
    path: str  # relative to fs/, as ChangeSet paths are
    slot: str = ""
    is_dir: bool = False  # _SAVED: the original is a folder (its times are put back: a rename may move them)
    mode: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0


@dataclass
class Undone:
    """What a rollback by the undo log did, and the paths the file tools wrote, left for a restore from the store."""

    put_back: int = 0
    removed: int = 0
    written: list[str] = field(default_factory=list)


@contextlib.contextmanager
def writable(fd: int) -> Iterator[None]:
    """A folder the worker may add to and remove from while the block runs (a step may leave one read-only); its
    mode is put back afterwards."""
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o700 != 0o700:
        os.fchmod(fd, mode | 0o700)
    try:
        yield
    finally:
        if mode & 0o700 != 0o700:
            os.fchmod(fd, mode)


def rename_node(src_fd: int, src: str, dst_fd: int, dst: str, is_dir: bool) -> None:
    """Rename between folders; moving a folder rewrites its "..", so a read-only one is opened up for a moment."""
    try:
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    except PermissionError:
        if not is_dir:
            raise
        child = os.open(src, DIR_FLAGS, dir_fd=src_fd)
        try:
            with writable(child):
                os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        finally:
            os.close(child)


def _unsafe(path: str, reason: str) -> Exception:
    return UndoFailed(f"{path!r} {reason}")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


class UndoLog:
    """The records and kept originals of the current attempt of one sandbox (see the module's docstring).

    Not thread-safe: its owner calls it under the lock that serializes merges and rollbacks."""

    def __init__(self, overlay_root: Path, fs: Path) -> None:
        self.root = overlay_root
        self.folder = overlay_root / "undo"
        self.fs = fs
        self.active = False  # recording; off until the folder is known to equal a snapshot (nothing to undo to)
        self.broken = False
        self.written: set[str] = set()
        #: Test hook, called before each step of a merge's recording or a rollback with what it is about to do:
        #: raising there stands for the worker failing at that point.
        self.fault: Callable[[str], None] | None = None
        # At most one record per path, oldest first (a path recorded again moves to the end, as a new change).
        self._records: dict[str, _Record] = {}
        self._covered: set[str] = set()  # paths recorded _SAVED or _CREATED: their subtrees are the attempt's
        self._folders: set[str] = set()  # paths recorded _FOLDER
        # The records as a tree: each path holding records below it, with its children on the way to them. A
        # subtree's records are found in O(its size), so a merge stays O(what it changes), never quadratic.
        self._below: dict[str, set[str]] = {}
        self._order: dict[str, int] = {}  # each recorded path's place in the order of changes
        self._appended = 0
        self._slots = 0
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._records)

    # -- the attempt's lifecycle ---------------------------------------------------------------------------------

    def reset(self, *, keep: bool) -> None:
        """Forget the attempt (its originals are deleted in the background); ``keep``: record the next one."""
        self.close()
        self._records, self._covered, self._folders, self._below, self._order = {}, set(), set(), {}, {}
        self.written, self._slots, self.broken, self.active = set(), 0, False, keep
        try:
            os.rmdir(self.folder)  # emptied by a rollback: no thread needed
            return
        except FileNotFoundError:
            return  # nothing was kept aside (or the sandbox is gone)
        except OSError:
            pass  # originals left: deleted in the background
        trash = self.root / f"trash-undo-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(self.folder, trash)
        except FileNotFoundError:
            return
        threading.Thread(
            target=remove_folder, args=(trash, "the kept originals"), name="overlay-undo-drop", daemon=True
        ).start()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def note_written(self, paths: Iterable[str]) -> None:
        """Paths the worker's file tools write into fs/ (a file and the folders they may have made)."""
        self.written.update(paths)

    # -- recording (called by the merge, by descriptor) ------------------------------------------------------------

    def covered(self, path: str) -> bool:
        while path:
            if path in self._covered:
                return True
            path = path.rpartition("/")[0]
        return False

    def note_folder(self, fd: int, path: str) -> None:
        """Before the merge changes the folder ``fd`` (at ``path``): keep its mode and times."""
        if not self.active or path in self._folders or self.covered(path):
            return
        st = os.fstat(fd)
        self._append(_Record(_FOLDER, path, mode=stat.S_IMODE(st.st_mode), atime_ns=st.st_atime_ns,
                             mtime_ns=st.st_mtime_ns))  # fmt: skip
        self._folders.add(path)

    def note_created(self, path: str) -> None:
        """The merge is about to put a node at ``path``, where the folder had none."""
        if not self.active or self.covered(path):
            return
        self._forget_below(path)
        self._append(_Record(_CREATED, path))
        self._covered.add(path)

    def set_aside(self, lower_fd: int, name: str, path: str) -> bool:
        """The merge is about to replace or delete ``name`` in the folder ``lower_fd`` (at ``path``): if it is an
        original, move it into the undo folder and return True (the name is then free). False: it is the attempt's
        own (or the log is off), and the caller removes or replaces it as it would without a log."""
        if not self.active or self.covered(path):
            return False
        try:
            if self.fault is not None:
                self.fault(f"set aside {path}")
            if path in self.written:  # the file tools changed it in place: not an original; restored from the store
                self._forget_below(path)
                self._append(_Record(_CREATED, path))
                self._covered.add(path)
                remove_at(lower_fd, name)
                return True
            if path in self._below or path in self._folders:
                self._undo_below(path)  # the kept folder must be the original, not what the attempt made of it
            st = lstat_at(lower_fd, name)
            if st is None:
                self.note_created(path)
                return True
            self._slots += 1
            slot = str(self._slots)
            is_dir = stat.S_ISDIR(st.st_mode)
            self._append(_Record(_SAVED, path, slot, is_dir, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns))
            self._covered.add(path)
            rename_node(lower_fd, name, self._undo_fd(), slot, is_dir)
            return True
        except BaseException:
            self.broken = True
            raise

    def _append(self, record: _Record) -> None:
        self._records.pop(record.path, None)
        self._records[record.path] = record
        self._order[record.path] = self._appended = self._appended + 1
        child, parent = record.path, record.path.rpartition("/")[0]
        while parent:
            children = self._below.setdefault(parent, set())
            if child in children:
                break  # the rest of the way up is linked already
            children.add(child)
            child, parent = parent, parent.rpartition("/")[0]

    def _subtree(self, path: str) -> list[_Record]:
        """The records at and below ``path``, oldest first; O(the subtree), not O(every record)."""
        found, todo = [], [path]
        while todo:
            at = todo.pop()
            if at in self._records:
                found.append(at)
            todo.extend(self._below.get(at, ()))
        return [self._records[p] for p in sorted(found, key=self._order.__getitem__)]

    def _forget_below(self, path: str) -> None:
        """Drop the records at and below ``path`` (its originals stay in the undo folder until the reset)."""
        if path in self._below or path in self._folders:
            self._drop(path)

    def _undo_below(self, path: str) -> None:
        """Undo, in place, what the attempt changed at and below ``path``; their records are done with."""
        below = self._subtree(path)
        with SafeFolders(self.fs, unsafe=_unsafe) as folders:
            for record in reversed(below):
                self._apply(folders, record, Undone())
        self._drop(path)

    def _drop(self, path: str) -> None:
        """Forget every record at and below ``path``."""
        todo = [path]
        while todo:
            at = todo.pop()
            if self._records.pop(at, None) is not None:
                del self._order[at]
                self._covered.discard(at)
                self._folders.discard(at)
            todo.extend(self._below.pop(at, ()))
        child, parent = path, path.rpartition("/")[0]
        while parent and parent in self._below:  # unlink the subtree; prune folders left holding nothing
            children = self._below[parent]
            children.discard(child)
            if children:
                break
            del self._below[parent]
            if parent in self._records:
                break  # a record itself: it stays linked to its own parent
            child, parent = parent, parent.rpartition("/")[0]

    def _undo_fd(self) -> int:
        if self._fd is None:
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.folder, 0o700)
            self._fd = os.open(self.folder, DIR_FLAGS)
        return self._fd

    # -- rollback ------------------------------------------------------------------------------------------------

    def rollback(self, selection: Selection) -> Undone | None:
        """Undo the attempt within ``selection``, newest record first, and start a fresh log. None when the log
        cannot (off, broken, or the selection needs what only the store can do): nothing was changed then. Raises
        `UndoFailed` when it stopped part-way: the log is broken, the folder must be restored from the store."""
        if not self.active or self.broken:
            return None
        planned = self._plan(selection)
        if planned is None:
            return None
        plan, as_now = planned
        done = Undone(written=rollback_roots(self.written, selection))
        self.broken = True  # until every record is undone
        doing = ""
        try:
            with SafeFolders(self.fs, unsafe=_unsafe) as folders:
                now = [self._folder_now(folders, record) for record in as_now]
                for record in [*reversed(plan), *now]:
                    doing = record.path
                    self._apply(folders, record, done)
        except Exception as e:
            # repr, not str: the error may quote a sandbox-made name (a newline forges log lines; a non-UTF-8 byte,
            # a surrogate, makes some log handlers and pytest-xdist's report channel raise)
            raise UndoFailed(f"undoing the attempt's change to {doing!r} failed: {str(e)!r}") from e
        finally:
            self.close()
        self.reset(keep=True)
        return done

    def _plan(self, selection: Selection) -> tuple[list[_Record], list[_Record]] | None:
        """The records to undo, and the folders on the way to a root: a restore gives those the tree's mode but
        leaves their times (the tree records none), while putting a root's original back touches its parent's."""
        plan, as_now = [], []
        for record in self._records.values():
            if not walks_to(selection, record.path):
                continue  # outside the selection or excluded: a restore leaves it as the attempt made it
            if not selection.covers(record.path):
                if record.kind != _FOLDER:
                    return None  # a node replaced on the way to a root: only a restore can keep what is outside
                as_now.append(record)
                continue
            if selection.excludes and record.kind != _FOLDER and self._holds_excluded(record, selection):
                return None
            plan.append(record)
        return plan, as_now

    def _holds_excluded(self, record: _Record, selection: Selection) -> bool:
        """Whether the node now at the record's path, or its kept original, holds a path the selection excludes
        (or one that cannot be listed: then it may)."""
        try:
            with SafeFolders(self.fs, unsafe=_unsafe) as folders:
                parent, name = folders.parent_of(record.path)
                if _any_below(parent, name, record.path, selection.excluded):
                    return True
            return record.kind == _SAVED and _any_below(self._undo_fd(), record.slot, record.path, selection.excluded)
        except (OSError, UndoFailed, RecursionError):  # unlistable, or deeper than a walk goes: it may
            return True
        finally:
            self.close()

    @staticmethod
    def _folder_now(folders: SafeFolders, record: _Record) -> _Record:
        """A folder on the way to a root: its original mode, its times as they are now."""
        parent, name = folders.parent_of(record.path)
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        return _Record(_FOLDER, record.path, mode=record.mode, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns)

    def _apply(self, folders: SafeFolders, record: _Record, done: Undone) -> None:
        if self.fault is not None:
            self.fault(f"{record.kind} {record.path}")
        parent, name = folders.parent_of(record.path)
        if record.kind == _FOLDER:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) != record.mode:
                    os.fchmod(fd, record.mode)
                os.utime(fd, ns=(record.atime_ns, record.mtime_ns))
            finally:
                os.close(fd)
            return
        now = lstat_at(parent, name)
        with writable(parent):
            if now is not None:
                remove_at(parent, name)
                done.removed += record.kind == _CREATED
            if self.fault is not None and record.kind == _SAVED:
                self.fault(f"put back {record.path}")  # the worst moment: the attempt's node gone, no original yet
            if record.kind == _SAVED:
                rename_node(self._undo_fd(), record.slot, parent, name, record.is_dir)
                if record.is_dir:
                    os.utime(name, ns=(record.atime_ns, record.mtime_ns), dir_fd=parent, follow_symlinks=False)
                done.put_back += 1
        if record.is_dir or (now is not None and stat.S_ISDIR(now.st_mode)):
            folders.forget()  # a folder on the way to later paths may have been swapped


def rollback_roots(paths: Iterable[str], selection: Selection) -> list[str]:
    """The roots of a restore that makes ``paths`` (changed since a snapshot taken with ``selection``) equal the
    snapshot, touching nothing a full restore would not: a path inside an excluded folder is left out, and a folder
    on the way to a root stands for the roots below it (restoring the folder itself would delete what lies outside
    the selection)."""
    roots: set[str] = set()
    for path in paths:
        if selection.covers(path):
            if walks_to(selection, path):
                roots.add(path)
        elif selection.is_ancestor(path):
            roots.update(root for root in selection.roots if _under(root, path))
    return sorted(roots)


def _any_below(parent: int, name: str, path: str, excluded: Callable[[str], bool]) -> bool:
    """Whether any path below the folder ``name`` (at ``path``) is excluded; never follows a symlink."""
    st = lstat_at(parent, name)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return False

    def fail(e: OSError) -> None:
        raise e

    for top, dirs, files, _fd in os.fwalk(name, dir_fd=parent, follow_symlinks=False, onerror=fail):
        rel = path + top[len(name) :]
        for child in (*dirs, *files):
            if excluded(f"{rel}/{child}"):
                return True
    return False
