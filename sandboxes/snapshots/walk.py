"""A walk of a folder in canonical tree order (depth-first, siblings by name), never following symlinks.

Snapshot and restore both merge this walk against a sorted stream (the stat cache, the target tree), so the walk
must produce exactly the order `tree.sort_key` defines. The consumer may `prune()` the folder it was just given
(restore does, before deleting or replacing it).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from tardigrade.sandboxes.selection import Selection


class Walker(Iterator[tuple[str, os.stat_result, bool]]):
    """Yields ``(path, lstat, is_ancestor)``; ``is_ancestor`` marks folders walked only to reach a selected root."""

    def __init__(self, root: str, selection: Selection, start: str = "") -> None:
        """``start``: walk only beneath this folder (relative to ``root``, already known to be walked into)."""
        self.root = root.rstrip("/") or "/"
        self.selection = selection
        self._stack: list[tuple[str, list[str], bool]] = []  # (folder, names left, folder is covered)
        self._descend_into: tuple[str, bool] | None = None
        self._push(start, selection.covers(start))

    def _push(self, rel: str, covered: bool) -> None:
        wanted = None if covered else self.selection.wanted_children(rel)
        try:
            names = os.listdir(f"{self.root}/{rel}" if rel else self.root)
        except (FileNotFoundError, NotADirectoryError):
            return
        if wanted is not None:
            names = [n for n in names if n in wanted]
        names.sort(reverse=True)  # pop() from the end yields ascending order
        self._stack.append((rel, names, covered))

    def prune(self) -> None:
        """Do not descend into the folder just yielded."""
        self._descend_into = None

    def __next__(self) -> tuple[str, os.stat_result, bool]:
        if self._descend_into is not None:
            self._push(*self._descend_into)
            self._descend_into = None
        selection = self.selection
        has_excludes = bool(selection.excludes)
        root = self.root
        while self._stack:
            rel, names, parent_covered = self._stack[-1]
            if not names:
                self._stack.pop()
                continue
            name = names.pop()
            path = f"{rel}/{name}" if rel else name
            # Everything below a covered folder is covered; only the way down to a root needs checking.
            covered = parent_covered or selection.covers(path)
            if has_excludes and covered and selection.excluded(path):
                continue
            try:
                st = os.lstat(f"{root}/{path}")
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                self._descend_into = (path, covered)
            return path, st, not covered
        raise StopIteration


def walks_to(selection: Selection, path: str) -> bool:
    """Whether a `Walker` over the whole root would yield ``path`` (if it exists): each folder on the way is wanted
    and nothing on the way is excluded."""
    covered = selection.covers("")
    parent = ""
    for name in path.split("/"):
        if not covered:
            wanted = selection.wanted_children(parent)
            if wanted is not None and name not in wanted:
                return False
        current = f"{parent}/{name}" if parent else name
        covered = covered or selection.covers(current)
        if selection.excludes and covered and selection.excluded(current):
            return False
        parent = current
    return True
