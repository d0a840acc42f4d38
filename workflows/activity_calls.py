"""`ActivityCalls`: the workflow side of every Tardigrade activity, one typed method each.

The workflows never build `execute_activity` calls by hand. Each method names its activity, its input and result
types, and the timeouts and retry policy that go with it, next to the call; what depends on the pipeline (its
`timeouts:`) comes from the `Timeouts` it was made with, and where an activity runs from the `SandboxRef`.

Sandbox activities are not retried by Temporal (`NO_RETRY`): a failure there means the sandbox or its worker is
gone, and the workflow decides what to do (rehydrate). Activities any worker can run (provisioning, model
calls, publishing outputs) go to the workflow's own queue and are retried as each policy below says.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TypedDict

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from tardigrade.activities.contract import (
        AGENT_START,
        AGENT_TOOL,
        CHECKPOINT,
        DESTROY,
        FUNCTION_TOOL,
        MODEL_CALL,
        MODEL_FATAL_ERRORS,
        OUTPUT_FATAL_ERRORS,
        PROVISION,
        ROLLBACK,
        RUN_STEP,
        SANDBOX_FATAL_ERRORS,
        UPLOAD_OUTPUTS,
        AgentStartInput,
        AgentStartResult,
        CheckpointInput,
        FunctionToolInput,
        FunctionToolLimits,
        ModelCallInput,
        ModelCallResult,
        OutputRecord,
        OutputsInput,
        ProvisionInput,
        RollbackInput,
        RollbackResult,
        RunStepInput,
        SandboxRef,
        SnapshotRef,
        StepOutcome,
        ToolCallInput,
        ToolCallResult,
    )
    from tardigrade.agent_spec import ModelConfig
    from tardigrade.pipeline import Timeouts

#: Sandbox activities: the workflow itself decides what a failure means (a lost sandbox is rehydrated).
NO_RETRY = RetryPolicy(maximum_attempts=1)
#: Provisioning can meet a flaky provider API; a few attempts, but never for what no new sandbox can fix.
PROVISION_RETRY = RetryPolicy(maximum_attempts=3, non_retryable_error_types=list(SANDBOX_FATAL_ERRORS))
#: Publishing is idempotent (create-only writes), so retrying a flaky bucket is safe.
OUTPUT_RETRY = RetryPolicy(
    maximum_attempts=5, initial_interval=timedelta(seconds=1), non_retryable_error_types=list(OUTPUT_FATAL_ERRORS)
)
#: Storing an agent's root node: a store blip is retried, a bad model configuration is not.
AGENT_START_RETRY = RetryPolicy(maximum_attempts=5, non_retryable_error_types=list(MODEL_FATAL_ERRORS))
#: Time for a sandbox to be destroyed (processes killed, folder removed).
DESTROY_TIMEOUT = timedelta(seconds=120)
#: An activity's own work plus the time to report its result: a step's timeout is enforced inside the activity.
REPORT_MARGIN = 60.0


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


class _SandboxRouting(TypedDict):
    """The options every in-sandbox activity shares: its host's queue, heartbeats, no Temporal retries."""

    task_queue: str
    heartbeat_timeout: timedelta
    retry_policy: RetryPolicy
    schedule_to_start_timeout: timedelta | None


class ActivityCalls:
    """Every activity the workflows call, with its options. Made once per run from the pipeline's timeouts."""

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts

    # -- on the workflow's own queue (any worker) ----------------------------------------------------------

    async def provision(self, input: ProvisionInput, *, summary: str) -> SandboxRef:
        result: SandboxRef = await workflow.execute_activity(
            PROVISION,
            input,
            result_type=SandboxRef,
            task_queue=workflow.info().task_queue,
            start_to_close_timeout=_seconds(self.timeouts.provision),
            heartbeat_timeout=_seconds(self.timeouts.heartbeat),
            retry_policy=PROVISION_RETRY,
            summary=summary,
        )
        return result

    async def upload_outputs(self, input: OutputsInput, *, summary: str) -> list[OutputRecord]:
        result: list[OutputRecord] = await workflow.execute_activity(
            UPLOAD_OUTPUTS,
            input,
            result_type=list[OutputRecord],
            task_queue=workflow.info().task_queue,  # reads the snapshot store: any worker can do it
            start_to_close_timeout=_seconds(self.timeouts.checkpoint),
            heartbeat_timeout=_seconds(max(self.timeouts.heartbeat, 30)),
            retry_policy=OUTPUT_RETRY,
            summary=summary,
        )
        return result

    async def agent_start(self, input: AgentStartInput, *, summary: str) -> AgentStartResult:
        result: AgentStartResult = await workflow.execute_activity(
            AGENT_START,
            input,
            result_type=AgentStartResult,
            task_queue=workflow.info().task_queue,
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=AGENT_START_RETRY,
            summary=summary,
        )
        return result

    async def model_call(self, input: ModelCallInput, *, model: ModelConfig, summary: str) -> ModelCallResult:
        result: ModelCallResult = await workflow.execute_activity(
            MODEL_CALL,
            input,
            result_type=ModelCallResult,
            task_queue=workflow.info().task_queue,
            start_to_close_timeout=_seconds(model.request_timeout + REPORT_MARGIN),
            heartbeat_timeout=_seconds(self.timeouts.heartbeat),
            # 408/409/429/5xx and network errors are retried; the server's retry-after, when it sends one,
            # replaces the backoff for that attempt (ApplicationError.next_retry_delay).
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(seconds=60),
                maximum_attempts=model.max_attempts,
                non_retryable_error_types=list(MODEL_FATAL_ERRORS),
            ),
            summary=summary,
        )
        return result

    async def function_tool(
        self, input: FunctionToolInput, *, limits: FunctionToolLimits, summary: str
    ) -> ToolCallResult:
        result: ToolCallResult = await workflow.execute_activity(
            FUNCTION_TOOL,
            input,
            result_type=ToolCallResult,
            task_queue=workflow.info().task_queue,
            # The activity enforces the tool's timeout itself, so a hung call becomes an error the model reads.
            start_to_close_timeout=_seconds(limits.timeout + REPORT_MARGIN),
            # The tool's own policy: the activity turns its last attempt's error into a result for the model.
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(seconds=30),
                maximum_attempts=limits.max_attempts,
                non_retryable_error_types=["StoreError"],
            ),
            summary=summary,
        )
        return result

    # -- in the sandbox (on the queue of the worker that hosts it) -----------------------------------------

    async def run_step(self, input: RunStepInput, *, summary: str) -> StepOutcome:
        result: StepOutcome = await workflow.execute_activity(
            RUN_STEP,
            input,
            result_type=StepOutcome,
            start_to_close_timeout=_seconds(input.step.timeout + REPORT_MARGIN),
            summary=summary,
            **self._in_sandbox(input.sandbox),
        )
        return result

    async def agent_tool(self, input: ToolCallInput, *, timeout: float, summary: str) -> ToolCallResult:
        result: ToolCallResult = await workflow.execute_activity(
            AGENT_TOOL,
            input,
            result_type=ToolCallResult,
            start_to_close_timeout=_seconds(timeout + REPORT_MARGIN),
            summary=summary,
            **self._in_sandbox(input.sandbox),
        )
        return result

    async def checkpoint(self, input: CheckpointInput, *, summary: str) -> SnapshotRef:
        result: SnapshotRef = await workflow.execute_activity(
            CHECKPOINT,
            input,
            result_type=SnapshotRef,
            start_to_close_timeout=_seconds(self.timeouts.checkpoint),
            summary=summary[:200],
            **self._in_sandbox(input.sandbox),
        )
        return result

    async def rollback(self, input: RollbackInput, *, summary: str) -> RollbackResult:
        result: RollbackResult = await workflow.execute_activity(
            ROLLBACK,
            input,
            result_type=RollbackResult,
            start_to_close_timeout=_seconds(self.timeouts.checkpoint),
            summary=summary,
            **self._in_sandbox(input.sandbox),
        )
        return result

    async def destroy(self, sandbox: SandboxRef, *, summary: str) -> None:
        """Destroy a sandbox and wait; one retry, since a sandbox left running costs money."""
        await workflow.execute_activity(
            DESTROY,
            sandbox,
            task_queue=sandbox.task_queue,
            start_to_close_timeout=DESTROY_TIMEOUT,
            schedule_to_start_timeout=_seconds(self.timeouts.host_pickup),
            retry_policy=RetryPolicy(maximum_attempts=2),
            summary=summary,
        )

    def start_destroy(self, sandbox: SandboxRef, *, summary: str) -> None:
        """Destroy a lost sandbox without waiting: kills orphans of a dead attempt if their worker still lives."""
        workflow.start_activity(
            DESTROY,
            sandbox,
            task_queue=sandbox.task_queue,
            start_to_close_timeout=DESTROY_TIMEOUT,
            schedule_to_start_timeout=_seconds(self.timeouts.host_pickup),
            retry_policy=NO_RETRY,
            summary=summary,
        )

    def _in_sandbox(self, sandbox: SandboxRef) -> _SandboxRouting:
        routing: _SandboxRouting = {
            "task_queue": sandbox.task_queue,
            "heartbeat_timeout": _seconds(self.timeouts.heartbeat),
            "retry_policy": NO_RETRY,
            # Work waiting longer than this on a host's own queue means the host is gone.
            "schedule_to_start_timeout": _seconds(self.timeouts.host_pickup) if sandbox.host_bound else None,
        }
        return routing
