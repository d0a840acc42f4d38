"""The `tardigrade` command.

    tardigrade run PIPELINE.yaml [--wait] [--id ID] [--task-queue Q] [--store URL]
    tardigrade status ID | result ID | logs ID [--step N] [--follow] | cancel ID
    tardigrade list [--pipeline NAME] [--status running|completed|failed|...]
    tardigrade worker [--task-queue Q]      tardigrade server [--stop]      tardigrade demo
    tardigrade snapshot create|restore|ls|verify|gc|keygen ...
    tardigrade schema | stage PIPELINE.yaml      (for clients in other languages)
    tardigrade codec-server [--port P] [--origin URL]   (encrypted history, readable in the Web UI)

Every command that talks to Temporal takes --address, --namespace, --profile and --config-file (Temporal's own
client config: TLS and API keys, so Temporal Cloud works). Exit codes: 0 success, 1 the run failed, 2 the command
cannot do what was asked (one line says why and what to do), 3 a bug; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from tardigrade.cli import clients, codec_server, logs, runs, snapshots
from tardigrade.cli.errors import BUG, explain
from tardigrade.cli.output import interrupt_hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tardigrade", description="Durable, snapshotted agent pipelines on Temporal.")
    sub = parser.add_subparsers(dest="command", required=True)
    runs.add_commands(sub)
    logs.add_commands(sub)
    snapshots.add_commands(sub)
    clients.add_commands(sub)
    codec_server.add_commands(sub)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks (also: TARDIGRADE_DEBUG=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("TARDIGRADE_DEBUG", "") not in ("", "0")
    if not debug:
        # The SDK logs what we explain ourselves (e.g. a failed connection) with its own traceback.
        logging.getLogger("temporalio").setLevel(logging.CRITICAL)
    handler: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.handler
    try:
        return asyncio.run(handler(args))
    except BrokenPipeError:  # `tardigrade logs ID | head`: the reader has all it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing more may reach the closed pipe
        return 0
    except KeyboardInterrupt:
        if hint := interrupt_hint():
            print(f"\ninterrupted: {hint}", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        explained = explain(e)
        if explained is None:
            print(
                f"error: unexpected {type(e).__name__}: {e} (a bug in Tardigrade: rerun with --debug for the traceback"
                " and report it)",
                file=sys.stderr,
            )
            return BUG
        message, code = explained
        print(f"error: {message}", file=sys.stderr)
        return code


def run() -> None:
    """Console entry point. Exits without interpreter finalization: the Temporal client's native threads can
    abort a finalizing interpreter ("PyGILState_Release ... finalizing"), turning a success into exit code -6."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
