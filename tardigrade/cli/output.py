"""Shared by the CLI's commands: how they print JSON, explain failures and take the common options."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import BaseModel


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


def print_json(obj: Any) -> None:
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


def address_or_default(explicit: str | None) -> str:
    """--address, else TEMPORAL_ADDRESS, else a running `tardigrade server`, else localhost:7233."""
    from tardigrade.devserver import resolve_address

    return resolve_address(explicit) or "localhost:7233"


def add_common(p: argparse.ArgumentParser, *, address: bool = True, as_json: bool = True) -> None:
    """The options most commands share: --address and --json."""
    if address:
        p.add_argument(
            "--address",
            help="Temporal frontend HOST:PORT (default: $TEMPORAL_ADDRESS, a running"
            " `tardigrade server`, or localhost:7233)",
        )
    if as_json:
        p.add_argument("--json", action="store_true", help="print one JSON object")
