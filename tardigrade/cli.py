"""The `tardigrade` command.

    tardigrade demo [--crash-at-step N] [--address HOST:PORT] [--json]
    tardigrade run PIPELINE.yaml [--address] [--task-queue] [--store URL] [--wait] [--json]
    tardigrade status WORKFLOW_ID      tardigrade result WORKFLOW_ID
    tardigrade server                  (the embedded Temporal dev server, in the foreground)
    tardigrade worker [--address] [--task-queue] [--namespace]
    tardigrade snapshot create|restore|ls|verify ...

Exit codes: 0 success, 1 the run failed, 2 bad input (pipeline file, store URL, snapshot id...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from tardigrade import config
from tardigrade.pipeline import PipelineError
from tardigrade.sandboxes.errors import TardigradeError
from tardigrade.sandboxes.stores import StoreError

if TYPE_CHECKING:
    from tardigrade.sandboxes.snapshots import SnapshotEngine


class UsageError(Exception):
    pass


def _print_json(obj: Any) -> None:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    print(json.dumps(obj, indent=2, default=str))


def failure_message(error: BaseException) -> str:
    """The innermost message of a Temporal failure chain ("Workflow execution failed" -> "Activity task
    failed" -> the activity's own words): the one that says what to change."""
    message = str(error)
    cause: BaseException | None = error
    while cause is not None:
        message = getattr(cause, "message", None) or str(cause) or message
        cause = getattr(cause, "cause", None) or cause.__cause__
    return message


def _address_or_fail(explicit: str | None) -> str:
    from tardigrade.devserver import resolve_address

    address = resolve_address(explicit)
    if address is None:
        return "localhost:7233"
    return address


# -- commands -------------------------------------------------------------------------------------------------


async def cmd_demo(args: argparse.Namespace) -> int:
    from tardigrade.demo import run_demo

    # A lost sandbox is the point of the demo: keep the SDK's tracebacks about it out of the way.
    logging.getLogger("temporalio").setLevel(logging.ERROR)
    say = (lambda _msg: None) if args.json else print
    out = await run_demo(crash_at_step=args.crash_at_step, address=args.address, keep_server=args.keep_server, say=say)
    if args.json:
        _print_json(out)
    return 0


async def cmd_worker(args: argparse.Namespace) -> int:
    from tardigrade.worker import serve

    return await serve(args.address, args.task_queue, args.namespace)


async def cmd_run(args: argparse.Namespace) -> int:
    from tardigrade.client import connect, start_pipeline
    from tardigrade.pipeline import load_pipeline

    loaded = load_pipeline(args.pipeline)
    client = await connect(_address_or_fail(args.address))
    handle = await start_pipeline(client, loaded, task_queue=args.task_queue, workflow_id=args.id, store_url=args.store)
    if not args.wait:
        if args.json:
            _print_json(
                {"workflow_id": handle.id, "status": "running", "task_queue": config.task_queue(args.task_queue)}
            )
        else:
            print(f"started {handle.id} on task queue {config.task_queue(args.task_queue)}")
            print(f"  follow it: tardigrade status {handle.id}    wait for it: tardigrade result {handle.id}")
        return 0
    return await _print_result(client, handle.id, args.json)


async def _print_result(client: Any, workflow_id: str, as_json: bool) -> int:
    from tardigrade.client import run_result

    try:
        result = await run_result(client, workflow_id)
    except WorkflowFailureError as e:
        message = failure_message(e)
        if as_json:
            _print_json({"workflow_id": workflow_id, "status": "failed", "error": message})
        else:
            print(f"{workflow_id} failed: {message}", file=sys.stderr)
        return 1
    if as_json:
        _print_json(result)
    else:
        print(
            f"{result.workflow_id}: {result.status}, {result.steps_completed}/{result.steps_total} steps,"
            f" {result.rehydrations} rehydration(s)"
        )
        print(f"  final snapshot    {result.final_snapshot}")
        print(f"  workspace digest  {result.workspace_digest}")
        print(f"  store             {result.store}")
        if result.usage.model_calls:
            print(f"  model usage       {_usage(result.usage)}")
        for agent in result.agents:
            print(
                f"  agent step {agent.step + 1:<6} {agent.turns} turns, {agent.tool_calls} tool calls: {agent.summary}"
            )
    return 0


def _usage(usage: Any) -> str:
    return f"{usage.model_calls} model calls, {usage.input_tokens} input + {usage.output_tokens} output tokens"


async def cmd_result(args: argparse.Namespace) -> int:
    from tardigrade.client import connect

    client = await connect(_address_or_fail(args.address))
    return await _print_result(client, args.workflow_id, args.json)


async def cmd_status(args: argparse.Namespace) -> int:
    from tardigrade.client import connect, run_status
    from tardigrade.workflows.state import RunStatus

    client = await connect(_address_or_fail(args.address))
    try:
        status = await run_status(client, args.workflow_id)
    except WorkflowFailureError as e:
        message = failure_message(e)
        if args.json:
            _print_json({"workflow_id": args.workflow_id, "status": "failed", "error": message})
        else:
            print(f"{args.workflow_id}: failed: {message}")
        return 1
    if args.json:
        _print_json(status)
        return 0
    if isinstance(status, RunStatus):
        where = (
            f"step {status.current_step}/{status.steps_total} · {status.current_step_name}"
            if status.current_step
            else "-"
        )
        print(f"{status.workflow_id} ({status.pipeline}): {status.phase}, at {where}")
        print(f"  steps completed   {status.steps_completed}/{status.steps_total}")
        print(f"  rehydrations      {status.rehydrations}")
        if status.sandbox:
            print(f"  sandbox           {status.sandbox.sandbox_id} on {status.sandbox.worker}")
        if status.last_snapshot:
            print(
                f"  last snapshot     {status.last_snapshot.snapshot_id} (after step {status.last_snapshot.step + 1})"
            )
        if status.agent:
            print(
                f"  agent             turn {status.agent.turn}/{status.agent.max_turns}, "
                f"{status.agent.tool_calls} tool calls so far"
            )
        if status.usage.model_calls:
            print(f"  model usage       {_usage(status.usage)}")
        if status.last_error:
            print(f"  last error        {status.last_error}")
        print(f"  snapshots         {len(status.checkpoints)} recent:")
        for record in status.checkpoints[-5:]:
            print(f"    after step {record.step + 1:>3}: {record.snapshot_id}")
    else:
        print(
            f"{status.workflow_id}: {status.status}, {status.steps_completed}/{status.steps_total} steps,"
            f" {status.rehydrations} rehydration(s); final snapshot {status.final_snapshot}"
        )
    return 0


async def cmd_server(args: argparse.Namespace) -> int:
    from tardigrade.devserver import EmbeddedTemporal

    server = EmbeddedTemporal(port=args.port, ui_port=args.ui_port)
    await server.start()
    server.write_state_file()
    print(f"Temporal dev server on {server.address}; Web UI: {server.ui_url}; database: {server.db_file}")
    print("Ctrl-C stops it. `tardigrade worker` and `tardigrade run` find it without --address.")
    try:
        while server.process is not None and server.process.poll() is None:
            await asyncio.sleep(1)
    finally:
        server.stop()
    return 0


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
        _print_json(report.to_json())
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
            _print_json([i.record() for i in infos])
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
    _print_json(
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
        _print_json(stats.__dict__)
    else:
        print(
            f"restored {args.snapshot_id[:16]}… into {target}: {stats.files_written} files written,"
            f" {stats.files_kept} kept, {stats.deleted} deleted"
        )
    return 0


async def _snapshot_verify(engine: SnapshotEngine, args: argparse.Namespace) -> int:
    report = await asyncio.to_thread(engine.verify, args.snapshot_id)
    if args.json:
        _print_json(
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


# -- parsing --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tardigrade", description="Durable, snapshotted agent pipelines on Temporal.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, *, address: bool = True, as_json: bool = True) -> None:
        if address:
            p.add_argument(
                "--address",
                help="Temporal frontend HOST:PORT (default: $TEMPORAL_ADDRESS, a running"
                " `tardigrade server`, or localhost:7233)",
            )
        if as_json:
            p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("demo", help="run the 40-step example, destroying its sandbox mid-run")
    p.add_argument("--crash-at-step", type=int, default=22, help="step during which the sandbox is destroyed (0: none)")
    p.add_argument("--keep-server", action="store_true", help="leave the embedded Temporal server running afterwards")
    common(p)
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("run", help="start a pipeline")
    p.add_argument("pipeline", help="the pipeline YAML file")
    p.add_argument("--task-queue", help=f"(default: $TARDIGRADE_TASK_QUEUE or {config.DEFAULT_TASK_QUEUE!r})")
    p.add_argument(
        "--store", help="snapshot store URL (default: the pipeline's `store`, $TARDIGRADE_STORE, or a local folder)"
    )
    p.add_argument("--id", help="workflow id (default: the pipeline name plus a random suffix)")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish and print its result")
    common(p)
    p.set_defaults(handler=cmd_run)

    for name, handler, help_text in [
        ("status", cmd_status, "current step, snapshots and rehydrations of a run"),
        ("result", cmd_result, "wait for a run and print its result"),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("workflow_id")
        common(p)
        p.set_defaults(handler=handler)

    p = sub.add_parser("server", help="run the embedded Temporal dev server (SQLite, Web UI) in the foreground")
    p.add_argument("--port", type=int)
    p.add_argument("--ui-port", type=int)
    p.set_defaults(handler=cmd_server)

    p = sub.add_parser("worker", help="run a worker with the plugin (Ctrl-C stops it; its runs move to others)")
    p.add_argument("--task-queue", help=f"(default: $TARDIGRADE_TASK_QUEUE or {config.DEFAULT_TASK_QUEUE!r})")
    p.add_argument("--namespace", help="(default: $TEMPORAL_NAMESPACE or 'default')")
    common(p, as_json=False)
    p.set_defaults(handler=cmd_worker)

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
            common(sp, as_json=False)
        common(sp, address=False)
        sp.set_defaults(handler=cmd_snapshot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.handler
    try:
        return asyncio.run(handler(args))
    except (PipelineError, TardigradeError, StoreError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkflowFailureError as e:
        print(f"error: the run failed: {failure_message(e)}", file=sys.stderr)
        return 1
    except RPCError as e:
        print(f"error: Temporal said: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """Console entry point. Exits without interpreter finalization: the Temporal client's native threads can
    abort a finalizing interpreter ("PyGILState_Release ... finalizing"), turning a success into exit code -6."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
