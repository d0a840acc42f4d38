"""The pipeline file: a Manifest, a sandbox, and the steps to run, validated with pydantic.

    name: nightly-orders
    manifest: {files: [...], env: {...}, secrets: [API_TOKEN], setup: ["python3 -m venv .venv"]}
    sandbox: {provider: local, network: false}
    steps:
      - {name: generate dataset, run: python3 gen.py, timeout: 5m}

`load_pipeline` turns any problem - bad YAML, an unknown key, a wrong type, a missing local file - into one
`PipelineError` whose message names the file and the field (``steps[3].timeout``) and says what is expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandboxes.manifest import WORKSPACE, Manifest, sandbox_path

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")


class PipelineError(Exception):
    """A pipeline file is not valid. The message names the file and field and says how to fix it."""


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"5m"``, ``"1h30m"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip() and (m := _DURATION.match(value)) and any(m.groups()):
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    else:
        raise ValueError(f"{value!r} is not a duration; use e.g. 30s, 5m, 1h30m or a number of seconds")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Step(_Strict):
    """One unit of work and of atomicity: it completes and is checkpointed, or it never happened."""

    name: str = Field(min_length=1, max_length=200)
    run: str | None = Field(default=None, min_length=1)
    agent: Any = None  # agent steps: see the agent step issue; rejected until then
    timeout: Duration = 3600.0
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str = WORKSPACE
    retries: int = Field(default=0, ge=0, le=100)
    retry_backoff: Duration = 1.0
    checkpoint: bool | None = None  # None: follow the pipeline's policy

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, v: str) -> str:
        return sandbox_path(v, field="cwd")

    @model_validator(mode="after")
    def _kind(self) -> Step:
        if self.agent is not None:
            raise ValueError("agent steps are not available yet; use `run:` with a shell command")
        if self.run is None:
            raise ValueError("a step needs `run:` (a shell command)")
        return self


class SandboxConfig(_Strict):
    provider: Literal["local", "e2b", "modal"] = "local"
    network: bool = False
    isolation: Literal["required", "preferred"] = "required"
    options: dict[str, Any] = Field(default_factory=dict)


class CheckpointPolicy(_Strict):
    """``every: 1`` (the default) snapshots after every step; ``every: 5`` after every fifth step and the last.
    A step's own ``checkpoint: true/false`` wins. A failure rolls back to the last checkpoint and re-runs the
    steps after it."""

    every: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if v == "every_step":
            return {"every": 1}
        if v == "end_only":
            return {"every": 1_000_000_000}
        return v


class Timeouts(_Strict):
    heartbeat: Duration = 10.0  # a worker that stops heartbeating this long is presumed dead
    host_pickup: Duration = 15.0  # a sandbox whose worker does not pick up work this long is presumed lost
    provision: Duration = 1800.0  # creating a sandbox, including setup commands
    checkpoint: Duration = 1800.0


class Pipeline(_Strict):
    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    manifest: Manifest = Field(default_factory=Manifest)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    store: str | None = None  # snapshot store URL; default: the worker's (a local folder)
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    steps: list[Step] = Field(min_length=1)
    max_rehydrations: int = Field(default=20, ge=0)  # consecutive losses of one step before the run fails
    steps_per_run: int = Field(default=200, ge=1)  # continue-as-new after this many steps keeps history small

    def checkpoint_after(self, index: int) -> bool:
        step = self.steps[index]
        if step.checkpoint is not None:
            return step.checkpoint
        return index == len(self.steps) - 1 or (index + 1) % self.checkpoint.every == 0


class LoadedPipeline(BaseModel):
    """A validated pipeline plus where it came from (local ``source`` files are relative to it)."""

    pipeline: Pipeline
    path: Path

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "constrained-")) or part in ("str", "int", "float", "bool"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _describe(error: ValidationError, source: str, data: Any) -> str:
    lines = []
    for e in error.errors():
        where = _field_path(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key {str(e['loc'][-1])!r} (check the spelling; see the README for the allowed keys)"
        elif e["type"] == "missing":
            msg = "is required"
        lines.append(f"{where}: {msg}")
    if len(lines) == 1:
        return f"{source}: {lines[0]}"
    return f"{source}: {len(lines)} problems:\n  " + "\n  ".join(lines)


def parse_pipeline(data: Any, source: str = "pipeline") -> Pipeline:
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a mapping with name, manifest, sandbox and steps at the top level")
    try:
        return Pipeline.model_validate(data)
    except ValidationError as e:
        raise PipelineError(_describe(e, source, data)) from None


def load_pipeline(path: str | Path) -> LoadedPipeline:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such pipeline file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: cannot read it ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PipelineError(f"{path}: invalid YAML{where}: {problem}") from None
    pipeline = parse_pipeline(data, str(path))
    for i, f in enumerate(pipeline.manifest.files):
        if f.source is not None:
            src = (path.parent / f.source).resolve()
            if not src.is_file():
                raise PipelineError(
                    f"{path}: manifest.files[{i}].source: file {f.source!r} not found (looked for {src}); paths are"
                    " relative to the pipeline file"
                )
    return LoadedPipeline(pipeline=pipeline, path=path.resolve())
