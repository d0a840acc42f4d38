"""Which blobs a store already holds: a worker-local SQLite cache of the store's ``index/`` objects.

Dedupe across snapshots, runs and pipelines needs to know, for a blob hash, which pack holds it. Asking the store
each time would mean listing the bucket per snapshot; instead each worker keeps this cache, adds the packs it
writes itself, and loads other writers' index objects at most every `REFRESH_SECONDS` (one LIST of ``index/``
plus one GET per pack it has not seen). Each index object is checked against the pack name it claims (a pack is
named by the hash of its index), so a corrupt or forged index cannot make a snapshot point at the wrong bytes.

A miss only costs storing a blob again. Packs that garbage collection has condemned are never handed out.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from tardigrade.sandboxes.snapshots.gc import Epoch
from tardigrade.sandboxes.snapshots.packs import blob_hash
from tardigrade.sandboxes.snapshots.tree import ChunkRef
from tardigrade.sandboxes.store_keys import INDEX
from tardigrade.sandboxes.stores.base import ObjectMissing, ObjectStore

REFRESH_SECONDS = 300.0
_LRU_LIMIT = 200_000


class BlobIndex:
    """Blob hash -> where it is stored. Thread-safe; one per store per worker."""

    def __init__(self, store: ObjectStore, path: Path | None, *, refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, ChunkRef] = OrderedDict()  # this process's own, newest last
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")  # a lost cache costs only dedupe
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS blobs (blob TEXT PRIMARY KEY, pack TEXT, offset INT, length INT,"
            " raw_length INT, codec INT)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS packs (pack TEXT PRIMARY KEY)")
        self._db.execute("CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs (pack)")
        self._db.execute("CREATE TABLE IF NOT EXISTS gc_epochs (id TEXT PRIMARY KEY)")
        self._refreshed = 0.0
        self.condemned: frozenset[str] = frozenset()

    # -- lookups ----------------------------------------------------------------------------------------------

    def get(self, blob: str) -> ChunkRef | None:
        with self._lock:
            ref = self._recent.get(blob)
            if ref is None:
                row = self._db.execute(
                    "SELECT blob, pack, offset, length, raw_length, codec FROM blobs WHERE blob = ?", (blob,)
                ).fetchone()
                ref = ChunkRef(*row) if row else None
            else:
                self._recent.move_to_end(blob)
        if ref is not None and ref.pack in self.condemned:
            return None  # about to be deleted: store the blob again rather than point at it
        return ref

    def add(self, ref: ChunkRef) -> None:
        """Remember a blob we just wrote (or saw referenced by a tree we trust)."""
        with self._lock:
            self._recent[ref.blob] = ref
            self._recent.move_to_end(ref.blob)
            if len(self._recent) > _LRU_LIMIT:
                self._recent.popitem(last=False)

    def add_pack(self, pack: str, refs: list[ChunkRef]) -> None:
        """Persist the blobs of a pack this process has durably stored."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?, ?)",
                [(r.blob, pack, r.offset, r.length, r.raw_length, r.codec) for r in refs],
            )
            self._db.execute("INSERT OR IGNORE INTO packs VALUES (?)", (pack,))
            self._db.execute("COMMIT")

    # -- keeping up with other writers ------------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> int:
        """Load index objects written by others since the last refresh. Returns how many packs were added."""
        if not force and time.monotonic() - self._refreshed < self.refresh_seconds:
            return 0
        self._refreshed = time.monotonic()
        with self._lock:
            known = {row[0] for row in self._db.execute("SELECT pack FROM packs")}
        added = 0
        for info in self.store.list(INDEX):
            pack = info.key.rsplit("/", 1)[-1]
            if pack in known:
                continue
            try:
                raw = self.store.get(info.key)
            except ObjectMissing:
                continue  # collected meanwhile
            if blob_hash(raw) != pack:
                continue  # not what it claims to be: never trust it for dedupe
            blobs = json.loads(raw)["blobs"]
            self.add_pack(pack, [ChunkRef(b[0], pack, b[1], b[2], b[3], b[4]) for b in blobs])
            added += 1
        return added

    def sync_gc(self, epochs: Iterable[Epoch]) -> None:
        """Never offer condemned packs; forget deleted ones for good."""
        condemned: set[str] = set()
        for epoch in epochs:
            if not epoch.deleted:
                condemned |= epoch.packs
                continue
            with self._lock:
                seen = self._db.execute("SELECT 1 FROM gc_epochs WHERE id = ?", (epoch.id,)).fetchone()
            if not seen:
                self.forget_packs(set(epoch.packs))
                with self._lock:
                    self._db.execute("INSERT OR IGNORE INTO gc_epochs VALUES (?)", (epoch.id,))
        self.condemned = frozenset(condemned)

    def forget_packs(self, packs: set[str]) -> None:
        """Drop packs that were deleted (after garbage collection)."""
        with self._lock:
            self._db.execute("BEGIN")
            for pack in packs:
                self._db.execute("DELETE FROM blobs WHERE pack = ?", (pack,))
                self._db.execute("DELETE FROM packs WHERE pack = ?", (pack,))
            self._db.execute("COMMIT")
            for blob in [b for b, r in self._recent.items() if r.pack in packs]:
                del self._recent[blob]

    def close(self) -> None:
        with self._lock:
            self._db.close()
