"""`SnapshotEngine`: create, restore, verify and list snapshots in one object store.

Its objects - packs of compressed blobs (file contents, and the folder listings of trees), pack indexes, tree
objects (a tardigrade-tree/2 root, merkle.py, or a flat tardigrade-tree/1 tree; the snapshot id is the hash of
the object) and small records for listing - are immutable and verified on read; where each lives is in
sandboxes/store_keys.py. A snapshot is usable once its tree object exists; it is written only after every pack
(contents and listings), and the record only after the tree. Trees are used in their flat form (tree.py), kept
per worker in a cache keyed by snapshot id, next to their folder listings' references and splice side file.
This module holds no Temporal code: activities and the CLI call it.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import blake3
import zstandard

from tardigrade.sandboxes.errors import SnapshotCorrupt, SnapshotError, SnapshotMissing
from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots import merkle
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.snapshots.create import CreateResult, CreateStats, create_snapshot
from tardigrade.sandboxes.snapshots.createbase import Published, Spliced
from tardigrade.sandboxes.snapshots.crypto import EncryptedStore, Encryption, EncryptionError, require_no_encryption
from tardigrade.sandboxes.snapshots.gc import Epoch, GcPolicy, GcReport, collect_garbage, load_epochs
from tardigrade.sandboxes.snapshots.hinted import check_changes
from tardigrade.sandboxes.snapshots.index import BlobIndex
from tardigrade.sandboxes.snapshots.packs import (
    MAX_WINDOW,
    BlobUndecodable,
    PackWriter,
    blob_hash,
    decode_blob,
    file_hash,
)
from tardigrade.sandboxes.snapshots.restore import RestoreStats, read_footer, restore_tree, tree_entries
from tardigrade.sandboxes.snapshots.splice import retarget_side
from tardigrade.sandboxes.store_keys import PACKS, RECORDS, index_key, pack_key, record_key, tree_key
from tardigrade.sandboxes.stores.base import ObjectMissing, ObjectStore
from tardigrade.sandboxes.stores.folder import FileStore
from tardigrade.sandboxes.stores.identity import ensure_identity

_ID = re.compile(r"^[0-9a-f]{64}$")
# The pack named by each chunk reference in a tree line: ["<blob>","<pack>",offset,...]. A quote inside a path is
# escaped (\"), so a path can never look like this.
_PACK_REF = re.compile(rb'\["[0-9a-f]{64}","([0-9a-f]{64})"')
_CREATE_ATTEMPTS = 3  # packs found missing are re-uploaded; more vanishing than this means something deletes them
_LIST_SHARD_AT = 8  # unconfirmed packs in one packs/xx/ folder from which one listing beats a HEAD each
_CHECK_THREADS = 16
_LIST_PAGE = 1000  # keys per listing request (S3, GCS and Azure alike)
_TREE_PACKS_LIMIT = 64
MERKLE_FROM_BYTES = 4 << 20  # flat trees from this size are stored as listings (tree/2): see merkle_from_bytes
log = logging.getLogger("tardigrade.snapshots")
_TREE_CACHE_LIMIT = 32
SIDE_SUFFIX = ".side"  # a cached tree's digest records (splice.py), next to it
# A cached tree's folder listings (merkle.py; empty for a flat tree), next to it: a cached tree is used only with
# it, since the packs of its listings are the tree's too (GC marks them, a reused tree needs them).
FOLDERS_SUFFIX = ".folders"
_PRUNE_SLACK = 8
_IN_MEMORY_TREE = 32 << 20  # trees up to this size are compressed in memory
# A stored tree may inflate to this many times its size (real trees: under 70x, folders-only ones with equal
# mtimes), or to the floor, whichever is more: a zstd bomb is cut off there instead of filling the disk.
_TREE_INFLATE_RATIO = 1024
_TREE_INFLATE_FLOOR = 64 << 20


@dataclass
class SnapshotInfo:
    """What a snapshot is, as recorded next to it (and returned by `create`)."""

    id: str
    digest: str
    parent: str | None = None
    created_at: float = 0.0
    entries: int = 0
    bytes: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    stats: CreateStats | None = None  # only on the result of `create`

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("stats")
        return d


@dataclass
class VerifyProblem:
    path: str | None
    key: str
    problem: str


@dataclass
class VerifyReport:
    snapshot_id: str
    files: int = 0
    blobs: int = 0
    packs: int = 0
    bytes: int = 0
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _last_line(path: Path) -> bytes:
    """A file's last line, read from its end (a footer: never more than a block)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 65536))
        return f.read().rsplit(b"\n", 1)[-1]


def check_snapshot_id(snapshot_id: str) -> str:
    if not _ID.match(snapshot_id):
        raise SnapshotError(f"{snapshot_id!r} is not a snapshot id (64 lowercase hex characters)")
    return snapshot_id


class _PacksVanished(Exception):
    """Packs a new tree would reference are not in the store (any more)."""

    def __init__(self, packs: set[str]) -> None:
        super().__init__(f"{len(packs)} pack(s) missing")
        self.packs = packs


def tree_packs(body: Path) -> set[str]:
    """Every pack an uncompressed tree references, read in blocks (a tree can be larger than memory allows)."""
    packs: set[bytes] = set()
    tail = b""
    with open(body, "rb") as f:
        while block := f.read(1 << 20):
            block = tail + block
            cut = block.rfind(b"\n") + 1  # only whole lines: a reference never spans two of them
            packs.update(_PACK_REF.findall(block, 0, cut))
            tail = block[cut:]
    packs.update(_PACK_REF.findall(tail))
    return {p.decode() for p in packs}


class SnapshotEngine:
    """Snapshots of folders in one store. Thread-safe; keep one per store for the life of a worker."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        scratch_dir: Path | None = None,
        encryption: Encryption | Literal["env"] | None = "env",
    ) -> None:
        """``encryption="env"`` (the default) encrypts when TARDIGRADE_ENCRYPTION_KEY is set (see crypto.py)."""
        self.encryption = Encryption.from_env() if encryption == "env" else encryption
        self.raw_store = store
        self.store: ObjectStore = EncryptedStore(store, self.encryption) if self.encryption else store
        self._own_scratch = scratch_dir is None  # a folder of our own making goes away with `close`
        self.scratch = Path(scratch_dir or tempfile.mkdtemp(prefix="tardigrade-scratch-"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._epochs: dict[str, Epoch] = {}  # garbage-collection epochs are immutable: read each once
        self._lock = threading.Lock()
        self._remembered = 0
        self._retired: list[BlobIndex] = []  # indexes of a store that went away, closed with the engine
        #: The form new trees are stored in: 2, a Merkle tree of folder listings in packs (merkle.py); 1, one flat
        #: object (what stores written before hold). Every form is read, whatever this says.
        self.tree_format = 2
        #: Flat trees smaller than this are stored as one tardigrade-tree/1 object even when `tree_format` is 2:
        #: below it a one-object tree costs less per checkpoint than the listings' packs (measured: 4 MiB is
        #: about 20,000 files), above it the listings on a change's path are what a one-file
        #: change writes. Tests set 0 to exercise tree/2 on small workspaces.
        self.merkle_from_bytes = MERKLE_FROM_BYTES
        #: Which store this is (stores/identity.py). Every cache below is keyed by it, never by the URL.
        self.identity = ensure_identity(self.raw_store)
        self._open_caches(self.identity)

    def _open_caches(self, identity: str) -> None:
        self.known = BlobIndex(self.store, self.scratch / f"blobs.sqlite-{identity}")
        self._trees = self.scratch / "trees" / identity
        self._trees.mkdir(parents=True, exist_ok=True)
        self._tree_packs: OrderedDict[str, frozenset[str]] = OrderedDict()  # snapshot id -> packs its tree uses

    def check_identity(self) -> str:
        """Read the store's identity again. If the store behind the URL changed (emptied, recreated, another
        endpoint), drop every cache of the old one and start empty: nothing it remembers is known to be here."""
        identity = ensure_identity(self.raw_store)
        with self._lock:
            old = self.identity
            if identity == old:
                return identity
            self._retired.append(self.known)  # a snapshot in progress may still hold it
            self.identity = identity
            old_trees = self._trees
            self._open_caches(identity)
        log.warning("store %s changed identity (%s -> %s): its local caches start over", self.store.url, old, identity)
        shutil.rmtree(old_trees, ignore_errors=True)
        for stale in self.scratch.glob(f"blobs.sqlite-{old}*"):
            stale.unlink(missing_ok=True)
        return identity

    def _stat_cache_owner(self, identity: str) -> str:
        """Whose stat cache a folder's is: this store, and the encryption key, if any. Its lines are reused in new
        trees as they are, so lines that name blobs encrypted with another key (or none) must never be."""
        return identity if self.encryption is None else f"{identity}/key-{self.encryption.key_id.hex()}"

    def close(self) -> None:
        """Release what the engine holds for its life: the blob index (a SQLite connection), the store's
        connections, and the scratch folder if the engine made it. Call once, when no snapshot is in progress."""
        self.known.close()
        for index in self._retired:
            index.close()
        self.store.close()
        if self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # -- create -----------------------------------------------------------------------------------------------

    def create(
        self,
        root: str | Path,
        *,
        selection: Selection | None = None,
        parent: str | None = None,
        cache_path: Path | None = None,
        labels: dict[str, str] | None = None,
        changes: ChangeSet | None = None,
    ) -> SnapshotInfo:
        """Snapshot ``root``. With a ``cache_path`` from the previous snapshot or restore, unchanged files are
        not read again. Returns the new snapshot (which may equal ``parent`` if nothing changed).

        With ``parent`` and ``changes`` (what the sandbox knows it changed since ``parent``, see changes.py), only
        the listed paths are looked at; everything else is taken from the parent's tree without a walk.

        The tree is published only when every pack it references was written by this snapshot or confirmed to be in
        the store since this snapshot began (after its identity check): packs that vanished - a deleted prefix, a
        lifecycle rule, an operator - are forgotten and their content uploaded again, so a snapshot reported as
        created can always be restored."""
        selection = selection or Selection.everything()
        if changes is not None:
            check_changes(changes)  # bad input is refused before anything is read
        for _ in range(_CREATE_ATTEMPTS):
            try:
                with self._parent_tree(parent if changes is not None else None) as parent_tree:
                    hint = (changes, parent_tree) if changes is not None and parent_tree is not None else None
                    result = self._create_once(str(root), selection, cache_path, hint)
                break
            except _PacksVanished as e:
                if not e.packs:
                    continue  # the store changed identity during the snapshot: again, against the new one
                self.known.vanish(e.packs)
                log.warning(
                    "%d pack(s) referenced for a snapshot of %s are missing from %s (e.g. %s); storing them again",
                    len(e.packs),
                    root,
                    self.store.url,
                    pack_key(min(e.packs)),
                )
        else:
            raise SnapshotError(
                f"packs keep vanishing from snapshot store {self.store.url} while {root} is snapshotted; is something"
                " deleting objects under this prefix (a lifecycle rule, another tool)?"
            )
        info = SnapshotInfo(
            id=result.snapshot_id,
            digest=result.digest,
            parent=parent,
            created_at=time.time(),
            entries=result.stats.entries,
            bytes=result.stats.bytes,
            labels=dict(labels or {}),
            stats=result.stats,
        )
        # The record comes last; an identical earlier snapshot keeps its record (and its labels).
        if result.stats.tree_written or not self.store.exists(record_key(info.id)):
            self.store.put_deferred(record_key(info.id), [json.dumps(info.record()).encode()])
        self.store.flush()  # the tree, then the record, each durable before it is visible
        return info

    @contextmanager
    def _parent_tree(self, parent: str | None) -> Iterator[tuple[str, Path] | None]:
        """The parent's verified tree, for a hinted snapshot; None (a full walk) if it cannot be had."""
        if parent is None:
            yield None
            return
        with ExitStack() as stack:
            try:
                path: Path | None = stack.enter_context(self.open_tree(parent))
            except (SnapshotMissing, SnapshotCorrupt) as e:
                log.warning("the parent of a hinted snapshot cannot be read, so the folder is walked whole: %s", e)
                path = None
            yield (parent, path) if path is not None else None

    def _create_once(
        self,
        root: str,
        selection: Selection,
        cache_path: Path | None,
        hint: tuple[ChangeSet, tuple[str, Path]] | None = None,
    ) -> CreateResult:
        since = time.monotonic()  # packs confirmed before this are checked again
        identity = self.check_identity()
        known = self.known
        epochs = load_epochs(self.store, self._epochs)
        known.sync_gc(epochs)
        known.refresh()

        def publish(
            flat_id: str, body: Path, side: tuple[Path, frozenset[str]] | None, spliced: Spliced | None
        ) -> Published:
            """Store the folder listings of the flat tree ``body`` (tardigrade-tree/2), then queue the root object
            once every pack the tree names is known to be in the store; `create` flushes it together with the
            record (packs were flushed before). ``side``: the body's side file and packs, if it has one;
            ``spliced``: where a spliced body can differ from its parent, whose untouched listings are reused."""
            packs = set(side[1]) if side is not None else tree_packs(body)
            root = body.with_name(body.name + ".root")
            try:
                if self.tree_format == 1 or body.stat().st_size < self.merkle_from_bytes:
                    snapshot_id, tree_object, folders, blobs, stored, deduped = flat_id, body, {}, 0, 0, 0
                else:
                    reusable = self._reusable_listings(spliced[0]) if spliced is not None else None
                    writer = PackWriter(self.store, known, encryption=self.encryption)
                    try:
                        if spliced is not None and reusable:
                            folders = merkle.split_changed(body, reusable, spliced[1], writer, root)
                        else:
                            folders = merkle.split(body, writer, root)
                    finally:
                        writer.close()
                    snapshot_id, tree_object = file_hash(root), root
                    blobs, stored = writer.stats.blobs_new, writer.stats.bytes_stored
                    deduped = writer.stats.blobs_reused
                    packs |= {ref.pack for refs in folders.values() for ref in refs}
                self._require_packs(known, packs, since)
                if self.identity != identity:
                    raise _PacksVanished(set())  # the store changed under this snapshot: start over against it
                written = False
                if not self.store.exists(tree_key(snapshot_id)):
                    self._put_tree(snapshot_id, tree_object)
                    written = True
                if side is not None and snapshot_id != flat_id and not retarget_side(side[0], snapshot_id):
                    side = None
                self._remember_tree(snapshot_id, body, packs, side[0] if side is not None else None, folders)
            finally:
                root.unlink(missing_ok=True)
            return Published(snapshot_id, written, blobs, stored, deduped)

        def tree_usable(snapshot_id: str) -> bool:
            """The unchanged workspace's last tree may be reused: it and every pack it names are in the store."""
            if not self.store.exists(tree_key(snapshot_id)):
                return False
            try:
                packs = self._packs_of(snapshot_id)
                self._require_packs(known, packs, since)
            except _PacksVanished as e:
                known.vanish(e.packs)
                return False
            except SnapshotError as e:
                log.warning("the last snapshot's tree cannot be reused: %s", e)
                return False
            # A condemned pack (of a folder listing, say) may be deleted any moment: store the tree anew.
            return packs.isdisjoint(known.condemned)

        return create_snapshot(
            self.store,
            root,
            selection=selection,
            known=known,
            cache_path=cache_path,
            scratch=self.scratch,
            publish=publish,
            tree_exists=tree_usable,
            gc_epochs=epochs,
            encryption=self.encryption,
            store_id=self._stat_cache_owner(identity),
            avoid_packs=frozenset(known.vanished),
            changes=hint[0] if hint else None,
            parent=hint[1] if hint else None,
            parent_side=self._trees / f"{hint[1][0]}{SIDE_SUFFIX}" if hint else None,
            trees_dir=self._trees,
        )

    def _require_packs(self, known: BlobIndex, packs: set[str] | frozenset[str], since: float) -> None:
        """Raise `_PacksVanished` unless every pack is known to be in the store at some moment after ``since``.
        Packs this process wrote or checked since then cost nothing; the rest are checked in one batch."""
        todo = known.unconfirmed(packs, since)
        if not todo:
            return
        present = self._present(todo)
        known.confirm(present)
        if todo - present:
            raise _PacksVanished(todo - present)

    def _present(self, packs: set[str]) -> set[str]:
        """Which of these packs the store holds, in the fewest requests: one listing of packs/ when that takes
        fewer pages than there are packs to check (a store of up to 1,000 packs: one request), else a HEAD each or
        one listing of a packs/xx/ folder where many fall into it; in parallel on object stores."""
        if isinstance(self.raw_store, FileStore):
            return {pack for pack in packs if self.store.exists(pack_key(pack))}
        if len(packs) > 2 * (self.known.pack_count() // _LIST_PAGE + 1):
            return {info.key.rsplit("/", 1)[-1] for info in self.store.list(PACKS)} & packs
        shards: dict[str, list[str]] = {}
        for pack in packs:
            shards.setdefault(pack[:2], []).append(pack)
        checks: list[list[str]] = []
        for members in shards.values():
            if len(members) >= _LIST_SHARD_AT:
                checks.append(members)
            else:
                checks += [[pack] for pack in members]

        def check(group: list[str]) -> set[str]:
            if len(group) == 1:
                return set(group) if self.store.exists(pack_key(group[0])) else set()
            listed = {info.key.rsplit("/", 1)[-1] for info in self.store.list(f"{PACKS}{group[0][:2]}/")}
            return listed.intersection(group)

        if len(checks) == 1:
            return check(checks[0])
        with ThreadPoolExecutor(min(_CHECK_THREADS, len(checks)), thread_name_prefix="pack-check") as pool:
            return set().union(*pool.map(check, checks))

    def _packs_of(self, snapshot_id: str) -> frozenset[str]:
        """Every pack the snapshot needs: its files' and its folder listings'."""
        with self._lock:
            packs = self._tree_packs.get(snapshot_id)
        if packs is None:
            with self.open_tree(snapshot_id) as path:
                files = tree_packs(path)
            listings = {ref.pack for refs in self.folders_of(snapshot_id).values() for ref in refs}
            packs = self._note_packs(snapshot_id, files | listings)
        return packs

    def _reusable_listings(self, parent: str) -> merkle.FolderRefs | None:
        """The parent's folder listings, if a spliced child may name them without looking: none in a pack that
        garbage collection condemned or that was found missing (those are stored again, under new packs)."""
        try:
            folders = self.folders_of(parent)
        except SnapshotError as e:
            log.info("the listings of %s are not reused: %s", parent, e)
            return None
        avoid = self.known.condemned | self.known.vanished
        if any(ref.pack in avoid for refs in folders.values() for ref in refs):
            return None
        return folders

    def folders_of(self, snapshot_id: str) -> merkle.FolderRefs:
        """The folder listings of the snapshot's tree as stored (none for a flat tardigrade-tree/1 tree), from the
        file kept next to its cached tree; read from the store if that is gone or fails its checks."""
        companion = self._trees / f"{snapshot_id}{FOLDERS_SUFFIX}"
        for _ in range(2):
            try:
                return merkle.read_folder_refs(companion, snapshot_id)
            except FileNotFoundError:
                (self._trees / snapshot_id).unlink(missing_ok=True)  # pruned meanwhile: fetch both again
            except ValueError as e:  # cut short (a full disk), damaged, another tree's: the store's root says
                log.warning("the cached folder listings of %s are read again from the store: %s", snapshot_id, e)
                companion.unlink(missing_ok=True)
                (self._trees / snapshot_id).unlink(missing_ok=True)
            with self.open_tree(snapshot_id):
                pass
        raise SnapshotError(f"the folder listings of cached tree {snapshot_id} keep vanishing from {self._trees}")

    def _note_packs(self, snapshot_id: str, packs: set[str] | frozenset[str]) -> frozenset[str]:
        frozen = frozenset(packs)
        with self._lock:
            self._tree_packs[snapshot_id] = frozen
            self._tree_packs.move_to_end(snapshot_id)
            while len(self._tree_packs) > _TREE_PACKS_LIMIT:
                self._tree_packs.popitem(last=False)
        return frozen

    def _put_tree(self, snapshot_id: str, body: Path) -> None:
        """Store a tree object: a flat tree, or a tardigrade-tree/2 root (merkle.py)."""
        if body.stat().st_size <= _IN_MEMORY_TREE:
            packed = zstandard.ZstdCompressor(level=1).compress(body.read_bytes())
            self.store.put_deferred(tree_key(snapshot_id), [packed])
            return
        compressed = body.with_suffix(".zst")  # large trees stream through a file, never whole in memory
        try:
            with open(body, "rb") as src, open(compressed, "wb") as dst:
                zstandard.ZstdCompressor(level=1).copy_stream(src, dst)
            self.store.put_file(tree_key(snapshot_id), compressed)
        finally:
            compressed.unlink(missing_ok=True)

    # -- trees ------------------------------------------------------------------------------------------------

    def _remember_tree(
        self,
        snapshot_id: str,
        body: Path,
        packs: set[str] | None = None,
        side: Path | None = None,
        folders: merkle.FolderRefs | None = None,
    ) -> None:
        """Keep a verified, uncompressed copy of recent trees (flat, whatever their stored form): rollbacks restore
        the same tree over and over. Its folder listings (``folders``, merkle.py) go next to it first, and its side
        file (splice.py), if given: the next hinted checkpoint splices both."""
        if packs is not None:
            self._note_packs(snapshot_id, packs)
        companion = self._trees / f"{snapshot_id}{FOLDERS_SUFFIX}"
        if folders is not None and not companion.exists():
            scratch = body.with_name(body.name + FOLDERS_SUFFIX)
            try:
                merkle.write_folder_refs(scratch, snapshot_id, folders)
                self._keep_file(scratch, companion)
            finally:
                scratch.unlink(missing_ok=True)
        if side is not None and not (self._trees / f"{snapshot_id}{SIDE_SUFFIX}").exists():
            self._keep_file(side, self._trees / f"{snapshot_id}{SIDE_SUFFIX}")
        target = self._trees / snapshot_id
        if target.exists():
            return
        self._keep_file(body, target)
        self._remembered += 1
        # Pruned on the first tree of each process too: a CLI call remembers one tree and exits, and counting to
        # 16 within one process would let its cache grow by a tree per call for ever.
        if self._remembered % 16 == 1:
            self._prune_trees()

    def _keep_file(self, source: Path, target: Path) -> None:
        tmp = self._trees / f".{target.name}.{os.getpid()}.{threading.get_ident()}"  # CLI processes share the folder
        try:
            os.link(source, tmp)  # the file is ours and immutable from here on: share it, do not copy it
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)

    def _prune_trees(self) -> None:
        """Keep the newest `_TREE_CACHE_LIMIT` cached trees, each with its side file. Other processes (CLI calls)
        prune the same folder at the same time: a tree gone between the listing and its stat is simply gone."""
        with os.scandir(self._trees) as listing:
            entries = list(listing)
        companions = (SIDE_SUFFIX, FOLDERS_SUFFIX)
        if sum(not e.name.endswith(companions) for e in entries) <= _TREE_CACHE_LIMIT + _PRUNE_SLACK:
            return  # each CLI call adds a tree: stat them all only every few calls, not on every one
        aged, sides = [], []
        for cached in entries:
            if cached.name.endswith(companions):
                sides.append(cached.name)
                continue
            try:
                aged.append((cached.stat(follow_symlinks=False).st_mtime, cached.name))
            except FileNotFoundError:
                continue
        aged.sort()
        for _, old in aged[:-_TREE_CACHE_LIMIT]:
            (self._trees / old).unlink(missing_ok=True)
        kept = {name for _, name in aged[-_TREE_CACHE_LIMIT:]}
        for side in sides:  # a side file (or folders file) outlives its tree by one prune at most
            if side.rpartition(".")[0] not in kept:
                (self._trees / side).unlink(missing_ok=True)

    @contextmanager
    def open_tree(self, snapshot_id: str) -> Iterator[Path]:
        """A verified, uncompressed copy of the snapshot's tree, in flat form whatever form it is stored in (a
        tardigrade-tree/2 tree is assembled from its folder listings, merkle.py). Raises `SnapshotMissing` /
        `SnapshotCorrupt` / `UnsafeTree`."""
        check_snapshot_id(snapshot_id)
        cached = self._trees / snapshot_id
        try:
            os.utime(cached)  # now the newest: pruning, here or in another process, takes older trees first
        except FileNotFoundError:
            pass
        else:
            if (self._trees / f"{snapshot_id}{FOLDERS_SUFFIX}").exists():
                yield cached
                return
        key = tree_key(snapshot_id)
        fd, name = tempfile.mkstemp(dir=self.scratch, prefix="fetch-")
        os.close(fd)
        compressed, body = Path(name), Path(name + ".tree")
        try:
            try:
                self.store.get_file(key, compressed)
            except ObjectMissing:
                raise SnapshotMissing(
                    snapshot_id,
                    self.store.url,
                    "its tree object is missing; was it garbage-collected, or written to another store?",
                ) from None
            if self.encryption is None:
                with open(compressed, "rb") as head:
                    require_no_encryption(head.read(16), f"the tree of snapshot {snapshot_id}")
            hasher = blake3.blake3()
            # Its hash can only be checked at the end: bound what a crafted tree can inflate to before then.
            limit = max(_TREE_INFLATE_FLOOR, _TREE_INFLATE_RATIO * compressed.stat().st_size)
            inflated = 0
            try:
                with open(compressed, "rb") as src, open(body, "wb") as dst:
                    reader = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_reader(src)
                    while block := reader.read(1 << 20):
                        inflated += len(block)
                        if inflated > limit:
                            raise SnapshotCorrupt(
                                snapshot_id, None, key, f"inflates past {limit} bytes (refused before its hash check)"
                            )
                        hasher.update(block)
                        dst.write(block)
            except zstandard.ZstdError as e:
                raise SnapshotCorrupt(snapshot_id, None, key, f"cannot be decompressed ({e})") from None
            if hasher.hexdigest() != snapshot_id:
                raise SnapshotCorrupt(snapshot_id, None, key, "does not match its hash (the tree is corrupt)")
            folders: merkle.FolderRefs = {}
            if merkle.is_root_footer(_last_line(body)):
                flat = Path(name + ".flat")
                try:
                    with open(flat, "wb") as out:
                        folders = merkle.assemble(
                            snapshot_id,
                            body.read_bytes(),  # the root folder's listing, bounded like any tree object
                            merkle.ListingReader(self.store, self.encryption, snapshot_id),
                            out,
                        )
                    os.replace(flat, body)
                finally:
                    flat.unlink(missing_ok=True)
            self._remember_tree(snapshot_id, body, folders=folders)
            yield body
        finally:
            compressed.unlink(missing_ok=True)
            body.unlink(missing_ok=True)

    def entries(self, snapshot_id: str) -> Iterator[t.Entry]:
        with self.open_tree(snapshot_id) as path:
            yield from tree_entries(path, snapshot_id)

    # -- restore ----------------------------------------------------------------------------------------------

    def restore(
        self,
        snapshot_id: str,
        root: str | Path,
        *,
        selection: Selection | None = None,
        cache_path: Path | None = None,
        changes: ChangeSet | None = None,
    ) -> RestoreStats:
        """Make ``root`` equal the snapshot within ``selection``: a full restore into an empty folder, or a
        rollback of a live one that rewrites only what differs. ``root`` is created if missing. ``changes``: the
        paths that may differ from the snapshot (the overlay knows them); only those are restored (restore.py)."""
        Path(root).mkdir(parents=True, exist_ok=True)
        identity = self.check_identity()
        with self.open_tree(snapshot_id) as tree_path:
            return restore_tree(
                self.store,
                snapshot_id,
                tree_path,
                str(root),
                selection=selection or Selection.everything(),
                cache_path=cache_path,
                scratch=self.scratch,
                encryption=self.encryption,
                store_id=self._stat_cache_owner(identity),
                changes=changes,
            )

    # -- inspection -------------------------------------------------------------------------------------------

    def info(self, snapshot_id: str) -> SnapshotInfo:
        check_snapshot_id(snapshot_id)
        try:
            record = self._record(record_key(snapshot_id))
        except ObjectMissing:
            if not self.store.exists(tree_key(snapshot_id)):
                raise SnapshotMissing(snapshot_id, self.store.url) from None
            with self.open_tree(snapshot_id) as path:
                footer = read_footer(path, snapshot_id)
            return SnapshotInfo(id=snapshot_id, digest=str(footer["digest"]))
        return SnapshotInfo(**record)

    def list(self) -> builtins.list[SnapshotInfo]:
        """All snapshot records, oldest first."""
        out = []
        for obj in self.store.list(RECORDS):
            try:
                out.append(SnapshotInfo(**self._record(obj.key)))
            except (ObjectMissing, ValueError, TypeError):
                continue  # deleted meanwhile, or not ours
        return sorted(out, key=lambda s: s.created_at)

    def _check_pack_index(
        self, pack: str, blobs: dict[str, tuple[t.ChunkRef, str]], size: int
    ) -> builtins.list[VerifyProblem]:
        """A pack is named by the hash of its index: check the index against the name, and the tree's references
        against the index (the blobs themselves are checked one by one against their own hashes)."""
        key = index_key(pack)
        try:
            index = self.store.get(key)
        except ObjectMissing:
            return [VerifyProblem(None, key, "is missing (the data is intact; later snapshots cannot reuse it)")]
        if blob_hash(index) != pack:
            return [VerifyProblem(None, key, "does not match its hash (the pack's name)")]
        try:
            listed = {b[0]: tuple(b[1:]) for b in json.loads(index)["blobs"]}
            if not all(len(v) == 4 and all(type(x) is int for x in v) for v in listed.values()):
                raise TypeError("not four numbers per blob")
        except (ValueError, KeyError, TypeError, IndexError):
            return [VerifyProblem(None, key, "is not a valid pack index")]
        problems = []
        for ref, file_path in blobs.values():
            if listed.get(ref.blob) != (ref.offset, ref.length, ref.raw_length, ref.codec):
                problems.append(
                    VerifyProblem(file_path, key, f"does not list blob {ref.blob[:16]}... as the tree says")
                )
        if any(offset + length > size for offset, length, *_ in listed.values()):
            problems.append(VerifyProblem(None, pack_key(pack), "is shorter than its index says (truncated?)"))
        return problems

    def collect_garbage(self, policy: GcPolicy, *, now: float | None = None) -> GcReport:
        """Delete what no kept snapshot needs, in two phases a grace period apart (see snapshots/gc.py)."""

        def tree_packs(snapshot_id: str) -> set[str]:
            packs: set[str] = set()
            for entry in self.entries(snapshot_id):
                packs.update(ref.pack for ref in entry.chunks)
            # A tardigrade-tree/2 tree's folder listings live in packs too (merkle.py): those are kept as well.
            packs.update(ref.pack for refs in self.folders_of(snapshot_id).values() for ref in refs)
            return packs

        return collect_garbage(self.store, policy, tree_packs=tree_packs, now=now)

    def _record(self, key: str) -> dict[str, Any]:
        data = self.store.get(key)
        if self.encryption is None:
            require_no_encryption(data, f"snapshot record {key}")
        record: dict[str, Any] = json.loads(data)
        return record

    def verify(self, snapshot_id: str) -> VerifyReport:
        """Read back every object the snapshot needs and check each against its hash. Reports all problems."""
        report = VerifyReport(snapshot_id)
        try:
            with self.open_tree(snapshot_id) as path:
                by_pack: dict[str, dict[str, tuple[t.ChunkRef, str]]] = {}
                for entry in tree_entries(path, snapshot_id):
                    if entry.kind != t.FILE:
                        continue
                    report.files += 1
                    report.bytes += entry.size
                    for ref in entry.chunks:
                        by_pack.setdefault(ref.pack, {}).setdefault(ref.blob, (ref, entry.path))
            for folder, refs in self.folders_of(snapshot_id).items():  # tardigrade-tree/2 listings, read again
                for ref in refs:
                    by_pack.setdefault(ref.pack, {}).setdefault(ref.blob, (ref, folder))
        except SnapshotError as e:
            key = getattr(e, "key", tree_key(snapshot_id))
            report.problems.append(VerifyProblem(None, key, str(e)))
            return report
        for pack, blobs in by_pack.items():
            report.packs += 1
            key = pack_key(pack)
            try:
                data = self.store.get(key)
            except ObjectMissing:
                first_path = next(iter(blobs.values()))[1]
                report.problems.append(VerifyProblem(first_path, key, "is missing"))
                continue
            report.problems += self._check_pack_index(pack, blobs, len(data))
            for ref, file_path in blobs.values():
                report.blobs += 1
                try:
                    raw = decode_blob(ref, memoryview(data)[ref.offset : ref.offset + ref.length], self.encryption)
                    blob_id = self.encryption.blob_id if self.encryption else blob_hash
                    ok = len(raw) == ref.raw_length and blob_id(raw) == ref.blob
                except (BlobUndecodable, EncryptionError):
                    ok = False
                if not ok:
                    report.problems.append(VerifyProblem(file_path, key, f"blob {ref.blob[:16]}... is corrupt"))
        return report
