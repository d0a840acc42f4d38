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
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from tardigrade.cli import runs, snapshots
from tardigrade.cli.output import UsageError, failure_message
from tardigrade.pipeline import PipelineError
from tardigrade.sandboxes.errors import TardigradeError
from tardigrade.sandboxes.stores import StoreError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tardigrade", description="Durable, snapshotted agent pipelines on Temporal.")
    sub = parser.add_subparsers(dest="command", required=True)
    runs.add_commands(sub)
    snapshots.add_commands(sub)
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
