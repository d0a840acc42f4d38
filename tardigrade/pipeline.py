"""The pipeline file: a Manifest, a sandbox, and the steps to run, validated with pydantic.

    name: nightly-orders
    manifest: {files: [...], env: {...}, secrets: [API_TOKEN], setup: ["python3 -m venv .venv"]}
    sandbox: {provider: local, network: false}
    steps:
      - {name: generate dataset, run: python3 gen.py, timeout: 5m}
      - {name: triage, agent: "Fix the broken rows in data.csv", model: {name: gpt-4.1-mini}}  # agent_spec.py

`load_pipeline` turns any problem - bad YAML, an unknown key, a wrong type, a missing local file - into one
`PipelineError` whose message names the file and the field (``steps[3].timeout``) and says what is expected.

A pipeline can also be built in Python: the same models, so the same rules (a mistake raises pydantic's
ValidationError, naming the field); `start_pipeline` then checks its ``source:`` files as `load_pipeline` does::

    Pipeline(name="nightly", steps=[Step(name="generate", run="python3 gen.py", timeout="5m")])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from tardigrade.agent_spec import DEFAULT_TOOLS, ModelConfig, ToolName, check_agent_step
from tardigrade.sandboxes.manifest import WORKSPACE, Manifest, Output, sandbox_path, tree_path

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")


class PipelineError(ValueError):
    """A pipeline is not valid. The message names the file and the field and says how to fix it. A ValueError, like
    the ValidationError of a pipeline built in Python, so ``except ValueError`` catches either."""


def parse_duration(value: Any, *, allow_zero: bool = False) -> float:
    """``90``, ``"90s"``, ``"5m"``, ``"1h30m"`` -> seconds."""
    if allow_zero and value in (0, "0"):
        return 0.0
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip() and (m := _DURATION.match(value)) and any(m.groups()):
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    else:
        raise ValueError(f"{value!r} is not a duration; use e.g. 30s, 5m, 1h30m or a number of seconds")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError("a duration must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
DEFAULT_MAX_TURNS = 50


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Step(_Strict):
    """One unit of work and of atomicity: it completes and is checkpointed, or it never happened."""

    name: str = Field(min_length=1, max_length=200)
    run: str | None = Field(default=None, min_length=1)
    # An agent step: instructions for a model that works with tools in the sandbox (see tardigrade/agent_spec.py).
    agent: str | None = Field(default=None, min_length=1)
    model: ModelConfig | None = None
    tools: tuple[ToolName, ...] | None = None  # default: DEFAULT_TOOLS
    max_turns: int | None = Field(default=None, ge=1, le=1000)  # default: DEFAULT_MAX_TURNS
    max_output_tokens: int | None = Field(default=None, ge=1)
    done: Literal["finish", "no_tool_calls"] | None = None  # default: finish
    timeout: Duration = 3600.0
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str = WORKSPACE
    retries: int = Field(default=0, ge=0, le=100)
    retry_backoff: Duration = 1.0
    # None: follow the pipeline's policy. Agent steps may say every_tool_call: a snapshot after each mutating
    # tool call, so a lost sandbox resumes the agent at the turn it was on instead of at its first turn.
    checkpoint: bool | Literal["every_tool_call"] | None = None

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, v: str) -> str:
        return sandbox_path(v, field="cwd")

    @model_validator(mode="after")
    def _kind(self) -> Step:
        if self.agent is not None:
            if self.run is not None:
                raise ValueError("a step has either `run:` (a shell command) or `agent:` (instructions), not both")
            if self.model is None:
                raise ValueError(
                    "an agent step needs `model:`, e.g. `model: {name: gpt-4.1-mini}` (with OPENAI_API_KEY set on"
                    " the worker) or `model: {provider: scripted, script: [...]}` to replay tool calls offline"
                )
            check_agent_step(self.model, self.agent_tools, self.done_when)
            return self
        agent_only = [k for k in ("model", "tools", "max_turns", "max_output_tokens", "done") if getattr(self, k)]
        if agent_only:
            raise ValueError(
                f"{', '.join(agent_only)} only apply to agent steps; add `agent:` with instructions, or remove them"
            )
        if self.checkpoint == "every_tool_call":
            raise ValueError("checkpoint: every_tool_call only applies to agent steps; use true or false here")
        if self.run is None:
            raise ValueError("a step needs `run:` (a shell command) or `agent:` (instructions for a model)")
        return self

    @property
    def agent_tools(self) -> tuple[ToolName, ...]:
        return self.tools if self.tools is not None else DEFAULT_TOOLS

    @property
    def done_when(self) -> str:
        return self.done or "finish"

    @property
    def turn_limit(self) -> int:
        return self.max_turns or DEFAULT_MAX_TURNS


ProviderName = Literal["local", "e2b", "modal"]


class SandboxConfig(_Strict):
    """``provider`` is one name or a preference list (``[local, e2b]``): a run provisions on the first one the
    worker offers, and after losing a sandbox is rehydrated on the next (see sandboxes/providers.py)."""

    provider: ProviderName | list[ProviderName] = "local"
    network: bool = False
    isolation: Literal["required", "preferred"] = "required"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("provider", mode="before")
    @classmethod
    def _provider(cls, v: Any) -> Any:
        known = get_args(ProviderName)
        names = v if isinstance(v, list) else [v]
        if not names or any(name not in known for name in names):
            raise ValueError("Input should be 'local', 'e2b' or 'modal', or a preference list such as [local, e2b]")
        if len(set(names)) != len(names):
            raise ValueError("each provider may appear once in the list")
        return v

    @property
    def preferences(self) -> list[str]:
        return [self.provider] if isinstance(self.provider, str) else list(self.provider)


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
    outputs: list[Output] = Field(default_factory=list)  # published from checkpoints (sandboxes/outputs.py)

    @model_validator(mode="after")
    def _outputs(self) -> Pipeline:
        names = [step.name for step in self.steps]
        selection = self.manifest.snapshot.selection()
        for i, output in enumerate(self.outputs):
            where = f"outputs[{i}]"
            if output.after not in ("end", "each_step"):
                if output.after not in names:
                    raise ValueError(
                        f"{where}.after: no step is named {output.after!r}; use a step's name, end or each_step"
                    )
                if not self.checkpoint_after(names.index(output.after)):
                    raise ValueError(
                        f"{where}.after: step {output.after!r} is not checkpointed, and outputs are published from"
                        " checkpoints; set `checkpoint: true` on it"
                    )
            path = tree_path(output.path)
            parts = path.split("/")
            excluded = any(selection.excluded("/".join(parts[:n])) for n in range(1, len(parts) + 1))
            if not selection.covers(path) or excluded:
                raise ValueError(
                    f"{where}.path: {output.path} is not in the snapshots (manifest.snapshot include/exclude, mounts),"
                    " and outputs are published from snapshots"
                )
        return self

    def checkpoint_after(self, index: int) -> bool:
        step = self.steps[index]
        if step.checkpoint is not None:
            return step.checkpoint is not False  # every_tool_call includes the step's end
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
    check_sources(pipeline, path.parent, source=str(path), relative_to="the pipeline file")
    return LoadedPipeline(pipeline=pipeline, path=path.resolve())


def check_sources(pipeline: Pipeline, base_dir: Path, *, source: str, relative_to: str) -> None:
    """Every Manifest file copied from disk (``source:``) must exist; relative paths are resolved against base_dir.

    Checked before anything is staged, so a typo is one clear error rather than a half-uploaded seed snapshot.
    """
    for i, f in enumerate(pipeline.manifest.files):
        if f.source is not None:
            src = (base_dir / f.source).resolve()
            if not src.is_file():
                raise PipelineError(
                    f"{source}: manifest.files[{i}].source: file {f.source!r} not found (looked for {src}); paths are"
                    f" relative to {relative_to}"
                )
