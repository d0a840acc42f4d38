"""The walk file: every path the last snapshot's walk saw, with its stat, kept next to the stat cache.

A walking snapshot must stat every path; it need not process every path. Comparing this walk's lines with the
recorded ones as two sets (hashing in C) gives exactly the paths whose stat changed, appeared or disappeared, and
only those are read and spliced into the parent's tree (splice.py). The lines are the `create.Fingerprint` parts
(``path NUL mode:size:mtime:ctime:ino``), so recording them costs one write of bytes the walk built anyway.

Files recorded too close to their snapshot for the stat to vouch for the content ("racy", statcache.py) are listed
in the footer: the next snapshot reads them again whatever their stat says. The stat cache's header holds the
file's BLAKE3: a walk file that is missing, stale (another process wrote it) or altered is not used.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import blake3

_FORMAT = "tardigrade-walk/1"


def walk_path(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.name + ".walk")


def record_walk(path: Path, lines: bytes, count: int, racy: list[str]) -> str | None:
    """Write the walk file atomically; returns its hash for the stat cache's header, or None if the walk cannot be
    recorded (a path with a newline would split a line)."""
    if lines.count(b"\n") != count:
        return None
    footer = json.dumps({"format": _FORMAT, "racy": racy}, ensure_ascii=False).encode("utf-8", "surrogateescape")
    data = lines + footer
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return blake3.blake3(data).hexdigest()


def load_walk(path: Path, expected: str) -> tuple[bytes, set[str]] | None:
    """The recorded walk's lines (as one block) and racy paths, if the file is the one the stat cache names."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if blake3.blake3(data).hexdigest() != expected:
        return None
    cut = data.rfind(b"\n") + 1
    try:
        footer = json.loads(data[cut:].decode("utf-8", "surrogateescape"))
        racy = footer["racy"]
        if footer["format"] != _FORMAT or not all(isinstance(p, str) for p in racy):
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return data[:cut], set(racy)


_BLOCK = 64 << 10


def _common_prefix(a: bytes, b: bytes) -> int:
    """The length of the common prefix, compared a block at a time in C, then bisected within the first block
    that differs."""
    n = min(len(a), len(b))
    at = 0
    while at < n and a[at : at + _BLOCK] == b[at : at + _BLOCK]:
        at += _BLOCK
    lo, hi = at, min(at + _BLOCK, n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[at:mid] == b[at:mid]:
            lo = mid
        else:
            hi = mid - 1
    return min(lo, n)


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """The length of the common suffix, at most ``limit``: `_common_prefix` from the other end, without copies."""
    la, lb = len(a), len(b)
    at = 0  # bytes known equal at the end
    while at + _BLOCK <= limit and a[la - at - _BLOCK : la - at] == b[lb - at - _BLOCK : lb - at]:
        at += _BLOCK
    lo, hi = at, min(at + _BLOCK, limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[la - mid : la - at] == b[lb - mid : lb - at]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def differing(old: bytes, new: bytes) -> tuple[bytes, bytes]:
    """The parts of two recorded walks that differ: their common prefix and suffix of whole lines cut off, so a
    change in one place costs a set difference of a few lines, not of the whole walk."""
    start = old.rfind(b"\n", 0, _common_prefix(old, new)) + 1
    tail = _common_suffix(old, new, min(len(old), len(new)) - start)
    old_end, new_end = len(old) - tail, len(new) - tail
    # The suffix from the first line start inside it: both sides then cut at a line start.
    skip = old.find(b"\n", old_end, len(old)) + 1 - old_end if tail else 0
    if tail and skip <= 0:
        skip = tail  # no whole line in the common suffix
    return old[start : old_end + skip], new[start : new_end + skip]
