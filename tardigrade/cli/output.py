"""Shared by the CLI's commands: the common options, how they connect, print JSON, number steps and explain
failures.

Steps are numbered one way everywhere a person looks: 1 to N, as `TARDIGRADE_STEP` and the Web UI count them,
and "seed" for the state before step 1 (the Manifest's files, and the snapshot taken right after setup). The
workflow's own models count from 0 with -1 for setup; `for_people` converts what the CLI prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from temporalio.client import Client

    from tardigrade.client import Connection
    from tardigrade.plugin import TardigradePlugin

#: How long the CLI waits for Temporal to answer a connection (the SDK's own limit is 30 s).
CONNECT_TIMEOUT = 10.0
SEED = "seed"


class UsageError(Exception):
    """Bad command-line input or a state the command cannot work with: printed as one line, exit code 2."""


# -- what a command wants said if the user presses Ctrl-C -----------------------------------------------------------

_interrupt_hint: str | None = None


def on_interrupt(hint: str | None) -> None:
    """What `main` prints when Ctrl-C stops the command (e.g. that the run goes on, and how to follow it)."""
    global _interrupt_hint
    _interrupt_hint = hint


def interrupt_hint() -> str | None:
    return _interrupt_hint


# -- printing ---------------------------------------------------------------------------------------------------------


def print_json(obj: Any) -> None:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    print(json.dumps(obj, indent=2, default=str))


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def failure_message(error: BaseException) -> str:
    """The innermost message of a Temporal failure chain ("Workflow execution failed" -> "Activity task
    failed" -> the activity's own words): the one that says what to change."""
    message = str(error)
    cause: BaseException | None = error
    while cause is not None:
        message = getattr(cause, "message", None) or str(cause) or message
        cause = getattr(cause, "cause", None) or cause.__cause__
    return message


# -- step numbers -----------------------------------------------------------------------------------------------------


def step_name(index: int | None) -> str:
    """A workflow step index (0-based, -1 for setup) as people count it: "seed", 1, 2, ..."""
    if index is None:
        return "end"
    return SEED if index < 0 else str(index + 1)


def _step_for_people(index: Any) -> Any:
    return (SEED if index < 0 else index + 1) if isinstance(index, int) else index


def for_people(data: dict[str, Any]) -> dict[str, Any]:
    """A `RunResult`/`RunStatus` dump with every step index 1-based and setup as "seed"."""
    out = dict(data)
    for key in ("checkpoints", "agents", "outputs"):
        if isinstance(out.get(key), list):
            out[key] = [{**item, "step": _step_for_people(item.get("step"))} for item in out[key]]
    for key in ("last_snapshot", "agent"):
        if isinstance(out.get(key), dict):
            out[key] = {**out[key], "step": _step_for_people(out[key].get("step"))}
    return out


def snapshot_step(labels: dict[str, str]) -> str:
    """The step a stored snapshot was taken after, from its labels: "seed" for the Manifest's files and for the
    snapshot after setup (recorded as step 0), else the 1-based step."""
    if labels.get("seed") or labels.get("step") in ("0", "-1"):
        return SEED
    return labels.get("step", "-")


# -- options and connecting -------------------------------------------------------------------------------------------


def add_common(p: argparse.ArgumentParser, *, address: bool = True, as_json: bool = True) -> None:
    """The options most commands share: where Temporal is, --json and --debug."""
    if address:
        g = p.add_argument_group(
            "Temporal connection",
            "Default: Temporal's client config (a --profile in its TOML file and the TEMPORAL_* variables, e.g."
            " TEMPORAL_ADDRESS, TEMPORAL_API_KEY, TEMPORAL_TLS), else a running `tardigrade server`, else"
            " localhost:7233.",
        )
        g.add_argument("--address", help="Temporal frontend HOST:PORT")
        g.add_argument("--namespace", help="(default: the profile's, $TEMPORAL_NAMESPACE, or 'default')")
        g.add_argument("--profile", help="client profile to use (default: $TEMPORAL_PROFILE or 'default')")
        g.add_argument("--config-file", help="client config TOML (default: $TEMPORAL_CONFIG_FILE or Temporal's)")
    if as_json:
        p.add_argument("--json", action="store_true", help="print one JSON object")
    with contextlib.suppress(argparse.ArgumentError):  # a command that calls this twice gets it once
        # SUPPRESS: the top-level `tardigrade --debug` is not overwritten by a subcommand's default.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")


_connection: Connection | None = None


def connection(args: argparse.Namespace) -> Connection:
    """Where the command's Temporal is, from its options (see `add_common`)."""
    global _connection
    from tardigrade.client import resolve_connection

    _connection = resolve_connection(
        getattr(args, "address", None),
        getattr(args, "namespace", None),
        profile=getattr(args, "profile", None),
        config_file=getattr(args, "config_file", None),
    )
    return _connection


def current_connection() -> Connection | None:
    """The connection the running command resolved, for error messages."""
    return _connection


async def client_for(args: argparse.Namespace, plugin: TardigradePlugin | None = None) -> Client:
    from tardigrade.client import connect

    return await connect(connection(args), plugin=plugin, timeout=CONNECT_TIMEOUT)
