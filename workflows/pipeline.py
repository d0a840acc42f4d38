"""`PipelineWorkflow`: run a pipeline's steps in a sandbox, checkpoint after each, survive losing the sandbox.

Read top to bottom, the loop is the durability contract:

1. Make sure there is a live sandbox whose files equal the last snapshot: provision one (Manifest, setup, restore
   the last snapshot) if there is none, or roll the live one back if a failed attempt may have dirtied it.
2. Run the next step as an activity that heartbeats, so a dead worker is noticed within seconds.
3. Checkpoint: snapshot the sandbox and record the snapshot id in history.
4. If the sandbox or its worker is lost at any point, forget it and go back to 1: a fresh sandbox is rehydrated
   from the last snapshot and the run resumes at the first step that snapshot does not include.

History holds ids, digests, exit codes and short output tails only. The run continues-as-new every
`steps_per_run` steps (or when Temporal suggests it), carrying its state, so a 1,000-step pipeline stays far
below Temporal's history limits. Deterministic: no I/O, clocks or randomness here - only activities do that.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from tardigrade.activities.contract import (
        OUTAGE_ERRORS,
        SANDBOX_DIVERGED,
        SANDBOX_FATAL_ERRORS,
        STEP_FAILED,
        CheckpointInput,
        OutputsInput,
        ProvisionInput,
        RollbackInput,
        RunStepInput,
        SandboxPlan,
        StepOutcome,
        setup_position,
        snapshot_position,
    )
    from tardigrade.pipeline import Pipeline
    from tardigrade.workflows.activity_calls import ActivityCalls
    from tardigrade.workflows.agent import AgentContext, AgentLoop
    from tardigrade.workflows.search_attributes import PHASE, STEP, searched_phase
    from tardigrade.workflows.state import (
        AgentProgress,
        CheckpointRecord,
        RunInput,
        RunResult,
        RunState,
        RunStatus,
        step_label,
    )

MAX_RETRY_BACKOFF = 300.0
#: Waiting out a store outage: the first pause, and the longest (the backoff doubles in between).
OUTAGE_FIRST_WAIT = 1.0
OUTAGE_MAX_WAIT = 60.0


def _failed_step(error: ActivityError) -> StepOutcome | None:
    """The outcome a failed step's activity carries (STEP_FAILED), or None for any other failure."""
    cause = error.cause
    if isinstance(cause, ApplicationError) and cause.type == STEP_FAILED and cause.details:
        return StepOutcome.model_validate(cause.details[0])
    return None


def _fatal(error: ActivityError) -> bool:
    cause = error.cause
    return isinstance(cause, ApplicationError) and cause.type in SANDBOX_FATAL_ERRORS


def _outage(error: ActivityError) -> bool:
    """The snapshot store is down, throttling or full: nobody's fault here, and no reason to fail the run."""
    cause = error.cause
    return isinstance(cause, ApplicationError) and cause.type in OUTAGE_ERRORS


def _diverged(error: ActivityError) -> bool:
    cause = error.cause
    return isinstance(cause, ApplicationError) and cause.type == SANDBOX_DIVERGED


def _describe(error: BaseException) -> str:
    cause = error.cause if isinstance(error, ActivityError) and error.cause else error
    if isinstance(cause, ApplicationError):
        return f"{cause.type}: {cause.message}"
    return f"{type(cause).__name__}: {cause}"


@workflow.defn(name="TardigradePipeline")
class PipelineWorkflow:
    def __init__(self) -> None:
        self._input: RunInput | None = None
        self._state = RunState()
        self._phase = "starting"
        self._last_error: str | None = None
        self._segment_steps = 0
        self._agent_progress: AgentProgress | None = None
        self._sandbox_plan: SandboxPlan | None = None
        self._calls: ActivityCalls | None = None
        self._outage: ActivityError | None = None  # a store outage to wait out before the next activity
        self._outage_since: float | None = None  # workflow time the current outage was first seen
        self._outage_waits = 0
        self._waiting_for: str | None = None
        self._searched: tuple[str, int] | None = None  # the TardigradePhase and TardigradeStep last set

    # -- the run ----------------------------------------------------------------------------------------------

    @workflow.run
    async def run(self, input: RunInput) -> RunResult:
        self._input = input
        self._state = state = input.initial_state()
        steps = input.pipeline.steps
        try:
            while state.next_step < len(steps):
                if self._time_to_continue_as_new():
                    self._continue_as_new()
                await self._ready_sandbox()
                await self._attempt(state.next_step)
        except workflow.ContinueAsNewError:
            raise  # the sandbox lives on into the next run
        except (Exception, asyncio.CancelledError) as e:  # cancelled, or failed: do not leave a sandbox running
            # Not BaseException: a workflow evicted from the worker's cache is closed with GeneratorExit, and that
            # is no reason to destroy its sandbox (nor can it run workflow code any more).
            # Cancel means stop: the step's activity was cancelled (its processes killed), and now the sandbox goes.
            # The last snapshot stays in the store, recorded in history, for `tardigrade run --from` or a reset.
            cancelled = is_cancelled_exception(e)
            self._set_phase("cancelled" if cancelled else "failed", None)
            await self._destroy_sandbox()
            raise
        await self._destroy_sandbox()
        await self._upload_outputs(None)
        self._set_phase("completed", None)
        return self._result("completed")

    async def _ready_sandbox(self) -> None:
        """Loop until there is a live sandbox whose files equal the last snapshot."""
        state = self._state
        while True:
            if self._outage is not None:
                await self._wait_for_store(self._outage)
            if state.sandbox is None:
                try:
                    await self._provision()
                except ActivityError as e:
                    if not _outage(e):
                        raise
                    self._outage = e
                    continue
            try:
                if state.last_snapshot is None:
                    # The state right after setup: what step 1 starts from, and what its retries roll back to.
                    await self._checkpoint(step=-1)
                elif state.needs_rollback:
                    await self._rollback()
                self._store_answered()
                return
            except ActivityError as e:
                self._sandbox_lost(e)

    async def _attempt(self, index: int) -> None:
        state, pipeline = self._state, self._pipeline
        step = pipeline.steps[index]
        self._set_phase("running", index)
        state.step_runs += 1
        try:
            outcome = await (self._run_agent(index) if step.agent is not None else self._run_step(index))
        except ActivityError as e:
            self._sandbox_lost(e)
            return
        if not outcome.ok:
            failures = state.failures[index] = state.failures.get(index, 0) + 1
            if failures > step.retries:
                raise self._step_failed(index, outcome, failures)
            self._last_error = f"{step_label(pipeline, index)} failed ({self._exit_text(outcome)}); retrying"
            self._back_to_last_checkpoint(rollback=True)
            await workflow.sleep(min(step.retry_backoff * 2 ** (failures - 1), MAX_RETRY_BACKOFF))
            return
        while pipeline.checkpoint_after(index):
            try:
                await self._checkpoint(step=index)
            except ActivityError as e:
                if _outage(e):  # the sandbox still holds the step's effects: wait, then checkpoint them again
                    await self._wait_for_store(e)
                    continue
                if _diverged(e):  # reset to before this checkpoint: the sandbox holds other files; redo the step
                    self._last_error = f"{step_label(pipeline, index)}: {_describe(e)}"
                    self._back_to_last_checkpoint(rollback=True)
                    return
                self._sandbox_lost(e)  # the step's effects died with the sandbox: it runs again
                return
            await self._upload_outputs(index)
            break
        self._store_answered()
        state.next_step = index + 1
        state.steps_completed = max(state.steps_completed, index + 1)
        state.consecutive_losses = 0
        state.lost_providers = []
        state.agent = None
        self._segment_steps += 1

    # -- losing a sandbox -------------------------------------------------------------------------------------

    def _sandbox_lost(self, error: ActivityError) -> None:
        """Anything but a fatal error or a cancellation means the sandbox (or its worker) is gone or cannot be
        trusted."""
        if is_cancelled_exception(error):
            # The run was cancelled and so was the activity: stop, never rehydrate. Raised as a cancellation, so
            # the run ends CANCELED rather than FAILED.
            raise asyncio.CancelledError("the run was cancelled") from error
        if _fatal(error):
            raise error
        state = self._state
        if _outage(error):
            # The store failed, not the sandbox: keep it, wait (in _ready_sandbox), roll back and run the step again.
            self._outage = error
            self._back_to_last_checkpoint(rollback=state.sandbox is not None)
            return
        state.rehydrations += 1
        workflow.metric_meter().create_counter(
            "tardigrade_rehydrations", "Sandboxes replaced by a fresh one restored from the last snapshot"
        ).add(1, {"pipeline": self._pipeline.name})
        state.consecutive_losses += 1
        self._last_error = f"sandbox lost at {self._where()}: {_describe(error)}"
        workflow.logger.warning("%s; rehydrating from the last snapshot", self._last_error)
        if state.consecutive_losses > self._pipeline.max_rehydrations:
            raise ApplicationError(
                f"gave up after losing the sandbox {state.consecutive_losses} times in a row at {self._where()}."
                f" Last error: {_describe(error)}. Is a step killing its own sandbox (out of memory, disk full)?"
                f" Raise max_rehydrations if the infrastructure is just flaky.",
                type="TooManySandboxLosses",
                non_retryable=True,
            )
        if state.sandbox is not None:
            # Kill orphans of the dead attempt if their worker still lives; a dead worker took them with it.
            # Not awaited: the new sandbox does not share files with the old one.
            self._activities.start_destroy(state.sandbox, summary="destroy the lost sandbox and any orphaned processes")
            if state.sandbox.provider not in state.lost_providers:
                state.lost_providers.append(state.sandbox.provider)  # the next provision tries the others first
        state.sandbox = None
        state.position = None
        self._back_to_last_checkpoint(rollback=False)

    async def _wait_for_store(self, error: ActivityError) -> None:
        """Wait out a store outage with backoff, for up to ``timeouts.outage`` in all; then the run fails."""
        state, limit = self._state, self._pipeline.timeouts.outage
        now = workflow.now().timestamp()
        if self._outage_since is None:
            self._outage_since = now
        waited = now - self._outage_since
        if waited >= limit:
            raise ApplicationError(
                f"gave up waiting for the snapshot store after {waited:.0f}s at {self._where()} (timeouts.outage is"
                f" {limit:.0f}s). Last error: {_describe(error)}",
                type="StoreOutage",
                non_retryable=True,
            )
        delay = min(OUTAGE_FIRST_WAIT * 2**self._outage_waits, OUTAGE_MAX_WAIT, limit - waited)
        self._outage_waits += 1
        self._waiting_for = self._last_error = f"waiting for the store: {_describe(error)}"
        workflow.logger.warning("%s; trying again in %.0fs", self._waiting_for, delay)
        steps = len(self._pipeline.steps)
        self._set_phase("waiting for the store", state.next_step if state.next_step < steps else None)
        await workflow.sleep(delay)
        self._outage = self._waiting_for = None

    def _store_answered(self) -> None:
        """The store worked again: the next outage gets the whole ``timeouts.outage`` again."""
        self._outage_since, self._outage_waits = None, 0

    def _back_to_last_checkpoint(self, *, rollback: bool) -> None:
        state = self._state
        state.next_step = state.last_snapshot.step + 1 if state.last_snapshot else 0
        state.needs_rollback = rollback
        if state.agent is not None:
            if rollback:
                state.agent = None  # a failed agent step is retried from its first turn, on the last checkpoint
            else:
                state.next_step = state.agent.step  # a lost one resumes at its turn (checkpoint: every_tool_call)

    # -- activities -------------------------------------------------------------------------------------------

    async def _provision(self) -> None:
        state, pipeline = self._state, self._pipeline
        restore = state.agent.snapshot if state.agent is not None else state.last_snapshot
        if state.agent is not None:
            resume = state.agent
            at = f"step {resume.step + 1}, agent resumes at turn {resume.turn}"
            summary = f"rehydrate: new sandbox from the last snapshot in {at}"
            self._set_phase("rehydrating", state.next_step)
        elif restore is not None:
            after = "setup" if restore.step < 0 else f"step {restore.step + 1}"
            summary = f"rehydrate: new sandbox from the snapshot after {after}"
            start = self._run_input.start
            if start is not None and not state.providers and restore.snapshot_id == start.snapshot.snapshot_id:
                summary = f"fork: new sandbox from {start.source} (the snapshot after {after})"
            self._set_phase("rehydrating", state.next_step)
        else:
            summary = "provision sandbox: manifest files and setup"
            self._set_phase("provisioning", None)
        if state.lost_providers and len(pipeline.sandbox.preferences) > 1:
            summary += f" (preferring a provider other than {', '.join(state.lost_providers)})"
        state.sandbox = await self._activities.provision(
            ProvisionInput(
                run_id=workflow.info().workflow_id,
                plan=self._plan,
                store=self._run_input.store,
                seed_snapshot=self._run_input.seed_snapshot,
                restore=restore,
                reason="rehydrate" if restore else "start",
                avoid_providers=list(state.lost_providers),
            ),
            summary=summary,
        )
        state.needs_rollback = False
        state.position = snapshot_position(restore.snapshot_id) if restore else setup_position(state.sandbox.sandbox_id)
        state.providers.append(state.sandbox.provider)

    async def _run_step(self, index: int) -> StepOutcome:
        pipeline, state = self._pipeline, self._state
        assert state.sandbox is not None
        attempt = state.failures.get(index, 0) + 1
        label = step_label(pipeline, index)
        try:
            outcome = await self._activities.run_step(
                RunStepInput(
                    sandbox=state.sandbox,
                    plan=self._plan,
                    step=pipeline.steps[index],
                    store=self._run_input.store,
                    index=index,
                    attempt=attempt,
                    expected=state.position,
                ),
                summary=label if attempt == 1 else f"{label} (attempt {attempt})",
            )
        except ActivityError as e:
            failed = _failed_step(e)
            if failed is None:
                raise
            outcome = failed
        if outcome.position is not None:
            state.position = outcome.position
        if outcome.rolled_back_first:
            self._last_error = f"{label}: the sandbox was ahead of the run's history (a reset?); rolled back first"
        return outcome

    async def _run_agent(self, index: int) -> StepOutcome:
        context = AgentContext(
            pipeline=self._pipeline,
            state=self._state,
            store=self._run_input.store,
            index=index,
            attempt=self._state.failures.get(index, 0) + 1,
            activities=self._activities,
            on_progress=self._on_agent_progress,
        )
        return await AgentLoop(context).run()

    def _on_agent_progress(self, progress: AgentProgress | None) -> None:
        self._agent_progress = progress
        if progress is not None:
            where = step_label(self._pipeline, progress.step)
            workflow.set_current_details(
                f"{where} — agent turn {progress.turn}/{progress.max_turns} (rehydrations: {self._state.rehydrations})"
            )

    async def _checkpoint(self, *, step: int) -> None:
        pipeline, state = self._pipeline, self._state
        assert state.sandbox is not None
        self._set_phase("checkpointing", step if step >= 0 else None)
        snapshot = await self._activities.checkpoint(
            CheckpointInput(
                sandbox=state.sandbox,
                plan=self._plan,
                store=self._run_input.store,
                run_id=workflow.info().workflow_id,
                step=step,
                parent=state.last_snapshot.snapshot_id if state.last_snapshot else None,
                expected=state.position,
            ),
            summary="checkpoint after setup" if step < 0 else f"checkpoint after {step_label(pipeline, step)}",
        )
        state.position = snapshot_position(snapshot.snapshot_id)
        state.last_snapshot = snapshot
        state.checkpoints.append(CheckpointRecord(step=step, snapshot_id=snapshot.snapshot_id))

    async def _rollback(self) -> None:
        state = self._state
        assert state.sandbox is not None and state.last_snapshot is not None
        self._set_phase("rolling back", state.next_step)
        where = "setup" if state.last_snapshot.step < 0 else f"step {state.last_snapshot.step + 1}"
        await self._activities.rollback(
            RollbackInput(
                sandbox=state.sandbox, plan=self._plan, store=self._run_input.store, snapshot=state.last_snapshot
            ),
            summary=f"roll back to the snapshot after {where} before retrying",
        )
        state.needs_rollback = False
        state.position = snapshot_position(state.last_snapshot.snapshot_id)

    async def _upload_outputs(self, step: int | None) -> None:
        """Publish the outputs due after ``step``'s checkpoint (None: the end of the run), from that snapshot."""
        pipeline, state = self._pipeline, self._state
        step_name = pipeline.steps[step].name if step is not None else None
        due = {i: output for i, output in enumerate(pipeline.outputs) if output.applies_after(step_name)}
        if not due or state.last_snapshot is None:
            return
        self._set_phase("publishing outputs", step)
        where = step_label(pipeline, step) if step is not None else "the run"
        while True:
            try:
                records = await self._activities.upload_outputs(
                    OutputsInput(
                        pipeline=pipeline.name,
                        store=self._run_input.store,
                        run_id=workflow.info().workflow_id,
                        snapshot=state.last_snapshot,
                        step=step,
                        outputs=due,
                    ),
                    summary=f"publish {len(due)} output(s) of {where}",
                )
                break
            except ActivityError as e:
                if not _outage(e):
                    raise
                await self._wait_for_store(e)  # publishing is create-only: trying again is safe
        self._store_answered()
        state.outputs.extend(records)

    async def _destroy_sandbox(self) -> None:
        sandbox = self._state.sandbox
        if sandbox is None:
            return
        self._state.sandbox = None
        try:
            await self._activities.destroy(sandbox, summary="destroy the sandbox")
        except ActivityError:
            workflow.logger.warning("could not destroy sandbox %s; its worker will clean it up", sandbox.sandbox_id)

    # -- continue-as-new --------------------------------------------------------------------------------------

    def _time_to_continue_as_new(self) -> bool:
        return self._segment_steps >= self._pipeline.steps_per_run or workflow.info().is_continue_as_new_suggested()

    def _continue_as_new(self) -> None:
        state = self._state.model_copy(update={"segment": self._state.segment + 1})
        workflow.continue_as_new(self._run_input.model_copy(update={"state": state}))

    # -- reporting --------------------------------------------------------------------------------------------

    @workflow.query
    def status(self) -> RunStatus:
        state, index = self._state, self._state.next_step
        pipeline = self._input.pipeline if self._input else None
        running = pipeline is not None and index < len(pipeline.steps) and self._phase != "completed"
        return RunStatus(
            workflow_id=workflow.info().workflow_id,
            pipeline=pipeline.name if pipeline else "",
            phase=self._phase,
            current_step=index + 1 if running else None,
            current_step_name=pipeline.steps[index].name if running and pipeline else None,
            steps_total=len(pipeline.steps) if pipeline else 0,
            steps_completed=state.steps_completed,
            rehydrations=state.rehydrations,
            sandbox=state.sandbox,
            last_snapshot=state.last_snapshot,
            checkpoints=state.checkpoints[-50:],
            last_error=self._last_error,
            waiting_for=self._waiting_for,
            usage=state.usage,
            agent=self._agent_progress,
        )

    def _set_phase(self, phase: str, index: int | None) -> None:
        self._phase = phase
        pipeline = self._pipeline
        where = step_label(pipeline, index) if index is not None else pipeline.name
        workflow.set_current_details(f"{where} — {phase} (rehydrations: {self._state.rehydrations})")
        if self._run_input.search_attributes:
            searched = (searched_phase(phase), index + 1 if index is not None else self._state.next_step)
            if searched != self._searched:  # one upsert (a history event) per change that a search can see
                self._searched = searched
                workflow.upsert_search_attributes([PHASE.value_set(searched[0]), STEP.value_set(searched[1])])

    def _where(self) -> str:
        index = self._state.next_step
        steps = self._pipeline.steps
        return step_label(self._pipeline, index) if index < len(steps) else "the end of the run"

    @staticmethod
    def _exit_text(outcome: StepOutcome) -> str:
        if outcome.reason:
            return outcome.reason
        return "timed out" if outcome.timed_out else f"exit code {outcome.exit_code}"

    def _step_failed(self, index: int, outcome: StepOutcome, attempts: int) -> ApplicationError:
        pipeline, last = self._pipeline, self._state.last_snapshot
        restore_hint = ""
        if last is not None:
            after = "setup" if last.step < 0 else f"step {last.step + 1}"
            restore_hint = (
                f" The workspace after {after} is snapshot {last.snapshot_id}; inspect it with `tardigrade snapshot"
                f" restore {last.snapshot_id} DIR --store {self._run_input.store}`."
            )
        log_hint = f" Full output: {outcome.output_log} in the store." if outcome.output_log else ""
        self._last_error = f"{step_label(pipeline, index)} failed: {self._exit_text(outcome)}"
        return ApplicationError(
            f"{step_label(pipeline, index)} failed ({self._exit_text(outcome)}) after {attempts} attempt(s)."
            f"{restore_hint}{log_hint} Output ends with:\n{outcome.output_tail}",
            {"step": index + 1, "exit_code": outcome.exit_code, "last_snapshot": last.snapshot_id if last else None},
            type="StepFailed",
            non_retryable=True,
        )

    def _result(self, status: str) -> RunResult:
        state, last = self._state, self._state.last_snapshot
        return RunResult(
            workflow_id=workflow.info().workflow_id,
            pipeline=self._pipeline.name,
            status=status,
            steps_total=len(self._pipeline.steps),
            steps_completed=state.steps_completed,
            step_runs=state.step_runs,
            rehydrations=state.rehydrations,
            final_snapshot=last.snapshot_id if last else None,
            workspace_digest=last.digest if last else None,
            seed_snapshot=self._run_input.seed_snapshot,
            store=self._run_input.store,
            checkpoints=state.checkpoints,
            usage=state.usage,
            agents=[state.agents[i] for i in sorted(state.agents)],
            outputs=state.outputs,
            providers=state.providers,
        )

    @property
    def _run_input(self) -> RunInput:
        assert self._input is not None
        return self._input

    @property
    def _pipeline(self) -> Pipeline:
        return self._run_input.pipeline

    @property
    def _activities(self) -> ActivityCalls:
        if self._calls is None:
            self._calls = ActivityCalls(self._pipeline.timeouts)
        return self._calls

    @property
    def _plan(self) -> SandboxPlan:
        """What sandbox activities get instead of the whole pipeline (its size does not grow with the steps)."""
        if self._sandbox_plan is None:
            self._sandbox_plan = SandboxPlan.of(self._pipeline)
        return self._sandbox_plan
