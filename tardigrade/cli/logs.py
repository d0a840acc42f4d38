"""`tardigrade logs ID [--step N] [--follow]`: what a run's steps printed.

Everything comes from places that already exist, so it works for any run, from any machine:

* the workflow history (every run of a continue-as-new chain): each attempt of a step is an activity whose result
  (`StepOutcome`) holds the redacted output tail, and the store key of the full log when the output was longer;
  an agent step's model replies and tool calls are activities too, with short redacted previews;
* the snapshot store, for those full logs (``logs/<hash>.zst``, redacted, compressed);
* the heartbeats of the step running now (`StepProgress`: the redacted end of its output so far), read with
  DescribeWorkflowExecution - this is what `--follow` prints live. Heartbeats reach the server at most every
  0.8 times the pipeline's heartbeat timeout, so live output comes in bursts of a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from temporalio.api.failure.v1 import Failure
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflow.v1 import PendingActivityInfo
from temporalio.client import Client, WorkflowExecutionStatus

from tardigrade.activities.contract import (
    AGENT_START,
    AGENT_TOOL,
    MODEL_CALL,
    RUN_STEP,
    AgentStartInput,
    ModelCallResult,
    RunStepInput,
    StepOutcome,
    StepProgress,
    ToolCallResult,
)
from tardigrade.cli.output import UsageError, add_common, client_for
from tardigrade.workflows.state import RunInput

#: How often `--follow` asks for the running step's output.
LIVE_INTERVAL = 1.0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("logs", help="what a run's steps printed (live with --follow)")
    p.add_argument("workflow_id")
    p.add_argument("--step", type=int, help="only this step (1-based), and only its output on stdout")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the run (or --step) ends")
    add_common(p, as_json=False)
    p.set_defaults(handler=cmd_logs)


async def cmd_logs(args: argparse.Namespace) -> int:
    client = await client_for(args)
    printer = LogPrinter(client, args.workflow_id, step=args.step)
    return await (printer.follow() if args.follow else printer.show())


@dataclass
class Attempt:
    """One try at one step: a `run_step` activity, or an agent step's activities from its start on."""

    step: int  # 0-based, as the workflow counts
    number: int  # 1-based, per step
    agent: bool
    shown: int = 0  # bytes of the redacted output already printed
    done: bool = False
    descriptions: dict[int, str] = field(default_factory=dict)  # agent: scheduled event id -> tool call summary


class LogPrinter:
    def __init__(self, client: Client, workflow_id: str, *, step: int | None, out: TextIO | None = None) -> None:
        self.client = client
        self.workflow_id = workflow_id
        self.only = step - 1 if step is not None else None
        self.out = out or sys.stdout
        # Headers go where the output goes, except for a single step, whose stdout is its output alone.
        self.notes = sys.stderr if step is not None else self.out
        self.input: RunInput | None = None
        self.scheduled: dict[tuple[str, int], tuple[str, Attempt | None]] = {}  # (run, event id) -> type, attempt
        self.by_activity: dict[tuple[str, str], Attempt] = {}  # (run, activity id) -> attempt, for heartbeats
        self.tries: dict[int, int] = {}
        self.agent: Attempt | None = None
        self.later_step_started = False  # a step after --step began: that step is over
        self.ended: str | None = None  # how the run ended, once it did
        self.failed = False
        self.seen_any = False

    # -- reading history -------------------------------------------------------------------------------------

    async def _chain(self) -> list[str]:
        """The run ids of the workflow's continue-as-new chain, oldest first."""
        description = await self.client.get_workflow_handle(self.workflow_id).describe()
        chain = [description.run_id]
        while True:
            handle = self.client.get_workflow_handle(self.workflow_id, run_id=chain[0])
            async for event in handle.fetch_history_events():
                previous = event.workflow_execution_started_event_attributes.continued_execution_run_id
                break
            if not previous:
                return chain
            chain.insert(0, previous)

    async def _events(self, run_id: str, *, wait: bool) -> AsyncIterator[HistoryEvent]:
        handle = self.client.get_workflow_handle(self.workflow_id, run_id=run_id)
        async for event in handle.fetch_history_events(wait_new_event=wait):
            yield event

    async def _decode(self, payloads: Any, kind: type[Any]) -> Any:
        (value,) = await self.client.data_converter.decode(payloads.payloads, [kind])
        return value

    async def _feed(self, run_id: str, event: HistoryEvent) -> str | None:
        """Print what the event adds; return the next run's id if the run continued-as-new."""
        if event.HasField("workflow_execution_started_event_attributes"):
            if self.input is None:
                started = event.workflow_execution_started_event_attributes
                self.input = await self._decode(started.input, RunInput)
                self._check_step()
        elif event.HasField("activity_task_scheduled_event_attributes"):
            await self._scheduled(run_id, event)
        elif event.HasField("activity_task_completed_event_attributes"):
            attrs = event.activity_task_completed_event_attributes
            kind, attempt = self.scheduled.get((run_id, attrs.scheduled_event_id), ("", None))
            if attempt is not None:
                await self._completed(kind, attempt, attrs.result, attrs.scheduled_event_id)
        elif event.HasField("activity_task_failed_event_attributes"):
            attrs_f = event.activity_task_failed_event_attributes
            self._lost(run_id, attrs_f.scheduled_event_id, await self._message(attrs_f.failure))
        elif event.HasField("activity_task_timed_out_event_attributes"):
            attrs_t = event.activity_task_timed_out_event_attributes
            why = await self._message(attrs_t.failure) or "timed out"
            self._lost(run_id, attrs_t.scheduled_event_id, f"{why} (its worker or sandbox was lost)")
        elif event.HasField("workflow_execution_continued_as_new_event_attributes"):
            return event.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
        elif event.HasField("workflow_execution_completed_event_attributes"):
            self.ended = "completed"
        elif event.HasField("workflow_execution_failed_event_attributes"):
            failure = event.workflow_execution_failed_event_attributes.failure
            self.ended, self.failed = f"failed: {await self._message(failure)}", True
        elif event.HasField("workflow_execution_canceled_event_attributes"):
            self.ended, self.failed = "was cancelled", True
        elif event.HasField("workflow_execution_terminated_event_attributes"):
            reason = event.workflow_execution_terminated_event_attributes.reason
            self.ended, self.failed = f"was terminated: {reason or 'no reason given'}", True
        elif event.HasField("workflow_execution_timed_out_event_attributes"):
            self.ended, self.failed = "timed out", True
        return None

    async def _message(self, failure: Failure) -> str:
        """A failure's own message. With encrypted history (tardigrade/codec.py) it sits in an encoded payload."""
        if not failure.HasField("encoded_attributes"):
            return failure.message
        copy = Failure()
        copy.CopyFrom(failure)
        error = await self.client.data_converter.decode_failure(copy)
        return str(getattr(error, "message", None) or error)

    def _check_step(self) -> None:
        assert self.input is not None
        total = len(self.input.pipeline.steps)
        if self.only is not None and not 0 <= self.only < total:
            raise UsageError(f"--step must be between 1 and {total}: run {self.workflow_id} has {total} steps")

    async def _scheduled(self, run_id: str, event: HistoryEvent) -> None:
        attrs = event.activity_task_scheduled_event_attributes
        kind = attrs.activity_type.name
        attempt: Attempt | None = None
        if kind in (RUN_STEP, AGENT_START):
            index = (await self._decode(attrs.input, RunStepInput if kind == RUN_STEP else AgentStartInput)).index
            self.tries[index] = self.tries.get(index, 0) + 1
            attempt = Attempt(step=index, number=self.tries[index], agent=kind == AGENT_START)
            self.agent = attempt if attempt.agent else None
            if self.only is not None and index > self.only:
                self.later_step_started = True
            self._header(attempt)
        elif kind in (MODEL_CALL, AGENT_TOOL) and self.agent is not None:
            attempt = self.agent
            if kind == AGENT_TOOL and event.user_metadata.HasField("summary"):
                summary = await self._decode_one(event.user_metadata.summary)
                attempt.descriptions[event.event_id] = str(summary).rpartition(" · tool ")[2]
        else:
            return
        self.scheduled[(run_id, event.event_id)] = (kind, attempt)
        self.by_activity[(run_id, attrs.activity_id)] = attempt

    async def _decode_one(self, payload: Any) -> Any:
        (value,) = await self.client.data_converter.decode([payload])
        return value

    def _shows(self, attempt: Attempt) -> bool:
        return self.only is None or attempt.step == self.only

    def _label(self, attempt: Attempt) -> str:
        assert self.input is not None
        steps = self.input.pipeline.steps
        label = f"step {attempt.step + 1}/{len(steps)} · {steps[attempt.step].name}"
        label += " (agent)" if attempt.agent else ""
        return label + (f" · attempt {attempt.number}" if attempt.number > 1 else "")

    def _header(self, attempt: Attempt) -> None:
        if self._shows(attempt):
            self.seen_any = True
            print(f"── {self._label(attempt)} ──", file=self.notes, flush=True)

    def _write(self, data: bytes) -> None:
        if data:
            text = data.decode(errors="replace")
            self.out.write(text if text.endswith("\n") else text + "\n")
            self.out.flush()

    async def _completed(self, kind: str, attempt: Attempt, result: Any, scheduled_id: int) -> None:
        if not self._shows(attempt):
            return
        if kind == RUN_STEP:
            outcome: StepOutcome = await self._decode(result, StepOutcome)
            full, note = await self._full_output(outcome)
            if attempt.shown == 0 or attempt.shown <= len(full):
                self._write(full[attempt.shown :])
            if note:
                print(note, file=sys.stderr)
            end = "timed out" if outcome.timed_out else f"exit {outcome.exit_code}"
            print(f"── {end} · {outcome.seconds:.1f} s", file=self.notes, flush=True)
            attempt.done = True
        elif kind == MODEL_CALL:
            reply: ModelCallResult = await self._decode(result, ModelCallResult)
            said = reply.finish_summary or reply.text
            if said:
                verb = "finished" if reply.finish_summary is not None else "model"
                self.out.write(f"[turn {reply.turn}] {verb}: {said.strip()}\n")
        elif kind == AGENT_TOOL:
            tool: ToolCallResult = await self._decode(result, ToolCallResult)
            what = attempt.descriptions.get(scheduled_id, tool.name)
            status = f"exit {tool.exit_code}" if tool.exit_code is not None else ("ok" if tool.ok else "error")
            self.out.write(f"  $ {what}  -> {status}\n")
            for line in tool.preview.strip().splitlines():
                self.out.write(f"    {line}\n")
        self.out.flush()

    def _lost(self, run_id: str, scheduled_id: int, message: str) -> None:
        kind, attempt = self.scheduled.get((run_id, scheduled_id), ("", None))
        if attempt is None or not self._shows(attempt):
            return
        if kind == RUN_STEP:
            attempt.done = True
            print(f"── lost: {message}; the step runs again in a fresh sandbox", file=self.notes, flush=True)
        elif kind == AGENT_TOOL:
            print(f"  !! tool call lost: {message}", file=self.notes, flush=True)

    async def _full_output(self, outcome: StepOutcome) -> tuple[bytes, str | None]:
        """The step's whole redacted output: the stored log when there is one, else the tail (which is all of it)."""
        tail = outcome.output_tail.encode()
        if not outcome.output_log:
            return tail, None
        assert self.input is not None
        try:
            data = await asyncio.to_thread(read_log, self.input.store, outcome.output_log)
        except Exception as e:  # the store may be out of reach from here: the tail still helps
            omitted = outcome.output_bytes - len(tail)
            return (
                f"[... {omitted:,} earlier bytes are in the full log ...]\n".encode() + tail,
                f"(the full log {outcome.output_log} in {self.input.store} could not be read here: {e})",
            )
        return data, None

    # -- the step running now ---------------------------------------------------------------------------------

    async def _live(self, run_id: str, pending: PendingActivityInfo) -> None:
        attempt = self.by_activity.get((run_id, pending.activity_id))
        if attempt is None or attempt.done or attempt.agent or not self._shows(attempt):
            return
        if not pending.HasField("heartbeat_details") or not pending.heartbeat_details.payloads:
            return
        try:
            progress: StepProgress = await self._decode(pending.heartbeat_details, StepProgress)
        except Exception:
            return  # a worker of an older version heartbeats a plain count
        if progress.tail_end <= attempt.shown:
            return
        data = progress.tail.encode()
        exact = len(data) == progress.tail_end - progress.tail_start
        if attempt.shown < progress.tail_start:
            if attempt.shown or progress.tail_start:
                skipped = progress.tail_start - attempt.shown
                print(f"[... {skipped:,} bytes not shown live; the full log has them ...]", file=self.notes)
            piece = data
        elif exact:
            piece = data[attempt.shown - progress.tail_start :]
        else:
            piece = data[-(progress.tail_end - attempt.shown) :]
        self._write_partial(piece)
        attempt.shown = progress.tail_end

    def _write_partial(self, data: bytes) -> None:
        """Live output arrives in pieces that need not end a line."""
        self.out.write(data.decode(errors="replace"))
        self.out.flush()

    async def _poll_live(self) -> None:
        handle = self.client.get_workflow_handle(self.workflow_id)
        while True:
            try:
                description = await handle.describe()
                for pending in description.raw_description.pending_activities:
                    await self._live(description.run_id, pending)
            except asyncio.CancelledError:
                raise
            except Exception:
                pass  # a blip: the next poll will do
            await asyncio.sleep(LIVE_INTERVAL)

    # -- the two modes ----------------------------------------------------------------------------------------

    def _step_over(self) -> bool:
        return self.only is not None and self.later_step_started

    async def show(self) -> int:
        """Everything printed so far, and the end of the running step's output."""
        for run_id in await self._chain():
            async for event in self._events(run_id, wait=False):
                await self._feed(run_id, event)
        description = await self.client.get_workflow_handle(self.workflow_id).describe()
        if description.status == WorkflowExecutionStatus.RUNNING:
            for pending in description.raw_description.pending_activities:
                await self._live(description.run_id, pending)
            if self.out is sys.stdout and not self._step_over():
                print(f"(still running; `tardigrade logs {self.workflow_id} --follow` keeps printing)", file=sys.stderr)
        self._nothing_yet()
        return self._finish()

    async def follow(self) -> int:
        """Print as it happens, until the run ends (or the step asked for is over)."""
        live = asyncio.create_task(self._poll_live())
        try:
            chain = await self._chain()
            for earlier in chain[:-1]:
                async for event in self._events(earlier, wait=False):
                    await self._feed(earlier, event)
            following: str | None = chain[-1]
            while following is not None and not self._step_over():
                current, following = following, None
                async for event in self._events(current, wait=True):
                    following = await self._feed(current, event) or following
                    if self._step_over():
                        break
        finally:
            live.cancel()
        return self._finish()

    def _nothing_yet(self) -> None:
        if self.only is not None and not self.seen_any:
            print(f"step {self.only + 1} has not started yet; add --follow to wait for it", file=sys.stderr)

    def _finish(self) -> int:
        if self.ended and not self._step_over():
            print(f"── run {self.workflow_id} {self.ended}", file=sys.stderr if self.only is not None else self.out)
        return 1 if self.failed and not self._step_over() else 0


def read_log(store_url: str, key: str) -> bytes:
    """A stored step log, decrypted (if TARDIGRADE_ENCRYPTION_KEY is set) and decompressed."""
    import zstandard

    from tardigrade.sandboxes.exec_log import LOG_LIMIT
    from tardigrade.sandboxes.snapshots.crypto import EncryptedStore, Encryption
    from tardigrade.sandboxes.stores import ObjectStore, open_store

    parts = urlsplit(store_url)
    if parts.scheme in ("", "file") and not Path(parts.path if parts.scheme else store_url).is_dir():
        raise FileNotFoundError(f"the store folder {parts.path or store_url} is not on this machine")
    store: ObjectStore = open_store(store_url)
    try:
        encryption = Encryption.from_env()
        reader = EncryptedStore(store, encryption) if encryption else store
        data = reader.get(key)
    finally:
        store.close()
    # Logs are stored capped (sandboxes/exec_log.py): a log object inflating past that is crafted, not a log.
    limit = LOG_LIMIT + (1 << 16)
    out = zstandard.ZstdDecompressor(max_window_size=1 << 27).stream_reader(io.BytesIO(data)).read(limit + 1)
    if len(out) > limit:
        raise ValueError(f"log object {key} inflates past {limit:,} bytes; it is not a log this worker stored")
    return bytes(out)
