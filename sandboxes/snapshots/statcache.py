"""The stat cache: what each file's content was at the last snapshot or restore, keyed by its stat.

Like git's index, it lets a snapshot skip reading files whose size, mtime, ctime, inode and mode are unchanged,
and lets a rollback skip files that still match. It lives on the worker next to (never inside) the sandbox, and
only describes objects of one store. ctime cannot be set from user space, so a file rewritten with its old
mtime restored still shows as changed.

One line per regular file, in canonical tree order: ``json path TAB stat key TAB content hash TAB tree line``.
Losing the cache costs a full read on the next snapshot, never correctness.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sandboxes.snapshots.tree import sort_key

FORMAT = "tardigrade-statcache/1"


def stat_key(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_mode}"


@dataclass(slots=True)
class CachedFile:
    path: str
    stat_key: str
    hash: str
    tree_line: bytes


class StatCacheCursor:
    """Merge-join access: `seek` must be called with paths in canonical order."""

    def __init__(self, path: Path | None, store_url: str) -> None:
        self._lines: Iterator[bytes] = iter(())
        self._file: IO[bytes] | None = None
        self._current: CachedFile | None = None
        self._current_key: list[str] | None = None
        self.snapshot: str | None = None
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
        self._lines = iter(self._file)
        self._advance()

    def _advance(self) -> None:
        for line in self._lines:
            parts = line.rstrip(b"\n").split(b"\t", 3)
            if len(parts) != 4:
                continue
            path = json.loads(parts[0])
            self._current = CachedFile(path, parts[1].decode(), parts[2].decode(), parts[3])
            self._current_key = sort_key(path)
            return
        self._current = None
        self._current_key = None

    def seek(self, path: str) -> CachedFile | None:
        key = sort_key(path)
        while self._current_key is not None and self._current_key < key:
            self._advance()
        if self._current is not None and self._current.path == path:
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
        self._tmp = path.with_name(path.name + ".new")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit()/abort()
        self._file.write(self._header("0" * 64))  # rewritten in place by commit()

    def _header(self, snapshot_id: str) -> bytes:
        header = {"format": FORMAT, "store": self.store_url, "snapshot": snapshot_id}
        return json.dumps(header).encode() + b"\n"

    def add(self, path: str, key: str, content_hash: str, tree_line: bytes) -> None:
        self._file.write(b"%s\t%s\t%s\t%s\n" % (json.dumps(path).encode(), key.encode(), content_hash.encode(), tree_line))

    def commit(self, snapshot_id: str) -> None:
        self._file.seek(0)
        self._file.write(self._header(snapshot_id))
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)
