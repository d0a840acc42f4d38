"""The stat cache: what each file's content was at the last snapshot or restore, keyed by its stat.

Like git's index, it lets a snapshot skip reading files whose size, mtime, ctime, inode and mode are unchanged,
and lets a rollback skip files that still match. It lives on the worker next to (never inside) the sandbox, and
only describes objects of one store. ctime cannot be set from user space, so a file rewritten with its old
mtime restored still shows as changed.

One line per regular file, in canonical tree order, made so an unchanged file costs no parsing at all:

    JSON path  TAB  stat key  TAB  content hash  TAB  mode (octal)  TAB  tree line

The line is copied as-is into the next cache, its tree line into the next tree, and its digest record is
assembled from the raw fields. Losing the cache costs a full read on the next snapshot, never correctness.

Racy files (as git calls them): a file rewritten with the same size within one timestamp tick of the moment its
stat was taken keeps an identical stat. So a file whose mtime or ctime lies within `RACY_NS` of the start of the
snapshot or restore that records it is written with its stat key marked ``racy:``: the next snapshot hashes it
again (without storing anything if it did not change) instead of trusting the stat, and the cache then carries
no fingerprint, so the shortcut for an untouched folder is not taken either.
"""

from __future__ import annotations

import contextlib
import glob
import json
import mmap
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import blake3

from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots.tree import json_str, sort_key

FORMAT = "tardigrade-statcache/2"
_STRAY_SECONDS = 86400.0
# Kernel timestamps come from a coarse clock (a jiffy, up to 10 ms) and some filesystems keep whole seconds or
# two: a second covers the usual ones, and costs one re-hash of the files that fresh.
RACY_NS = 1_000_000_000
RACY_PREFIX = "racy:"
NO_FINGERPRINT = "racy" * 16  # never a walk's fingerprint (those are hex): the untouched-folder shortcut is off
NO_WALK = "0" * 64  # no walk file goes with the cache (a restore wrote it, or the walk could not be recorded)


def stat_key(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_mode}"


def fingerprint_part(path: str, st: os.stat_result) -> str:
    """One path's line of a folder's walk fingerprint (and of the walk file, walkfile.py): what a snapshot hashes and
    a restore must hash alike, so the next snapshot can tell the folder is untouched."""
    return f"{path}\0{st.st_mode}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}\n"


def fingerprint_hasher(selection: Selection) -> blake3.blake3:
    """A walk fingerprint's hash, seeded with the selection: the same folder under another selection differs."""
    return blake3.blake3(repr(selection.to_json()).encode())


def is_racy(st: os.stat_result, since_ns: int, *, ctime: bool = True) -> bool:
    """Whether a same-size rewrite after this stat was taken (at ``since_ns`` or later) could leave it unchanged."""
    newest = max(st.st_mtime_ns, st.st_ctime_ns) if ctime else st.st_mtime_ns
    return newest >= since_ns - RACY_NS


def cache_key(st: os.stat_result, since_ns: int, *, ctime: bool = True) -> str:
    """The stat key to record for a file stat-ed at ``since_ns`` or later: marked racy if it is too fresh."""
    key = stat_key(st)
    return RACY_PREFIX + key if is_racy(st, since_ns, ctime=ctime) else key


@dataclass(slots=True)
class CachedFile:
    path: str
    stat_key: str
    hash: str
    line: bytes  # the whole cache line, reusable as-is when the file is unchanged
    fields: list[bytes]  # [json path, stat key, hash, mode, tree line]

    @property
    def tree_line(self) -> bytes:
        return self.fields[4]

    @property
    def racy(self) -> bool:
        """Recorded too close to its snapshot for the stat to vouch for the content: hash it again."""
        return self.stat_key.startswith(RACY_PREFIX)

    def matches(self, key: str) -> bool:
        """The stat is what was recorded (racy or not)."""
        return self.stat_key == key or (self.racy and self.stat_key[len(RACY_PREFIX) :] == key)

    def digest_record(self) -> bytes:
        f = self.fields
        return b"%s\0f\0%s\0%s\0\n" % (f[0], f[3], f[2])


def cache_line(path: str, key: str, content_hash: str, mode: int, tree_line: bytes) -> bytes:
    return b"%s\t%s\t%s\t%o\t%s\n" % (
        json_str(path).encode("utf-8", "surrogateescape"),
        key.encode(),
        content_hash.encode(),
        mode,
        tree_line,
    )


class StatCacheCursor:
    """Merge-join access: `seek` must be called with paths in canonical order."""

    def __init__(self, path: Path | None, store_url: str) -> None:
        self._lines: Iterator[bytes] = iter(())
        self._file: IO[bytes] | None = None
        self._current: CachedFile | None = None
        self._current_key: list[str] | None = None
        self._consumed = False  # the current line was handed out; move on before the next seek
        self.snapshot: str | None = None
        self.fingerprint: str | None = None
        self.digest: str | None = None
        self.entries = self.bytes = 0
        self.gc_seen = 0.0  # the newest garbage-collection epoch the writer of this cache had taken into account
        self.walk = NO_WALK  # the hash of the walk file recorded with this cache (walkfile.py), if any
        self.header_end = 0  # where the lines start
        if path is None:
            return
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        except FileNotFoundError:
            return
        try:
            header = json.loads(self._file.readline())
        except ValueError:
            header = {}
        if header.get("format") != FORMAT or header.get("store") != store_url:
            return  # a cache for another store (or format) tells us nothing
        self.snapshot = header.get("snapshot")
        self.fingerprint = header.get("fingerprint")
        self.digest = header.get("digest")
        self.entries = int(header.get("entries", 0))
        self.bytes = int(header.get("bytes", 0))
        self.gc_seen = float(header.get("gc_seen", 0))
        walk = header.get("walk")
        self.walk = walk if isinstance(walk, str) and len(walk) == 64 else NO_WALK
        self.header_end = self._file.tell()
        self._lines = iter(self._file)
        self._advance()

    def _advance(self) -> None:
        for line in self._lines:
            fields = line.rstrip(b"\n").split(b"\t", 4)
            if len(fields) != 5:
                continue
            raw = fields[0]
            # Plain paths are stored as '"path"'; only escaped ones need a JSON parse.
            path = json.loads(raw) if b"\\" in raw else raw[1:-1].decode("utf-8", "surrogateescape")
            self._current = CachedFile(path, fields[1].decode(), fields[2].decode(), line, fields)
            self._current_key = None
            return
        self._current = None
        self._current_key = None

    def seek(self, path: str) -> CachedFile | None:
        if self._consumed:
            self._consumed = False
            self._advance()
        current = self._current
        if current is not None and current.path == path:  # the usual case: the next line is this file
            self._consumed = True
            return current
        key = sort_key(path)
        while self._current is not None:
            if self._current_key is None:
                self._current_key = sort_key(self._current.path)
            if self._current_key >= key:
                break
            self._advance()
        if self._current is not None and self._current.path == path:
            self._consumed = True
            return self._current
        return None

    def mapped(self) -> mmap.mmap:
        """The whole cache file, mapped read-only (lines from `header_end` on), for splicing (splice.py)."""
        if self._file is None:
            raise ValueError("no stat cache is open")
        return mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class StatCacheWriter:
    """Writes a new cache next to the old one; `commit` swaps it in atomically."""

    def __init__(self, path: Path, store_url: str) -> None:
        self.path = path
        self.store_url = store_url
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: two snapshots of one folder at once (two CLI calls) must not write into one file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new")
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self.gc_seen = 0.0
        self.racy = False  # some line was recorded racy: the fingerprint must not vouch for the folder
        self.racy_paths: list[str] = []
        self.walk = NO_WALK  # set by whoever records the walk file that goes with this cache
        self._file.write(self._header("0" * 64, "0" * 64, "0" * 64, 0, 0))  # rewritten in place by commit()

    def _header(self, snapshot_id: str, fingerprint: str, digest: str, entries: int, total: int) -> bytes:
        # Fixed width, so commit() can write it over the placeholder without moving the lines.
        header = {
            "format": FORMAT,
            "store": self.store_url,
            "snapshot": snapshot_id,
            "fingerprint": fingerprint,
            "digest": digest,
            "entries": f"{entries:020}",
            "bytes": f"{total:020}",
            "gc_seen": f"{self.gc_seen:024.6f}",
            "walk": self.walk,
        }
        return json.dumps(header).encode() + b"\n"

    def add(self, path: str, key: str, content_hash: str, mode: int, tree_line: bytes) -> None:
        """``key`` is `stat_key`, or `racy_key` for a file too fresh for its stat to vouch for it."""
        if key.startswith(RACY_PREFIX):
            self.racy = True
            self.racy_paths.append(path)
        self._file.write(cache_line(path, key, content_hash, mode, tree_line))

    def add_line(self, line: bytes) -> None:
        """A line of the old cache, as it was (never a racy one: those are hashed again and written anew)."""
        self._file.write(line)

    def add_racy_line(self, path: str, line: bytes) -> None:
        """A line of the old cache whose file is still too fresh for its stat to vouch for it."""
        self.racy = True
        self.racy_paths.append(path)
        self._file.write(line)

    def write_raw(self, data: bytes | memoryview) -> None:
        """Lines already in canonical order and format (a spliced stretch of the old cache)."""
        self._file.write(data)

    def commit(self, snapshot_id: str, fingerprint: str, digest: str, entries: int, total: int) -> None:
        """Seal the cache as describing ``snapshot_id``, whose walk had this stat ``fingerprint``."""
        self._file.seek(0)
        if self.racy:
            fingerprint = NO_FINGERPRINT
        self._file.write(self._header(snapshot_id, fingerprint, digest, entries, total))
        self._file.close()
        os.replace(self._tmp, self.path)
        # Writers killed mid-snapshot leave their file behind; one a day old belongs to no live snapshot.
        for stray in self.path.parent.glob(f".{glob.escape(self.path.name)}.*.new"):
            with contextlib.suppress(OSError):
                if stray.stat().st_mtime < time.time() - _STRAY_SECONDS:
                    stray.unlink()

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)
