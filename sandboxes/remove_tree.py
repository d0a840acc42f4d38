"""Delete a folder tree that another deletion may be emptying at the same time (a destroyed sandbox's folder, a
dropped overlay layer): `safe_folders.remove_at`, started again when a folder vanishes under it.

`remove_at` already copes with any depth (a sandbox can nest folders deeper than Python's recursion limit and the
worker's descriptor limit) and never follows a symlink; what it does not do is shrug off a second deleter: a folder
gone mid-walk raises FileNotFoundError. Here that means "someone else got there first": begin again from the top.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from tardigrade.sandboxes.safe_folders import remove_at

log = logging.getLogger(__name__)


def remove_tree(parent_fd: int, name: str) -> None:
    """Delete ``name`` in the folder ``parent_fd`` - a file, a symlink or a whole folder tree. A missing name is
    fine, and so is another deletion of the same tree at the same time (a sandbox destroyed while a background
    thread deletes a layer inside it)."""
    for _ in range(100):
        with contextlib.suppress(FileNotFoundError):
            remove_at(parent_fd, name)
            return
    remove_at(parent_fd, name)


def remove_folder(path: Path, what: str) -> None:
    """Delete the worker's own folder ``path`` (a sandbox's, a dropped layer, kept originals) and everything in it.
    A missing one is fine; a failure is logged as "could not delete ``what``", not raised: callers run this in
    background threads and at teardown, where nobody could act on an exception."""
    try:
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        remove_tree(parent, path.name)
    except OSError:
        if path.parent.exists():  # else its owner (the sandbox's folder) was deleted meanwhile, and it with it
            log.warning("could not delete %s %s", what, path, exc_info=True)
    finally:
        os.close(parent)
