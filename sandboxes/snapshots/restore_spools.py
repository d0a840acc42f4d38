"""What a restore keeps on disk while its merge runs, so memory stays bounded for any tree: the files and links
to write after the merge (`Plan`), the new stat cache in canonical order (`CacheSpool`), and the walk fingerprint
of the folder as the restore leaves it (`AfterFingerprint`), which lets the next snapshot of an untouched folder
reuse the restored one whole.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import IO

from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.create import MAX_WALK_KEPT
from tardigrade.sandboxes.snapshots.statcache import (
    NO_FINGERPRINT,
    RACY_PREFIX,
    StatCacheWriter,
    cache_line,
    fingerprint_hasher,
    fingerprint_part,
    stat_key,
)


class Plan:
    """Files and links to write after the merge pass, spooled to disk so memory stays bounded."""

    def __init__(self, scratch: Path) -> None:
        fd, name = tempfile.mkstemp(dir=scratch, prefix="restore-")
        self.path = Path(name)
        try:
            self._out: IO[bytes] = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self.files = 0
        self.links = 0

    def add(self, entry: t.Entry) -> None:
        self._out.write(t.encode_entry(entry) + b"\n")
        if entry.kind == t.FILE:
            self.files += 1
        else:
            self.links += 1

    def entries(self, kind: str) -> Generator[tuple[t.Entry, bytes], None, None]:
        """The planned entries of one kind, with their (canonical) tree lines. Holds the spool open until exhausted
        or closed: wrap a loop that may stop early in `contextlib.closing`."""
        self._out.flush()
        if not (self.files if kind == t.FILE else self.links):
            return
        with open(self.path, "rb") as f:
            for line in f:
                entry = t.decode_entry(line)
                if entry.kind == kind:
                    yield entry, line.rstrip(b"\n")

    def close(self) -> None:
        self._out.close()
        self.path.unlink(missing_ok=True)


class CacheSpool:
    """The new stat cache in canonical order while the merge runs: kept files' lines as they were, a placeholder
    for each file written later (whose stat is known only then), filled from a second spool at the end."""

    PLACEHOLDER = b"*\n"

    def __init__(self, scratch: Path) -> None:
        fd, name = tempfile.mkstemp(dir=scratch, prefix="restore-cache-")
        self.path = Path(name)
        self.out: IO[bytes] = os.fdopen(fd, "wb")
        self.written_path = self.path.with_name(self.path.name + ".written")
        self.written: IO[bytes] = open(self.written_path, "wb")  # noqa: SIM115 - closed in close()
        self.placeholders = 0
        self.racy = False

    def add(self, path: str, key: str, content_hash: str, mode: int, tree_line: bytes) -> None:
        self.racy = self.racy or key.startswith(RACY_PREFIX)
        self.out.write(cache_line(path, key, content_hash, mode, tree_line))

    def add_written(self, path: str, key: str, content_hash: str, mode: int, tree_line: bytes) -> None:
        self.racy = self.racy or key.startswith(RACY_PREFIX)
        self.written.write(cache_line(path, key, content_hash, mode, tree_line))

    def commit(self, writer: StatCacheWriter) -> None:
        """Copy the spooled lines into ``writer``, each placeholder replaced by the next written file's line."""
        self.out.close()
        self.written.close()
        writer.racy = writer.racy or self.racy
        with open(self.path, "rb") as kept, open(self.written_path, "rb") as written:
            if not self.placeholders:
                while block := kept.read(1 << 20):
                    writer.add_line(block)
                return
            for line in kept:
                writer.add_line(next(written) if line == self.PLACEHOLDER else line)

    def close(self) -> None:
        self.out.close()
        self.written.close()
        self.path.unlink(missing_ok=True)
        self.written_path.unlink(missing_ok=True)


def fingerprint_line(path: str, st: os.stat_result) -> bytes:
    """One line of `create.Fingerprint` (the same bytes it hashes for this path and stat)."""
    return fingerprint_part(path, st).encode("utf-8", "surrogateescape")


class AfterFingerprint:
    """The walk fingerprint (`create.Fingerprint`) of the folder as the restore leaves it, without walking it
    again: each path's line as the merge saw it, spooled to disk, except for what the restore makes or changes and
    every folder (whose mtime it may set), which are stat-ed at the end.

    It must vouch only for what the restore left: a file or symlink the restore made and something else changed
    before the end (a sandbox process) would otherwise be taken into the fingerprint as it was changed, and the next
    snapshot would reuse this one whole over it. So each is stat-ed when made (`made`) and must look the same at
    the end, or the fingerprint does not vouch (`vouches`). Past `MAX_WALK_KEPT` paths to look at (a full restore)
    it does not vouch either: the next snapshot checks each file against the stat cache instead.
    """

    def __init__(self, root: str, selection: Selection, scratch: Path) -> None:
        self.root = root
        self.selection = selection
        fd, name = tempfile.mkstemp(dir=scratch, prefix="restore-walk-")
        self.path = Path(name)
        self._out: IO[bytes] = os.fdopen(fd, "wb")
        self._offset = 0
        self._later: list[tuple[int, str]] | None = []  # (offset in the spool, path) to stat at the end
        self._made: dict[str, str] = {}  # path -> stat key of the file or symlink the restore made there
        self.vouches = True

    def add(self, path: str, st: os.stat_result) -> None:
        if self._later is not None:
            line = fingerprint_line(path, st)
            self._out.write(line)
            self._offset += len(line)

    def later(self, path: str) -> None:
        if self._later is not None:
            self._later.append((self._offset, path))
            if len(self._later) > MAX_WALK_KEPT:
                self._later = None
                self._made.clear()

    def made(self, path: str, st: os.stat_result) -> None:
        """The restore made (or settled) a file or symlink at ``path`` (one of the `later` paths); ``st`` its stat
        right after."""
        if self._later is not None:
            self._made[path] = stat_key(st)

    def hexdigest(self) -> str:
        """The fingerprint; check `vouches` after."""
        self._out.close()
        if self._later is None:
            self.vouches = False
            return NO_FINGERPRINT
        hasher = fingerprint_hasher(self.selection)
        with open(self.path, "rb") as spool:
            at = 0
            for offset, path in self._later:
                hasher.update(spool.read(offset - at))
                at = offset
                made = self._made.get(path)
                try:
                    st = os.lstat(f"{self.root}/{path}")
                except FileNotFoundError:
                    self.vouches = self.vouches and made is None
                    continue
                self.vouches = self.vouches and made in (None, stat_key(st))
                hasher.update(fingerprint_line(path, st))
            while block := spool.read(1 << 20):
                hasher.update(block)
        return hasher.hexdigest()

    def close(self) -> None:
        self._out.close()
        self.path.unlink(missing_ok=True)
