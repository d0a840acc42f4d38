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
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from tardigrade.agent_spec import DEFAULT_TOOLS, ModelConfig, ToolName, check_agent_step
from tardigrade.sandboxes.layout import WORKSPACE
from tardigrade.sandboxes.manifest import SANDBOX_PATH_SCHEMA, Manifest, Output, sandbox_path, tree_path

# Also the JSON Schema's pattern (ECMAScript reads it the same way): hours, minutes, seconds, at least one of them.
DURATION_PATTERN = r"^(?=.*\d)\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$"
_DURATION = re.compile(DURATION_PATTERN)


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


# In a file a duration is a number of seconds or text such as "1h30m"; validated, it is always seconds. The JSON
# Schema (tardigrade/schema.py) describes what people write. Its "errorMessage" is what editors and the TypeScript
# client say when a value does not fit (a convention of YAML/JSON language servers, not standard JSON Schema).
DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "pattern": DURATION_PATTERN}],
    "examples": ["30s", "5m", "1h30m", 90],
    "errorMessage": "expected a duration such as 30s, 5m, 1h30m or a number of seconds",
}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(DURATION_SCHEMA, mode="validation")]
DEFAULT_MAX_TURNS = 50


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _null_unless_agent(what: str) -> dict[str, Any]:
    return {"type": "null", "errorMessage": f"{what} only applies to agent steps; add `agent:` with instructions"}


# What `_kind` checks, as JSON Schema (for editors and other languages): `run:` or `agent:`, and agent-only keys.
_STEP_KINDS: dict[str, Any] = {
    "if": {"required": ["agent"], "properties": {"agent": {"type": "string"}}},
    "then": {
        "required": ["model"],
        "errorMessage": "an agent step needs `model:`, e.g. `model: {name: gpt-4.1-mini}`",
        "properties": {
            "run": {"type": "null", "errorMessage": "a step has either `run:` or `agent:`, not both"},
        },
    },
    "else": {
        "required": ["run"],
        "errorMessage": "a step needs `run:` (a shell command) or `agent:` (instructions for a model)",
        "properties": {
            "model": _null_unless_agent("model"),
            "tools": {**_null_unless_agent("tools"), "type": ["array", "null"], "maxItems": 0},
            "max_turns": _null_unless_agent("max_turns"),
            "max_output_tokens": _null_unless_agent("max_output_tokens"),
            "done": _null_unless_agent("done"),
            "checkpoint": {**_null_unless_agent("every_tool_call"), "type": ["boolean", "null"]},
        },
    },
}


class Step(_Strict):
    """One unit of work and of atomicity: it completes and is checkpointed, or it never happened. A shell command
    (`run:`) or a task for an LLM agent (`agent:` with `model:`)."""

    model_config = ConfigDict(json_schema_extra=_STEP_KINDS)

    name: str = Field(min_length=1, max_length=200, description="Shown in status, logs and the Web UI.")
    run: str | None = Field(
        default=None, min_length=1, description="A shell command, run as `sh -c` in `cwd` (default /workspace)."
    )
    # An agent step: instructions for a model that works with tools in the sandbox (see tardigrade/agent_spec.py).
    agent: str | None = Field(
        default=None, min_length=1, description="Instructions for an LLM agent that works with tools in the sandbox."
    )
    model: ModelConfig | None = Field(default=None, description="Agent steps: which model answers.")
    tools: tuple[ToolName, ...] | None = Field(
        default=None,
        description="Agent steps: the tools offered (default: exec, read_file, write_file, list_files).",
        json_schema_extra={"uniqueItems": True},
    )
    max_turns: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description=f"Agent steps: model calls before the step fails (default {DEFAULT_MAX_TURNS}).",
    )
    max_output_tokens: int | None = Field(default=None, ge=1, description="Agent steps: per model call.")
    done: Literal["finish", "no_tool_calls"] | None = Field(
        default=None,
        description="Agent steps: when the agent is done - it calls finish(summary) (the default), or replies"
        " without tool calls.",
    )
    timeout: Duration = Field(default=3600.0, description="The command (or the whole agent step) is killed after it.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of this step only.")
    cwd: str = Field(
        default=WORKSPACE,
        description="Working directory, inside /workspace or ~.",
        json_schema_extra=SANDBOX_PATH_SCHEMA,
    )
    retries: int = Field(
        default=0, ge=0, le=100, description="On a non-zero exit, roll back to the last checkpoint and try again."
    )
    retry_backoff: Duration = Field(default=1.0, description="Wait before a retry; doubles with every retry.")
    # None: follow the pipeline's policy. Agent steps may say every_tool_call: a snapshot after each mutating
    # tool call, so a lost sandbox resumes the agent at the turn it was on instead of at its first turn.
    checkpoint: bool | Literal["every_tool_call"] | None = Field(
        default=None,
        description="Snapshot after this step (true/false; default: the pipeline's `checkpoint:`). Agent steps may"
        " say every_tool_call: a snapshot after each tool call that may change files.",
    )

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
    worker offers, and after losing a sandbox is rehydrated on the next (see sandboxes/provider_choice.py)."""

    provider: ProviderName | list[ProviderName] = Field(
        default="local",
        description="Where sandboxes run: local (bubblewrap), e2b or modal, or a preference list such as [local, e2b].",
        json_schema_extra={"uniqueItems": True, "minItems": 1},
    )
    network: bool = Field(default=False, description="Whether commands in the sandbox may use the network.")
    isolation: Literal["required", "preferred"] = Field(
        default="required",
        description="required: refuse to run without bubblewrap; preferred: run unisolated, with a loud warning.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Provider-specific settings.")

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

    every: int = Field(default=1, ge=1, description="Snapshot after every N-th step (and the last).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if v == "every_step":
            return {"every": 1}
        if v == "end_only":
            return {"every": 1_000_000_000}
        return v

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """A file may also say ``every_step`` or ``end_only``: the schema describes what people write."""
        schema = handler.resolve_ref_schema(handler(core_schema))
        if handler.mode != "validation":
            return schema
        shorthand = {"enum": ["every_step", "end_only"]}
        return {"title": schema.pop("title"), "description": schema.pop("description"), "anyOf": [shorthand, schema]}


class Timeouts(_Strict):
    """How long Tardigrade waits before it presumes something lost, or gives up."""

    heartbeat: Duration = Field(
        default=10.0, description="A worker that stops heartbeating this long is presumed dead."
    )
    host_pickup: Duration = Field(
        default=15.0, description="A sandbox whose worker does not pick up work this long is presumed lost."
    )
    provision: Duration = Field(default=1800.0, description="Creating a sandbox, including setup commands.")
    checkpoint: Duration = Field(default=1800.0, description="Taking one snapshot.")


class Pipeline(_Strict):
    """A Tardigrade pipeline: a Manifest (what the sandbox needs), a sandbox, and the steps to run in it. Every
    step is a durable Temporal activity, and the sandbox's files are snapshotted after each one."""

    name: str = Field(min_length=1, max_length=200, description="Names the run (its workflow id starts with it).")
    description: str = Field(default="", description="Free text.")
    manifest: Manifest = Field(default_factory=Manifest, description="What the sandbox needs.")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="Where the steps run.")
    store: str | None = Field(
        default=None,
        description="Snapshot store URL (file://, s3://, r2://, gs://, az://); default: $TARDIGRADE_STORE, else a"
        " local folder.",
    )
    checkpoint: CheckpointPolicy = Field(
        default_factory=CheckpointPolicy, description="every_step (the default), end_only, or {every: N}."
    )
    timeouts: Timeouts = Field(default_factory=Timeouts, description="Loss detection and provisioning limits.")
    steps: list[Step] = Field(min_length=1, description="The steps, run in order.")
    max_rehydrations: int = Field(
        default=20, ge=0, description="Consecutive losses of the sandbox at one step before the run gives up."
    )
    steps_per_run: int = Field(
        default=200, ge=1, description="Continue-as-new after this many steps, so history stays small."
    )
    outputs: list[Output] = Field(
        default_factory=list, description="Paths published to object stores from checkpoints."
    )  # sandboxes/outputs.py

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


def validation_message(error: ValidationError, source: str) -> str:
    """One message naming the source and each field (``steps[3].timeout``), as `load_pipeline` reports them."""
    return _describe(error, source, None)


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
