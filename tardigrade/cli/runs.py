"""The run commands: `run`, `status`, `result`, `list`, `cancel`, `demo`, `server` and `worker`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from datetime import datetime
from typing import Any

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import CancelledError, TerminatedError
from temporalio.service import RPCError

from tardigrade import config
from tardigrade.activities.capacity import DEFAULT_MAX_CONCURRENT_SNAPSHOTS, DEFAULT_MAX_LIVE_SANDBOXES
from tardigrade.cli.output import (
    SEED,
    UsageError,
    add_common,
    client_for,
    connection,
    failure_message,
    for_people,
    on_interrupt,
    print_json,
    warn,
)
from tardigrade.codec import CodecError

#: `--status` values and the visibility-query status each stands for.
STATUSES = {
    "running": "Running",
    "completed": "Completed",
    "failed": "Failed",
    "cancelled": "Canceled",
    "terminated": "Terminated",
    "timed-out": "TimedOut",
}
#: How often `run --wait` checks again whether a worker polls the queue, once it said none does.
WORKER_CHECK_INTERVAL = 5.0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="start a pipeline")
    p.add_argument("pipeline", help="the pipeline YAML file")
    p.add_argument("--task-queue", help=f"(default: $TARDIGRADE_TASK_QUEUE or {config.DEFAULT_TASK_QUEUE!r})")
    p.add_argument(
        "--store", help="snapshot store URL (default: the pipeline's `store`, $TARDIGRADE_STORE, or a local folder)"
    )
    p.add_argument("--id", help="workflow id (default: the pipeline name plus a random suffix)")
    p.add_argument(
        "--from",
        dest="start_from",
        metavar="SNAPSHOT_OR_RUN:STEP",
        help="fork: start after STEP (1-based; 0: after setup) of run RUN, with the files of its checkpoint there;"
        " or from a snapshot id (its step label, or :STEP)",
    )
    p.add_argument("--wait", action="store_true", help="show progress, wait for the run to finish, print its result")
    add_common(p)
    p.set_defaults(handler=cmd_run)

    for name, handler, help_text in [
        ("status", cmd_status, "current step, snapshots and rehydrations of a run"),
        ("result", cmd_result, "wait for a run and print its result"),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("workflow_id")
        add_common(p)
        p.set_defaults(handler=handler)

    p = sub.add_parser("list", help="recent runs, newest first")
    p.add_argument("--pipeline", help="only runs of this pipeline (its `name:`)")
    p.add_argument("--status", choices=sorted(STATUSES), help="only runs in this state")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default %(default)s; 0: all)")
    add_common(p)
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("cancel", help="ask a run to stop")
    p.add_argument("workflow_id")
    add_common(p)
    p.set_defaults(handler=cmd_cancel)

    p = sub.add_parser("demo", help="run the 40-step example, destroying its sandbox mid-run")
    p.add_argument("--crash-at-step", type=int, default=22, help="step during which the sandbox is destroyed (0: none)")
    p.add_argument("--keep-server", action="store_true", help="leave the embedded Temporal server running afterwards")
    add_common(p)
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("server", help="run the embedded Temporal dev server (SQLite, Web UI) in the foreground")
    p.add_argument("--port", type=int)
    p.add_argument("--ui-port", type=int)
    p.add_argument("--codec-endpoint", help="a `tardigrade codec-server` URL the Web UI decodes encrypted history with")
    p.add_argument("--stop", action="store_true", help="stop the server `tardigrade server` left running, and exit")
    add_common(p, address=False, as_json=False)
    p.set_defaults(handler=cmd_server)

    p = sub.add_parser("worker", help="run a worker with the plugin (Ctrl-C stops it; its runs move to others)")
    p.add_argument("--task-queue", help=f"(default: $TARDIGRADE_TASK_QUEUE or {config.DEFAULT_TASK_QUEUE!r})")
    p.add_argument(
        "--policy",
        metavar="FILE",
        help="the worker policy, YAML or JSON: which host folders, endpoints and providers pipelines may use"
        " (default: $TARDIGRADE_POLICY, else nothing beyond the worker's own store)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        default=os.environ.get("TARDIGRADE_METRICS"),
        help="serve Prometheus metrics (Temporal's and Tardigrade's) at http://HOST:PORT/metrics"
        " (default: $TARDIGRADE_METRICS, else none)",
    )
    p.add_argument(
        "--tracing",
        action="store_true",
        help="OpenTelemetry traces over OTLP to $OTEL_EXPORTER_OTLP_ENDPOINT (needs the otel extra and"
        " opentelemetry-exporter-otlp)",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("TARDIGRADE_LOG_FORMAT", "text"),
        help="json: one JSON object per log line, a step's facts as fields (default: $TARDIGRADE_LOG_FORMAT or text)",
    )
    p.add_argument(
        "--max-sandboxes",
        type=int,
        default=DEFAULT_MAX_LIVE_SANDBOXES,
        help="sandboxes this worker hosts at once; more runs wait for one (default %(default)s)",
    )
    p.add_argument(
        "--max-snapshots",
        type=int,
        default=DEFAULT_MAX_CONCURRENT_SNAPSHOTS,
        help="checkpoints and restores at once; more wait their turn (default %(default)s: the cores, at least 2)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, how long steps in flight may take to finish before they are cancelled and their"
        " runs rehydrate elsewhere from their last checkpoint (default %(default)s)",
    )
    add_common(p, as_json=False)
    p.set_defaults(handler=cmd_worker)


def _flags(args: argparse.Namespace) -> str:
    """The connection options this command was given, to repeat in the commands we suggest."""
    out = ""
    for option in ("address", "namespace", "profile", "config_file"):
        value = getattr(args, option, None)
        if value:
            out += f" --{option.replace('_', '-')} {value}"
    return out


def _follow_hint(workflow_id: str, args: argparse.Namespace) -> str:
    f = _flags(args)
    return (
        f"follow it: `tardigrade status {workflow_id}{f}` or `tardigrade logs {workflow_id} --follow{f}`;"
        f" wait for it: `tardigrade result {workflow_id}{f}`; stop it: `tardigrade cancel {workflow_id}{f}`"
    )


# -- run, result, status ------------------------------------------------------------------------------------------


async def cmd_run(args: argparse.Namespace) -> int:
    from tardigrade.client import start_pipeline
    from tardigrade.fork import ForkError
    from tardigrade.pipeline import load_pipeline
    from tardigrade.sandboxes.manifest import refuse_credentials

    loaded = load_pipeline(args.pipeline)
    if args.store:
        try:  # before connecting: the real cause, not "cannot reach Temporal"
            refuse_credentials(args.store, "--store")
        except ValueError as e:
            raise UsageError(str(e)) from None
    client = await client_for(args)
    queue = config.task_queue(args.task_queue)
    try:
        handle = await start_pipeline(
            client, loaded, task_queue=queue, workflow_id=args.id, store_url=args.store, start_from=args.start_from
        )
    except ForkError as e:
        raise UsageError(str(e)) from None
    ui = connection(args).web_ui(handle.id)
    if args.json and not args.wait:
        print_json({"workflow_id": handle.id, "status": "running", "task_queue": queue, "web_ui": ui})
        return 0
    if not args.json:
        print(f"started {handle.id} on task queue {queue}", flush=True)
        if ui:
            print(f"  Web UI: {ui}", flush=True)
    if not args.wait:
        print(f"  {_follow_hint(handle.id, args)}")
        return 0
    on_interrupt(f"run {handle.id} goes on without this command; {_follow_hint(handle.id, args)}")
    names = [step.name for step in loaded.pipeline.steps]
    return await _wait(client, handle, names, queue, args.json)


async def _warn_without_worker(client: Client, queue: str) -> None:
    """Say so when no worker polls the run's queue (the run would wait silently), and when one turns up."""
    from tardigrade.client import live_pollers

    warned = False
    while True:
        try:
            polling = bool(await live_pollers(client, queue))
        except RPCError:
            polling = True  # cannot tell: better no warning than a wrong one
        if not polling and not warned:
            warn(
                f"no worker is polling task queue {queue!r}: the run waits until one does; start one with"
                f" `tardigrade worker --task-queue {queue}`"
            )
            warned = True
        elif polling and warned:
            warn(f"a worker is polling task queue {queue!r} now")
            warned = False
        await asyncio.sleep(WORKER_CHECK_INTERVAL)


async def _wait(client: Client, handle: Any, step_names: list[str], queue: str, as_json: bool) -> int:
    from tardigrade.cli.progress import RunProgress

    started = time.monotonic()
    watchers = [asyncio.create_task(_warn_without_worker(client, queue))]
    try:
        if as_json:
            return await _print_result(client, handle.id, as_json)
        with RunProgress(step_names) as progress:
            watchers.append(asyncio.create_task(progress.watch(handle)))
            try:
                result = await handle.result()
            except WorkflowFailureError as e:
                print(f"{handle.id} {_ended(e)}", file=sys.stderr)
                return 1
            progress.show_completed(result.steps_completed)
    finally:
        for task in watchers:
            task.cancel()
    print(f"Done in {time.monotonic() - started:.1f} s.")
    return await _print_result(client, handle.id, as_json)


def _ended(error: WorkflowFailureError) -> str:
    """How a run that did not complete ended, in a few words."""
    if isinstance(error.cause, CancelledError):
        return "was cancelled"
    if isinstance(error.cause, TerminatedError):
        return f"was terminated: {error.cause.message or 'no reason given'}"
    return f"failed: {failure_message(error)}"


async def _print_result(client: Client, workflow_id: str, as_json: bool) -> int:
    from tardigrade.client import run_result

    try:
        result = await run_result(client, workflow_id)
    except WorkflowFailureError as e:
        if as_json:
            print_json({"workflow_id": workflow_id, "status": "failed", "error": failure_message(e)})
        else:
            print(f"{workflow_id} {_ended(e)}", file=sys.stderr)
        return 1
    if as_json:
        print_json(for_people(result.model_dump(mode="json")))
        return 0
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
        print(f"  agent step {agent.step + 1:<6} {agent.turns} turns, {agent.tool_calls} tool calls: {agent.summary}")
    return 0


def _usage(usage: Any) -> str:
    return f"{usage.model_calls} model calls, {usage.input_tokens} input + {usage.output_tokens} output tokens"


async def cmd_result(args: argparse.Namespace) -> int:
    client = await client_for(args)
    on_interrupt(f"run {args.workflow_id} goes on without this command; {_follow_hint(args.workflow_id, args)}")
    return await _print_result(client, args.workflow_id, args.json)


def _after(step: int) -> str:
    return SEED if step < 0 else f"after step {step + 1}"


async def cmd_status(args: argparse.Namespace) -> int:
    from tardigrade.client import run_status
    from tardigrade.workflows.state import RunStatus

    client = await client_for(args)
    try:
        status = await run_status(client, args.workflow_id)
    except WorkflowFailureError as e:
        if args.json:
            print_json({"workflow_id": args.workflow_id, "status": "failed", "error": failure_message(e)})
        else:
            print(f"{args.workflow_id} {_ended(e)}")
        return 1
    if args.json:
        print_json(for_people(status.model_dump(mode="json")))
        return 0
    if isinstance(status, RunStatus):
        where = (
            f"step {status.current_step}/{status.steps_total} · {status.current_step_name}"
            if status.current_step
            else "-"
        )
        print(f"{status.workflow_id} ({status.pipeline}): {status.phase}, at {where}")
        if status.waiting_for:
            print(f"  {status.waiting_for}")
        print(f"  steps completed   {status.steps_completed}/{status.steps_total}")
        print(f"  rehydrations      {status.rehydrations}")
        if status.sandbox:
            print(f"  sandbox           {status.sandbox.sandbox_id} on {status.sandbox.worker}")
        if status.last_snapshot:
            print(f"  last snapshot     {status.last_snapshot.snapshot_id} ({_after(status.last_snapshot.step)})")
        if status.agent:
            print(
                f"  agent             turn {status.agent.turn}/{status.agent.max_turns}, "
                f"{status.agent.tool_calls} tool calls so far"
            )
        if status.usage.model_calls:
            print(f"  model usage       {_usage(status.usage)}")
        if status.last_error:
            print(f"  last error        {status.last_error}")
        if ui := connection(args).web_ui(status.workflow_id):
            print(f"  Web UI            {ui}")
        print(f"  snapshots         {len(status.checkpoints)} recent:")
        for record in status.checkpoints[-5:]:
            print(f"    {_after(record.step) + ':':<16}{record.snapshot_id}")
    else:
        print(
            f"{status.workflow_id}: {status.status}, {status.steps_completed}/{status.steps_total} steps,"
            f" {status.rehydrations} rehydration(s); final snapshot {status.final_snapshot}"
        )
    return 0


# -- list, cancel ------------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


_STATUS_NAMES = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.COMPLETED: "completed",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.TERMINATED: "terminated",
    WorkflowExecutionStatus.TIMED_OUT: "timed-out",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "continued",
}


async def cmd_list(args: argparse.Namespace) -> int:
    client = await client_for(args)
    if args.limit < 0:
        raise UsageError("--limit must be 0 (all) or more")
    # Every run of a chain that continued-as-new is listed once, as its latest run.
    query = "WorkflowType = 'TardigradePipeline' AND ExecutionStatus != 'ContinuedAsNew'"
    if args.status:
        query += f" AND ExecutionStatus = '{STATUSES[args.status]}'"
    rows: list[dict[str, Any]] = []
    unreadable: CodecError | None = None
    async for execution in client.list_workflows(query):
        try:
            memo = await execution.memo()
        except CodecError as e:  # another team's encrypted runs share the namespace: list them, say so below
            memo, unreadable = {"pipeline": ENCRYPTED}, e
        pipeline = str(memo.get("pipeline", "?"))  # runs started before the memo existed have none
        if args.pipeline and pipeline != args.pipeline:
            continue
        status = _STATUS_NAMES.get(execution.status, str(execution.status)) if execution.status else "?"
        end = execution.close_time or datetime.now(execution.start_time.tzinfo)
        rows.append(
            {
                "workflow_id": execution.id,
                "pipeline": pipeline,
                "status": status,
                "steps": memo.get("steps"),
                "started": execution.start_time.isoformat(),
                "closed": execution.close_time.isoformat() if execution.close_time else None,
                "seconds": round((end - execution.start_time).total_seconds(), 1),
                "task_queue": execution.task_queue,
            }
        )
        if args.limit and len(rows) >= args.limit:
            break
    if unreadable is not None:
        hidden = sum(r["pipeline"] == ENCRYPTED for r in rows)
        print(f"note: {hidden} run(s) listed as {ENCRYPTED}: {unreadable}", file=sys.stderr)
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        which = " ".join(f"{k}={v}" for k, v in (("pipeline", args.pipeline), ("status", args.status)) if v)
        print(f"no runs{' with ' + which if which else ''}{_namespace_note(args)}")
        return 0
    width = max(len("WORKFLOW ID"), *(len(r["workflow_id"]) for r in rows))
    pwidth = max(len("PIPELINE"), *(len(r["pipeline"]) for r in rows))
    print(f"{'WORKFLOW ID':<{width}}  {'PIPELINE':<{pwidth}}  {'STATUS':<10}  {'STARTED':<19}  DURATION")
    for r in rows:
        started = _when(datetime.fromisoformat(r["started"]))
        print(
            f"{r['workflow_id']:<{width}}  {r['pipeline']:<{pwidth}}  {r['status']:<10}  {started:<19}"
            f"  {_duration(r['seconds'])}"
        )
    return 0


#: What `list` shows for a run whose memo is encrypted with a key this client does not hold.
ENCRYPTED = "(encrypted)"


def _namespace_note(args: argparse.Namespace) -> str:
    conn = connection(args)
    return f" in namespace {conn.namespace!r} on {conn.address}"


async def cmd_cancel(args: argparse.Namespace) -> int:
    client = await client_for(args)
    handle = client.get_workflow_handle(args.workflow_id)
    description = await handle.describe()
    if description.status != WorkflowExecutionStatus.RUNNING:
        state = _STATUS_NAMES.get(description.status, "closed") if description.status else "closed"
        raise UsageError(f"run {args.workflow_id} is already {state}; there is nothing to cancel")
    await handle.cancel()
    if args.json:
        print_json({"workflow_id": args.workflow_id, "cancel_requested": True})
    else:
        print(
            f"cancellation requested for {args.workflow_id};"
            f" `tardigrade status {args.workflow_id}{_flags(args)}` shows when it has stopped"
        )
    return 0


# -- demo, server, worker ------------------------------------------------------------------------------------------


async def cmd_demo(args: argparse.Namespace) -> int:
    from tardigrade.demo import run_demo

    # A lost sandbox is the point of the demo: keep the SDK's tracebacks about it out of the way.
    logging.getLogger("temporalio").setLevel(logging.CRITICAL)
    configured = any(getattr(args, o, None) for o in ("address", "profile", "config_file", "namespace"))
    conn = connection(args)
    # Nothing said where Temporal is: the demo starts its own server (or uses a running `tardigrade server`).
    target = conn if configured or conn.configured else None
    quiet = (lambda _msg: None) if args.json else None
    out = await run_demo(crash_at_step=args.crash_at_step, address=target, keep_server=args.keep_server, say=quiet)
    if args.json:
        print_json(for_people(out))
    return 0


async def cmd_worker(args: argparse.Namespace) -> int:
    from tardigrade.worker import serve

    return await serve(
        connection(args),
        args.task_queue,
        None,
        policy=args.policy,
        metrics=args.metrics,
        tracing=args.tracing,
        log_format=args.log_format,
        max_sandboxes=args.max_sandboxes,
        max_snapshots=args.max_snapshots,
        shutdown_grace=args.shutdown_grace,
    )


async def cmd_server(args: argparse.Namespace) -> int:
    from tardigrade.devserver import EmbeddedTemporal, state_file, stop_running_server

    if args.stop:
        stopped = stop_running_server()
        if stopped is None:
            raise UsageError(f"no `tardigrade server` is running (none is recorded in {state_file()})")
        print(f"stopped the Temporal dev server on {stopped['address']} (pid {stopped['pid']})")
        return 0
    server = EmbeddedTemporal(port=args.port, ui_port=args.ui_port, ui_codec_endpoint=args.codec_endpoint)
    await server.start()
    server.write_state_file()
    print(f"Temporal dev server on {server.address}; Web UI: {server.ui_url}; database: {server.db_file}")
    print("Ctrl-C (or `tardigrade server --stop`) stops it. `tardigrade worker` and `tardigrade run` find it.")
    try:
        while server.process is not None and server.process.poll() is None:
            await asyncio.sleep(1)
    finally:
        server.stop()
    return 0
