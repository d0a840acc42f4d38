"""Symlink-safe access to folder trees a sandbox shaped or named: the one implementation everything uses.

Everything inside a sandbox is hostile (design.md, trust model), and so is every name a sandbox sends. Yet the
worker writes into folders a sandbox shaped - a local sandbox's folder, an ``rw`` data mount bound into it - and
fills folders from names a sandbox chose - the remote mirror, from a listing and a tar stream. A path string is
not safe to hand to the kernel there: ``..`` climbs out, and any folder on the way may have been swapped for a
symlink to ``/etc``. So here:

* a path is checked before it is used (`relative_problem`): relative, no empty, ``.`` or ``..`` part, no NUL;
* folders are opened one component at a time, each with O_NOFOLLOW relative to the previous one's descriptor
  (`SafeFolders`), and the last component is only used through ``dir_fd=`` calls that do not follow it: a
  symlink on the way is an error - or, where the caller owns the tree, is removed - and is never followed;
* files are read and written only if they are regular files - checked before opening and again on the open
  descriptor, which is opened with O_NONBLOCK - so a FIFO, socket or device can never block the worker;
  reads are capped;
* trees are deleted and walked by descriptor (`remove_at`, `walk_bottom_up`), never by path.

Users: the snapshot restore (sandboxes/snapshots/restore.py), the remote mirror (sandboxes/mirror.py), the local
provider's file tools (sandboxes/bubblewrap.py) and the data-mount refresh (sandboxes/mounts.py). Everything here is
blocking file I/O: async callers run it with ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from tardigrade.sandboxes.errors import UnsafePath

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_BLOCK = 1 << 20

#: Builds the error to raise for an unsafe ``path`` and why: each user names paths its own way (a snapshot entry,
#: a sandbox path, a listing name).
Unsafe = Callable[[str, str], Exception]


def _unsafe_path(path: str, reason: str) -> Exception:
    return UnsafePath(f"{path!r} {reason}")


def relative_problem(path: str) -> str | None:
    """Why ``path`` is not a plain relative path that stays below its root, or None if it is one."""
    if not path:
        return "is empty"
    if path.startswith("/"):
        return "is absolute"
    if "\0" in path:
        return "contains a NUL byte"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, '.' or '..' component"
    return None


def is_safe_relative(path: str) -> bool:
    return relative_problem(path) is None


def kind_of(mode: int) -> str:
    """What a node is, in words for an error message."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


class SafeFolders:
    """Descriptors of the folders along the path last asked for, below ``root``, opened without following symlinks.

    The root itself is the worker's own choice (it may be reached through a symlink); only what lies below it is
    distrusted. A descriptor `parent_of` returns stays valid until the next call on this object: do not close it.
    Not thread-safe: give each thread its own, or hold a lock.
    """

    def __init__(self, root: str | os.PathLike[str], *, unsafe: Unsafe = _unsafe_path) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._unsafe = unsafe
        self._chain: list[tuple[str, int]] = []

    def __enter__(self) -> SafeFolders:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._drop(0)
        os.close(self.root_fd)

    def forget(self) -> None:
        """Call after deleting or replacing a folder from outside: descriptors into it are stale."""
        self._drop(0)

    def _drop(self, keep: int) -> None:
        for _, fd in self._chain[keep:]:
            os.close(fd)
        del self._chain[keep:]

    # -- folders ------------------------------------------------------------------------------------------------

    def parent_of(self, path: str, *, create: bool = False, replace_symlinks: bool = False) -> tuple[int, str]:
        """The descriptor of ``path``'s folder and ``path``'s last component. ``create`` makes missing folders
        (mode 0755); ``replace_symlinks`` deletes a symlink found where a folder should be (only for trees the
        worker owns, such as a data mount it is making equal to its source); otherwise a symlink or a file on the
        way raises."""
        problem = relative_problem(path)
        if problem is not None:
            raise self._unsafe(path, problem)
        *folders, name = path.split("/")
        keep = 0
        while keep < len(self._chain) and keep < len(folders) and self._chain[keep][0] == folders[keep]:
            keep += 1
        self._drop(keep)
        for component in folders[keep:]:
            parent = self._chain[-1][1] if self._chain else self.root_fd
            self._chain.append((component, self._open_folder(parent, component, path, create, replace_symlinks)))
        return (self._chain[-1][1] if self._chain else self.root_fd), name

    def _open_folder(self, parent: int, component: str, path: str, create: bool, replace_symlinks: bool) -> int:
        for _ in range(3):  # another process may change the folder between our calls: look again, a little
            try:
                return os.open(component, DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, f"no folder {component!r} on the way to {path!r}") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(component, 0o755, dir_fd=parent)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                if not (replace_symlinks and _is_symlink(parent, component)):
                    raise self._unsafe(path, f"lies beneath a symlink or a file ({component!r}); refusing") from None
                os.unlink(component, dir_fd=parent)
        raise self._unsafe(path, f"kept changing while its folder {component!r} was opened")

    def make_dirs(self, path: str) -> None:
        """``mkdir -p`` below the root, never through a symlink."""
        parent, name = self.parent_of(path, create=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent)
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            raise self._unsafe(path, "is a symlink; refusing to follow it")
        if not stat.S_ISDIR(mode):
            raise FileExistsError(errno.EEXIST, f"{path!r} exists and is {kind_of(mode)}, not a folder")

    # -- nodes --------------------------------------------------------------------------------------------------

    def lstat(self, path: str) -> os.stat_result:
        parent, name = self.parent_of(path)
        return os.stat(name, dir_fd=parent, follow_symlinks=False)

    def readlink(self, path: str) -> str:
        parent, name = self.parent_of(path)
        return os.readlink(name, dir_fd=parent)

    def remove(self, path: str) -> None:
        """Delete whatever is at ``path`` (file, symlink or whole folder); a missing path is fine."""
        try:
            parent, name = self.parent_of(path)
        except FileNotFoundError:
            return
        remove_at(parent, name)

    def hardlink(self, target: str, path: str, *, create: bool = False) -> None:
        """Make ``path`` a hard link to ``target``, which must be a regular file below the same root; ``create``
        makes ``path``'s missing folders."""
        target_parent, target_name = self.parent_of(target)
        target_parent = os.dup(target_parent)  # the next parent_of() may close it
        try:
            if not stat.S_ISREG(os.stat(target_name, dir_fd=target_parent, follow_symlinks=False).st_mode):
                raise self._unsafe(path, f"is a hard link to {target!r}, which is not a regular file")
            parent, name = self.parent_of(path, create=create)
            os.link(target_name, name, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(target_parent)

    # -- regular files ------------------------------------------------------------------------------------------

    def _regular(self, path: str, mode: int) -> None:
        if stat.S_ISREG(mode):
            return
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, f"{path!r} is a folder")
        if stat.S_ISLNK(mode):
            raise self._unsafe(path, "is a symlink; refusing to follow it (read or write the file it points at)")
        raise self._unsafe(path, f"is {kind_of(mode)}, not a regular file; refusing to open it")

    def open_regular(self, path: str, flags: int, mode: int = 0o644) -> int:
        """A descriptor of the regular file at ``path``. Anything else - a folder, symlink, FIFO, socket or device -
        is refused before it is opened and, should it be swapped in meanwhile, again on the open descriptor;
        O_NONBLOCK makes even that open return at once. ``flags`` may add O_CREAT, never O_TRUNC (truncate a
        descriptor only once it is known to be a regular file)."""
        parent, name = self.parent_of(path, create=bool(flags & os.O_CREAT))
        try:
            self._regular(path, os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise FileNotFoundError(errno.ENOENT, f"no such file: {path!r}") from None
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.ENODEV):  # swapped for a symlink, socket or device
                raise self._unsafe(path, "changed into something that is not a regular file; refusing") from None
            raise
        try:
            self._regular(path, os.fstat(fd).st_mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_file(self, path: str, *, limit: int | None) -> bytes:
        """At most ``limit`` bytes of the regular file at ``path`` (all of it if None), read in blocks."""
        fd = self.open_regular(path, os.O_RDONLY)
        try:
            out = bytearray()
            while limit is None or len(out) < limit:
                block = os.read(fd, _BLOCK if limit is None else min(_BLOCK, limit - len(out)))
                if not block:
                    break
                out += block
            return bytes(out)
        finally:
            os.close(fd)

    def write_file(self, path: str, data: bytes, *, mode: int) -> None:
        """Create or overwrite the regular file at ``path`` (making its folders) with ``data`` and ``mode``."""
        fd = self.open_regular(path, os.O_WRONLY | os.O_CREAT, mode)
        try:
            os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def _is_symlink(parent_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``name``'s own status in the folder ``dir_fd`` (a symlink's, never its target's), or None if it is missing."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(parent_fd: int, name: str) -> None:
    """Delete whatever ``name`` is in the folder ``parent_fd`` - a file, a symlink (not what it points at) or a
    whole folder - by descriptor, opening up folders a step left read-only. A missing name is fine.

    A sandbox can nest folders deeper than Python's recursion limit and the worker's descriptor limit, so the walk
    goes down one folder at a time and back up through ``..``, with two descriptors open at most. A live command
    may move the folder being emptied meanwhile: each climb checks that ``..`` is the folder it came from (device
    and inode) and stops with an error otherwise, so nothing outside the tree is ever emptied."""
    if not _unlink_unless_folder(parent_fd, name):
        return
    came_from: list[tuple[int, int, str]] = []  # (device, inode) of each folder above ``fd``, and its child's name
    fd = _enter_folder(parent_fd, name)
    try:
        while True:
            folder = _empty_but_one_folder(fd)
            if folder is not None:
                inner = _enter_folder(fd, folder)
                st = os.fstat(fd)
                came_from.append((st.st_dev, st.st_ino, folder))
                os.close(fd)
                fd = inner
                continue
            if not came_from:
                break
            device, inode, child = came_from.pop()
            up = os.open("..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (device, inode):
                raise OSError(errno.ESTALE, f"a folder inside {name!r} was moved while it was being deleted")
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(child, dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=parent_fd)


def _unlink_unless_folder(parent_fd: int, name: str) -> bool:
    """Delete ``name`` if it is anything but a folder; whether it is a folder (False when it is gone)."""
    try:
        os.unlink(name, dir_fd=parent_fd)
        return False
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        return True
    except PermissionError:  # POSIX allows EPERM for a folder too; for anything else it is a real refusal
        try:
            if stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                return True
        except FileNotFoundError:
            return False
        raise


def _enter_folder(parent_fd: int, name: str) -> int:
    """The folder's descriptor (never through a symlink), made writable so its entries can be deleted."""
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    if os.fstat(fd).st_mode & 0o700 != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def _empty_but_one_folder(fd: int) -> str | None:
    """Delete everything but folders in ``fd``, and empty folders; the name of a non-empty folder left, or None."""
    for child in os.listdir(fd):
        if not _unlink_unless_folder(fd, child):
            continue
        try:
            os.rmdir(child, dir_fd=fd)
        except FileNotFoundError:
            continue
        except OSError:
            return child
    return None


def walk_bottom_up(root: str | os.PathLike[str]) -> Iterator[tuple[str, int, str, os.stat_result]]:
    """Every node below ``root`` as ``(path relative to root, descriptor of its folder, name, lstat)``, a folder's
    contents before the folder itself, by descriptor: symlinks are reported, never entered, and a folder swapped
    for a symlink mid-walk is not entered either. A descriptor is valid until the next item; do not close it."""
    frames: list[tuple[int, str, list[str], tuple[str, os.stat_result] | None]] = []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        frames.append((fd, "", sorted(os.listdir(fd), reverse=True), None))
        while frames:
            folder_fd, rel, names, me = frames[-1]
            if not names:
                frames.pop()
                os.close(folder_fd)
                if me is not None and frames:
                    yield rel, frames[-1][0], me[0], me[1]
                continue
            name = names.pop()
            path = f"{rel}/{name}" if rel else name
            try:
                st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                child = _open_to_walk(folder_fd, name, st)
                if child is not None:
                    frames.append((child, path, sorted(os.listdir(child), reverse=True), (name, st)))
                    continue
                st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)  # swapped since: report what it is now
            yield path, folder_fd, name, st
    finally:
        for folder_fd, *_rest in frames:
            os.close(folder_fd)


def _open_to_walk(parent_fd: int, name: str, st: os.stat_result) -> int | None:
    """A folder's descriptor for walking it, opening up one a sandbox made unreadable; None if it is no longer a
    folder."""
    for _ in range(2):
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except PermissionError:
            os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=parent_fd, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                return None
            raise
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)


def set_folder_modes(root: Path, mode: int) -> None:
    """chmod ``root`` and every folder below it (never through a symlink)."""
    os.chmod(root, mode)
    for _, parent, name, st in walk_bottom_up(root):
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(name, mode, dir_fd=parent, follow_symlinks=False)
