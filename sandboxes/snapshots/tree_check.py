"""Validating a snapshot's tree before a restore writes from it, once per cached tree, and reading its lines.

A tree comes from the store, which is trusted no further than its integrity checks: before anything is written
from it, every line is checked (paths stay inside the target, nothing beneath a symlink, canonical order). That
costs what the tree holds, so the verdict is kept on the worker's cached copy of the tree (an extended attribute)
and bound to that very file (snapshot id, inode, size): a rollback of the same tree does not read it whole again.
Validation also learns whether every line can be read by position (`line_head`, no JSON parsing), which lets a
restore skip parsing lines and binary-search the tree (restore.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from tardigrade.sandboxes.errors import UnsafeTree
from tardigrade.sandboxes.snapshots import tree as t

#: Extended attribute on a verified tree file in the worker's tree cache: the validator's verdict, so a tree is
#: validated once, not on every rollback. Versioned: a stricter validator bumps it and every tree is checked anew.
CHECKED_ATTR = "user.tardigrade.checked"
CHECKED_VERSION = b"2"  # 2: bound to the snapshot id, size and inode (`bound_to`)


@dataclass(frozen=True)
class TreeShape:
    """What validation learned about a tree beyond "safe": whether every entry line reads the same by position
    (`line_head`: its path and kind) as JSON reads it, with nothing between entries (then lines need not be parsed to
    be merged, and the tree can be binary-searched), and whether it holds hard links (a ChangeSet restore then
    merges the whole folder)."""

    canonical: bool
    hardlinks: bool


def check_tree(snapshot_id: str, tree_path: Path) -> TreeShape:
    """Validate a verified, uncompressed tree before anything is written from it (`UnsafeTree` otherwise), once:
    the verdict is kept on the file, which must be the caller's own (the engine's tree cache)."""
    shape = known_shape(snapshot_id, tree_path)
    if shape is not None:
        return shape
    bound = bound_to(snapshot_id, tree_path)  # before reading it: a file changed meanwhile is not vouched for
    shape = _validate(snapshot_id, tree_path)
    with contextlib.suppress(OSError):  # a filesystem without user xattrs validates every time
        flags = (b"c" if shape.canonical else b"") + (b"h" if shape.hardlinks else b"")
        os.setxattr(tree_path, CHECKED_ATTR, CHECKED_VERSION + b":" + flags + b":" + bound)
    return shape


def bound_to(snapshot_id: str, tree_path: Path) -> bytes:
    """What a verdict kept on a tree file holds for: this snapshot's tree, in this inode, of this size. A copy
    that carries xattrs (``cp -a``, shutil.copy2) or an edit that changes the size is validated anew. (A same-size
    edit in place by the worker's own user is not caught: the cached tree is not hashed again on use either.)"""
    st = os.stat(tree_path)
    return f"{snapshot_id}:{st.st_size}:{st.st_dev}:{st.st_ino}".encode()


def known_shape(snapshot_id: str, tree_path: Path) -> TreeShape | None:
    """The verdict kept on a tree file by `check_tree`, if it was given for this very file."""
    try:
        mark = os.getxattr(tree_path, CHECKED_ATTR)
    except OSError:
        return None
    version, _, rest = mark.partition(b":")
    flags, _, bound = rest.partition(b":")
    if version != CHECKED_VERSION or bound != bound_to(snapshot_id, tree_path):
        return None
    return TreeShape(canonical=b"c" in flags, hardlinks=b"h" in flags)


def _validate(snapshot_id: str, tree_path: Path) -> TreeShape:
    footer = read_footer(tree_path, snapshot_id)
    if footer.get("format") != t.FORMAT:
        raise UnsafeTree(snapshot_id, "", f"tree format {footer.get('format')!r} is not {t.FORMAT!r}")
    validator = t.TreeValidator(snapshot_id)
    count = 0
    canonical, hardlinks = True, False
    with open(tree_path, "rb") as f:
        lines = iter(f)
        line = next(lines, b"")
        for following in lines:  # every line but the last (the footer)
            if line.startswith(b'{"p"'):
                entry = t.parse_entry(snapshot_id, line)
                validator.check(entry)
                count += 1
                hardlinks = hardlinks or entry.kind == t.HARDLINK
                canonical = canonical and line_head(line) == (entry.path, entry.kind)
            else:
                canonical = False  # skipped by every reader; but a binary search would trip over it
            line = following
        if line.startswith(b'{"p"'):  # a last line every reader takes for an entry: checked as one
            validator.check(t.parse_entry(snapshot_id, line))
            count += 1
            canonical = False
    if count != footer.get("entries"):
        raise UnsafeTree(snapshot_id, "", f"tree lists {count} entries but its footer says {footer.get('entries')}")
    return TreeShape(canonical, hardlinks)


def tree_entries(tree_path: Path, snapshot_id: str = "") -> Generator[t.Entry, None, None]:
    """Entries of an uncompressed tree file (the footer line is skipped). Each line is type-checked: a tree comes
    from a store, so a malformed one is `UnsafeTree`, never a raw KeyError or TypeError."""
    with open(tree_path, "rb") as f:
        for line in f:
            if line.startswith(b'{"p"'):
                yield t.parse_entry(snapshot_id or tree_path.name, line)


def read_footer(tree_path: Path, snapshot_id: str = "") -> dict[str, object]:
    """The tree's last line; `UnsafeTree` unless it is a JSON object with the footer's fields."""
    footer = t.footer_json(tree_path)
    if not (
        isinstance(footer, dict)
        and all(type(footer.get(k)) is int for k in ("entries", "bytes"))
        and isinstance(footer.get("digest"), str)
    ):
        raise UnsafeTree(snapshot_id or tree_path.name, "", "tree has no valid footer")
    return footer


def head_parsed(line: bytes) -> tuple[str, str]:
    entry = t.decode_entry(line)
    return entry.path, entry.kind


def head_canonical(line: bytes) -> tuple[str, str]:
    """Path and kind of a line of a canonical tree (``{"p":"<path>","k":"<kind>",...``), without parsing it."""
    end = line.index(b'"', 6)
    raw = line[6:end]
    if b"\\" in raw or line[end : end + 7] != b'","k":"':  # an escape: the quote found may be one of them
        return head_parsed(line)
    return raw.decode("utf-8", "surrogateescape"), chr(line[end + 7])


def line_head(line: bytes) -> tuple[str, str] | None:
    """`head_canonical`, or None for a line it cannot read (a crafted tree's)."""
    try:
        return head_canonical(line)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None
