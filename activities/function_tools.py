"""The function-tool activity: one call of a Python function registered with the plugin, run on the worker.

Routed to the pipeline's shared task queue (any worker that registered the function), never into the sandbox: the
function may use the worker's own credentials and services, and the sandbox never sees them. Arguments are read
from the conversation in the store and the result is stored there, as for the sandbox tools; history gets a ref,
a short redacted preview and a few numbers.

Failures: arguments that do not fit the function's schema go back to the model at once (no retry can fix them).
An exception from the function is retried by Temporal under the tool's own retry policy; the last attempt stores
the error as the call's result, so the model reads it and decides, exactly as for a failing command.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from tardigrade.activities.contract import AGENT_TEXT_BYTES, FUNCTION_TOOL, FunctionToolInput, ToolCallResult
from tardigrade.activities.conversation import ConversationError, Conversations
from tardigrade.activities.secrets import Redactor, resolve_secrets
from tardigrade.activities.tools import PREVIEW_CHARS, TOOL_OUTPUT_LIMIT
from tardigrade.function_tools import FunctionTool


class FunctionToolActivities:
    def __init__(self, conversations: Conversations, function_tools: Mapping[str, FunctionTool]) -> None:
        self.conversations = conversations
        self.function_tools = dict(function_tools)

    def all(self) -> list[Callable[..., Any]]:
        return [self.function_tool]

    @activity.defn(name=FUNCTION_TOOL)
    async def function_tool(self, input: FunctionToolInput) -> ToolCallResult:
        """Call the function the model asked for and store what it returned (or why it failed)."""
        conversation = self.conversations.open(input.store)
        try:
            root, call = await asyncio.to_thread(conversation.call, input.root, input.node, input.call_id)
        except ConversationError as e:
            raise ApplicationError(str(e), type="StoreError", non_retryable=True) from e
        redactor = Redactor(resolve_secrets(root.secrets).values)
        started = time.monotonic()
        ok, text = await self._call(call["name"], call["arguments"], input, redactor)
        text = redactor.text(text)
        if len(text.encode()) > TOOL_OUTPUT_LIMIT:
            text = text.encode()[:TOOL_OUTPUT_LIMIT].decode(errors="ignore") + "\n[cut: the result was longer]"
        item = {"type": "function_call_output", "call_id": input.call_id, "output": text}
        try:
            ref = await asyncio.to_thread(conversation.put_item, item)
        except ConversationError as e:
            raise ApplicationError(str(e), type="StoreError", non_retryable=True) from e
        preview = " ".join(text.split())
        return ToolCallResult(
            call_id=input.call_id,
            name=call["name"],
            ok=ok,
            result=ref,
            preview=(preview if len(preview) <= PREVIEW_CHARS else preview[: PREVIEW_CHARS - 1] + "…")[
                :AGENT_TEXT_BYTES
            ],
            output_bytes=len(text.encode()),
            seconds=round(time.monotonic() - started, 3),
        )

    async def _call(self, name: str, arguments: str, input: FunctionToolInput, redactor: Redactor) -> tuple[bool, str]:
        tool = self.function_tools.get(name)
        if tool is None:
            # Another worker of the queue may have it (workers being rolled out): retry, then tell the model.
            message = f"the function tool {name!r} is not registered on this worker of {activity.info().task_queue!r}"
            return self._failed_attempt(message, input, redactor, type="FunctionToolUnavailable")
        try:
            raw = json.loads(arguments or "{}")
        except ValueError as e:
            return False, f"error: the arguments of {name} are not valid JSON ({e}); send a JSON object"
        if not isinstance(raw, dict):
            return False, f"error: the arguments of {name} must be a JSON object"
        try:
            checked = tool.check(raw)
        except ValueError as e:
            return False, f"error: invalid arguments for {name}: {e}"
        try:
            return True, await asyncio.wait_for(tool.call(checked), tool.timeout)
        except TimeoutError:
            message = f"{name} did not return within its timeout ({tool.timeout:g} s)"
            return self._failed_attempt(message, input, redactor, type="FunctionToolFailed")
        except Exception as e:  # whatever the function raises is the model's to read in the end
            return self._failed_attempt(f"{type(e).__name__}: {e}", input, redactor, type="FunctionToolFailed")

    @staticmethod
    def _failed_attempt(message: str, input: FunctionToolInput, redactor: Redactor, *, type: str) -> tuple[bool, str]:
        """Retry while the tool's attempts last; the last attempt's error becomes the call's result. The message
        is redacted first: a failure's message is written to history."""
        attempt = activity.info().attempt
        message = redactor.text(message)[:TOOL_OUTPUT_LIMIT]
        if attempt < input.max_attempts:
            # from None: the original exception's text would reach history unredacted as the cause
            raise ApplicationError(f"{message} (attempt {attempt} of {input.max_attempts})", type=type) from None
        return False, f"error: {message} (after {attempt} attempts)"
