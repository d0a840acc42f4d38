"""The snapshot tool: `tardigrade snapshot create|restore|ls|verify|gc|keygen`, straight against a store.

Snapshots are named by 64 hex digits; like git, any unambiguous prefix of 4 or more will do (`ls` shows 12).
Only `create` may make a new store: every other command refuses a local store folder that does not exist,
rather than creating an empty one and reporting that it holds nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tardigrade import config
from tardigrade.cli.output import UsageError, add_common, print_json, snapshot_step

if TYPE_CHECKING:
    from tardigrade.client import Connection
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
            sp.add_argument("snapshot_id", help="the snapshot's id, or a unique prefix of it (4+ characters)")
        if name in ("create", "restore"):
            sp.add_argument("dir")
        if name == "keygen":
            sp.set_defaults(handler=cmd_snapshot, store=None)
            continue
        sp.add_argument("--store", default=config.default_store_url(), help="store URL (default: %(default)s)")
        if name == "create":
            sp.add_argument("--parent", help="the snapshot this one follows (for people and GC; a prefix will do)")
        if name == "ls":
            sp.add_argument("--pipeline", help="only snapshots of this pipeline")
            sp.add_argument("--run", help="only snapshots taken by this run (its workflow id)")
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


def _engine(store_url: str, *, create: bool = False) -> SnapshotEngine:
    """An engine with a persistent cache folder, so repeated commands reuse the dedupe index and trees. A local
    store folder must exist unless ``create`` (opening one would otherwise make an empty store)."""
    import blake3

    from tardigrade.sandboxes.snapshots import SnapshotEngine
    from tardigrade.sandboxes.stores import open_store

    parts = urlsplit(store_url)
    if parts.scheme in ("", "file"):
        folder = Path(parts.path if parts.scheme else store_url).expanduser()
        if not folder.is_dir() and not create:
            raise UsageError(
                f"there is no snapshot store at {folder} (no such folder); check --store (default:"
                " $TARDIGRADE_STORE or the state folder's snapshots/), or make one with"
                " `tardigrade snapshot create`"
            )
    store = open_store(store_url)
    scratch = config.state_dir() / "cli-cache" / blake3.blake3(store.url.encode()).hexdigest()[:16]
    return SnapshotEngine(store, scratch_dir=scratch)


def folder_cache(engine: SnapshotEngine, folder: Path) -> Path:
    """The stat cache of one folder for this store: with it, `create` reads only the files changed since the last
    `create` or `restore` of that folder, as a worker does for its sandboxes (without it, every call re-read and
    re-hashed the whole folder). It holds the store's identity and is ignored for any other store."""
    import blake3

    name = blake3.blake3(str(folder.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return engine.scratch / "statcaches" / name


async def _live_snapshots(conn: Connection, store_url: str) -> set[str]:
    """The last snapshot and seed of every running pipeline that uses this store: GC must keep them. A running
    pipeline whose worker cannot answer stops GC (`NoWorker`): what it still needs cannot be known."""
    from tardigrade.cli.output import CONNECT_TIMEOUT
    from tardigrade.client import connect, run_status
    from tardigrade.workflows.state import RunInput, RunStatus

    client = await connect(conn, timeout=CONNECT_TIMEOUT)
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
        status = await run_status(client, execution.id)
        if isinstance(status, RunStatus):
            keep.update(record.snapshot_id for record in status.checkpoints[-1:])
            if status.last_snapshot:
                keep.add(status.last_snapshot.snapshot_id)
    return keep


async def _gc(engine: SnapshotEngine, args: argparse.Namespace) -> int:
    from tardigrade.cli.output import connection
    from tardigrade.pipeline import parse_duration
    from tardigrade.sandboxes.snapshots.gc import GcPolicy

    live = None
    if not args.no_live_check:
        conn = connection(args)
        if not conn.configured:
            raise UsageError(
                "gc needs to see which snapshots running pipelines still use: pass --address or --profile (or set"
                " TEMPORAL_ADDRESS), or --no-live-check to rely on --keep-within alone"
            )
        loop = asyncio.get_running_loop()

        def live() -> set[str]:  # called by the collector from its thread, after it listed the snapshots
            return asyncio.run_coroutine_threadsafe(_live_snapshots(conn, engine.store.url), loop).result()

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
    engine = _engine(args.store, create=args.snapshot_command == "create")
    if args.snapshot_command == "create":
        return await _snapshot_create(engine, args)
    if args.snapshot_command == "restore":
        return await _snapshot_restore(engine, args)
    if args.snapshot_command == "ls":
        return await _snapshot_ls(engine, args)
    if args.snapshot_command == "gc":
        return await _gc(engine, args)
    return await _snapshot_verify(engine, args)


async def _snapshot_create(engine: SnapshotEngine, args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder")
    parent = await asyncio.to_thread(resolve_id, engine, args.parent) if args.parent else None
    info = await asyncio.to_thread(engine.create, root, parent=parent, cache_path=folder_cache(engine, root))
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
            "files_read": stats.files_read if stats else 0,
            "files_unchanged": stats.files_unchanged if stats else 0,
            "bytes_new": stats.bytes_new if stats else 0,
            "bytes_stored": stats.bytes_stored if stats else 0,
            "seconds": round(stats.seconds, 3) if stats else 0,
        }
    )
    return 0


async def _snapshot_restore(engine: SnapshotEngine, args: argparse.Namespace) -> int:
    target = Path(args.dir)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} is a file; restore into a folder")
    if target.exists() and any(target.iterdir()) and not args.force:
        raise UsageError(f"{target} is not empty; restore replaces its contents - add --force to allow it")
    snapshot_id = await asyncio.to_thread(resolve_id, engine, args.snapshot_id)  # before the folder is made
    stats = await asyncio.to_thread(engine.restore, snapshot_id, target, cache_path=folder_cache(engine, target))
    if args.json:
        print_json({"snapshot_id": snapshot_id, **stats.__dict__})
    else:
        print(
            f"restored {snapshot_id[:12]} into {target}: {stats.files_written} files written,"
            f" {stats.files_kept} kept, {stats.deleted} deleted"
        )
    return 0


async def _snapshot_verify(engine: SnapshotEngine, args: argparse.Namespace) -> int:
    snapshot_id = await asyncio.to_thread(resolve_id, engine, args.snapshot_id)
    report = await asyncio.to_thread(engine.verify, snapshot_id)
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


_HEX = re.compile(r"^[0-9a-f]{4,64}$")
SHORT_ID = 12


def resolve_id(engine: SnapshotEngine, text: str) -> str:
    """The full id of the one snapshot whose id starts with ``text`` (git-style); `UsageError` if none or several."""
    from tardigrade.sandboxes.store_keys import tree_key

    prefix = text.strip().lower()
    if not _HEX.match(prefix):
        raise UsageError(
            f"{text!r} is not a snapshot id: give its 64 hex characters or a unique prefix of at least 4"
            " (`tardigrade snapshot ls` shows the first 12)"
        )
    where = f"store {engine.store.url}"
    if len(prefix) == 64:
        if engine.store.exists(tree_key(prefix)):
            return prefix
        matches: list[str] = []
    else:
        names = (obj.key.rpartition("/")[2] for obj in engine.store.list(tree_key(prefix)))
        matches = sorted({name for name in names if len(name) == 64 and name.startswith(prefix)})
    if not matches:
        what = f"snapshot {prefix}" if len(prefix) == 64 else f"snapshot starting with {prefix}"
        raise UsageError(
            f"there is no {what} in {where}; `tardigrade snapshot ls --store {engine.store.url}` lists them"
        )
    if len(matches) > 1:
        shown = ", ".join(m[:SHORT_ID] for m in matches[:4]) + (", ..." if len(matches) > 4 else "")
        raise UsageError(
            f"{prefix} is ambiguous: {len(matches)} snapshots start with it ({shown}); give more characters"
        )
    return matches[0]


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


async def _snapshot_ls(engine: SnapshotEngine, args: argparse.Namespace) -> int:
    infos = await asyncio.to_thread(engine.list)
    if args.pipeline:
        infos = [i for i in infos if i.labels.get("pipeline") == args.pipeline]
    if args.run:
        infos = [i for i in infos if i.labels.get("run") == args.run]
    if args.json:
        print_json([{**i.record(), "step": snapshot_step(i.labels)} for i in infos])
        return 0
    if not infos:
        which = " ".join(f"{k}={v}" for k, v in (("pipeline", args.pipeline), ("run", args.run)) if v)
        print(f"no snapshots{' with ' + which if which else ''} in {engine.store.url}")
        return 0
    rows: list[dict[str, Any]] = [
        {
            "id": i.id[:SHORT_ID],
            "created": datetime.fromtimestamp(i.created_at).strftime("%Y-%m-%d %H:%M:%S") if i.created_at else "-",
            "pipeline": i.labels.get("pipeline", "-"),
            "run": i.labels.get("run", "-"),
            "step": snapshot_step(i.labels),
            "files": str(i.entries),
            "size": _size(i.bytes),
        }
        for i in infos
    ]
    columns = ["id", "created", "pipeline", "run", "step", "files", "size"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    right = {"files", "size"}

    def line(values: dict[str, str]) -> str:
        cells = [values[c].rjust(widths[c]) if c in right else values[c].ljust(widths[c]) for c in columns]
        return "  ".join(cells).rstrip()

    print(line({c: c.upper() for c in columns}))
    for row in rows:
        print(line(row))
    return 0
