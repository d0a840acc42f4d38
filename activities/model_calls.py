"""Model activities: start an agent's conversation, and ask the model for its next turn.

They run on the shared task queue (any worker will do: they touch no sandbox). The conversation is read from and
written to the snapshot store (activities/conversation.py), so each activity's input and result is a handful of
refs, call ids and token counts however long the conversation gets.

The model is reached through the official `openai` client - the Responses API, or Chat Completions for
OpenAI-compatible servers that lack it - with the key and endpoint taken from the worker's environment
(OPENAI_API_KEY, OPENAI_BASE_URL) unless the pipeline's `model` block names others. The client's own retries are
off: Temporal retries the activity instead, so each attempt is visible in history, and a 408/409/429/5xx answer's
``retry-after`` becomes the delay before the next attempt. Other 4xx answers fail the step at once with the
endpoint's message. ``provider: scripted`` replays the turns written in the pipeline file instead, offline.
"""

from __future__ import annotations

import asyncio
import difflib
import email.utils
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from tardigrade.activities.contract import (
    AGENT_START,
    AGENT_TEXT_BYTES,
    MODEL_CALL,
    AgentStartInput,
    AgentStartResult,
    FunctionToolLimits,
    ModelCallInput,
    ModelCallResult,
    TokenUsage,
    ToolCallRef,
)
from tardigrade.activities.conversation import (
    AgentRoot,
    Conversation,
    ConversationError,
    Conversations,
    FunctionToolSpec,
    Node,
    StoredReply,
)
from tardigrade.activities.sandbox import heartbeating
from tardigrade.activities.secrets import Redactor
from tardigrade.agent_spec import ALL_TOOLS, FINISH, READ_ONLY_TOOLS, TOOL_ARGS, ModelConfig, tool_schema
from tardigrade.sandboxes.manifest import secret_name

if TYPE_CHECKING:
    import openai  # an optional extra (tardigrade-temporal[openai]): imported when a model is first called

    from tardigrade.function_tools import FunctionTool

RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx
MAX_RETRY_AFTER = 600.0  # seconds; a longer retry-after is capped (the activity's retry policy bounds the total)

PREAMBLE = (
    "You carry out one step of a data pipeline inside a sandbox: a Linux machine whose files you change with the"
    " tools you are given. Your working directory is {cwd}; relative paths are relative to it. The sandbox may"
    " have no network access. A tool that fails (a non-zero exit code, a missing file, a timeout) tells you so in"
    " its result: read it and adjust. {done}"
)
DONE_TEXT = {
    "finish": "When the task is complete, call the `finish` tool with a short summary of what you did.",
    "no_tool_calls": "When the task is complete, reply with a short summary of what you did and call no tool.",
}
NUDGE = "You called no tool. Continue the task with the tools, or call `finish` with a summary if it is complete."


def _bounded(text: str, limit: int = AGENT_TEXT_BYTES) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _failure(message: str, kind: str, *, retry_after: float | None = None, retryable: bool = False) -> ApplicationError:
    delay = timedelta(seconds=min(retry_after, MAX_RETRY_AFTER)) if retry_after is not None else None
    return ApplicationError(message, type=kind, non_retryable=not retryable, next_retry_delay=delay)


def _store_failure(error: ConversationError) -> ApplicationError:
    return _failure(str(error), "StoreError")


@dataclass
class ModelReply:
    """A model's answer, normalized: items to append to the conversation, and what it cost."""

    items: list[dict[str, Any]] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0


# -- OpenAI wire formats ----------------------------------------------------------------------------------------


def chat_messages(instructions: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses-style items as Chat Completions messages: calls join their assistant message, results become
    ``tool`` messages."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}]
    assistant_open = False
    for item in items:
        kind = item.get("type")
        if kind == "message":
            content = item["content"]
            if item["role"] == "assistant":
                messages.append({"role": "assistant", "content": content})
                assistant_open = True
                continue
            messages.append({"role": item["role"], "content": content})
        elif kind == "function_call":
            if not assistant_open:
                messages.append({"role": "assistant", "content": None})
                assistant_open = True
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
            messages[-1].setdefault("tool_calls", []).append(call)
            continue
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        assistant_open = False
    return messages


def _text_of(content: Any) -> str:
    parts = content or []
    return "".join(getattr(p, "text", "") or "" for p in parts if getattr(p, "type", "") == "output_text")


def _reply_items(text: str, calls: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if text:
        items.append({"type": "message", "role": "assistant", "content": text})
    for call_id, name, arguments in calls:
        items.append({"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments})
    return items


def retry_after_seconds(headers: Any, now: Callable[[], float] = time.time) -> float | None:
    """The server's requested delay: ``retry-after-ms``, or ``retry-after`` in seconds or as an HTTP date."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    try:
        if value is not None:
            return max(0.0, float(value) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        seconds = parsed.timestamp() - now()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _error_detail(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return error.message


# -- activities -------------------------------------------------------------------------------------------------


class ModelActivities:
    def __init__(self, conversations: Conversations, function_tools: Mapping[str, FunctionTool] | None = None) -> None:
        self.conversations = conversations
        self.function_tools = dict(function_tools or {})

    def all(self) -> list[Callable[..., Any]]:
        return [self.agent_start, self.model_call]

    @activity.defn(name=AGENT_START)
    async def agent_start(self, input: AgentStartInput) -> AgentStartResult:
        """Store the root of a new conversation: how the step's agent works, and its task."""
        step = input.step
        assert step.agent is not None and step.model is not None
        _require_key(step.model)
        tools = [*step.agent_tools, *([FINISH] if step.done_when == "finish" else [])]
        functions = self._function_tools(step.agent_tools, input.label)
        root = AgentRoot(
            run_id=input.run_id,
            index=input.index,
            attempt=input.attempt,
            label=input.label,
            instructions=PREAMBLE.format(cwd=step.cwd, done=DONE_TEXT[step.done_when]),
            model=step.model,
            tools=tools,
            function_tools=functions,
            done=step.done_when,
            max_output_tokens=step.max_output_tokens,
            env=input.env,
            secrets=input.secrets,
            cwd=step.cwd,
            timeout=step.timeout,
        )
        first = Node(parent=None, root=root, items=[{"type": "message", "role": "user", "content": step.agent}])
        conversation = self.conversations.open(input.store)
        ref = await asyncio.to_thread(conversation.put_node, first)
        return AgentStartResult(conversation=ref)

    def _function_tools(self, names: Iterable[str], label: str) -> list[FunctionToolSpec]:
        """The step's function tools as this worker registered them; a name it does not know stops the step."""
        specs = []
        for name in names:
            if name in TOOL_ARGS:
                continue
            tool = self.function_tools.get(name)
            if tool is None:
                close = difflib.get_close_matches(name, [*ALL_TOOLS, *self.function_tools], n=1)
                hint = f"did you mean {close[0]!r}?" if close else "register it with TardigradePlugin(tools=[...])"
                raise _failure(
                    f"{label}: tools names {name!r}, which is neither a sandbox tool ({', '.join(ALL_TOOLS)}) nor a"
                    f" function tool registered on this worker ({', '.join(self.function_tools) or 'none'}); {hint}",
                    "ModelNotConfigured",
                )
            schema = tool.schema()
            specs.append(
                FunctionToolSpec(
                    name=name,
                    description=schema["description"],
                    parameters=schema["parameters"],
                    timeout=tool.timeout,
                    max_attempts=tool.max_attempts,
                )
            )
        return specs

    @activity.defn(name=MODEL_CALL)
    async def model_call(self, input: ModelCallInput) -> ModelCallResult:
        """One model turn: append the tool results, ask the model (or reuse this run's reply to the very same
        conversation), store the reply as a new node, and return its tool calls."""
        conversation = self.conversations.open(input.store)
        async with heartbeating(lambda: {"turn": input.turn}):
            try:
                request, nodes = await asyncio.to_thread(self._request, conversation, input)
                stored = await asyncio.to_thread(conversation.reply, request)
                replayed = stored is not None
                if stored is None:
                    assert nodes[0].root is not None
                    items = [item for node in nodes for item in node.items]
                    reply = await self._ask(nodes[0].root, items, input.turn)
                    node = await asyncio.to_thread(conversation.put_node, Node(parent=request, items=reply.items))
                    mine = StoredReply(node=node, input_tokens=reply.input_tokens, output_tokens=reply.output_tokens)
                    stored = await asyncio.to_thread(conversation.put_reply, request, mine)
                    replayed = stored != mine  # another attempt of this call got there first
                reply_node = await asyncio.to_thread(conversation.node, stored.node)
            except ConversationError as e:
                raise _store_failure(e) from e
        root = nodes[0].root
        assert root is not None
        # A reply reused by a later attempt of this same activity was never reported: its first attempt died
        # after asking. One reused by another activity (an agent step started over) was counted already.
        counted_before = replayed and activity.info().attempt == 1
        usage = (
            TokenUsage()
            if counted_before
            else TokenUsage(input_tokens=stored.input_tokens, output_tokens=stored.output_tokens, model_calls=1)
        )
        return _result(root, stored.node, reply_node, input.turn, usage, replayed)

    @staticmethod
    def _request(conversation: Conversation, input: ModelCallInput) -> tuple[str, list[Node]]:
        """The conversation to send: the head plus this turn's tool results (and a reminder, if asked)."""
        new_items = [conversation.item(ref) for ref in input.tool_results]
        if input.nudge:
            new_items.append({"type": "message", "role": "user", "content": NUDGE})
        request = conversation.append(input.conversation, new_items)
        return request, conversation.chain(request)

    async def _ask(self, root: AgentRoot, items: list[dict[str, Any]], turn: int) -> ModelReply:
        if root.model.provider == "scripted":
            return _scripted_reply(root, turn)
        return await _openai_reply(root, items, turn)


def _result(
    root: AgentRoot, node_ref: str, node: Node, turn: int, usage: TokenUsage, replayed: bool
) -> ModelCallResult:
    names = [secret_name(entry) for entry in root.secrets]
    redactor = Redactor(os.environ[name] for name in names if name in os.environ)
    calls: list[ToolCallRef] = []
    functions = {f.name: f for f in root.function_tools}
    text, summary = "", None
    for item in node.items:
        if item["type"] == "message":
            text += item["content"]
        elif item["type"] == "function_call" and item["name"] == FINISH and FINISH in root.tools:
            try:
                summary = str(json.loads(item["arguments"]).get("summary") or "")
            except (ValueError, AttributeError):
                summary = item["arguments"]
        elif item["type"] == "function_call":
            function = functions.get(item["name"])
            calls.append(
                ToolCallRef(
                    call_id=item["call_id"],
                    name=item["name"],
                    description=_bounded(redactor.text(describe_call(item["name"], item["arguments"])), 120),
                    # A function tool never touches the sandbox: it runs beside read-only calls, no checkpoint.
                    read_only=function is not None or (item["name"] in READ_ONLY_TOOLS and item["name"] in root.tools),
                    function=FunctionToolLimits(timeout=function.timeout, max_attempts=function.max_attempts)
                    if function is not None
                    else None,
                )
            )
    return ModelCallResult(
        conversation=node_ref,
        turn=turn,
        tool_calls=calls,
        finish_summary=_bounded(redactor.text(summary)) if summary is not None else None,
        text=_bounded(redactor.text(text)),
        usage=usage,
        replayed=replayed,
    )


def describe_call(name: str, arguments: str) -> str:
    """A one-line description for activity summaries. Never a file's content."""
    try:
        args = json.loads(arguments)
    except ValueError:
        return f"{name} (arguments are not valid JSON)"
    if not isinstance(args, dict):
        return f"{name} (arguments are not an object)"
    if name == "exec":
        return f"exec: {' '.join(str(args.get('command', '')).split())}"
    if name == "write_file":
        return f"write_file: {args.get('path')} ({len(str(args.get('content', '')))} chars)"
    if name in ("read_file", "list_files"):
        return f"{name}: {args.get('path', '.')}"
    if name == "apply_patch":
        files = [line.split(":", 1)[1].strip() for line in str(args.get("patch", "")).splitlines()
                 if line.startswith(("*** Update File:", "*** Add File:", "*** Delete File:"))]  # fmt: skip
        return f"apply_patch: {', '.join(files) or 'no files'}"
    if name not in TOOL_ARGS:  # a function tool: its arguments, short
        return f"{name}({', '.join(f'{k}={v}' for k, v in args.items())})"
    return name


def _require_key(model: ModelConfig) -> str | None:
    if model.provider == "scripted":
        return None
    key = os.environ.get(model.api_key_env)
    if not key:
        raise _failure(
            f"model {model.name!r} needs an API key, but {model.api_key_env} is not set on this worker. Export"
            f" {model.api_key_env} (and OPENAI_BASE_URL for an OpenAI-compatible endpoint) in the environment of"
            " the worker process - keys live on workers, never in the pipeline - or use `model: {provider:"
            " scripted, script: [...]}` to replay tool calls offline.",
            "ModelNotConfigured",
        )
    return key


def _scripted_reply(root: AgentRoot, turn: int) -> ModelReply:
    script = root.model.script or []
    if turn > len(script):
        ending = "`- finish: {summary: ...}`" if root.done == "finish" else "`- say: <summary>`"
        raise _failure(
            f"{root.label}: the scripted model has {len(script)} turn(s) but the agent asked for turn {turn}."
            f" End model.script with {ending}.",
            "ScriptExhausted",
        )
    entry = script[turn - 1]
    calls = [
        (f"call_{turn}_{i + 1}", call.tool, json.dumps(call.arguments, sort_keys=True))
        for i, call in enumerate(entry.calls)
    ]
    return ModelReply(items=_reply_items(entry.say or "", calls))


async def _openai_reply(root: AgentRoot, items: list[dict[str, Any]], turn: int) -> ModelReply:
    model = root.model
    key = _require_key(model)
    try:
        import openai
    except ImportError:
        raise _failure(
            "the openai package is not installed on this worker;"
            " install it with pip install 'tardigrade-temporal[openai]'",
            "ModelNotConfigured",
        ) from None
    base_url = model.base_url or os.environ.get("OPENAI_BASE_URL") or None
    functions = {f.name: f for f in root.function_tools}
    tools = [
        {"name": name, "description": functions[name].description, "parameters": functions[name].parameters}
        if name in functions
        else tool_schema(name)
        for name in root.tools
    ]
    redactor = Redactor([key or ""])
    client = openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=model.request_timeout)
    try:
        if model.api == "responses":
            response = await client.responses.create(
                model=model.name or "",
                instructions=root.instructions,
                input=items,  # type: ignore[arg-type]  # our stored items are valid input items
                # Not strict: the schemas have optional arguments, which strict mode does not allow.
                tools=[{"type": "function", "strict": False, **schema} for schema in tools],  # type: ignore[misc]
                store=False,
                **_optional(max_output_tokens=root.max_output_tokens, temperature=model.temperature),
            )
            text, calls = "", []
            for i, out in enumerate(response.output):
                if out.type == "message":
                    text += _text_of(out.content)
                elif out.type == "function_call":
                    calls.append((out.call_id or f"call_{turn}_{i + 1}", out.name, out.arguments or "{}"))
            usage = response.usage
            return ModelReply(
                items=_reply_items(text, calls),
                input_tokens=usage.input_tokens if usage else 0,
                output_tokens=usage.output_tokens if usage else 0,
            )
        completion = await client.chat.completions.create(
            model=model.name or "",
            messages=chat_messages(root.instructions, items),  # type: ignore[arg-type]
            tools=[{"type": "function", "function": schema} for schema in tools],  # type: ignore[typeddict-item]
            **_optional(max_tokens=root.max_output_tokens, temperature=model.temperature),
        )
        if not completion.choices:
            raise _failure(f"the endpoint sent no choices for {model.name!r}", "ModelBadReply", retryable=True)
        message = completion.choices[0].message
        chat_calls = [
            (call.id or f"call_{turn}_{i + 1}", call.function.name, call.function.arguments or "{}")
            for i, call in enumerate(message.tool_calls or [])
            if call.type == "function"
        ]
        chat_usage = completion.usage
        return ModelReply(
            items=_reply_items(message.content or "", chat_calls),
            input_tokens=chat_usage.prompt_tokens if chat_usage else 0,
            output_tokens=chat_usage.completion_tokens if chat_usage else 0,
        )
    except openai.APIStatusError as e:
        raise _status_failure(e, model, redactor) from None
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        where = redactor.text(base_url or "the default OpenAI endpoint")
        raise _failure(f"cannot reach the model endpoint at {where}: {redactor.text(str(e))}", "ModelUnreachable",
                       retryable=True) from None  # fmt: skip
    finally:
        await client.close()


def _optional(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _status_failure(error: openai.APIStatusError, model: ModelConfig, redactor: Redactor) -> ApplicationError:
    status = error.status_code
    url = redactor.text(str(error.request.url)) if error.request is not None else "the model endpoint"
    detail = redactor.text(_error_detail(error))
    if status in RETRYABLE_STATUS or status >= 500:
        delay = retry_after_seconds(error.response.headers if error.response is not None else None)
        after = f"; retrying in {delay:g} s as the server asked (retry-after)" if delay is not None else ""
        return _failure(f"HTTP {status} from {url}: {detail}{after}", "ModelUnavailable", retry_after=delay,
                        retryable=True)  # fmt: skip
    hints = {
        401: f" Check {model.api_key_env} on the worker.",
        403: f" Check that the key in {model.api_key_env} may use model {model.name!r}.",
        404: f" Check model.name ({model.name!r}) and the endpoint; a server without the Responses API needs"
        " `api: chat_completions` in the model block.",
    }
    return _failure(
        f"the model endpoint refused the request: HTTP {status} from {url}: {detail}.{hints.get(status, '')}",
        "ModelRequestRejected",
    )
