"""The run commands: `demo`, `run`, `status`, `result`, `server` and `worker`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from temporalio.client import WorkflowFailureError

from tardigrade import config
from tardigrade.cli.output import add_common, address_or_default, failure_message, print_json


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the 40-step example, destroying its sandbox mid-run")
    p.add_argument("--crash-at-step", type=int, default=22, help="step during which the sandbox is destroyed (0: none)")
    p.add_argument("--keep-server", action="store_true", help="leave the embedded Temporal server running afterwards")
    add_common(p)
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("run", help="start a pipeline")
    p.add_argument("pipeline", help="the pipeline YAML file")
    p.add_argument("--task-queue", help=f"(default: $TARDIGRADE_TASK_QUEUE or {config.DEFAULT_TASK_QUEUE!r})")
    p.add_argument(
        "--store", help="snapshot store URL (default: the pipeline's `store`, $TARDIGRADE_STORE, or a local folder)"
    )
    p.add_argument("--id", help="workflow id (default: the pipeline name plus a random suffix)")
    p.add_argument("--wait", action="store_true", help="wait for the run to finish and print its result")
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

    p = sub.add_parser("server", help="run the embedded Temporal dev server (SQLite, Web UI) in the foreground")
    p.add_argument("--port", type=int)
    p.add_argument("--ui-port", type=int)
    p.set_defaults(handler=cmd_server)

    p = sub.add_parser("worker", help="run a worker with the plugin (Ctrl-C stops it; its runs move to others)")
    p.add_argument("--task-queue", help=f"(default: $TARDIGRADE_TASK_QUEUE or {config.DEFAULT_TASK_QUEUE!r})")
    p.add_argument("--namespace", help="(default: $TEMPORAL_NAMESPACE or 'default')")
    add_common(p, as_json=False)
    p.set_defaults(handler=cmd_worker)


async def cmd_demo(args: argparse.Namespace) -> int:
    from tardigrade.demo import run_demo

    # A lost sandbox is the point of the demo: keep the SDK's tracebacks about it out of the way.
    logging.getLogger("temporalio").setLevel(logging.ERROR)
    say = (lambda _msg: None) if args.json else print
    out = await run_demo(crash_at_step=args.crash_at_step, address=args.address, keep_server=args.keep_server, say=say)
    if args.json:
        print_json(out)
    return 0


async def cmd_worker(args: argparse.Namespace) -> int:
    from tardigrade.worker import serve

    return await serve(args.address, args.task_queue, args.namespace)


async def cmd_run(args: argparse.Namespace) -> int:
    from tardigrade.client import connect, start_pipeline
    from tardigrade.pipeline import load_pipeline

    loaded = load_pipeline(args.pipeline)
    client = await connect(address_or_default(args.address))
    handle = await start_pipeline(client, loaded, task_queue=args.task_queue, workflow_id=args.id, store_url=args.store)
    if not args.wait:
        if args.json:
            print_json(
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
            print_json({"workflow_id": workflow_id, "status": "failed", "error": message})
        else:
            print(f"{workflow_id} failed: {message}", file=sys.stderr)
        return 1
    if as_json:
        print_json(result)
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

    client = await connect(address_or_default(args.address))
    return await _print_result(client, args.workflow_id, args.json)


async def cmd_status(args: argparse.Namespace) -> int:
    from tardigrade.client import connect, run_status
    from tardigrade.workflows.state import RunStatus

    client = await connect(address_or_default(args.address))
    try:
        status = await run_status(client, args.workflow_id)
    except WorkflowFailureError as e:
        message = failure_message(e)
        if args.json:
            print_json({"workflow_id": args.workflow_id, "status": "failed", "error": message})
        else:
            print(f"{args.workflow_id}: failed: {message}")
        return 1
    if args.json:
        print_json(status)
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
