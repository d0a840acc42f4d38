"""The flat tree (tardigrade-tree/1): one line per path of a snapshot, in canonical order, plus the workspace digest.

A flat tree is JSON lines, then a footer line (format, entry count, bytes, workspace digest, selection). Entries
are sorted depth-first with siblings by name (the order a walk produces), which lets create and restore
stream-merge a tree against a live folder in bounded memory, and splice and binary-search it as bytes. Every
reader (restore, verify, diff, GC) and every writer (create, splice) works on this form.

How a tree is stored: new snapshots store it as a Merkle tree of folder listings in packs (tardigrade-tree/2,
merkle.py), whose root object is ``trees/xx/<snapshot id>`` and whose lines are these lines (plus, on a folder's
line, ``"x"``: where its listing is), so the flat tree is assembled from it on read, byte for byte what was
split, and the workspace digest does not depend on the form. Stores written before hold flat trees as one
zstd-compressed object, whose id - the snapshot id - is the BLAKE3 hash of the uncompressed flat tree; those are
read as they are. Either way the snapshot id verifies the whole tree.

Entry fields (short keys keep trees small): ``p`` path, ``k`` kind (``d`` folder, ``f`` file, ``l`` symlink,
``h`` hard link to an earlier file), ``m`` permission bits, ``t`` mtime in ns, ``s`` size, ``h`` BLAKE3 of the
content, ``c`` chunks as ``[blob, pack, offset, stored length, raw length, codec]``, ``l`` link target.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import blake3

from tardigrade.sandboxes.errors import UnsafeTree

FORMAT = "tardigrade-tree/1"
EMPTY_HASH = blake3.blake3(b"").hexdigest()

DIR, FILE, SYMLINK, HARDLINK = "d", "f", "l", "h"

CODEC_RAW, CODEC_ZSTD = 0, 1
CODEC_ENCRYPTED = 0x10  # flag: the stored bytes are AES-GCM encrypted (see snapshots/crypto.py)

# The largest blob a snapshot writes is a 2 MiB chunk (create.CHUNK_MAX; smaller files are one blob of under
# 1 MiB). A reference claiming more is corrupt or crafted: refused before anything is allocated for it.
MAX_BLOB_BYTES = 8 << 20
MAX_STORED_BYTES = MAX_BLOB_BYTES + (64 << 10)  # raw blobs, plus zstd's and AES-GCM's few bytes of overhead
MAX_PACK_OFFSET = 1 << 40  # packs are ~16 MiB (PACK_TARGET): an offset past a terabyte is crafted
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
PATH_MAX, NAME_MAX = 4095, 255  # Linux's limits (bytes): a longer path, name or link target cannot be restored


class ChunkRef(NamedTuple):
    """Where one piece of a file lives: blob ``blob`` (BLAKE3 of its raw bytes) at ``offset`` in pack ``pack``."""

    blob: str
    pack: str
    offset: int
    length: int  # bytes stored in the pack
    raw_length: int  # bytes after decoding
    codec: int


@dataclass(slots=True)
class Entry:
    path: str
    kind: str
    mode: int = 0
    mtime_ns: int = 0
    size: int = 0
    hash: str = ""
    chunks: list[ChunkRef] = field(default_factory=list)
    link: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"p": self.path, "k": self.kind}
        if self.kind == HARDLINK:
            d["l"] = self.link
            return d
        d["t"] = self.mtime_ns
        if self.kind == SYMLINK:
            d["l"] = self.link
            return d
        d["m"] = self.mode
        if self.kind == FILE:
            d["s"] = self.size
            d["h"] = self.hash
            d["c"] = [list(c) for c in self.chunks]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        return cls(
            path=d["p"],
            kind=d["k"],
            mode=d.get("m", 0),
            mtime_ns=d.get("t", 0),
            size=d.get("s", 0),
            hash=d.get("h", ""),
            chunks=[ChunkRef(*c) for c in d.get("c", ())],
            link=d.get("l", ""),
        )


def encode_entry(entry: Entry) -> bytes:
    return json.dumps(entry.to_json(), separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")


def decode_entry(line: bytes) -> Entry:
    """An entry of a tree already checked by `parse_entry` (or written by us): no type checks."""
    return Entry.from_json(json.loads(line.decode("utf-8", "surrogateescape")))


def _is_int(v: object) -> bool:
    return type(v) is int  # not bool, not float


def parse_entry(snapshot_id: str, line: bytes) -> Entry:
    """One line of a tree read from a store, with every field of the right type: anything else is `UnsafeTree`,
    never a KeyError or TypeError from deep inside a restore."""
    try:
        d = json.loads(line.decode("utf-8", "surrogateescape"))
    except ValueError:
        raise UnsafeTree(snapshot_id, "", "has a line that is not JSON") from None
    return entry_from_dict(snapshot_id, d)


def entry_from_dict(snapshot_id: str, d: object) -> Entry:
    """`parse_entry` of a line already parsed as JSON."""
    if not isinstance(d, dict) or not isinstance(d.get("p"), str) or not isinstance(d.get("k"), str):
        raise UnsafeTree(snapshot_id, "", "has an entry without a path and a kind")
    path = d["p"]
    for key, ok in (("m", _is_int), ("t", _is_int), ("s", _is_int), ("h", lambda v: isinstance(v, str)),
                    ("l", lambda v: isinstance(v, str)), ("c", lambda v: isinstance(v, list))):  # fmt: skip
        if key in d and not ok(d[key]):
            raise UnsafeTree(snapshot_id, path, f"has a malformed field {key!r}")
    if not all(is_chunk_json(c) for c in d.get("c", ())):
        raise UnsafeTree(snapshot_id, path, "has a malformed chunk reference")
    return Entry.from_json(d)


def is_chunk_json(c: object) -> bool:
    """Whether a parsed JSON value has the shape of a chunk reference: ``[str, str, int, int, int, int]``."""
    return (
        isinstance(c, list)
        and len(c) == 6
        and isinstance(c[0], str)
        and isinstance(c[1], str)
        and all(_is_int(v) for v in c[2:])
    )


_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\\ud800-\udfff]')


def json_str(text: str) -> str:
    """``json.dumps(text, ensure_ascii=False)``, without its cost for the usual plain path."""
    return json.dumps(text, ensure_ascii=False) if _NEEDS_ESCAPE.search(text) else f'"{text}"'


def digest_record(path: str, kind: str, mode: int, content_hash: str, link: str) -> bytes:
    """What the workspace digest covers of one entry: never mtimes, owners or how content is chunked."""
    return f"{json_str(path)}\0{kind}\0{mode:o}\0{content_hash}\0{link}\n".encode("utf-8", "surrogateescape")


def entry_digest_record(entry: Entry) -> bytes:
    return digest_record(entry.path, entry.kind, entry.mode, entry.hash, entry.link)


def sort_key(path: str) -> list[str]:
    """Canonical order: depth-first, siblings by name. Comparing component lists gives exactly that."""
    return path.split("/")


def footer(entries: int, total_bytes: int, digest: str, selection: dict[str, list[str]]) -> bytes:
    return json.dumps(
        {"format": FORMAT, "entries": entries, "bytes": total_bytes, "digest": digest, "selection": selection},
        separators=(",", ":"),
    ).encode()


def footer_json(tree_path: Path) -> object:
    """The tree's last line (its footer) as JSON, or None if it is not JSON: read from the end, never whole."""
    with open(tree_path, "rb") as f:
        f.seek(max(0, os.path.getsize(tree_path) - 65536))
        last = f.read().rsplit(b"\n", 1)[-1]
    try:
        return json.loads(last)
    except ValueError:
        return None


def check_path(snapshot_id: str, path: str) -> None:
    """A tree path must be relative, normalized and free of control surprises."""
    if not path or path.startswith("/"):
        raise UnsafeTree(snapshot_id, path, "is absolute or empty")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeTree(snapshot_id, path, "has an empty, '.' or '..' component")
    if "\0" in path:
        raise UnsafeTree(snapshot_id, path, "contains a NUL byte")
    if len(path.encode("utf-8", "surrogateescape")) > PATH_MAX or any(
        len(p.encode("utf-8", "surrogateescape")) > NAME_MAX for p in parts
    ):
        raise UnsafeTree(snapshot_id, path[:200], f"is longer than a path ({PATH_MAX}) or name ({NAME_MAX}) may be")


def check_chunk(snapshot_id: str, path: str, c: ChunkRef) -> None:
    """A chunk reference (type-checked by `parse_entry`) that names a possible blob: `UnsafeTree` otherwise."""
    if c.codec & ~CODEC_ENCRYPTED not in (CODEC_RAW, CODEC_ZSTD):
        raise UnsafeTree(snapshot_id, path, "uses an unknown codec")
    if not (
        0 <= c.raw_length <= MAX_BLOB_BYTES and 0 <= c.length <= MAX_STORED_BYTES and 0 <= c.offset <= MAX_PACK_OFFSET
    ):
        raise UnsafeTree(snapshot_id, path, f"has a chunk of impossible size (at most {MAX_BLOB_BYTES} bytes)")
    if not (_HEX64.match(c.blob) and _HEX64.match(c.pack)):
        raise UnsafeTree(snapshot_id, path, "has a chunk whose blob or pack is not a 64-hex-digit name")


class TreeValidator:
    """Streaming checks that make a tree safe to restore: paths stay inside the target, entries are in canonical
    order without duplicates, nothing is written beneath a symlink, and hard links point at earlier files."""

    def __init__(self, snapshot_id: str) -> None:
        self.snapshot_id = snapshot_id
        self._last: list[str] | None = None
        self._symlinks: set[str] = set()  # bounded by the number of symlinks in the tree
        self._open_dirs: list[str] = []  # the folders the walk is inside of: bounded by the tree's depth

    def check(self, entry: Entry) -> None:
        sid = self.snapshot_id
        check_path(sid, entry.path)
        if entry.kind not in (DIR, FILE, SYMLINK, HARDLINK):
            raise UnsafeTree(sid, entry.path, f"has an unknown kind {entry.kind!r}")
        key = sort_key(entry.path)
        if self._last is not None and key <= self._last:
            raise UnsafeTree(sid, entry.path, "is out of order or duplicated")
        self._last = key
        # Any ancestor that is a symlink would make the write go through it.
        parts = entry.path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in self._symlinks:
                raise UnsafeTree(sid, entry.path, "lies beneath a symlink in the same tree (write through a symlink)")
        # Its folder must be listed before it (trees list every folder they pass through): otherwise the merge
        # would delete the folder as unlisted and then find no folder to write into.
        while self._open_dirs and not entry.path.startswith(self._open_dirs[-1] + "/"):
            self._open_dirs.pop()
        parent = entry.path.rpartition("/")[0]
        if parent and (not self._open_dirs or self._open_dirs[-1] != parent):
            raise UnsafeTree(sid, entry.path, f"is listed without its folder {parent!r}")
        if entry.kind == DIR:
            self._open_dirs.append(entry.path)
        for c in entry.chunks:
            check_chunk(sid, entry.path, c)
        if entry.kind == SYMLINK:
            if not entry.link or "\0" in entry.link or len(entry.link.encode("utf-8", "surrogateescape")) > PATH_MAX:
                raise UnsafeTree(sid, entry.path, "is a symlink without a valid target")
            self._symlinks.add(entry.path)
        elif entry.kind == FILE:
            if entry.size != sum(c.raw_length for c in entry.chunks):
                raise UnsafeTree(sid, entry.path, "has chunks that do not add up to its size")
        elif entry.kind == HARDLINK:
            # The target must come earlier; that it is a regular file is checked when the link is made.
            check_path(sid, entry.link)
            if sort_key(entry.link) >= key:
                raise UnsafeTree(sid, entry.path, f"is a hard link to {entry.link!r}, which is not an earlier entry")
            link_parts = entry.link.split("/")
            for i in range(1, len(link_parts) + 1):
                if "/".join(link_parts[:i]) in self._symlinks:
                    raise UnsafeTree(sid, entry.path, "is a hard link through a symlink")
        if entry.mode & ~0o7777 or entry.mode < 0:
            raise UnsafeTree(sid, entry.path, "has invalid mode bits")
        if entry.size < 0:
            raise UnsafeTree(sid, entry.path, "has a negative size")
        if not -(1 << 63) <= entry.mtime_ns < (1 << 63):
            raise UnsafeTree(sid, entry.path, "has an mtime out of range")
        if entry.kind == FILE and not _HEX64.match(entry.hash):
            raise UnsafeTree(sid, entry.path, "has a content hash that is not 64 hex digits")


def iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a byte stream into lines without holding more than one line and one chunk."""
    pending = b""
    for chunk in chunks:
        data = pending + chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending
