"""The agent loop of an agent step, run by `PipelineWorkflow` in place of a shell command.

    start the conversation (its root: instructions, tools, the task)
    repeat:  model turn (an activity on any worker)
             -> the tool calls it asked for (activities in the sandbox; consecutive read-only ones in parallel)
             -> the next model turn, with their results
    until the model calls `finish` (or, with `done: no_tool_calls`, answers without calling a tool)

Every model call and every tool call is its own activity, so a crash loses at most the call in flight. A tool
error (non-zero exit, missing file, timeout) is an ordinary result the model reads; only a lost sandbox fails a
tool activity, and that propagates as an `ActivityError` to the pipeline workflow, which rehydrates and calls
this loop again:

* by default the step starts over from its first turn on the pre-step snapshot (the abandoned attempt stays in
  history; its model replies are reused from the store where the conversation is the same, so they are not
  paid for twice);
* with ``checkpoint: every_tool_call`` a snapshot follows each mutating tool call and `RunState.agent` records
  it with the conversation and the turn, so the step resumes at that turn with the files that turn left behind.

History carries refs into the store, never the conversation. Deterministic: no I/O, clocks or randomness.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from tardigrade.activities.contract import (
        OUTAGE_ERRORS,
        OUTPUT_TAIL_BYTES,
        AgentStartInput,
        CheckpointInput,
        FunctionToolInput,
        FunctionToolLimits,
        ModelCallInput,
        ModelCallResult,
        SandboxPlan,
        SnapshotRef,
        StepOutcome,
        TokenUsage,
        ToolCallInput,
        ToolCallRef,
        ToolCallResult,
        snapshot_position,
    )
    from tardigrade.pipeline import Pipeline, Step
    from tardigrade.sandboxes.store_keys import agent_node_key
    from tardigrade.workflows.activity_calls import ActivityCalls
    from tardigrade.workflows.state import (
        AgentProgress,
        AgentReport,
        AgentResume,
        CheckpointRecord,
        RunState,
        step_label,
    )


@dataclass
class AgentContext:
    """What the loop needs from the pipeline workflow."""

    pipeline: Pipeline
    state: RunState
    store: str
    index: int
    attempt: int  # 1 + the step's failed attempts: a retry after a failure is a new conversation
    activities: ActivityCalls
    on_progress: Callable[[AgentProgress | None], None]


@dataclass
class _Turn:
    """The model's latest reply and how far its tool calls have got."""

    number: int
    conversation: str
    calls: list[ToolCallRef]
    results: list[str]  # refs of the results of calls[: len(results)]
    finish_summary: str | None = None


class AgentLoop:
    def __init__(self, context: AgentContext) -> None:
        self.context = context
        self.step: Step = context.pipeline.steps[context.index]
        self.label = step_label(context.pipeline, context.index)
        self.every_tool_call = self.step.checkpoint == "every_tool_call"
        # Counted over all attempts of the step: a restart keeps what the abandoned attempt spent.
        empty = AgentReport(step=context.index, turns=0, tool_calls=0, usage=TokenUsage(), finished=False)
        self.report = context.state.agents.get(context.index, empty)
        self.tool_calls = self.report.tool_calls

    async def run(self) -> StepOutcome:
        """Run (or resume) the step's agent until it finishes, runs out of turns or time, or a call fails."""
        context, state, step = self.context, self.context.state, self.step
        started = workflow.now()
        deadline = started + timedelta(seconds=step.timeout)
        resume = state.agent if state.agent is not None and state.agent.step == context.index else None
        if resume is not None:
            root = resume.root
            turn = _Turn(resume.turn, resume.conversation, list(resume.calls), list(resume.results),
                         resume.finish_summary)  # fmt: skip
            workflow.logger.info("%s: resuming at turn %d after losing the sandbox", self.label, turn.number)
        else:
            root = await self._start()
            turn = _Turn(0, root, [], [])
        try:
            while True:
                if len(turn.results) < len(turn.calls):
                    await self._run_tools(root, turn)
                if turn.finish_summary is not None:
                    return self._outcome(started, turn, finished=True, text=turn.finish_summary)
                if turn.number >= step.turn_limit:
                    why = f"the agent used all {step.turn_limit} turns (max_turns) without finishing"
                    return self._outcome(started, turn, finished=False, text=why)
                if workflow.now() >= deadline:
                    why = f"the agent step ran longer than its timeout ({step.timeout:g} s) without finishing"
                    return self._outcome(started, turn, finished=False, text=why, timed_out=True)
                self._progress(turn.number + 1)
                # A reply that called no tool (and did not finish) gets a reminder to use a tool or finish.
                nudge = turn.number > 0 and not turn.calls
                reply = await self._model_call(turn, nudge)
                self._account(reply)
                turn = _Turn(reply.turn, reply.conversation, list(reply.tool_calls), [], reply.finish_summary)
                if not turn.calls and turn.finish_summary is None and step.done_when == "no_tool_calls":
                    turn.finish_summary = reply.text
                self._remember(root, turn)
        finally:
            state.agents[context.index] = self.report.model_copy(
                update={"turns": turn.number, "tool_calls": self.tool_calls, "conversation": turn.conversation}
            )
            context.on_progress(None)

    # -- the three kinds of activity ----------------------------------------------------------------------

    async def _start(self) -> str:
        context, pipeline = self.context, self.context.pipeline
        assert self.step.model is not None
        try:
            started = await context.activities.agent_start(
                AgentStartInput(
                    store=context.store,
                    run_id=workflow.info().run_id,
                    index=context.index,
                    attempt=context.attempt,
                    label=self.label,
                    step=self.step,
                    env={**pipeline.manifest.env, **self.step.env},
                    secrets=list(pipeline.manifest.secrets),
                ),
                summary=f"{self.label} · start agent ({self.step.model.label})",
            )
        except ActivityError as e:
            raise self._failed("could not start the agent", e) from e
        return started.conversation

    async def _model_call(self, turn: _Turn, nudge: bool) -> ModelCallResult:
        model = self.step.model
        assert model is not None
        number = turn.number + 1
        try:
            return await self.context.activities.model_call(
                ModelCallInput(
                    store=self.context.store,
                    conversation=turn.conversation,
                    tool_results=turn.results,
                    nudge=nudge,
                    turn=number,
                ),
                model=model,
                summary=f"{self.label} · model turn {number}",
            )
        except ActivityError as e:
            raise self._failed(f"the model call of turn {number} failed", e) from e

    async def _run_tools(self, root: str, turn: _Turn) -> None:
        """The turn's remaining calls in order; consecutive read-only calls run side by side."""
        while len(turn.results) < len(turn.calls):
            start = len(turn.results)
            batch = [turn.calls[start]]
            if batch[0].read_only:
                for call in turn.calls[start + 1 :]:
                    if not call.read_only:
                        break
                    batch.append(call)
            results = await asyncio.gather(*(self._tool(root, turn, call) for call in batch))
            turn.results.extend(result.result for result in results)
            self.tool_calls += len(batch)
            if not batch[0].read_only and self.every_tool_call:
                await self._checkpoint(root, turn, batch[0])
            else:
                self._remember(root, turn)

    async def _tool(self, root: str, turn: _Turn, call: ToolCallRef) -> ToolCallResult:
        state = self.context.state
        if call.function is not None:  # a function tool: on any worker of the queue, outside the sandbox
            try:
                return await self._function_tool(turn, root, call, call.function)
            except ActivityError as e:  # its own errors are results; this is a lost worker or store, every attempt
                raise self._failed(f"the function tool {call.name} could not be run", e) from e
        assert state.sandbox is not None
        result = await self.context.activities.agent_tool(
            ToolCallInput(
                sandbox=state.sandbox,
                store=self.context.store,
                root=root,
                node=turn.conversation,
                call_id=call.call_id,
                index=self.context.index,
                turn=turn.number,
                expected=state.position,
            ),
            timeout=self.step.timeout,
            summary=f"{self.label} · tool {call.description}",
        )
        if result.position is not None:  # read-only calls run side by side and leave the position alone
            state.position = result.position
        return result

    async def _function_tool(
        self, turn: _Turn, root: str, call: ToolCallRef, limits: FunctionToolLimits
    ) -> ToolCallResult:
        return await self.context.activities.function_tool(
            FunctionToolInput(
                store=self.context.store,
                root=root,
                node=turn.conversation,
                call_id=call.call_id,
                index=self.context.index,
                turn=turn.number,
                max_attempts=limits.max_attempts,
            ),
            limits=limits,
            summary=f"{self.label} · function {call.description}",
        )

    async def _checkpoint(self, root: str, turn: _Turn, call: ToolCallRef) -> None:
        """Snapshot the files a mutating call left, and record them with the conversation as the resume point."""
        context, state = self.context, self.context.state
        assert state.sandbox is not None
        previous = state.agent.snapshot if state.agent is not None else state.last_snapshot
        snapshot = await context.activities.checkpoint(
            CheckpointInput(
                sandbox=state.sandbox,
                plan=SandboxPlan.of(context.pipeline),
                store=context.store,
                run_id=workflow.info().workflow_id,
                step=context.index,
                parent=previous.snapshot_id if previous else None,
                expected=state.position,
            ),
            summary=f"{self.label} · checkpoint after turn {turn.number} · {call.description}",
        )
        state.position = snapshot_position(snapshot.snapshot_id)
        record = CheckpointRecord(step=context.index, snapshot_id=snapshot.snapshot_id, turn=turn.number)
        state.checkpoints.append(record)
        self._remember(root, turn, snapshot)

    # -- bookkeeping --------------------------------------------------------------------------------------

    def _remember(self, root: str, turn: _Turn, snapshot: SnapshotRef | None = None) -> None:
        """Move the resume point forward. Without a new snapshot that is only right while the files still equal
        the last one, which holds here: every mutating call is followed by a snapshot (every_tool_call)."""
        state = self.context.state
        if not self.every_tool_call:
            return
        if snapshot is None:
            if state.agent is None or state.agent.step != self.context.index:
                return  # nothing changed the files yet: a loss simply starts the step over
            snapshot = state.agent.snapshot
        state.agent = AgentResume(
            step=self.context.index,
            root=root,
            turn=turn.number,
            conversation=turn.conversation,
            calls=turn.calls,
            results=list(turn.results),
            finish_summary=turn.finish_summary,
            snapshot=snapshot,
        )

    def _account(self, reply: ModelCallResult) -> None:
        """Token usage counts as soon as a call completes, so a step that starts over keeps what it spent."""
        state = self.context.state
        state.usage = state.usage.plus(reply.usage)
        self.report = self.report.model_copy(update={"usage": self.report.usage.plus(reply.usage)})

    def _progress(self, turn: int) -> None:
        limit = self.step.turn_limit
        self.context.on_progress(
            AgentProgress(step=self.context.index, turn=turn, max_turns=limit, tool_calls=self.tool_calls)
        )

    def _outcome(
        self, started: datetime, turn: _Turn, *, finished: bool, text: str, timed_out: bool = False
    ) -> StepOutcome:
        self.report = self.report.model_copy(update={"finished": finished, "summary": text})
        seconds = (workflow.now() - started).total_seconds()
        return StepOutcome(
            index=self.context.index,
            exit_code=0 if finished else 1,
            timed_out=timed_out,
            seconds=round(seconds, 3),
            output_tail=text[-OUTPUT_TAIL_BYTES:],
            output_log=agent_node_key(turn.conversation),  # the conversation's last node
            reason=None if finished else text,
        )

    def _failed(self, what: str, error: ActivityError) -> BaseException:
        if is_cancelled_exception(error):
            return asyncio.CancelledError("the run was cancelled")  # no further model calls: the run stops
        cause = error.cause
        if isinstance(cause, ApplicationError) and cause.type in OUTAGE_ERRORS:
            return error  # the store is down, not the agent: the pipeline waits it out and runs the step again
        detail = f"{cause.type}: {cause.message}" if isinstance(cause, ApplicationError) else str(cause or error)
        return ApplicationError(f"{self.label}: {what}. {detail}", type="AgentStepFailed", non_retryable=True)
