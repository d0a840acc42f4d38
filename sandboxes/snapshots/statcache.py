"""The stat cache: what each file's content was at the last snapshot or restore, keyed by its stat.

Like git's index, it lets a snapshot skip reading files whose size, mtime, ctime, inode and mode are unchanged,
and lets a rollback skip files that still match. It lives on the worker next to (never inside) the sandbox, and
only describes objects of one store. ctime cannot be set from user space, so a file rewritten with its old
mtime restored still shows as changed.

One line per regular file, in canonical tree order, made so an unchanged file costs no parsing at all:

    JSON path  TAB  stat key  TAB  content hash  TAB  mode (octal)  TAB  tree line

The line is copied as-is into the next cache, its tree line into the next tree, and its digest record is
assembled from the raw fields. Losing the cache costs a full read on the next snapshot, never correctness.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tardigrade.sandboxes.snapshots.tree import json_str, sort_key

FORMAT = "tardigrade-statcache/2"
_STRAY_SECONDS = 86400.0


def stat_key(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_mode}"


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
        }
        return json.dumps(header).encode() + b"\n"

    def add(self, path: str, key: str, content_hash: str, mode: int, tree_line: bytes) -> None:
        self._file.write(cache_line(path, key, content_hash, mode, tree_line))

    def add_line(self, line: bytes) -> None:
        self._file.write(line)

    def commit(self, snapshot_id: str, fingerprint: str, digest: str, entries: int, total: int) -> None:
        """Seal the cache as describing ``snapshot_id``, whose walk had this stat ``fingerprint``."""
        self._file.seek(0)
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
