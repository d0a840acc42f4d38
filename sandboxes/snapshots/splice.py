"""Splicing a parent's flat tree: a checkpoint whose Python work follows what changed, not the workspace.

A tree body is sorted in canonical order (`tree.sort_key`), one line per entry, so the lines a change touches - a
path, or a folder and everything below it - form one contiguous byte range that bisection over line offsets finds
by decoding only the lines it probes. The new body is the parent's with those ranges replaced by the fresh lines:
the unchanged part is copied as byte ranges and hashed by BLAKE3 in C, never parsed entry by entry.

The workspace digest is BLAKE3 over every entry's digest record (`tree.digest_record`), in the same order. Next to
each locally cached tree lies its *side file*: those records, one per line, then a JSON footer (the tree's id and
size, its entry, file and byte counts, hard links, and how many chunk references name each pack). The records
splice the same way, so the new digest is one hash over spliced bytes. A side file is trusted only when its
records hash to the digest recorded in the (hash-verified) tree it describes, and the records of every removed
range must equal what the removed tree lines give; anything else means the side file is rebuilt from the tree in
one linear pass, or the caller falls back to the entry-by-entry path.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

from tardigrade.sandboxes.errors import UnsafeTree
from tardigrade.sandboxes.snapshots import tree as t

SIDE_FORMAT = "tardigrade-treeside/1"
# The pack named by each chunk reference of a tree line (a quote inside a JSON string is escaped, so a path or a
# link can never look like one). Counted per pack, so removing lines removes exactly their references.
PACK_REF = re.compile(rb'\["[0-9a-f]{64}","([0-9a-f]{64})"')
_TREE_PATH = re.compile(rb'\{"p":"([^"\\]*)"')
_RECORD_PATH = re.compile(rb'"([^"\\]*)"\0')
_PLAIN_FILE = re.compile(rb'^\{"p":"([^"\\]*)","k":"f","t":-?\d+,"m":(\d+),"s":(\d+),"h":"([0-9a-f]{64})"')
_PLAIN_DIR = re.compile(rb'^\{"p":"([^"\\]*)","k":"d","t":-?\d+,"m":(\d+)\}$')


class Unspliceable(Exception):
    """The parent's tree or side file cannot be spliced (hard links, a mismatch, an odd line): the caller takes the
    entry-by-entry path instead, which handles every case."""


@dataclass
class SideFooter:
    """What a side file says about the tree it describes; counts are taken from the tree's own lines."""

    tree: str
    body: int  # the tree body's size in bytes
    entries: int
    files: int
    total: int  # the logical size of its files (the tree footer's "bytes")
    hardlinks: int
    packs: Counter[str]  # pack -> chunk references naming it

    def encode(self) -> bytes:
        """The footer line: its fields, sealed by their hash (the records are sealed by the tree's digest)."""
        fields = {
            "format": SIDE_FORMAT,
            "tree": self.tree,
            "body": self.body,
            "entries": self.entries,
            "files": self.files,
            "bytes": self.total,
            "hardlinks": self.hardlinks,
            "packs": dict(self.packs),
        }
        return json.dumps({"fields": fields, "seal": _seal(fields)}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> SideFooter | None:
        """The footer, or None if it is not one of ours or its seal does not match its fields."""
        try:
            outer = json.loads(raw)
            d = outer["fields"]
            if d["format"] != SIDE_FORMAT or not isinstance(d["packs"], dict) or outer["seal"] != _seal(d):
                return None
            body, entries, files, total, hardlinks = (d[k] for k in ("body", "entries", "files", "bytes", "hardlinks"))
            counts = [body, entries, files, total, hardlinks, *d["packs"].values()]
            if not all(type(v) is int and v >= 0 for v in counts):
                return None
            return cls(str(d["tree"]), body, entries, files, total, hardlinks, Counter(d["packs"]))
        except (ValueError, KeyError, TypeError):
            return None


def _seal(fields: dict[str, object]) -> str:
    return blake3.blake3(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def count_packs(block: bytes | memoryview) -> Counter[str]:
    return Counter(m.decode() for m in PACK_REF.findall(block))


def record_splittable(records: bytes, count: int) -> bool:
    """Whether these ``count`` records are one line each: a symlink target with a newline breaks the bisection."""
    return records.count(b"\n") == count


def _line_record(line: bytes, snapshot_id: str) -> tuple[bytes, str, int]:
    """(digest record, kind, file size) of one tree line; the usual plain lines are read without a JSON parse."""
    plain = _PLAIN_FILE.match(line)
    if plain is not None:
        return b'"%s"\0f\0%o\0%s\0\n' % (plain[1], int(plain[2]), plain[4]), t.FILE, int(plain[3])
    plain = _PLAIN_DIR.match(line)
    if plain is not None:
        return b'"%s"\0d\0%o\0\0\n' % (plain[1], int(plain[2])), t.DIR, 0
    entry = t.parse_entry(snapshot_id, line)
    return t.entry_digest_record(entry), entry.kind, entry.size if entry.kind == t.FILE else 0


def retarget_side(side_path: Path, snapshot_id: str) -> bool:
    """Make a side file describe the tree stored as ``snapshot_id``: a tardigrade-tree/2 snapshot's id is its
    root object's hash, not the hash of the flat body the side file was written next to (merkle.py). Rewrites the
    footer in place; False if the file has no footer of ours (then it is rebuilt when needed)."""
    with open(side_path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        at = end
        while at > 0:  # the footer is the last line; its pack counts can make it longer than one block
            at = max(0, at - 65536)
            f.seek(at)
            cut = f.read(end - at).rfind(b"\n")
            if cut >= 0:
                at += cut + 1
                break
        f.seek(at)
        footer = SideFooter.decode(f.read())
        if footer is None:
            return False
        footer.tree = snapshot_id
        f.seek(at)
        f.truncate()
        f.write(footer.encode())
    return True


def build_side(body_path: Path, snapshot_id: str, digest: str, side_path: Path) -> bool:
    """Rebuild the side file of a verified tree in one streaming pass over its lines. False if the tree cannot be
    spliced (its recorded digest is not the hash of its records, or a record spans lines)."""
    hasher = blake3.blake3()
    entries = files = total = hardlinks = 0
    packs: Counter[str] = Counter()
    fd, tmp = tempfile.mkstemp(dir=side_path.parent, prefix=f".{side_path.name}.")
    try:
        with open(body_path, "rb") as body, os.fdopen(fd, "wb") as out:
            records: list[bytes] = []
            for line in body:
                if not line.endswith(b"\n"):
                    break  # the footer
                record, kind, size = _line_record(line[:-1], snapshot_id)
                if record.count(b"\n") != 1:
                    return False
                records.append(record)
                entries += 1
                files += kind == t.FILE
                hardlinks += kind == t.HARDLINK
                total += size
                if kind == t.FILE:
                    packs.update(m.decode() for m in PACK_REF.findall(line))
                if len(records) >= 4096:
                    block = b"".join(records)
                    hasher.update(block)
                    out.write(block)
                    records = []
            block = b"".join(records)
            hasher.update(block)
            out.write(block)
            if hasher.hexdigest() != digest:
                return False
            size = os.fstat(body.fileno()).st_size
            out.write(SideFooter(snapshot_id, size, entries, files, total, hardlinks, packs).encode())
        os.replace(tmp, side_path)
        return True
    except UnsafeTree:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)


class ParentTree:
    """A parent's tree body and side file, mapped read-only, checked against each other."""

    def __init__(self, body_path: Path, side_path: Path, snapshot_id: str, digest: str) -> None:
        self._files: list[mmap.mmap] = []
        self.body = self._map(body_path)
        self.body_end = self.body.rfind(b"\n") + 1  # the footer follows the last line
        self.side = self._map(side_path)
        self.side_end = self.side.rfind(b"\n") + 1
        footer = SideFooter.decode(self.side[self.side_end :])
        if footer is None or footer.tree != snapshot_id or footer.body != len(self.body):
            self.close()
            raise Unspliceable("the side file describes another tree")
        self.footer = footer
        hasher = blake3.blake3()
        stream(self.side, 0, self.side_end, hasher.update)
        if hasher.hexdigest() != digest:
            self.close()
            raise Unspliceable("the side file's records do not hash to the tree's digest")
        self.snapshot_id = snapshot_id

    def _map(self, path: Path) -> mmap.mmap:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                self.close()
                raise Unspliceable(f"{path.name} is empty")
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._files.append(m)
        return m

    def close(self) -> None:
        for m in self._files:
            m.close()
        self._files = []


def _tree_path(buf: mmap.mmap, start: int, end: int) -> str:
    m = _TREE_PATH.match(buf, start, end)
    if m is not None:
        return m[1].decode("utf-8", "surrogateescape")
    try:
        path = json.loads(buf[start:end].decode("utf-8", "surrogateescape"))["p"]
    except (ValueError, KeyError, TypeError):
        raise Unspliceable("a tree line has no path") from None
    if not isinstance(path, str):
        raise Unspliceable("a tree line has no path")
    return path


def _record_path(buf: mmap.mmap, start: int, end: int) -> str:
    return _leading_path(buf, start, end, _RECORD_PATH, b"\0", "a side record")


def _leading_path(buf: mmap.mmap, start: int, end: int, quick: re.Pattern[bytes], sep: bytes, what: str) -> str:
    """The JSON string that opens a line and ends at ``sep``: by ``quick`` when it has no escapes, else decoded."""
    m = quick.match(buf, start, end)
    if m is not None:
        return m[1].decode("utf-8", "surrogateescape")
    cut = buf.find(sep, start, end)
    try:
        path = json.loads(buf[start:cut].decode("utf-8", "surrogateescape"))
    except ValueError:
        raise Unspliceable(f"{what} has no path") from None
    if cut < 0 or not isinstance(path, str):
        raise Unspliceable(f"{what} has no path")
    return path


PathOf = Callable[[mmap.mmap, int, int], str]


def first_line(buf: mmap.mmap, lo: int, hi: int, path_of: PathOf, after: Callable[[list[str]], bool]) -> int:
    """The offset of the first line in [lo, hi) whose sort key satisfies ``after`` (False for a prefix of the lines,
    True for the rest), or ``hi``. ``lo`` and ``hi`` are line starts; only the probed lines are decoded."""
    while lo < hi:
        mid = (lo + hi) // 2
        cut = buf.rfind(b"\n", lo, mid)
        start = cut + 1 if cut >= 0 else lo
        end = buf.find(b"\n", start, hi)
        if end < 0:
            raise Unspliceable("a line runs past its region")
        if after(t.sort_key(path_of(buf, start, end))):
            hi = start
        else:
            lo = end + 1
    return lo


def span(buf: mmap.mmap, end: int, path_of: PathOf, path: str, subtree: bool, start: int = 0) -> tuple[int, int]:
    """The byte range of ``path``'s line (and, for a subtree, every line below it) among the lines in [start, end);
    empty where it would go."""
    key = t.sort_key(path)
    lo = first_line(buf, start, end, path_of, lambda k: k >= key)
    if subtree:
        n = len(key)
        return lo, first_line(buf, lo, end, path_of, lambda k: k[:n] > key)
    if lo < end:
        line_end = buf.find(b"\n", lo, end)
        if path_of(buf, lo, line_end) == path:
            return lo, line_end + 1
    return lo, lo


@dataclass
class Cut:
    """One merged range of the parent replaced by fresh lines: body bytes [blo, bhi), side bytes [slo, shi)."""

    blo: int
    bhi: int
    slo: int
    shi: int
    lines: list[bytes]
    records: list[bytes]


def plan_cuts(parent: ParentTree, targets: list[tuple[str, bool]]) -> tuple[list[Cut], dict[str, int]]:
    """Locate each (path, is subtree) in body and side, merged where ranges meet; returns the cuts and, per target
    path, the index of the cut its fresh lines go into. Body and side must agree on every range."""
    found = []
    for path, subtree in sorted(targets, key=lambda x: t.sort_key(x[0])):
        blo, bhi = span(parent.body, parent.body_end, _tree_path, path, subtree)
        slo, shi = span(parent.side, parent.side_end, _record_path, path, subtree)
        found.append((path, blo, bhi, slo, shi))
    cuts: list[Cut] = []
    where: dict[str, int] = {}
    for path, blo, bhi, slo, shi in found:
        if cuts and blo <= cuts[-1].bhi:
            last = cuts[-1]
            if slo > last.shi:
                raise Unspliceable("the tree and its side file disagree on the order of entries")
            last.bhi, last.shi = max(last.bhi, bhi), max(last.shi, shi)
        else:
            if cuts and slo <= cuts[-1].shi:
                raise Unspliceable("the tree and its side file disagree on the order of entries")
            cuts.append(Cut(blo, bhi, slo, shi, [], []))
        where[path] = len(cuts) - 1
    return cuts, where


@dataclass
class Removed:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    hardlinks: int = 0


def removed_lines(parent: ParentTree, cuts: list[Cut]) -> tuple[Removed, Counter[str], list[t.ChunkRef]]:
    """Parse the parent lines the cuts remove (these are what changed, so this is O(changes)); their records must be
    exactly the side file's bytes for the same range. Returns counts, their pack references and their chunks."""
    removed = Removed()
    packs: Counter[str] = Counter()
    chunks: list[t.ChunkRef] = []
    for cut in cuts:
        block = parent.body[cut.blo : cut.bhi]
        records = []
        for line in block.split(b"\n")[:-1]:
            try:
                entry = t.parse_entry(parent.snapshot_id, line)
            except UnsafeTree as e:
                raise Unspliceable(str(e)) from None
            records.append(t.entry_digest_record(entry))
            removed.entries += 1
            if entry.kind == t.FILE:
                removed.files += 1
                removed.bytes += entry.size
                chunks += entry.chunks
            removed.hardlinks += entry.kind == t.HARDLINK
        if b"".join(records) != parent.side[cut.slo : cut.shi]:
            raise Unspliceable("the side file's records differ from the tree's lines")
        packs += count_packs(block)
    return removed, packs, chunks


def write_spliced(
    parent: ParentTree, cuts: list[Cut], body_out: Path, side_out: Path, footer_of: Callable[[str], bytes]
) -> tuple[str, str]:
    """Write the new body and side records: the parent's bytes between cuts, the fresh lines in them. Returns (tree
    id, workspace digest); ``footer_of(digest)`` gives the tree footer. The side file's footer is the caller's."""
    body_hash, digest = blake3.blake3(), blake3.blake3()
    with open(body_out, "wb") as body, open(side_out, "wb") as side:
        bpos = spos = 0
        for cut in [*cuts, Cut(parent.body_end, parent.body_end, parent.side_end, parent.side_end, [], [])]:
            fresh_body, fresh_side = b"".join(cut.lines), b"".join(cut.records)
            stream(parent.body, bpos, cut.blo, body.write, body_hash.update)
            body.write(fresh_body)
            body_hash.update(fresh_body)
            stream(parent.side, spos, cut.slo, side.write, digest.update)
            side.write(fresh_side)
            digest.update(fresh_side)
            bpos, spos = cut.bhi, cut.shi
        footer = footer_of(digest.hexdigest())
        body.write(footer)
        body_hash.update(footer)
    return body_hash.hexdigest(), digest.hexdigest()


_BLOCK = 8 << 20


def stream(buf: mmap.mmap, start: int, end: int, *sinks: Callable[[memoryview], object]) -> None:
    """Feed bytes [start, end) of a mapped file to each sink in blocks, dropping each block's pages from this
    process once fed: a copied tree of hundreds of MB stays in the page cache, not in the process's memory."""
    with memoryview(buf) as view:
        for at in range(start, end, _BLOCK):
            stop = min(at + _BLOCK, end)
            with view[at:stop] as block:
                for sink in sinks:
                    sink(block)
            aligned = at - at % mmap.PAGESIZE
            buf.madvise(mmap.MADV_DONTNEED, aligned, stop - aligned)


def cache_path_of(buf: mmap.mmap, start: int, end: int) -> str:
    """The path of a stat-cache line (statcache.py): its first field, a JSON string."""
    return _leading_path(buf, start, end, _RECORD_PATH_TAB, b"\t", "a stat-cache line")


_RECORD_PATH_TAB = re.compile(rb'"([^"\\]*)"\t')


def splice_singles(
    buf: mmap.mmap,
    start: int,
    end: int,
    path_of: PathOf,
    lines: dict[str, bytes],
    write: Callable[[bytes | memoryview], object],
) -> None:
    """Write the sorted lines in [start, end) with the line of each path in ``lines`` replaced by its value (b""
    removes it; a path without a line gets one where it belongs)."""
    pos = start
    for path in sorted(lines, key=t.sort_key):
        lo, hi = span(buf, end, path_of, path, False, pos)
        stream(buf, pos, lo, write)
        write(lines[path])
        pos = hi
    stream(buf, pos, end, write)
