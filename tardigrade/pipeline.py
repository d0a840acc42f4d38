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
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from tardigrade.agent_spec import DEFAULT_TOOLS, AgentToolName, ModelConfig, check_agent_step
from tardigrade.sandboxes.layout import WORKSPACE
from tardigrade.sandboxes.limits import Limits
from tardigrade.sandboxes.manifest import (
    NO_CREDENTIALS_SCHEMA,
    SANDBOX_PATH_SCHEMA,
    Manifest,
    Output,
    refuse_credentials,
    sandbox_path,
    tree_path,
)
from tardigrade.sandboxes.network.rules import NetworkRule, NetworkRuleError
from tardigrade.sandboxes.provider_options import (
    ALL_PROVIDER_OPTIONS,
    NAMED_PROVIDERS,
    QUALIFIED_PROVIDER,
    check_options,
    describe_options,
    is_provider_name,
)

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
    tools: tuple[AgentToolName, ...] | None = Field(
        default=None,
        description="Agent steps: the tools offered (default: exec, read_file, write_file, list_files), and the"
        " names of function tools registered on the workers (TardigradePlugin(tools=[...])).",
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
    def agent_tools(self) -> tuple[AgentToolName, ...]:
        return self.tools if self.tools is not None else DEFAULT_TOOLS

    @property
    def done_when(self) -> str:
        return self.done or "finish"

    @property
    def turn_limit(self) -> int:
        return self.max_turns or DEFAULT_MAX_TURNS


# A provider name: built in (or shipped through the provider kit), or a third party's qualified entry-point name,
# which only the worker can check (sandboxes/provider_kit.py); validated by `SandboxConfig._provider`.
ProviderName = Annotated[
    str,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "enum": list(NAMED_PROVIDERS)},
                {"type": "string", "pattern": QUALIFIED_PROVIDER.pattern},
            ]
        }
    ),
]
# The keys any provider takes (the schema cannot tell which key belongs to which provider; the model does).
_OPTIONS_SCHEMA: dict[str, Any] = {"propertyNames": {"enum": sorted(ALL_PROVIDER_OPTIONS)}}


class NetworkAllow(_Strict):
    """``network: {allow: [...]}``: the hosts a sandbox may reach (sandboxes/network/rules.py)."""

    allow: list[str] = Field(
        description="Hosts the sandbox may reach through the worker's egress proxy: names (pypi.org), `*.` suffix"
        " rules (*.github.com) or IP addresses.",
        json_schema_extra={"minItems": 1},
    )

    @field_validator("allow")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        try:
            return list(NetworkRule.parse({"allow": v}, "network").allow)
        except NetworkRuleError as e:
            raise ValueError(str(e).removeprefix("network.allow").strip()) from None


class SandboxConfig(_Strict):
    """``provider`` is one name or a preference list (``[local, e2b]``): a run provisions on the first one the
    worker offers, and after losing a sandbox is rehydrated on the next (see sandboxes/provider_choice.py)."""

    provider: ProviderName | list[ProviderName] = Field(
        default="local",
        description=f"Where sandboxes run: {', '.join(NAMED_PROVIDERS)} (local is bubblewrap on the worker), an"
        " installed provider's entry-point name (acme.vm), or a preference list such as [local, e2b].",
        json_schema_extra={
            "uniqueItems": True,
            "minItems": 1,
            "errorMessage": f"expected one of {', '.join(NAMED_PROVIDERS)}, an installed provider's qualified name"
            " such as acme.vm, or a list of them",
        },
    )
    network: bool | NetworkAllow = Field(
        default=False,
        description="false: no network (the default); true: the internet, never the worker or its private networks;"
        " {allow: [pypi.org, '*.github.com']}: only those hosts, through the worker's egress proxy.",
    )
    isolation: Literal["required", "preferred"] = Field(
        default="required",
        description="required: refuse to run without bubblewrap; preferred: run unisolated, with a loud warning.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Provider-specific settings (sandboxes/provider_options.py): {describe_options()}.",
        json_schema_extra=_OPTIONS_SCHEMA,
    )
    limits: Limits = Field(
        default_factory=Limits,
        description="What the sandbox's commands may use (sandboxes/limits.py): memory, disk and tmp (sizes such as"
        " 2GiB), pids, cpu (cores); defaults memory 4GiB, pids 512, cpu no cap, disk 20GiB, tmp 1GiB. A step that"
        " hits one fails, naming the limit.",
    )

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, v: Any) -> Any:
        try:
            NetworkRule.parse(v, "sandbox.network")  # one clear message for any wrong shape
        except NetworkRuleError as e:  # the field is named by the pipeline's own error format
            raise ValueError(str(e).removeprefix("sandbox.network").removeprefix(".").strip()) from None
        return v

    @field_validator("provider", mode="before")
    @classmethod
    def _provider(cls, v: Any) -> Any:
        names = v if isinstance(v, list) else [v]
        if not names or any(not isinstance(name, str) or not is_provider_name(name) for name in names):
            raise ValueError(
                f"Input should be one of {', '.join(NAMED_PROVIDERS)}, an installed provider's qualified entry-point"
                " name such as acme.vm, or a preference list such as [local, e2b]"
            )
        if len(set(names)) != len(names):
            raise ValueError("each provider may appear once in the list")
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        provider = info.data.get("provider", "local")  # absent: it was invalid, and that error is reported
        check_options(v, [provider] if isinstance(provider, str) else provider)
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
    outage: Duration = Field(
        default=3600.0,
        description="How long a run waits out an outage of its snapshot store (unreachable, throttling, full),"
        " retrying with backoff, before it fails. The run keeps its sandbox meanwhile.",
    )


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
        json_schema_extra=NO_CREDENTIALS_SCHEMA,
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

    @field_validator("store")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        if v is not None:
            refuse_credentials(v, "store")
        return v

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


MAX_PIPELINE_BYTES = 8 << 20  # far above any real pipeline (a run's input must fit a 2 MiB Temporal payload)
MAX_YAML_NODES = 100_000  # values in the document with every alias expanded: a "billion laughs" file is refused


def _expanded_size(root: yaml.Node, source: str) -> int:
    """How many values the document holds once every alias is expanded, counted without expanding anything (each
    node's size is computed once). Refuses cycles (``&a [*a]``) and sizes past `MAX_YAML_NODES`."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:  # iterative: a deeply nested document must not exhaust Python's recursion limit here
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if not children_done:
            if id(node) in open_nodes:
                raise PipelineError(f"{source}: a YAML alias refers to a value that contains it (a cycle)")
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        open_nodes.discard(id(node))
        size = 1 + sum(sizes[id(c)] for c in children)
        if size > MAX_YAML_NODES:
            raise PipelineError(
                f"{source}: the YAML expands to more than {MAX_YAML_NODES:,} values (anchors and aliases repeated"
                " inside each other); write the values out or simplify the file"
            )
        sizes[id(node)] = size
    return sizes[id(root)]


def load_yaml(text: str, source: str) -> Any:
    """Parse a pipeline's YAML (or JSON) text with bounds: a file over `MAX_PIPELINE_BYTES`, an alias bomb or
    nesting too deep for the parser is one `PipelineError`, not a client that hangs or runs out of memory."""
    if len(text) > MAX_PIPELINE_BYTES:
        raise PipelineError(
            f"{source}: the file is {len(text):,} characters; pipeline files are at most {MAX_PIPELINE_BYTES >> 20}"
            " MiB (copy large files in with manifest.files[].source)"
        )
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters already: inside the try
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PipelineError(f"{source}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise PipelineError(f"{source}: the YAML is nested too deeply; flatten it") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_pipeline(path: str | Path) -> LoadedPipeline:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such pipeline file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: cannot read it ({e})") from None
    data = load_yaml(text, str(path))
    pipeline = parse_pipeline(data, str(path))
    from tardigrade.sandboxes.policy import client_policy  # client-side only: the workflow imports this module

    policy = client_policy()
    roots = policy.file_roots if policy is not None else ()
    check_sources(pipeline, path.parent, source=str(path), relative_to="the pipeline file", roots=roots)
    return LoadedPipeline(pipeline=pipeline, path=path.resolve())


def check_sources(
    pipeline: Pipeline, base_dir: Path, *, source: str, relative_to: str, roots: Sequence[str] = ()
) -> None:
    """Every Manifest file copied from disk (``source:``) must exist; relative paths are resolved against base_dir.
    It must resolve (symlinks followed, ``..`` applied) inside base_dir or one of ``roots`` (a policy's file_roots):
    a pipeline cannot make the client upload ~/.ssh/id_rsa into a snapshot.

    Checked before anything is staged, so a typo is one clear error rather than a half-uploaded seed snapshot.
    """
    base = base_dir.resolve()
    allowed = [base, *(Path(r).resolve() for r in roots)]
    for i, f in enumerate(pipeline.manifest.files):
        if f.source is not None:
            src = (base_dir / f.source).resolve()
            if not any(src == folder or folder in src.parents for folder in allowed):
                also = f" or the policy's file_roots ({', '.join(roots)})" if roots else ""
                raise PipelineError(
                    f"{source}: manifest.files[{i}].source: {f.source!r} resolves to {src}, outside the pipeline's"
                    f" folder ({base}){also}; copy the file into that folder, or add its folder to file_roots in"
                    " the policy file (TARDIGRADE_POLICY)"
                )
            if not src.is_file():
                raise PipelineError(
                    f"{source}: manifest.files[{i}].source: file {f.source!r} not found (looked for {src}); paths are"
                    f" relative to {relative_to}"
                )
