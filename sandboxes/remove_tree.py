"""Delete a folder tree of any depth by descriptor, without recursion and with two descriptors open at most.

A sandbox can nest folders deeper than Python's recursion limit (``mkdir a; cd a`` in a loop) and deeper than the
worker's descriptor limit: a recursive delete (``shutil.rmtree`` on Python 3.11, `safe_folders.remove_at`) then
raises and leaves the tree on the worker's disk. Here the walk goes down one folder at a time and back up through
``..``, remembering names, not descriptors. Symlinks are deleted, never followed; folders a step left read-only are
opened up. Only for trees nothing else changes meanwhile (a destroyed sandbox's folder, a dropped layer): ``..`` is
then the folder the walk came from. Never for a folder a live command can reach (such as a restore into a sandbox):
a command moving the folder being emptied could make ``..`` lead out of the tree; `safe_folders.remove_at` is for
those.
"""

from __future__ import annotations

import contextlib
import os
import stat

from tardigrade.sandboxes.safe_folders import DIR_FLAGS


def remove_tree(parent_fd: int, name: str) -> None:
    """Delete ``name`` in the folder ``parent_fd`` - a file, a symlink or a whole folder tree. A missing name is
    fine, and so is another deletion of the same tree at the same time (a sandbox destroyed while a background
    thread deletes a layer inside it): a folder gone under the walk makes it start again from the top."""
    for _ in range(100):
        with contextlib.suppress(FileNotFoundError):
            _remove(parent_fd, name)
            return
    _remove(parent_fd, name)


def _remove(parent_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=parent_fd)
        return
    except FileNotFoundError:
        return
    except (IsADirectoryError, PermissionError):
        if not _is_folder(parent_fd, name):
            raise
    below: list[str] = []  # the names from ``name`` down to the folder ``fd`` is
    fd = _enter(parent_fd, name)
    try:
        while True:
            folder = _empty_but_one_folder(fd)
            if folder is not None:
                inner = _enter(fd, folder)
                os.close(fd)
                fd = inner
                below.append(folder)
                continue
            if not below:
                break
            up = os.open("..", DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            os.rmdir(below.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=parent_fd)


def _is_folder(parent_fd: int, name: str) -> bool:
    """Whether ``name`` is a folder (FileNotFoundError if it is gone: the caller starts again)."""
    return stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)


def _enter(parent_fd: int, name: str) -> int:
    """The folder's descriptor, the folder made writable so its entries can be deleted."""
    fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    if os.fstat(fd).st_mode & 0o700 != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def _empty_but_one_folder(fd: int) -> str | None:
    """Delete what is not a folder in ``fd``; the name of a folder left in it, or None once it is empty."""
    for child in os.listdir(fd):
        try:
            os.unlink(child, dir_fd=fd)
        except FileNotFoundError:
            continue
        except (IsADirectoryError, PermissionError):
            if not _is_folder(fd, child):
                raise
            with contextlib.suppress(OSError):  # an empty folder goes at once: no descent needed
                os.rmdir(child, dir_fd=fd)
                continue
            return child
    return None
