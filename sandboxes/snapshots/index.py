"""Which blobs a store already holds: a worker-local SQLite cache of the store's ``index/`` objects.

Dedupe across snapshots, runs and pipelines needs to know, for a blob hash, which pack holds it. Asking the store
each time would mean listing the bucket per snapshot; instead each worker keeps this cache, adds the packs it
writes itself, and loads other writers' index objects at most every `REFRESH_SECONDS` (one LIST of ``index/``
plus one GET per pack it has not seen). Each index object is checked against the pack name it claims (a pack is
named by the hash of its index), so a corrupt or forged index cannot make a snapshot point at the wrong bytes.

A miss only costs storing a blob again. Packs that garbage collection has condemned are never handed out, nor
packs found missing from the store (`vanish`). The index belongs to one store *identity* (stores/identity.py), never
to a URL: the engine opens a fresh one when the store behind its URL changes.

It also remembers when each pack was last known to be in the store (`confirm`): written by this process, or seen by
an existence check. A snapshot's tree is published only when every pack it references was confirmed since the
snapshot began (see SnapshotEngine.create).
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
_CONFIRMED_LIMIT = 200_000


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
        # When this cache last loaded others' indexes, by the wall clock: a short-lived process (a CLI call) that
        # shares the cache with the one before it need not list the store's index/ again within the interval.
        self._db.execute("CREATE TABLE IF NOT EXISTS refreshed (at REAL)")
        row = self._db.execute("SELECT MAX(at) FROM refreshed").fetchone()
        age = time.time() - row[0] if row and row[0] is not None else None
        self._refreshed = time.monotonic() - age if age is not None and 0 <= age < refresh_seconds else 0.0
        # No row yet (a new store, a new worker): lookups skip SQLite, ~10 us a blob of a first snapshot.
        self._db_empty = self._db.execute("SELECT 1 FROM blobs LIMIT 1").fetchone() is None
        self.condemned: frozenset[str] = frozenset()
        self.vanished: set[str] = set()  # packs found missing from the store: never offered again
        self._confirmed: dict[str, float] = {}  # pack -> monotonic time it was last known to be in the store

    # -- lookups ----------------------------------------------------------------------------------------------

    def get(self, blob: str) -> ChunkRef | None:
        with self._lock:
            ref = self._recent.get(blob)
            if ref is not None:
                self._recent.move_to_end(blob)
            elif not self._db_empty:
                row = self._db.execute(
                    "SELECT blob, pack, offset, length, raw_length, codec FROM blobs WHERE blob = ?", (blob,)
                ).fetchone()
                ref = ChunkRef(*row) if row else None
        if ref is not None and (ref.pack in self.condemned or ref.pack in self.vanished):
            return None  # about to be deleted, or already gone: store the blob again rather than point at it
        return ref

    def add(self, ref: ChunkRef) -> None:
        """Remember a blob we just wrote (or saw referenced by a tree we trust)."""
        with self._lock:
            self._recent[ref.blob] = ref
            self._recent.move_to_end(ref.blob)
            if len(self._recent) > _LRU_LIMIT:
                self._recent.popitem(last=False)

    def add_pack(self, pack: str, refs: list[ChunkRef]) -> None:
        """Persist the blobs of a pack this process has durably stored (so it is in the store now)."""
        self._store_pack(pack, refs)
        self.confirm([pack])

    def _store_pack(self, pack: str, refs: list[ChunkRef]) -> None:
        with self._lock:
            self._db_empty = False
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
        started = time.time()
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
            self._store_pack(pack, [ChunkRef(b[0], pack, b[1], b[2], b[3], b[4]) for b in blobs])
            added += 1
        with self._lock:
            self._db.execute("DELETE FROM refreshed")
            self._db.execute("INSERT INTO refreshed VALUES (?)", (started,))
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

    def pack_count(self) -> int:
        """How many packs the index knows: about how many the store holds."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM packs").fetchone()
        return int(row[0])

    # -- what is in the store now -----------------------------------------------------------------------------

    def confirm(self, packs: Iterable[str]) -> None:
        """These packs are in the store as of now (just written, or just checked)."""
        now = time.monotonic()
        with self._lock:
            for pack in packs:
                self._confirmed[pack] = now
                self.vanished.discard(pack)  # stored again (same content, same name): usable again
            if len(self._confirmed) > _CONFIRMED_LIMIT:  # drop the oldest half: they only cost a re-check
                keep = sorted(self._confirmed.items(), key=lambda item: item[1])[len(self._confirmed) // 2 :]
                self._confirmed = dict(keep)

    def unconfirmed(self, packs: Iterable[str], since: float) -> set[str]:
        """The packs not known to be in the store at some moment after ``since`` (a `time.monotonic()` value)."""
        with self._lock:
            return {p for p in packs if self._confirmed.get(p, -1.0) < since}

    def vanish(self, packs: set[str]) -> None:
        """These packs are missing from the store: forget them and never offer their blobs again."""
        with self._lock:
            self.vanished |= packs
            for pack in packs:
                self._confirmed.pop(pack, None)
        self.forget_packs(packs)

    def close(self) -> None:
        with self._lock:
            self._db.close()
