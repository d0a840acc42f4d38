"""Trees as a Merkle tree of folders (tardigrade-tree/2): the stored form that makes a one-file change write only
the folders on its path, as restic and git do.

The flat tree (tree.py) is one object of every entry. Here each folder's listing - the tree lines of its direct
children, then a footer naming the folder - is a blob in a pack, written through a `PackWriter` like file content:
compressed, encrypted when encryption is on, deduplicated through the blob index, and so ten thousand files in a
hundred folders are still a handful of store objects. A child folder's line carries ``"x"``: the chunk references
``[blob, pack, offset, stored length, raw length, codec]`` of its listing (one, or a few pieces cut at line
boundaries for a folder too large for one blob). An unchanged folder is the same blob again, found by its hash.
The root folder's listing is the tree object itself (``trees/xx/<snapshot id>``), ending with the snapshot footer;
its hash is the snapshot id, so the id verifies everything beneath it. Paths inside stay full, so the flat tree
that restore, verify and diff read is the listings' lines concatenated depth first, minus the ``"x"`` fields, with
the flat footer: the workspace digest (over entries, never over objects) is the same in either form.

A listing's children must have their pack names before the listing is hashed, and a pack is named only when it is
sealed: so the listings are stored in rounds (`_store`), each round the folders whose children are all in sealed
packs, one seal between rounds. A one-file change at depth d makes d rounds of one new blob each (d small packs).
`split` encodes every listing of a flat tree and finds the unchanged ones stored by their hash; `split_changed`,
for a tree spliced from its parent's, takes the parent's listings of untouched folders as they are, so it costs
what the change touches. Both give the same tree.

Listings come from a store: `assemble` takes nothing on trust. Each blob is checked against its hash
(`ListingReader`), with its inflation bounded by its reference and the reference's by its stored size; each line
must be a direct child of the folder whose listing holds it, and a listing must name the folder it was fetched
for; no blob may be used twice in one tree (a few crafted listings naming each other over and over would expand
to billions of entries); depth is bounded by the path limit, and the listings held along the walk's path by
`MAX_LISTING`, as bytes; the reader's read-ahead by what it used; and the entry count must match the root
footer's. The `.folders` file kept next to a cached tree (`write_folder_refs`) names its tree and carries a check
hash: a spliced child names those listings unread, and GC keeps only their packs.
"""

from __future__ import annotations

import json
import mmap
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import blake3

from tardigrade.sandboxes.errors import SnapshotCorrupt, UnsafeTree
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.crypto import Encryption, EncryptionError
from tardigrade.sandboxes.snapshots.packs import BlobUndecodable, PackWriter, blob_hash, decode_blob
from tardigrade.sandboxes.snapshots.splice import first_line
from tardigrade.sandboxes.snapshots.tree_check import head_canonical
from tardigrade.sandboxes.store_keys import pack_key
from tardigrade.sandboxes.stores.base import ObjectMissing, ObjectStore

FORMAT = "tardigrade-tree/2"
FOLDER_FORMAT = "tardigrade-folder/2"
MAX_DEPTH = t.PATH_MAX // 2 + 1  # "a/a/a...": a deeper path is longer than Linux allows
# A listing is cut into pieces at line boundaries where a line's CRC says so (past PIECE_MIN), so an edit in a huge
# folder rewrites the pieces around it, not all; every piece is well under the largest blob readers accept.
PIECE_MIN, PIECE_MAX, PIECE_MASK = 512 << 10, 4 << 20, 0x3F
# A folder of a million entries lists ~200 MB: listings claiming more, together with those of the folders they are
# in (all held while a walk is inside them), are crafted.
MAX_LISTING = 1 << 30
# A listing's piece may claim to inflate this many times its stored size (past a floor): real listings are well
# under 100x (paths, mtimes and hashes differ line by line), the flat tree object's bound is the same (engine.py),
# and a piece of one line repeated inflates ten thousand times, a worker's disk filled from a small store object.
LISTING_INFLATE_RATIO, LISTING_INFLATE_FLOOR = 1024, 64 << 10
PENDING_LIMIT = 32 << 20  # closed folders' lines held before a round of stores is forced
_FLAT_HEAD = b'{"format":"' + t.FORMAT.encode() + b'",'
_ROOT_HEAD = b'{"format":"' + FORMAT.encode() + b'",'

#: Folder path -> the chunk references of its listing (the root, "", is the tree object and not in it).
FolderRefs = dict[str, list[t.ChunkRef]]


def refs_json(refs: list[t.ChunkRef]) -> bytes:
    return json.dumps([list(r) for r in refs], separators=(",", ":")).encode()


def folder_footer(path: str) -> bytes:
    return (
        b'{"format":"'
        + FOLDER_FORMAT.encode()
        + b'","path":'
        + t.json_str(path).encode("utf-8", "surrogateescape")
        + b"}"
    )


def is_root_footer(line: bytes) -> bool:
    """Whether a verified tree object's last line is a tardigrade-tree/2 root's footer (else it is a flat tree)."""
    return line.startswith(_ROOT_HEAD)


# -- writing ----------------------------------------------------------------------------------------------------


@dataclass
class _Folder:
    path: str
    lines: list[bytes] = field(default_factory=list)  # flat tree lines of its direct children
    children: dict[int, str] = field(default_factory=dict)  # index of a child folder's line -> its path
    size: int = 0


def split(body: Path, writer: PackWriter, root_out: Path) -> FolderRefs:
    """Store the folder listings of a flat tree body of ours (canonical order) through ``writer`` and write the
    root object to ``root_out``; returns every folder's references. Finishes the writer: every listing is durably
    stored when this returns. Memory: the lines of the folders the body is inside of, plus at most
    `PENDING_LIMIT` of closed folders waiting for their round."""
    folders: FolderRefs = {}
    stack = [_Folder("")]
    pending: list[_Folder] = []
    held = 0
    footer = b""
    with open(body, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                footer = line  # the last line
                break
            line = line[:-1]
            path, kind = head_canonical(line)
            parent = path.rpartition("/")[0]
            while stack[-1].path != parent:
                if len(stack) == 1:
                    raise ValueError(f"tree line {path[:200]!r} comes without its folder (not in canonical order)")
                pending.append(stack.pop())
                held += pending[-1].size
            top = stack[-1]
            if kind == t.DIR:
                top.children[len(top.lines)] = path
                stack.append(_Folder(path))
            top.lines.append(line)
            top.size += len(line) + 1
            if held > PENDING_LIMIT:
                _store(pending, writer, folders)
                pending, held = [], 0
    if not footer.startswith(_FLAT_HEAD):
        raise ValueError("the tree body has no tardigrade-tree/1 footer")
    while len(stack) > 1:
        pending.append(stack.pop())
    _store(pending, writer, folders)
    writer.finish()
    resolved = {path: [writer.resolve(r) for r in refs] for path, refs in folders.items()}
    with open(root_out, "wb") as out:
        for line in _listed(stack[0], resolved):
            out.write(line + b"\n")
        out.write(_ROOT_HEAD + footer[len(_FLAT_HEAD) :])
    return resolved


def split_changed(
    body: Path, parent: FolderRefs, targets: Iterable[tuple[str, bool]], writer: PackWriter, root_out: Path
) -> FolderRefs:
    """`split` of a tree body spliced from its parent's (splice.py), where only ``targets`` - (path, whole subtree?)
    pairs, the parent's lines the splice replaced - can differ: a folder above a target, or within a subtree
    target, is listed anew; every other folder's subtree is the parent's byte for byte, so its listing is the
    parent's (``parent``: its folder references), neither read nor encoded nor hashed. The body is read only
    where it is listed anew, a folder's subtree skipped by binary search: what the change touches, not what the
    workspace holds. The result is the one `split` gives."""
    above: set[str] = set()  # every folder with a target beneath it
    subtrees: set[str] = set()
    for path, subtree in targets:
        parts = path.split("/")
        above.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if subtree:
            subtrees.add(path)

    def listed_anew(folder: str) -> bool:
        if folder in above or folder in subtrees:
            return True
        parts = folder.split("/")
        return any("/".join(parts[:i]) in subtrees for i in range(1, len(parts)))

    folders = {path: refs for path, refs in parent.items() if not listed_anew(path)}
    reused: set[str] = set()  # folders of the new tree whose subtree is the parent's
    pending: list[_Folder] = []
    held = 0
    with open(body, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        end = buf.rfind(b"\n") + 1  # the footer follows the last line
        footer = buf[end:]
        root = _Folder("")
        stack: list[tuple[_Folder, int]] = [(root, 0)]  # a folder listed anew, where its next child's line starts
        while stack:
            folder, at = stack[-1]
            line_end = buf.find(b"\n", at, end) if at < end else -1
            line = buf[at:line_end] if line_end >= 0 else b""
            path, kind = head_canonical(line) if line else ("", "")
            if not line or (folder.path and not path.startswith(folder.path + "/")):
                stack.pop()  # past its last child: its parent goes on from here
                if stack:
                    pending.append(folder)
                    held += folder.size
                    stack[-1] = (stack[-1][0], at)
                continue
            if path.rpartition("/")[0] != folder.path:
                raise ValueError(f"tree line {path[:200]!r} comes without its folder (not in canonical order)")
            if kind == t.DIR:
                folder.children[len(folder.lines)] = path
            folder.lines.append(line)
            folder.size += len(line) + 1
            after = line_end + 1
            if kind == t.DIR and path not in folders:
                stack[-1] = (folder, after)  # for now; the child's end replaces it when the child is done
                stack.append((_Folder(path), after))
                continue
            if kind == t.DIR:  # the parent's listing holds: skip its subtree
                reused.add(path)
                after = _subtree_end(buf, after, end, path)
            stack[-1] = (folder, after)
            if held > PENDING_LIMIT:
                _store(pending, writer, folders)
                pending, held = [], 0
    _store(pending, writer, folders)
    writer.finish()

    def in_tree(path: str) -> bool:
        """Listed anew, or in a reused subtree: not a folder of the parent's that the change removed."""
        if path not in parent or listed_anew(path):
            return True
        parts = path.split("/")
        return any("/".join(parts[:i]) in reused for i in range(1, len(parts) + 1))

    resolved = {path: [writer.resolve(r) for r in refs] for path, refs in folders.items() if in_tree(path)}
    with open(root_out, "wb") as out:
        for listed in _listed(root, resolved):
            out.write(listed + b"\n")
        if not footer.startswith(_FLAT_HEAD):
            raise ValueError("the tree body has no tardigrade-tree/1 footer")
        out.write(_ROOT_HEAD + footer[len(_FLAT_HEAD) :])
    return resolved


def _path_of(buf: mmap.mmap, start: int, end: int) -> str:
    return head_canonical(buf[start:end])[0]


def _subtree_end(buf: mmap.mmap, start: int, end: int, folder: str) -> int:
    """Where the lines beneath ``folder`` (from ``start``, just past its own line) end."""
    key = t.sort_key(folder)
    depth = len(key)
    return first_line(buf, start, end, _path_of, lambda k: k[:depth] > key)


def _store(pending: list[_Folder], writer: PackWriter, folders: FolderRefs) -> None:
    """Store the listings of closed folders (children before parents), in rounds: a folder whose children all
    have sealed packs is stored (or found stored) now; the others wait for the seal that ends the round."""
    stalled = False
    while pending:
        rest = []
        for folder in pending:
            if any(c not in folders or writer.open_pack_has(folders[c]) for c in folder.children.values()):
                rest.append(folder)
                continue
            resolved = {c: [writer.resolve(r) for r in folders[c]] for c in folder.children.values()}
            folders[folder.path] = [writer.add(piece) for piece in _pieces(folder, resolved)]
            folder.lines = []
        if len(rest) == len(pending):  # their children went into the open pack in an earlier call: seal it
            if stalled:
                raise RuntimeError("folder listings wait for each other (a tree body out of order)")
            stalled = True
        else:
            stalled = False
        if rest:
            writer.seal()
        pending = rest


def _listed(folder: _Folder, folders: FolderRefs) -> Iterator[bytes]:
    """The folder's lines, each child folder's naming its listing."""
    for i, line in enumerate(folder.lines):
        child = folder.children.get(i)
        yield line if child is None else line[:-1] + b',"x":' + refs_json(folders[child]) + b"}"


def _pieces(folder: _Folder, folders: FolderRefs) -> list[bytes]:
    pieces: list[bytes] = []
    part: list[bytes] = []
    size = 0
    for line in _listed(folder, folders):
        part.append(line + b"\n")
        size += len(line) + 1
        if size >= PIECE_MAX or (size >= PIECE_MIN and zlib.crc32(line) & PIECE_MASK == 0):
            pieces.append(b"".join(part))
            part, size = [], 0
    part.append(folder_footer(folder.path))
    pieces.append(b"".join(part))
    return pieces


# -- reading ----------------------------------------------------------------------------------------------------

#: ``fetch(folder path, its listing's references)``: the listing, every piece checked against its hash.
Fetch = Callable[[str, list[t.ChunkRef]], bytes]

WINDOW_BYTES = 4 << 20  # one ranged read brings the listings stored after the one asked for along, up to this
_WINDOWS = 8  # ranged reads kept, one per pack: a folder's listing and its subfolders' are in different packs


class ListingReader:
    """Reads folder listings from their packs, a few MiB of a pack at a time: listings written together (siblings,
    cousins) are stored side by side, so a worker that reads a tree it does not have makes about a request per
    few MiB of listings (and one size check per pack), not one per folder, and reads ahead only while that pays
    (at most twice what the listings use, plus two windows). Every piece is checked against its hash before it
    is used."""

    def __init__(self, store: ObjectStore, encryption: Encryption | None, snapshot_id: str) -> None:
        self.store = store
        self.encryption = encryption
        self.snapshot_id = snapshot_id
        self.blob_id = encryption.blob_id if encryption else blob_hash
        self.reads = 0  # ranged reads made (the benchmark's and the tests' measure)
        self.bytes_read = 0  # and the bytes they brought
        self._used = 0  # bytes of the listings asked for
        self._sizes: dict[str, int] = {}
        self._windows: dict[str, tuple[int, bytes]] = {}  # pack -> (offset, bytes) of its last ranged read

    def __call__(self, path: str, refs: list[t.ChunkRef]) -> bytes:
        parts = []
        for ref in refs:
            key = pack_key(ref.pack)
            stored = self._stored(path, ref)
            try:
                raw = decode_blob(ref, stored, self.encryption)
            except (BlobUndecodable, EncryptionError) as e:
                raise SnapshotCorrupt(self.snapshot_id, path, key, f"holds a folder listing that {e}") from None
            if len(raw) != ref.raw_length or self.blob_id(raw) != ref.blob:
                raise SnapshotCorrupt(
                    self.snapshot_id,
                    path,
                    key,
                    f"is corrupt: folder listing blob {ref.blob[:16]}... fails its hash check",
                )
            parts.append(bytes(raw))
        return b"".join(parts)

    def _stored(self, path: str, ref: t.ChunkRef) -> bytes:
        self._used += ref.length
        window = self._windows.get(ref.pack)
        if window is not None and window[0] <= ref.offset and ref.offset + ref.length <= window[0] + len(window[1]):
            at = ref.offset - window[0]
            return window[1][at : at + ref.length]
        key = pack_key(ref.pack)
        try:
            size = self._sizes.get(ref.pack)
            if size is None:
                size = self._sizes[ref.pack] = self.store.stat(key).size
            if ref.offset + ref.length > size:
                raise SnapshotCorrupt(
                    self.snapshot_id, path, key, "is shorter than this folder's listing reference says"
                )
            # Read ahead while read-ahead pays: listings stored in reverse of the walk's order (crafted) would
            # otherwise make every tiny listing a download of a whole window.
            ahead = WINDOW_BYTES if self.bytes_read <= 2 * self._used + WINDOW_BYTES else 0
            end = min(ref.offset + max(ref.length, ahead), size)
            self.reads += 1
            data = self.store.get_range(key, ref.offset, end - ref.offset)
            self.bytes_read += len(data)
        except ObjectMissing:
            raise SnapshotCorrupt(self.snapshot_id, path, key, "is missing (it holds this folder's listing)") from None
        self._windows.pop(ref.pack, None)
        self._windows[ref.pack] = (ref.offset, data)
        while len(self._windows) > _WINDOWS:
            self._windows.pop(next(iter(self._windows)))
        return data[: ref.length]


def _body_and_footer(data: bytes) -> tuple[bytes, bytes]:
    """A listing's lines (each ending in a newline) and its last line, the footer."""
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]


def _lines(body: bytes) -> Iterator[tuple[int, bytes]]:
    """Each line of a listing body with where it starts, without copying the body into a list."""
    at = 0
    while at < len(body):
        end = body.index(b"\n", at)
        yield at, body[at:end]
        at = end + 1


def _parse_listed(snapshot_id: str, line: bytes) -> tuple[t.Entry, list[t.ChunkRef] | None, bytes]:
    """One line of a listing: its entry, its folder's listing references if it names one, and its flat line."""
    try:
        d = json.loads(line.decode("utf-8", "surrogateescape"))
    except ValueError:
        raise UnsafeTree(snapshot_id, "", "has a line that is not JSON") from None
    if not isinstance(d, dict) or "x" not in d:
        return t.entry_from_dict(snapshot_id, d), None, line
    x = d.pop("x")
    named = d.get("p")
    path = named if isinstance(named, str) else ""
    if not (isinstance(x, list) and x and all(t.is_chunk_json(c) for c in x)):
        raise UnsafeTree(snapshot_id, path, "names its folder's listing with malformed references")
    tail = b',"x":' + json.dumps(x, separators=(",", ":")).encode() + b"}"
    if not line.endswith(tail):
        raise UnsafeTree(snapshot_id, path, "names its folder's listing in a form no writer makes")
    flat = line[: -len(tail)] + b"}"
    try:
        again = json.loads(flat.decode("utf-8", "surrogateescape"))
    except ValueError:
        raise UnsafeTree(snapshot_id, path, "names its folder's listing in a form no writer makes") from None
    if again != d:  # a second "x", or anything else the cut changed
        raise UnsafeTree(snapshot_id, path, "names its folder's listing in a form no writer makes")
    refs = [t.ChunkRef(*c) for c in x]
    for ref in refs:
        t.check_chunk(snapshot_id, path, ref)
    return t.entry_from_dict(snapshot_id, d), refs, flat


def _root_footer(snapshot_id: str, line: bytes) -> dict[str, object]:
    try:
        footer = json.loads(line)
    except ValueError:
        footer = None
    if not (
        isinstance(footer, dict)
        and footer.get("format") == FORMAT
        and type(footer.get("entries")) is int
        and type(footer.get("bytes")) is int
        and isinstance(footer.get("digest"), str)
        and isinstance(footer.get("selection"), dict)
    ):
        raise UnsafeTree(snapshot_id, "", f"the root object has no valid {FORMAT} footer")
    return footer


def assemble(snapshot_id: str, root: bytes, fetch: Fetch, out: BinaryIO) -> FolderRefs:
    """Write the flat tree (tardigrade-tree/1 lines and footer) of snapshot ``snapshot_id`` to ``out``, from its
    root object ``root`` (already checked against the id) and ``fetch`` (a `ListingReader`). Returns every
    folder's references. Raises `UnsafeTree` (or the reader's `SnapshotCorrupt`) on anything a writer of this
    format cannot have produced. Each listing is checked whole before any listing it names is read. Memory: the
    listings of the folders the walk is inside of, as bytes (at most `MAX_LISTING` together), and their
    subfolders' lines, never a parsed object per line (a crafted listing of tiny lines would be ten times its
    size as those)."""
    root_body, last = _body_and_footer(root)
    footer = _root_footer(snapshot_id, last)
    expected = footer["entries"]
    assert isinstance(expected, int)
    folders: FolderRefs = {}
    seen: set[str] = set()
    count = 0

    def opened(folder: str, body: bytes, depth: int) -> _Opened:
        nonlocal count
        listed = _Opened(body)
        for at, line in _lines(body):
            count += 1
            if count > expected:
                raise UnsafeTree(snapshot_id, "", f"the folders list more than the {expected} entries the footer says")
            entry, refs, flat = _parse_listed(snapshot_id, line)
            path = entry.path
            t.check_path(snapshot_id, path)
            if path.rpartition("/")[0] != folder:
                raise UnsafeTree(snapshot_id, path[:200], f"is listed in the listing of folder {folder!r}")
            if entry.kind != t.DIR and refs is not None:
                raise UnsafeTree(snapshot_id, path[:200], "is not a folder but names a folder listing")
            if entry.kind == t.DIR:
                if refs is None:
                    raise UnsafeTree(snapshot_id, path[:200], "is a folder without its listing")
                if depth + 1 > MAX_DEPTH:
                    raise UnsafeTree(snapshot_id, path[:200], f"is nested deeper than {MAX_DEPTH} folders")
                if sum(r.raw_length for r in refs) > MAX_LISTING:
                    raise UnsafeTree(snapshot_id, path[:200], f"has a listing larger than {MAX_LISTING} bytes")
                if any(r.raw_length > max(LISTING_INFLATE_FLOOR, LISTING_INFLATE_RATIO * r.length) for r in refs):
                    raise UnsafeTree(
                        snapshot_id, path[:200], f"has a listing that inflates over {LISTING_INFLATE_RATIO} times"
                    )
                for ref in refs:
                    if ref.blob in seen:
                        raise UnsafeTree(
                            snapshot_id, path[:200], "names a listing blob already used (a tree is no graph)"
                        )
                    seen.add(ref.blob)
                listed.folders[at] = (path, refs, flat)
        return listed

    stack = [opened("", root_body, 0)]  # depth first: the folders the walk is in, each with what it has left
    held = len(root_body)
    while stack:
        top = stack[-1]
        if top.next >= len(top.body):
            held -= len(top.body)
            stack.pop()
            continue
        at = top.next
        top.next = top.body.index(b"\n", at) + 1
        child = top.folders.pop(at, None)
        if child is None:
            out.write(top.body[at : top.next])  # no "x": the flat line as listed
            continue
        path, refs, flat = child
        out.write(flat + b"\n")
        size = sum(r.raw_length for r in refs)
        if held + size > MAX_LISTING:
            raise UnsafeTree(
                snapshot_id, path[:200], f"has a listing that, with those of its folders, is over {MAX_LISTING} bytes"
            )
        body, child_footer = _body_and_footer(fetch(path, refs))
        if child_footer != folder_footer(path):
            raise UnsafeTree(snapshot_id, path[:200], "names the listing of another folder (or none)")
        folders[path] = refs
        stack.append(opened(path, body, len(stack)))
        held += len(body)
    if count != expected:
        raise UnsafeTree(snapshot_id, "", f"the folders list {count} entries but the footer says {expected}")
    selection = footer["selection"]
    total, digest = footer["bytes"], footer["digest"]
    assert isinstance(selection, dict) and isinstance(total, int) and isinstance(digest, str)
    out.write(t.footer(expected, total, digest, selection))
    return folders


@dataclass
class _Opened:
    """A listing being walked: its lines as bytes, where its next line starts, and its subfolders' lines by where
    they start: (path, listing references, flat line)."""

    body: bytes
    folders: dict[int, tuple[str, list[t.ChunkRef], bytes]] = field(default_factory=dict)
    next: int = 0


def read_folder_refs(path: Path, snapshot_id: str) -> FolderRefs:
    """The folder references of tree ``snapshot_id`` kept next to its cached flat tree (by `write_folder_refs`).
    Raises ``FileNotFoundError``, or ``ValueError`` for a file cut short, damaged or written for another tree:
    a spliced child names these listings unread and GC keeps only their packs, so a wrong one would make a wrong
    checkpoint or lose a kept snapshot's listings."""
    data = path.read_bytes()
    body, _, check = data.rpartition(b"\n")
    if not body or blake3.blake3(body).hexdigest().encode() != check:
        raise ValueError(f"{path} is damaged (it fails its check hash)")
    try:
        parsed = json.loads(body)
        if parsed["tree"] != snapshot_id:
            raise ValueError(f"{path} holds the folder listings of another tree ({str(parsed['tree'])[:16]}...)")
        return {p: [t.ChunkRef(*c) for c in refs] for p, refs in parsed["folders"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is malformed ({e!r})") from None


def write_folder_refs(path: Path, snapshot_id: str, folders: FolderRefs) -> None:
    """Write the folder references of tree ``snapshot_id``: JSON naming the tree, then a line with its BLAKE3."""
    body = json.dumps(
        {"tree": snapshot_id, "folders": {p: [list(r) for r in refs] for p, refs in folders.items()}},
        separators=(",", ":"),
    ).encode()
    path.write_bytes(body + b"\n" + blake3.blake3(body).hexdigest().encode())
