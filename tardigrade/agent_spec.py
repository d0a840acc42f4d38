"""What an agent step may say in the pipeline file: its model block, its tools, and an offline script.

    - name: triage rejected rows
      agent: |
        Read reports/rejected.csv and write reports/triage.md ...
      model: {name: gpt-4.1-mini}                  # any OpenAI-compatible endpoint; key on the worker
      tools: [exec, read_file, write_file]         # default: exec, read_file, write_file, list_files
      max_turns: 20
      done: finish                                 # or no_tool_calls
      checkpoint: every_tool_call                  # default: at step end

The tool argument models here are the single source of truth for three things: the JSON schemas the model is
shown, the validation of what a model sends back, and the validation of a scripted model's calls when the
pipeline file is loaded. Nothing here does I/O, so the workflow, the activities and the CLI can all import it.
"""

from __future__ import annotations

import inspect
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

ToolName = Literal["exec", "read_file", "write_file", "list_files", "apply_patch"]
ALL_TOOLS: tuple[ToolName, ...] = ("exec", "read_file", "write_file", "list_files", "apply_patch")
DEFAULT_TOOLS: tuple[ToolName, ...] = ("exec", "read_file", "write_file", "list_files")
#: What OpenAI accepts as a function name: the shape of a function tool's name (tardigrade/function_tools.py).
TOOL_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"


def _tool_name(value: str) -> str:
    if value in ALL_TOOLS or re.match(TOOL_NAME_PATTERN, value):
        return value
    raise ValueError(
        f"{value!r} is neither a sandbox tool ({', '.join(ALL_TOOLS)}) nor the name of a function tool"
        " (1-64 letters, digits, _ or -)"
    )


#: A tool a step may name: a sandbox tool, or a function tool registered on the workers (checked when the step
#: starts, since the pipeline file cannot know what a worker registered).
AgentToolName = Annotated[
    str,
    AfterValidator(_tool_name),
    WithJsonSchema({"anyOf": [{"enum": list(ALL_TOOLS)}, {"type": "string", "pattern": TOOL_NAME_PATTERN}]}),
]
#: Tools that cannot change the sandbox: several of them asked for in one turn run in parallel, and they never
#: need a checkpoint after them.
READ_ONLY_TOOLS = frozenset({"read_file", "list_files"})
FINISH = "finish"
DEFAULT_EXEC_TIMEOUT = 300.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- tool arguments ---------------------------------------------------------------------------------------------


class _Args(BaseModel):
    # Models sometimes add keys of their own; ignoring them beats failing the call.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ExecArgs(_Args):
    """Run a shell command (sh -c) in the sandbox's working directory. Returns its exit code and output."""

    command: str = Field(min_length=1, description="the shell command, e.g. `wc -l data/raw/*.csv`")
    timeout_seconds: float | None = Field(
        default=None, gt=0, le=3600, description=f"kill it after this long (default {DEFAULT_EXEC_TIMEOUT:.0f})"
    )


class ReadFileArgs(_Args):
    """Read a text file. Long files are cut; read parts of them with exec (sed -n, head, tail)."""

    path: str = Field(min_length=1, description="relative to /workspace, or absolute under /workspace or ~")


class WriteFileArgs(_Args):
    """Create or overwrite a file with the given text. Parent folders are created."""

    path: str = Field(min_length=1, description="relative to /workspace, or absolute under /workspace or ~")
    content: str = Field(description="the whole new content of the file")


class ListFilesArgs(_Args):
    """List the files and folders under a path, with sizes."""

    path: str = Field(default=".", description="the folder to list, relative to /workspace")
    depth: int = Field(default=2, ge=1, le=6, description="how many levels down to go")


class ApplyPatchArgs(_Args):
    """Edit files with a patch: '*** Begin Patch', then '*** Add File: P' (lines start with +), '*** Delete
    File: P', or '*** Update File: P' with '@@' hunks of ' ' context, '-' removed and '+' added lines, then
    '*** End Patch'."""

    patch: str = Field(min_length=1, description="the patch text, from *** Begin Patch to *** End Patch")


class FinishArgs(_Args):
    """Call this once the task is complete: the step ends and the summary is recorded."""

    summary: str = Field(min_length=1, description="what was done, for the people running the pipeline")


TOOL_ARGS: dict[str, type[_Args]] = {
    "exec": ExecArgs,
    "read_file": ReadFileArgs,
    "write_file": WriteFileArgs,
    "list_files": ListFilesArgs,
    "apply_patch": ApplyPatchArgs,
    FINISH: FinishArgs,
}


def tool_schema(name: str) -> dict[str, Any]:
    """A sandbox tool's JSON schema, from its argument model."""
    args = TOOL_ARGS[name]
    description = (args.__doc__ or "").strip()
    return {"name": name, "description": description, "parameters": without_titles(args.model_json_schema())}


def without_titles(schema: Any) -> Any:
    """A JSON schema without pydantic's generated titles (they only add noise for the model). A property that is
    itself called "title" stays: its value is a schema, not a string."""
    if isinstance(schema, dict):
        return {k: without_titles(v) for k, v in schema.items() if not (k == "title" and isinstance(v, str))}
    if isinstance(schema, list):
        return [without_titles(v) for v in schema]
    return schema


def check_arguments(name: str, arguments: dict[str, Any]) -> _Args:
    """Validate a tool call's arguments; raises ValueError with one line per problem."""
    try:
        return TOOL_ARGS[name].model_validate(arguments)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(problems) from None


# -- the model block --------------------------------------------------------------------------------------------


class ScriptedCall(_Strict):
    tool: str
    arguments: dict[str, Any]


def _one_key(schema: dict[str, Any]) -> None:
    """An entry has exactly one key, and its value is not optional: ``exec: {...}``, never ``exec: null``."""
    for value in schema["properties"].values():
        value.pop("default", None)
        if "anyOf" in value:
            value.update(next(s for s in value.pop("anyOf") if s != {"type": "null"}))
    schema.update(minProperties=1, maxProperties=1)


# Only for the JSON Schema: one entry of a scripted turn as written in a file, a tool call or text. The fields
# come from TOOL_ARGS, so a new tool shows up in the schema (and in editors' completion) by itself.
_ENTRY_FIELDS: dict[str, Any] = {
    "say": (str | None, Field(default=None, description="Text the model replies with.")),
    **{
        name: (args | None, Field(default=None, description=inspect.cleandoc(args.__doc__ or "")))
        for name, args in TOOL_ARGS.items()
    },
}
ScriptedEntry: type[BaseModel] = create_model(
    "ScriptedEntry",
    __config__=ConfigDict(extra="forbid", json_schema_extra=_one_key),
    __doc__="One entry of a scripted turn: a tool call (`exec: {command: ls}`) or text (`say: ...`).",
    **_ENTRY_FIELDS,
)


class ScriptedTurn(_Strict):
    """One reply of a scripted model: text, tool calls, or both. Written in the pipeline file as

    - exec: {command: wc -l data.csv}                          # one call
    - [read_file: {path: a.csv}, read_file: {path: b.csv}]      # several calls in one turn
    - say: The numbers look right.                              # text, no calls
    - finish: {summary: Wrote reports/triage.md}                # the last turn
    """

    say: str | None = None
    calls: tuple[ScriptedCall, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        entries = value if isinstance(value, list) else [value]
        if not entries:
            raise ValueError("an empty turn; write a tool call such as `exec: {command: ls}` or `say: text`")
        say: str | None = None
        calls = []
        for entry in entries:
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError(
                    f"{entry!r} is not a turn; write one tool call per mapping, e.g. `exec: {{command: ls}}`, a list"
                    " of them for several calls in one turn, or `say: text`"
                )
            ((key, arguments),) = entry.items()
            if key == "say":
                if not isinstance(arguments, str):
                    raise ValueError("say: expects text")
                say = arguments
            else:
                if not isinstance(arguments, dict):
                    raise ValueError(f"{key}: expects a mapping of arguments, e.g. {key}: {{...}}")
                calls.append({"tool": key, "arguments": arguments})
        return {"say": say, "calls": calls}

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """A turn as written: one `ScriptedEntry`, or a list of them."""
        if handler.mode != "validation":
            return handler(core_schema)
        written: TypeAdapter[Any] = TypeAdapter(
            ScriptedEntry | Annotated[list[ScriptedEntry], Field(min_length=1)]  # type: ignore[valid-type,arg-type]
        )
        return {"description": inspect.cleandoc(cls.__doc__ or ""), **handler(written.core_schema)}

    @model_serializer
    def _as_written(self) -> Any:
        """Serialized the way it is written, so it reads the same in history and survives a round trip."""
        entries: list[dict[str, Any]] = [{"say": self.say}] if self.say is not None else []
        entries += [{call.tool: call.arguments} for call in self.calls]
        return entries[0] if len(entries) == 1 else entries


# What `ModelConfig._complete` checks, as JSON Schema (for editors and other languages).
_MODEL_RULES: dict[str, Any] = {
    "if": {"required": ["provider"], "properties": {"provider": {"const": "scripted"}}},
    "then": {
        "required": ["script"],
        "properties": {"script": {"type": "array", "minItems": 1}},
        "errorMessage": "provider scripted needs a `script:`, a list of turns ending with `- finish: {summary: ...}`",
    },
    "else": {
        "required": ["name"],
        "properties": {"name": {"type": "string"}},
        "errorMessage": "name is required for provider openai, e.g. `model: {name: gpt-4.1-mini}`",
    },
}


class ModelConfig(_Strict):
    """Which model answers. ``provider: openai`` (the default) is any OpenAI-compatible endpoint: the key is read
    from the worker's environment (``api_key_env``, default OPENAI_API_KEY) and the endpoint from ``base_url`` or
    the worker's OPENAI_BASE_URL. ``provider: scripted`` replays ``script`` instead and needs no key or network;
    with ``provider: openai`` a script is ignored, so a pipeline can keep one for offline runs."""

    model_config = ConfigDict(json_schema_extra=_MODEL_RULES)

    provider: Literal["openai", "scripted"] = Field(
        default="openai", description="openai: any OpenAI-compatible endpoint; scripted: replay `script` offline."
    )
    name: str | None = Field(default=None, min_length=1, description="The model, e.g. gpt-4.1-mini.")
    api: Literal["responses", "chat_completions"] = Field(
        default="responses", description="chat_completions for servers without the Responses API."
    )
    base_url: str | None = Field(
        default=None,
        description="The endpoint, e.g. http://127.0.0.1:8000/v1 (default: the worker's OPENAI_BASE_URL).",
        json_schema_extra={"pattern": "^https?://", "errorMessage": "must be an http(s):// URL"},
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The worker's environment variable holding the key.",
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    request_timeout: float = Field(default=600.0, gt=0, description="One model call, in seconds.")
    max_attempts: int = Field(
        default=8, ge=1, le=100, description="Per model call, for 408/409/429/5xx and network errors."
    )
    script: list[ScriptedTurn] | None = Field(
        default=None, description="provider scripted: the replies to replay, one turn per entry, finish last."
    )

    @model_validator(mode="after")
    def _complete(self) -> ModelConfig:
        if self.provider == "openai" and not self.name:
            raise ValueError(
                "name is required for provider openai, e.g. `model: {name: gpt-4.1-mini}` (or use"
                " `provider: scripted` with a `script:` to run offline)"
            )
        if self.provider == "scripted" and not self.script:
            raise ValueError(
                "provider scripted needs a `script:`, a list of turns such as `- exec: {command: ls}` ending with"
                " `- finish: {summary: ...}`"
            )
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {self.base_url!r} must be an http(s):// URL, e.g. http://127.0.0.1:8000/v1")
        if self.base_url is not None and "@" in self.base_url.split("//", 1)[1].split("/", 1)[0]:
            raise ValueError("base_url must not contain credentials; the key is read from api_key_env")
        return self

    @property
    def label(self) -> str:
        return f"scripted {self.name}" if self.provider == "scripted" and self.name else self.name or self.provider


def check_agent_step(model: ModelConfig, tools: tuple[AgentToolName, ...], done: str) -> None:
    """Cross-field checks of an agent step: the tools are distinct and a script only calls tools it may use."""
    duplicates = sorted({t for t in tools if tools.count(t) > 1})
    if duplicates:
        raise ValueError(f"tools: {', '.join(duplicates)} listed more than once")
    if not model.script:
        return
    allowed = [*tools, *([FINISH] if done == "finish" else [])]
    for i, turn in enumerate(model.script):
        for call in turn.calls:
            where = f"model.script[{i}].{call.tool}"
            if call.tool not in allowed:
                hint = ""
                if call.tool == FINISH:
                    hint = " (done: no_tool_calls offers no finish tool; end the script with `say:`)"
                raise ValueError(f"{where}: not one of this step's tools ({', '.join(allowed)}){hint}")
            if call.tool not in TOOL_ARGS:
                continue  # a function tool: its arguments are checked on the worker that registered it
            try:
                check_arguments(call.tool, call.arguments)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
