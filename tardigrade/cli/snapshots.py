"""The snapshot tool: `tardigrade snapshot create|restore|ls|verify|gc|keygen`, straight against a store."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from tardigrade import config
from tardigrade.cli.output import UsageError, add_common, print_json

if TYPE_CHECKING:
    from tardigrade.sandboxes.snapshots import SnapshotEngine


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("snapshot", help="create, restore, list and verify snapshots directly")
    snap = p.add_subparsers(dest="snapshot_command", required=True)
    for name, help_text in [
        ("create", "snapshot a folder"),
        ("restore", "restore a snapshot into a folder"),
        ("ls", "list snapshots"),
        ("verify", "check every object of a snapshot"),
        ("gc", "delete what no kept snapshot needs (safe beside running pipelines)"),
        ("keygen", "print a new TARDIGRADE_ENCRYPTION_KEY for encryption at rest"),
    ]:
        sp = snap.add_parser(name, help=help_text)
        if name in ("restore", "verify"):
            sp.add_argument("snapshot_id")
        if name in ("create", "restore"):
            sp.add_argument("dir")
        if name == "keygen":
            sp.set_defaults(handler=cmd_snapshot, store=None)
            continue
        sp.add_argument("--store", default=config.default_store_url(), help="store URL (default: %(default)s)")
        if name == "create":
            sp.add_argument("--parent", help="the snapshot this one follows (recorded for people and GC)")
        if name == "restore":
            sp.add_argument(
                "--force", action="store_true", help="restore into a non-empty folder (its extra files are deleted)"
            )
        if name == "gc":
            sp.add_argument("--keep-last", type=int, default=10, help="per pipeline (default %(default)s)")
            sp.add_argument(
                "--keep-within", default="168h", help="also keep anything this recent (default %(default)s)"
            )
            sp.add_argument(
                "--grace",
                default="24h",
                help="how long condemned data waits before deletion; must"
                " exceed the longest snapshot (default %(default)s)",
            )
            sp.add_argument("--dry-run", action="store_true")
            sp.add_argument(
                "--no-live-check", action="store_true", help="do not ask Temporal which snapshots running pipelines use"
            )
            add_common(sp, as_json=False)
        add_common(sp, address=False)
        sp.set_defaults(handler=cmd_snapshot)


def _engine(store_url: str) -> SnapshotEngine:
    """An engine with a persistent cache folder, so repeated commands reuse the dedupe index and trees."""
    import blake3

    from tardigrade.sandboxes.snapshots import SnapshotEngine
    from tardigrade.sandboxes.stores import open_store

    store = open_store(store_url)
    scratch = config.state_dir() / "cli-cache" / blake3.blake3(store.url.encode()).hexdigest()[:16]
    return SnapshotEngine(store, scratch_dir=scratch)


async def _live_snapshots(address: str, store_url: str) -> set[str]:
    """The last snapshot and seed of every running pipeline that uses this store: GC must keep them."""
    from temporalio.client import Client

    from tardigrade.client import connect
    from tardigrade.workflows.pipeline import PipelineWorkflow
    from tardigrade.workflows.state import RunInput, RunStatus

    client: Client = await connect(address)
    keep: set[str] = set()
    query = "WorkflowType = 'TardigradePipeline' AND ExecutionStatus = 'Running'"
    async for execution in client.list_workflows(query):
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        async for event in handle.fetch_history_events():
            started = event.workflow_execution_started_event_attributes
            (run_input,) = await client.data_converter.decode(started.input.payloads, [RunInput])
            break
        if run_input.store != store_url:
            continue
        if run_input.seed_snapshot:
            keep.add(run_input.seed_snapshot)
        status: RunStatus = await handle.query(PipelineWorkflow.status)
        keep.update(record.snapshot_id for record in status.checkpoints[-1:])
        if status.last_snapshot:
            keep.add(status.last_snapshot.snapshot_id)
    return keep


async def _gc(engine: SnapshotEngine, args: argparse.Namespace) -> int:
    from tardigrade.devserver import resolve_address
    from tardigrade.pipeline import parse_duration
    from tardigrade.sandboxes.snapshots.gc import GcPolicy

    live = None
    if not args.no_live_check:
        address = resolve_address(args.address)
        if address is None:
            raise UsageError(
                "gc needs to see which snapshots running pipelines still use: pass --address (or set"
                " TEMPORAL_ADDRESS), or --no-live-check to rely on --keep-within alone"
            )
        loop = asyncio.get_running_loop()

        def live() -> set[str]:  # called by the collector from its thread, after it listed the snapshots
            return asyncio.run_coroutine_threadsafe(_live_snapshots(address, engine.store.url), loop).result()

    try:
        keep_within = parse_duration(args.keep_within, allow_zero=True)
        grace = parse_duration(args.grace, allow_zero=True)
    except ValueError as e:
        raise UsageError(f"--keep-within/--grace: {e}") from None
    policy = GcPolicy(keep_last=args.keep_last, keep_within=keep_within, grace=grace, live=live, dry_run=args.dry_run)
    report = await asyncio.to_thread(engine.collect_garbage, policy)
    if args.json:
        print_json(report.to_json())
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(
            f"kept {report.snapshots_kept} of {report.snapshots_total} snapshots"
            f" ({report.live_kept} in use by live runs)"
        )
        print(
            f"{verb} {len(report.records_deleted)} snapshot records; condemned {report.packs_condemned} packs and"
            f" {report.trees_condemned} trees (deleted by a gc run after --grace)"
        )
        print(f"{verb} {report.packs_deleted} packs and {report.trees_deleted} trees, {report.bytes_deleted} bytes")
        for snapshot_id in report.missing_trees:
            print(f"WARNING: kept snapshot {snapshot_id} has no tree in the store")
    return 0


async def cmd_snapshot(args: argparse.Namespace) -> int:
    if args.snapshot_command == "keygen":
        from tardigrade.sandboxes.snapshots.crypto import ENV_KEY, new_key

        print(f"export {ENV_KEY}={new_key()}")
        return 0
    engine = _engine(args.store)
    if args.snapshot_command == "create":
        return await _snapshot_create(engine, args)
    if args.snapshot_command == "restore":
        return await _snapshot_restore(engine, args)
    if args.snapshot_command == "ls":
        infos = await asyncio.to_thread(engine.list)
        if args.json:
            print_json([i.record() for i in infos])
            return 0
        for i in infos:
            labels = " ".join(f"{k}={v}" for k, v in sorted(i.labels.items()))
            print(f"{i.id}  {i.entries:>7} entries  {i.bytes:>12} bytes  {labels}")
        return 0
    if args.snapshot_command == "gc":
        return await _gc(engine, args)
    return await _snapshot_verify(engine, args)


async def _snapshot_create(engine: SnapshotEngine, args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder")
    info = await asyncio.to_thread(engine.create, root, parent=args.parent)
    stats = info.stats
    if not args.json:
        print(info.id)
        return 0
    print_json(
        {
            "snapshot_id": info.id,
            "digest": info.digest,
            "entries": info.entries,
            "bytes": info.bytes,
            "bytes_new": stats.bytes_new if stats else 0,
            "bytes_stored": stats.bytes_stored if stats else 0,
            "seconds": round(stats.seconds, 3) if stats else 0,
        }
    )
    return 0


async def _snapshot_restore(engine: SnapshotEngine, args: argparse.Namespace) -> int:
    target = Path(args.dir)
    if target.exists() and any(target.iterdir()) and not args.force:
        raise UsageError(f"{target} is not empty; restore replaces its contents - add --force to allow it")
    stats = await asyncio.to_thread(engine.restore, args.snapshot_id, target)
    if args.json:
        print_json(stats.__dict__)
    else:
        print(
            f"restored {args.snapshot_id[:16]}… into {target}: {stats.files_written} files written,"
            f" {stats.files_kept} kept, {stats.deleted} deleted"
        )
    return 0


async def _snapshot_verify(engine: SnapshotEngine, args: argparse.Namespace) -> int:
    report = await asyncio.to_thread(engine.verify, args.snapshot_id)
    if args.json:
        print_json(
            {
                "snapshot_id": report.snapshot_id,
                "ok": report.ok,
                "files": report.files,
                "packs": report.packs,
                "blobs": report.blobs,
                "problems": [p.__dict__ for p in report.problems],
            }
        )
    else:
        for p in report.problems:
            print(f"PROBLEM {p.key}{f' (file {p.path})' if p.path else ''}: {p.problem}")
        state = "OK" if report.ok else "CORRUPT"
        print(f"{report.snapshot_id}: {state} - {report.files} files, {report.blobs} blobs in {report.packs} packs")
    return 0 if report.ok else 1
