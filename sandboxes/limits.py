"""Resource limits per sandbox: what one step's commands may use, so that a fork bomb, a disk filler or a memory hog
ends its own step with a clear error and never takes the worker or another run with it.

A pipeline says ``sandbox: {limits: {memory: 2GiB, pids: 256, cpu: 1.5, disk: 10GiB, tmp: 512MiB}}``; whatever it
leaves out gets a default no normal pipeline meets (`DEFAULTS`). Sizes are bytes or text with a unit (``512MiB``,
``2GiB``, ``1.5G``; ``Ki/Mi/Gi/Ti``, ``K/M/G/T`` and ``KiB..TiB`` are powers of 1024, ``KB..TB`` powers of 1000);
``cpu`` is a number of cores (``0.5``, ``2``), never seconds: a step's wall-clock budget is its ``timeout``.

How the local provider enforces them is sandboxes/limit_enforcement.py. A limit breach is a step failure
(`LimitBreach` in the step's result names the limit and how to raise it), never a lost sandbox: it is rolled back
and retried only as often as the step's ``retries:`` say, and it never sends the run through rehydration. Hosted
providers map what their SDKs offer (Modal: cpu, memory) and run everything else inside their own VM or container
limits (see sandboxes/e2b.py and sandboxes/modal.py).

Pure models (the workflow imports them through the pipeline model): no I/O here, and no Temporal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from tardigrade.sandboxes.errors import TardigradeError

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10, "kb": 1000,
    "m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20, "mb": 1000**2,
    "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30, "gb": 1000**3,
    "t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40, "tb": 1000**4,
}  # fmt: skip
SIZE_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*([KkMmGgTt](?:i?[Bb]|i)?|[Bb])?\s*$"
_SIZE = re.compile(SIZE_PATTERN)
#: Below these a sandbox cannot even start a shell; a typo such as ``memory: 2`` (bytes) fails early instead.
_MIN_SIZE = 1 << 20
_MIN_PIDS = 8


def parse_size(value: Any) -> int:
    """``1073741824``, ``"1GiB"``, ``"512Mi"``, ``"1.5G"``, ``"100MB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB or 2GiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    else:
        raise ValueError(f"{value!r} is not a size; use e.g. 512MiB, 2GiB or a number of bytes")
    if size < _MIN_SIZE:
        raise ValueError(f"{format_size(size)} is too small; use at least 1MiB (e.g. 512MiB, 2GiB)")
    return size


def format_size(size: int) -> str:
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            text = f"{size / factor:.1f}".removesuffix(".0")
            return f"{text}{unit}"
    return f"{size}B"


def _parse_cpu(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("expected a number of cores such as 0.5 or 2")
    try:
        cores = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of cores; use e.g. 0.5 or 2 (cores, not seconds)") from None
    if not 0.01 <= cores <= 1024:
        raise ValueError("cpu is a number of cores between 0.01 and 1024, e.g. 0.5 or 2")
    return cores


SIZE_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "integer", "minimum": _MIN_SIZE}, {"type": "string", "pattern": SIZE_PATTERN}],
    "examples": ["512MiB", "2GiB", "10GB"],
    "errorMessage": "expected a size such as 512MiB or 2GiB, or a number of bytes",
}
Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(SIZE_SCHEMA, mode="validation")]
Cores = Annotated[
    float,
    BeforeValidator(_parse_cpu),
    WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "examples": [0.5, 2]}, mode="validation"),
]


class Limits(BaseModel):
    """What one sandbox may use. A field left out is None and means its default (`resolved`); the difference
    matters under a worker's ceilings, which lower a default but refuse a value the pipeline asked for (`within`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory: Size | None = Field(default=None, description="Memory of the step's processes together (default 4GiB).")
    pids: int | None = Field(
        default=None, ge=_MIN_PIDS, le=1_000_000, description="Processes and threads at once (default 512)."
    )
    cpu: Cores | None = Field(default=None, description="Cores, e.g. 0.5 or 2 (default: no cap).")
    disk: Size | None = Field(default=None, description="Bytes in /workspace and ~ together (default 20GiB).")
    tmp: Size | None = Field(default=None, description="Size of the private /tmp, a tmpfs in memory (default 1GiB).")

    def resolved(self) -> Limits:
        """These limits with every default filled in (cpu stays None: no cap)."""
        return self.model_copy(update={k: v for k, v in DEFAULTS.items() if getattr(self, k) is None})

    def within(self, ceilings: Limits) -> Limits:
        """These limits, resolved, under a worker's ceilings: a default above a ceiling is lowered to it; a value the
        pipeline asked for above a ceiling is a `LimitError` naming both fields."""
        resolved = self.resolved()
        update: dict[str, Any] = {}
        for name in LIMIT_NAMES:
            ceiling = getattr(ceilings, name)
            value = getattr(resolved, name)
            if ceiling is None or (value is not None and value <= ceiling):
                continue
            if getattr(self, name) is not None:
                raise LimitAboveCeiling(name, show_limit(name, value), show_limit(name, ceiling))
            update[name] = ceiling
        return resolved.model_copy(update=update)


LIMIT_NAMES = ("memory", "pids", "cpu", "disk", "tmp")
DEFAULTS: dict[str, Any] = {"memory": 4 << 30, "pids": 512, "disk": 20 << 30, "tmp": 1 << 30}


class LimitExceeded(TardigradeError):
    """A sandbox is over a limit where no command can be stopped any more (a checkpoint of a workspace over its
    disk limit): the run fails, naming the limit; a retry would find the same files."""


class LimitAboveCeiling(ValueError):
    """A pipeline asks for more than the worker's ceiling (``max_limits`` in its policy)."""

    def __init__(self, limit: str, asked: str, ceiling: str) -> None:
        super().__init__(f"sandbox.limits.{limit}: {asked} is above this worker's ceiling of {ceiling}")
        self.limit, self.asked, self.ceiling = limit, asked, ceiling


def show_limit(name: str, value: Any) -> str:
    if name in ("memory", "disk", "tmp"):
        return format_size(value)
    if name == "cpu":
        return f"{value:g} cores"
    return str(value)


@dataclass(frozen=True)
class LimitBreach:
    """A command ended because it hit one of its sandbox's limits."""

    limit: str  # memory | pids | disk | tmp
    message: str  # what happened and how to raise the limit


def breach(limit: str, value: Any, what: str) -> LimitBreach:
    return LimitBreach(
        limit,
        f"{what}: hit the sandbox's {limit} limit ({show_limit(limit, value)}); raise sandbox.limits.{limit} in the"
        " pipeline if the step needs more",
    )
