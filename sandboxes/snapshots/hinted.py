"""The walk a `ChangeSet` stands in for: the parent tree's entries, with only the listed paths looked at again.

`hinted_walk` yields what `Walker` would yield for the paths the hint lists (and the folders leading to them, whose
mtimes a change moves), and `Kept` entries of the parent for everything else, in canonical tree order - so the
snapshot code builds the same tree it would from a full walk, having stat-ed only what the step touched. A hint
that leaves out a change makes the snapshot miss that change (the hint's contract); it can never make the tree
name data that is not stored, because kept entries are the parent's own, whose packs are checked before the tree
is published like any other.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.snapshots.walk import Walker, walks_to

Walked = tuple[str, os.stat_result, bool]  # what Walker yields: (path, lstat, is_ancestor)


@dataclass(slots=True)
class Kept:
    """An entry of the parent tree that no listed path touches: its line goes into the new tree as it is. Only
    its path and kind are read up front; the rest is parsed when needed (an unchanged file whose stat-cache line
    holds the same tree line never is)."""

    line: bytes  # without the newline
    path: str
    kind: str
    parent_id: str
    _entry: t.Entry | None = None

    @property
    def entry(self) -> t.Entry:
        if self._entry is None:
            self._entry = t.parse_entry(self.parent_id, self.line)
        return self._entry

    def packs(self) -> list[str]:
        return [m.decode() for m in PACK_REF.findall(self.line)]

    def size(self) -> int:
        plain = _PLAIN_FILE.match(self.line)
        return int(plain[3]) if plain is not None else self.entry.size

    def digest_record(self) -> bytes:
        """`tree.entry_digest_record` of the entry, read off the line without parsing it where the line is the
        usual plain file or folder."""
        if self.kind == t.FILE:
            plain = _PLAIN_FILE.match(self.line)
            if plain is not None:
                return b'"%s"\0f\0%o\0%s\0\n' % (plain[1], int(plain[2]), plain[4])
        elif self.kind == t.DIR:
            plain = _PLAIN_DIR.match(self.line)
            if plain is not None:
                return b'"%s"\0d\0%o\0\0\n' % (plain[1], int(plain[2]))
        return t.entry_digest_record(self.entry)


# The start of a tree line whose path needs no unescaping, and the pack of each chunk reference in it (a quote
# inside a path is escaped, so a path can never look like either).
_PLAIN_HEAD = re.compile(rb'^\{"p":"([^"\\]*)","k":"([a-z])"')
PACK_REF = re.compile(rb'\["[0-9a-f]{64}","([0-9a-f]{64})"')
# The fields of the usual file and folder lines, in the order `tree.Entry.to_json` writes them.
_PLAIN_FILE = re.compile(rb'^\{"p":"([^"\\]*)","k":"f","t":-?\d+,"m":(\d+),"s":(\d+),"h":"([0-9a-f]{64})"')
_PLAIN_DIR = re.compile(rb'^\{"p":"([^"\\]*)","k":"d","t":-?\d+,"m":(\d+)\}$')


def check_changes(changes: ChangeSet) -> None:
    """Refuse a path no walk could produce, with the path named: a hint is input, and `..` must not escape."""
    for path in changes.paths:
        if not isinstance(path, str) or not path or path.startswith("/") or "\0" in path:
            raise ValueError(f"ChangeSet path {path!r} must be a relative POSIX path without NUL bytes")
        if any(part in ("", ".", "..") for part in path.split("/")):
            raise ValueError(f"ChangeSet path {path!r} has an empty, '.' or '..' component; list normalized paths")


def _lstat(root: str, path: str) -> os.stat_result | None:
    try:
        return os.lstat(f"{root}/{path}")
    except (FileNotFoundError, NotADirectoryError):
        return None


def _plan(root: str, selection: Selection, changes: ChangeSet) -> tuple[set[str], dict[str, os.stat_result]]:
    """The subtrees to walk again (listed paths, or the first thing on their way that is no longer a folder) and
    the folders leading to them, with their stats. Only paths the full walk would visit are kept."""
    subtrees: set[str] = set()
    ancestors: dict[str, os.stat_result] = {}
    for path in sorted(changes.paths, key=t.sort_key):  # a folder before what is inside it
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder in subtrees or not walks_to(selection, folder):
                break  # walked whole already, or no walk goes there (its folders' mtimes are still looked at)
            if i == len(parts):
                subtrees.add(path)
                break
            if folder in ancestors:
                continue
            st = _lstat(root, folder)
            if st is None or not stat.S_ISDIR(st.st_mode):
                subtrees.add(folder)  # deleted, or now a file or symlink: everything below went with it
                break
            ancestors[folder] = st
    return subtrees, ancestors


def _fresh(
    root: str, selection: Selection, subtrees: set[str], ancestors: dict[str, os.stat_result]
) -> Iterator[Walked]:
    """What a full walk yields for the planned paths, in canonical order."""
    for path in sorted(subtrees | ancestors.keys(), key=t.sort_key):
        if path in ancestors:
            yield path, ancestors[path], not selection.covers(path)
            continue
        st = _lstat(root, path)
        if st is None:
            continue  # deleted
        yield path, st, not selection.covers(path)
        if stat.S_ISDIR(st.st_mode):
            yield from Walker(root, selection, start=path)


def _replaced(path: str, subtrees: set[str], ancestors: dict[str, os.stat_result]) -> bool:
    if path in ancestors or path in subtrees:
        return True
    cut = path.rfind("/")
    while cut > 0:
        if path[:cut] in subtrees:
            return True
        cut = path.rfind("/", 0, cut)
    return False


def _parent_entries(parent_tree: Path, parent_id: str) -> Iterator[Kept]:
    with open(parent_tree, "rb") as f:
        for line in f:
            if line.startswith(b'{"p"'):
                raw = line.rstrip(b"\n")
                head = _PLAIN_HEAD.match(raw)
                if head is not None:
                    yield Kept(raw, head[1].decode("utf-8", "surrogateescape"), head[2].decode(), parent_id)
                else:
                    entry = t.parse_entry(parent_id, raw)
                    yield Kept(raw, entry.path, entry.kind, parent_id, entry)


def hinted_walk(
    root: str, selection: Selection, changes: ChangeSet, parent_tree: Path, parent_id: str
) -> Iterator[Walked | Kept]:
    """Merge the parent's entries with a walk of only what ``changes`` lists."""
    root = root.rstrip("/") or "/"
    subtrees, ancestors = _plan(root, selection, changes)
    fresh = _fresh(root, selection, subtrees, ancestors)
    nxt = next(fresh, None)
    nxt_key = t.sort_key(nxt[0]) if nxt is not None else None
    first = {p.split("/", 1)[0] for p in subtrees} | {p.split("/", 1)[0] for p in ancestors}
    for kept in _parent_entries(parent_tree, parent_id):
        path = kept.path
        if path.split("/", 1)[0] in first and _replaced(path, subtrees, ancestors):
            continue
        key = t.sort_key(path)
        while nxt is not None and nxt_key is not None and nxt_key < key:
            yield nxt
            nxt = next(fresh, None)
            nxt_key = t.sort_key(nxt[0]) if nxt is not None else None
        yield kept
    while nxt is not None:
        yield nxt
        nxt = next(fresh, None)


def parent_footer(parent_tree: Path) -> dict[str, object]:
    """The parent tree's footer (format, selection), or {} if it has none: then the hint is not used."""
    footer = t.footer_json(parent_tree)
    return footer if isinstance(footer, dict) else {}
