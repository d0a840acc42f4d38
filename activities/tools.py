"""Tool activities: one tool call of an agent, run in the agent step's sandbox.

Routed like `run_step` to the queue of the worker that holds the sandbox. The call's arguments are read from the
conversation in the store (a write_file's content never passes through history), and the result is stored there
too: the workflow gets back a ref, a short preview (never a file's content) and a few numbers.

A tool that fails - a non-zero exit, a missing file, a timeout, arguments that make no sense - is not an activity
failure: the error goes back to the model as the tool's result, and the model decides what to do. Only a lost
sandbox (`SandboxLost`) fails the activity, and the workflow rehydrates. Output longer than `TOOL_OUTPUT_LIMIT`
is cut for the model (its head and tail, and where the rest is); the full, redacted output is kept in the store
under ``logs/``. Secrets reach the sandbox's environment; everything a tool returns is redacted first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from tardigrade.activities.contract import AGENT_TEXT_BYTES, AGENT_TOOL, ToolCallInput, ToolCallResult
from tardigrade.activities.conversation import AgentRoot, ConversationError, Conversations
from tardigrade.activities.patch import PatchError, apply_hunks, parse_patch
from tardigrade.activities.sandbox import (
    SandboxActivities,
    diverged,
    heartbeating,
    maps_sandbox_errors,
    mark_changing,
)
from tardigrade.activities.secrets import Redactor, resolve_secrets
from tardigrade.agent_spec import (
    DEFAULT_EXEC_TIMEOUT,
    FINISH,
    READ_ONLY_TOOLS,
    ApplyPatchArgs,
    ExecArgs,
    ListFilesArgs,
    ReadFileArgs,
    WriteFileArgs,
    check_arguments,
)
from tardigrade.sandboxes.errors import SandboxError
from tardigrade.sandboxes.manifest import sandbox_path
from tardigrade.sandboxes.provider import ExecResult, Sandbox

TOOL_OUTPUT_LIMIT = 16 * 1024  # bytes of one tool's output the model sees; the rest is in the store
READ_LIMIT = 1 << 20  # read_file reads at most this much of a file
PATCH_LIMIT = 8 << 20  # apply_patch edits files up to this size (a sandbox can make a sparse file of any size)
LIST_LIMIT = 1000  # list_files shows at most this many entries
PREVIEW_CHARS = 160


@dataclass
class ToolOutput:
    ok: bool
    text: str  # what the model reads: redacted and bounded
    preview: str  # what history shows: redacted, short, never file contents
    output_bytes: int = 0
    output_log: str | None = None
    exit_code: int | None = None


def _failed(message: str) -> ToolOutput:
    return ToolOutput(ok=False, text=f"error: {message}", preview=_one_line(message))


def _one_line(text: str, limit: int = PREVIEW_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else "…" + flat[-(limit - 1) :]


class ToolActivities:
    def __init__(self, sandboxes: SandboxActivities, conversations: Conversations) -> None:
        self.sandboxes = sandboxes
        self.conversations = conversations

    def all(self) -> list[Callable[..., Any]]:
        return [self.agent_tool]

    @activity.defn(name=AGENT_TOOL)
    @maps_sandbox_errors
    async def agent_tool(self, input: ToolCallInput) -> ToolCallResult:
        """Run one tool call in the sandbox and store its result for the next model turn."""
        conversation = self.conversations.open(input.store)
        try:
            root, call = await asyncio.to_thread(conversation.call, input.root, input.node, input.call_id)
        except ConversationError as e:
            raise ApplicationError(str(e), type="StoreError", non_retryable=True) from e
        secrets = resolve_secrets(root.secrets)
        sandbox = await self.sandboxes.provider(input.sandbox.provider).attach(input.sandbox.sandbox_id)
        if input.expected is not None and sandbox.tracks_position:
            held = await sandbox.held_position()
            if held != input.expected:  # a reset went back to before the calls that made these files
                raise diverged(sandbox, held, input.expected, "the agent resumes from its last checkpoint")
        read_only = call["name"] in READ_ONLY_TOOLS and call["name"] in root.tools
        position = None if read_only else await mark_changing(sandbox, f"tool{input.index + 1}")
        run = _ToolRun(self.sandboxes, sandbox, root, input, await secrets.env_for(sandbox), secrets.values)
        started = time.monotonic()
        async with heartbeating(lambda: run.progress):
            output = await run.call(call["name"], call["arguments"])
        item = {"type": "function_call_output", "call_id": input.call_id, "output": output.text}
        try:
            ref = await asyncio.to_thread(conversation.put_item, item)
        except ConversationError as e:
            raise ApplicationError(str(e), type="StoreError", non_retryable=True) from e
        return ToolCallResult(
            call_id=input.call_id,
            name=call["name"],
            ok=output.ok,
            result=ref,
            preview=output.preview[:AGENT_TEXT_BYTES],
            output_bytes=output.output_bytes,
            output_log=output.output_log,
            exit_code=output.exit_code,
            seconds=round(time.monotonic() - started, 3),
            position=position,
        )


class _ToolRun:
    """One tool call: parse and check the arguments, then do it in the sandbox."""

    def __init__(
        self, sandboxes: SandboxActivities, sandbox: Sandbox, root: AgentRoot, input: ToolCallInput,
        secrets: dict[str, str], secret_values: Iterable[str] | None = None,
    ) -> None:  # fmt: skip
        """``secrets`` are the commands' secret variables (brokered ones hold placeholders); ``secret_values`` the
        real values to mask (default: the variables' values)."""
        self.sandboxes = sandboxes
        self.sandbox = sandbox
        self.root = root
        self.input = input
        self.secrets = secrets
        self.redactor = Redactor(secrets.values() if secret_values is None else secret_values)
        self.progress: dict[str, Any] = {"output_bytes": 0}
        self._tools: dict[str, Callable[[Any], Awaitable[ToolOutput]]] = {
            "exec": self.exec,
            "read_file": self.read_file,
            "write_file": self.write_file,
            "list_files": self.list_files,
            "apply_patch": self.apply_patch,
        }

    async def call(self, name: str, arguments: str) -> ToolOutput:
        offered = [t for t in self.root.tools if t != FINISH]
        if name not in offered:
            return _failed(f"there is no tool {name!r} in this step; the tools are: {', '.join(self.root.tools)}")
        try:
            raw = json.loads(arguments or "{}")
        except ValueError as e:
            return _failed(f"the arguments of {name} are not valid JSON ({e}); send a JSON object")
        if not isinstance(raw, dict):
            return _failed(f"the arguments of {name} must be a JSON object")
        try:
            args = check_arguments(name, raw)
        except ValueError as e:
            return _failed(f"invalid arguments for {name}: {e}")
        return await self._tools[name](args)

    def _labels(self, tool: str) -> dict[str, str]:
        return {"step": str(self.input.index + 1), "turn": str(self.input.turn), "tool": tool}

    def _env(self, secrets: bool) -> dict[str, str]:
        return {**self.root.env, "TARDIGRADE_STEP": str(self.input.index + 1), **(self.secrets if secrets else {})}

    def _count(self, chunk: bytes) -> None:
        self.progress["output_bytes"] += len(chunk)

    # -- tools ------------------------------------------------------------------------------------------------

    async def exec(self, args: ExecArgs) -> ToolOutput:
        await self.sandbox.kill_processes()  # exec never runs beside another call; nothing of a past try lingers
        timeout = min(args.timeout_seconds or DEFAULT_EXEC_TIMEOUT, self.root.timeout)
        result = await self.sandbox.exec(
            args.command,
            env=self._env(secrets=True),
            timeout=timeout,
            cwd=self.root.cwd,
            on_output=self._count,
            labels=self._labels("exec"),
            tail_bytes=TOOL_OUTPUT_LIMIT + self.redactor.overlap,
            mask=self.redactor,  # the full-output log on the worker's disk never holds a secret
        )
        output, log_key = await self._bounded_output(result)
        status = f"exit code {result.exit_code}"
        if result.timed_out:
            status = f"timed out after {timeout:g} s and was killed"
        elif result.limit is not None:  # the model learns which limit it hit (sandboxes/limits.py)
            status = f"exit code {result.exit_code}; stopped: {result.limit.message}"
        return ToolOutput(
            ok=result.exit_code == 0 and not result.timed_out and result.limit is None,
            text=f"{status}\n{output}" if output else status,
            preview=_one_line(f"{status}: {output[-PREVIEW_CHARS:]}" if output else status),
            output_bytes=result.output_bytes,
            output_log=log_key,
            exit_code=result.exit_code,
        )

    async def _bounded_output(self, result: ExecResult) -> tuple[str, str | None]:
        """All of the output if it is short; else its head and tail, with the whole kept in the store."""
        redactor = self.redactor
        log_path = Path(result.log_path) if result.log_path else None
        if result.output_bytes <= len(result.output_tail):
            if log_path is not None:
                log_path.unlink(missing_ok=True)
            return redactor.bytes(result.output_tail).decode(errors="replace"), None
        half = TOOL_OUTPUT_LIMIT // 2
        head = b""
        if log_path is not None:
            with contextlib.suppress(OSError), open(log_path, "rb") as f:
                head = redactor.head(f.read(half + redactor.overlap), half, whole=False)
        tail = redactor.tail(result.output_tail, half, whole=False)
        log_key = None
        if log_path is not None:
            log_key = await asyncio.to_thread(self.sandboxes.store_log, self.input.store, log_path, self.redactor)
        omitted = result.output_bytes - len(head) - len(tail)
        where = f" The full output is kept in the snapshot store as {log_key}." if log_key else ""
        note = (
            f"\n[... {omitted:,} of {result.output_bytes:,} bytes omitted here.{where} To see a part of it, run the"
            " command again narrowed down (grep, head, tail, sed -n) or redirect it to a file and read that.]\n"
        )
        return head.decode(errors="replace") + note + tail.decode(errors="replace"), log_key

    async def read_file(self, args: ReadFileArgs) -> ToolOutput:
        try:
            path = sandbox_path(args.path)
            data = await self.sandbox.read_file(path, limit=READ_LIMIT + 1)
        except FileNotFoundError:
            return _failed(f"no such file: {args.path}")
        except IsADirectoryError:
            return _failed(f"{args.path} is a folder; use list_files to see what is in it")
        except (ValueError, SandboxError, OSError) as e:
            return _failed(f"cannot read {args.path}: {e}")
        size = f"{len(data):,} bytes" if len(data) <= READ_LIMIT else f"more than {READ_LIMIT:,} bytes"
        if b"\0" in data[:8192]:
            text = f"{path} is a binary file ({size}); not shown. Inspect it with exec (file, xxd | head)."
        else:
            whole = len(data) <= READ_LIMIT  # else data holds READ_LIMIT + 1 bytes: plenty past the cut
            text = self.redactor.head(data, TOOL_OUTPUT_LIMIT, whole=whole).decode(errors="replace")
            if len(data) > TOOL_OUTPUT_LIMIT:
                text = (
                    text + f"\n[{path} has {size}; this is its beginning. Read other parts with exec, e.g."
                    f" sed -n '400,800p' {shlex.quote(path)}]"
                )
        return ToolOutput(ok=True, text=text, preview=f"{path}: {size}", output_bytes=len(data))

    async def write_file(self, args: WriteFileArgs) -> ToolOutput:
        data = args.content.encode()
        try:
            path = sandbox_path(args.path)
            await self.sandbox.write_file(path, data)
        except IsADirectoryError:
            return _failed(f"{args.path} is a folder")
        except (ValueError, SandboxError, OSError) as e:
            return _failed(f"cannot write {args.path}: {e}")
        return ToolOutput(ok=True, text=f"wrote {len(data):,} bytes to {path}", preview=f"{path}: {len(data):,} bytes")

    async def list_files(self, args: ListFilesArgs) -> ToolOutput:
        try:
            path = sandbox_path(args.path)
        except ValueError as e:
            return _failed(str(e))
        # The arguments reach the shell as variables, never as shell text: a path with quotes in it is just a path.
        # Records are NUL-terminated, so a file name holding a newline cannot pose as another entry.
        command = (
            'cd -- "$TARDIGRADE_LIST_PATH" 2>/dev/null || { printf "no such folder: %s\\n" "$TARDIGRADE_LIST_PATH";'
            ' exit 2; }; find . -mindepth 1 -maxdepth "$TARDIGRADE_LIST_DEPTH" -printf "%y %s %P\\0"'
            f" | LC_ALL=C sort -z -k3 | head -z -n {LIST_LIMIT + 1}"
        )
        env = {**self._env(secrets=False), "TARDIGRADE_LIST_PATH": path, "TARDIGRADE_LIST_DEPTH": str(int(args.depth))}
        result = await self.sandbox.exec(
            command, env=env, timeout=60, labels=self._labels("list_files"), tail_bytes=1 << 20
        )
        if result.log_path:
            Path(result.log_path).unlink(missing_ok=True)
        listing = self.redactor.bytes(result.output_tail).decode(errors="replace")
        if result.exit_code != 0:
            return _failed(listing.strip() or f"cannot list {path} (exit code {result.exit_code})")
        records = [r for r in listing.split("\0") if r]
        lines = []
        for record in records[:LIST_LIMIT]:
            kind, size, name = [*record.split(" ", 2), "", ""][:3]
            shown = name if name.isprintable() else repr(name)  # the sandbox names its files: nothing raw
            bytes_ = f"  ({int(size):,} bytes)" if size.isdigit() else ""
            lines.append(f"{shown}/" if kind == "d" else f"{shown}{bytes_}" if kind == "f" else shown)
        more = "\n[more entries not shown; list a subfolder]" if len(records) > LIST_LIMIT else ""
        text = f"{path}:\n" + ("\n".join(lines) if lines else "(empty)") + more
        return ToolOutput(ok=True, text=text, preview=f"{path}: {len(lines)} entries", output_bytes=len(text))

    async def apply_patch(self, args: ApplyPatchArgs) -> ToolOutput:
        """Work out every file's new content first; write only if the whole patch applies."""
        try:
            changes = parse_patch(args.patch)
            writes: list[tuple[str, bytes]] = []
            deletes: list[str] = []
            done: list[str] = []
            for change in changes:
                path = sandbox_path(change.path)
                if change.kind == "add":
                    if await self._exists(path):
                        raise PatchError(f"{change.path} already exists; change it with '*** Update File:'")
                    writes.append((path, change.content.encode()))
                    done.append(f"added {path}")
                elif change.kind == "delete":
                    if not await self._exists(path):
                        raise PatchError(f"{change.path} does not exist")
                    deletes.append(path)
                    done.append(f"deleted {path}")
                else:
                    content = await self.sandbox.read_file(path, limit=PATCH_LIMIT + 1)
                    if len(content) > PATCH_LIMIT:
                        raise PatchError(
                            f"{change.path} is larger than {PATCH_LIMIT >> 20} MiB; apply_patch edits smaller text"
                            " files - change this one with exec (sed -i, a script)"
                        )
                    old = content.decode()
                    new = apply_hunks(change.path, old, change.hunks)
                    target = sandbox_path(change.move_to) if change.move_to else path
                    writes.append((target, new.encode()))
                    if target != path:
                        deletes.append(path)
                    done.append(f"updated {path}" + (f" (now {target})" if target != path else ""))
        except FileNotFoundError as e:
            return _failed(f"the patch does not apply: no such file {e.filename or ''}".rstrip())
        except UnicodeDecodeError:
            return _failed("the patch does not apply: a file it updates is not UTF-8 text")
        except (PatchError, ValueError, SandboxError, OSError) as e:
            return _failed(f"the patch does not apply: {e}")
        for path, data in writes:
            await self.sandbox.write_file(path, data)
        if deletes:
            result = await self.sandbox.exec(
                "rm -f -- " + " ".join(shlex.quote(p) for p in deletes),
                env=self._env(secrets=False), timeout=60, labels=self._labels("apply_patch"),
            )  # fmt: skip
            if result.log_path:
                Path(result.log_path).unlink(missing_ok=True)
        summary = "; ".join(done)
        return ToolOutput(ok=True, text=f"patch applied: {summary}", preview=_one_line(summary))

    async def _exists(self, path: str) -> bool:
        try:
            await self.sandbox.read_file(path, limit=1)
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            return True
        return True
