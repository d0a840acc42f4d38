"""Garbage collection: delete what no kept snapshot needs, safely while other processes write snapshots.

Plain mark-and-sweep is not safe here: a snapshot being written may be about to reference an old pack (dedupe)
that the sweep sees as unreferenced. So deletion takes two GC runs, separated by a grace period:

1. A GC run decides which snapshots to keep, marks the packs their trees reference (file contents, and the folder
   listings a tardigrade-tree/2 tree is stored as: snapshots/merkle.py), deletes the records of the
   snapshots it drops, and *condemns* (does not delete) every unmarked pack older than the grace period, and the
   dropped trees, by writing an epoch object ``gc/condemned/<epoch>``.
2. Writers read the epochs when a snapshot starts, and never reuse a condemned pack or tree: they store the
   blob again instead.
3. A later GC run, once an epoch is older than the grace period, marks again and deletes the epoch's packs that
   are *still* unreferenced (a writer that reused one before it saw the epoch has finished by then, and its
   snapshot is marked), and trees whose record was not re-created. The epoch becomes ``gc/deleted/<epoch>``,
   which tells every worker to drop those packs from its dedupe index.

The only assumption: a snapshot finishes within the grace period (default one day). Packs younger than the
grace period are never condemned, so a snapshot in progress cannot lose the packs it just wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tardigrade.sandboxes.errors import SnapshotError
from tardigrade.sandboxes.store_keys import (
    GC_CONDEMNED,
    GC_DELETED,
    GC_LOCK,
    PACKS,
    RECORDS,
    index_key,
    pack_key,
    record_key,
    tree_key,
)
from tardigrade.sandboxes.stores.base import ObjectMissing, ObjectStore

DEFAULT_GRACE = 24 * 3600.0
DELETED_RECORD_TTL = 30 * 24 * 3600.0  # workers that have not synced for longer rebuild their caches
LOCK_TTL = 6 * 3600.0


class GcError(Exception):
    pass


@dataclass(frozen=True)
class Epoch:
    """One GC run's verdict: packs and trees condemned at ``created`` (GC's clock)."""

    id: str
    created: float
    packs: frozenset[str]
    trees: frozenset[str]
    deleted: bool  # the packs are gone (a gc/deleted/ record), not just condemned

    @property
    def key(self) -> str:
        return f"{GC_DELETED if self.deleted else GC_CONDEMNED}{self.id}"

    def to_json(self) -> bytes:
        return json.dumps({"created": self.created, "packs": sorted(self.packs), "trees": sorted(self.trees)}).encode()


def load_epochs(store: ObjectStore, cache: dict[str, Epoch] | None = None) -> list[Epoch]:
    """Every epoch in the store, oldest first. Epoch objects are immutable, so ``cache`` saves re-reading them."""
    epochs = []
    for prefix, deleted in ((GC_CONDEMNED, False), (GC_DELETED, True)):
        for info in store.list(prefix):
            cache_key = info.key
            if cache is not None and cache_key in cache:
                epochs.append(cache[cache_key])
                continue
            try:
                data = json.loads(store.get(info.key))
            except ObjectMissing:
                continue
            epoch = Epoch(
                info.key[len(prefix) :], data["created"], frozenset(data["packs"]), frozenset(data["trees"]), deleted
            )
            if cache is not None:
                cache[cache_key] = epoch
            epochs.append(epoch)
    return sorted(epochs, key=lambda e: e.created)


@dataclass
class GcPolicy:
    keep_last: int = 10  # per pipeline (label "pipeline"); seeds and unlabeled snapshots are groups of their own
    keep_within: float = 7 * 24 * 3600.0  # keep everything this recent, whatever keep_last says
    grace: float = DEFAULT_GRACE
    keep_ids: frozenset[str] = frozenset()  # snapshots to keep whatever the rules say
    #: What live runs still reference (last snapshot, seed). Asked *after* the snapshots are listed, so a
    #: checkpoint written meanwhile is either not listed (so not dropped) or reported live (so kept).
    live: Callable[[], Iterable[str]] | None = None
    dry_run: bool = False


@dataclass
class GcReport:
    snapshots_total: int = 0
    snapshots_kept: int = 0
    records_deleted: list[str] = field(default_factory=list)
    packs_condemned: int = 0
    trees_condemned: int = 0
    packs_deleted: int = 0
    trees_deleted: int = 0
    bytes_deleted: int = 0
    missing_trees: list[str] = field(default_factory=list)  # kept snapshots whose tree is already gone
    live_kept: int = 0

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _group(labels: dict[str, str]) -> tuple[str, bool]:
    return labels.get("pipeline", ""), "seed" in labels


def choose_kept(records: list[dict[str, Any]], policy: GcPolicy, now: float) -> set[str]:
    kept: set[str] = set()
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(_group(record.get("labels") or {}), []).append(record)
        if record["created_at"] >= now - policy.keep_within or record["id"] in policy.keep_ids:
            kept.add(record["id"])
    for members in groups.values():
        members.sort(key=lambda r: r["created_at"], reverse=True)
        kept.update(r["id"] for r in members[: policy.keep_last])
    return kept


class _Lease:
    """A best-effort lock so two GC runs do not interleave (writers never need it)."""

    def __init__(self, store: ObjectStore, now: float) -> None:
        self.store = store
        self.token = uuid.uuid4().hex
        body = json.dumps({"token": self.token, "expires": now + LOCK_TTL}).encode()
        if not store.put(GC_LOCK, body):
            try:
                held = json.loads(store.get(GC_LOCK))
            except ObjectMissing:
                held = {"expires": 0}
            if held.get("expires", 0) > now:
                raise GcError(
                    f"another garbage collection holds {GC_LOCK} in {store.url} until "
                    f"{time.ctime(held['expires'])}; if it died, delete that object"
                )
            store.delete(GC_LOCK)  # expired: its owner died
            if not store.put(GC_LOCK, body):
                raise GcError("another garbage collection started at the same moment; try again")

    def release(self) -> None:
        try:
            if json.loads(self.store.get(GC_LOCK)).get("token") == self.token:
                self.store.delete(GC_LOCK)
        except ObjectMissing:
            pass


def collect_garbage(
    store: ObjectStore,
    policy: GcPolicy,
    *,
    tree_packs: Callable[[str], Iterable[str]],
    now: float | None = None,
) -> GcReport:
    """One GC run (see the module docstring). ``tree_packs(snapshot_id)`` yields the packs a tree references
    and raises `SnapshotMissing` if the tree is gone."""
    now = time.time() if now is None else now
    report = GcReport()
    lease = None if policy.dry_run else _Lease(store, now)
    try:
        records = []
        for info in store.list(RECORDS):
            try:
                records.append(json.loads(store.get(info.key)))
            except (ObjectMissing, ValueError):
                continue
        report.snapshots_total = len(records)
        if policy.live is not None:
            live = frozenset(policy.live())
            report.live_kept = len(live)
            policy = dataclasses.replace(policy, keep_ids=policy.keep_ids | live)
        kept = choose_kept(records, policy, now)
        report.snapshots_kept = len(kept)

        marked: set[str] = set()
        for snapshot_id in kept:
            try:
                marked.update(tree_packs(snapshot_id))
            except SnapshotError:
                report.missing_trees.append(snapshot_id)

        epochs = load_epochs(store)
        pending_packs: set[str] = set()
        for epoch in epochs:
            if epoch.deleted:
                if epoch.created < now - DELETED_RECORD_TTL and not policy.dry_run:
                    store.delete(epoch.key)
                continue
            if epoch.created > now - policy.grace:
                pending_packs |= epoch.packs  # condemned recently: writers may not all have seen it yet
                continue
            _sweep(store, epoch, marked, kept, report, policy.dry_run)

        # Condemn what nothing kept references (and is old enough not to be a snapshot in progress).
        dropped = [r["id"] for r in records if r["id"] not in kept]
        condemned_packs = set()
        for info in store.list(PACKS):
            pack = info.key.rsplit("/", 1)[-1]
            if pack not in marked and pack not in pending_packs and info.modified < now - policy.grace:
                condemned_packs.add(pack)
        if not policy.dry_run:
            for snapshot_id in dropped:
                store.delete(f"snapshots/{snapshot_id}")
        report.records_deleted = dropped
        report.packs_condemned = len(condemned_packs)
        report.trees_condemned = len(dropped)
        if (condemned_packs or dropped) and not policy.dry_run:
            epoch = Epoch(
                f"{int(now * 1000):015d}-{uuid.uuid4().hex[:8]}",
                now,
                frozenset(condemned_packs),
                frozenset(dropped),
                deleted=False,
            )
            store.put(epoch.key, epoch.to_json())
    finally:
        if lease is not None:
            lease.release()
    return report


def _sweep(store: ObjectStore, epoch: Epoch, marked: set[str], kept: set[str], report: GcReport, dry: bool) -> None:
    """Delete what an old-enough epoch condemned and nothing references now; turn it into a deleted record."""
    gone = set()
    for pack in epoch.packs:
        if pack in marked:
            continue  # a snapshot written since references it again: it lives
        with contextlib.suppress(ObjectMissing):
            report.bytes_deleted += store.stat(pack_key(pack)).size
        if not dry:
            store.delete(index_key(pack))  # first, so nobody finds the pack for dedupe any more
            store.delete(pack_key(pack))
        gone.add(pack)
    report.packs_deleted += len(gone)
    for tree in epoch.trees:
        if tree in kept or store.exists(record_key(tree)):
            continue  # its record was re-created (an unchanged workspace snapshotted again)
        if not dry:
            store.delete(tree_key(tree))
        report.trees_deleted += 1
    if not dry:
        done = Epoch(epoch.id, epoch.created, frozenset(gone), epoch.trees, deleted=True)
        store.put(done.key, done.to_json())
        store.delete(epoch.key)
