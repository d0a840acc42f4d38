"""The pipeline workflow's own state and what it reports: `RunInput`, `RunState`, `RunStatus`, `RunResult`.

`RunState` is everything a run needs to carry on; it is passed through continue-as-new and seeds a fork. The
status query and the result are what clients (the CLI, your code, other languages) read. Pure pydantic models,
imported by the workflow and by clients alike.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, ValidationError, model_validator
from temporalio.exceptions import ApplicationError

from tardigrade.activities.contract import OutputRecord, SandboxRef, SnapshotRef, TokenUsage, ToolCallRef
from tardigrade.pipeline import Pipeline, Step, validation_message


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointRecord(_Model):
    step: int
    snapshot_id: str
    turn: int | None = None  # set for the snapshots an agent step takes after its tool calls (every_tool_call)


class AgentResume(_Model):
    """Where an agent step resumes after losing its sandbox, recorded together so they always match: the
    conversation, the tool calls of the current turn and how many of them are done, and the snapshot of the
    files those calls left behind (checkpoint: every_tool_call)."""

    step: int
    root: str  # the conversation's root node
    turn: int
    conversation: str  # the node holding the turn's reply
    calls: list[ToolCallRef]
    results: list[str]  # refs of the results of calls[: len(results)]
    finish_summary: str | None = None  # the reply also called finish: the step ends once calls are done
    snapshot: SnapshotRef


class AgentReport(_Model):
    step: int
    turns: int
    tool_calls: int
    usage: TokenUsage
    finished: bool
    summary: str = ""  # bounded, redacted
    conversation: str | None = None  # the last head ref


class AgentProgress(_Model):
    step: int
    turn: int
    max_turns: int
    tool_calls: int


class RunState(_Model):
    """Everything a run needs to carry on: passed through continue-as-new, and the seed of a fork."""

    next_step: int = 0
    last_snapshot: SnapshotRef | None = None
    sandbox: SandboxRef | None = None
    # Which state the live sandbox's files should be in (what the last activity that touched them left): every
    # sandbox activity checks the sandbox holds it, so after a `temporal workflow reset` the files follow history.
    position: str | None = None
    needs_rollback: bool = False
    rehydrations: int = 0
    consecutive_losses: int = 0
    failures: dict[int, int] = Field(default_factory=dict)  # step index -> failed attempts (non-zero exit)
    steps_completed: int = 0
    step_runs: int = 0  # step activities started, retries and re-runs included
    checkpoints: list[CheckpointRecord] = Field(default_factory=list)
    segment: int = 0  # how many times this run has continued-as-new
    agent: AgentResume | None = None  # an agent step's resume point (checkpoint: every_tool_call)
    usage: TokenUsage = Field(default_factory=TokenUsage)  # every model call of the run
    agents: dict[int, AgentReport] = Field(default_factory=dict)  # step index -> its last agent run
    lost_providers: list[str] = Field(default_factory=list)  # providers lost since the last completed step
    providers: list[str] = Field(default_factory=list)  # the provider of each sandbox the run provisioned
    outputs: list[OutputRecord] = Field(default_factory=list)


class StartPoint(_Model):
    """Where a fork starts: a recorded snapshot (of another run, or any snapshot in the store) and the step it was
    taken after. The run restores it into a new sandbox and goes on with the step after that one."""

    snapshot: SnapshotRef
    source: str = Field(description="What the user named: RUN:STEP or a snapshot id, for people reading history.")


class RunInput(_Model):
    """The workflow's input: a pipeline whose Manifest files were already staged in the store as a seed snapshot."""

    pipeline: Pipeline
    store: str
    seed_snapshot: str | None = None
    state: RunState | None = None
    start: StartPoint | None = Field(
        default=None, description="Fork: start after this snapshot's step, with its files, instead of at step 1."
    )
    search_attributes: bool = Field(
        default=False,
        description="The namespace has Tardigrade's search attributes registered: the run keeps TardigradeStep and"
        " TardigradePhase up to date (see workflows/search_attributes.py).",
    )

    @model_validator(mode="after")
    def _start_inside_the_pipeline(self) -> RunInput:
        if self.start is not None:
            step, total = self.start.snapshot.step, len(self.pipeline.steps)
            if not -1 <= step < total - 1:
                raise ValueError(
                    f"start.snapshot.step: {step + 1} is not a step after which this {total}-step pipeline has steps"
                    f" left to run; fork from 0 (after setup) to {total - 1}"
                )
        return self

    def initial_state(self) -> RunState:
        """The state a run starts in: carried over (continue-as-new), forked from a snapshot, or from scratch."""
        if self.state is not None:
            return self.state
        if self.start is None:
            return RunState()
        snapshot = self.start.snapshot
        return RunState(
            next_step=snapshot.step + 1,
            last_snapshot=snapshot,
            steps_completed=snapshot.step + 1,
            checkpoints=[CheckpointRecord(step=snapshot.step, snapshot_id=snapshot.snapshot_id)],
        )

    @model_validator(mode="wrap")
    @classmethod
    def _refuse_at_once(cls, data: Any, handler: ModelWrapValidatorHandler[RunInput]) -> RunInput:
        """Decoding a workflow's input, a ValidationError fails the workflow *task*, which Temporal retries forever;
        a non-retryable ApplicationError fails the run at once, naming the field. That is what a client in another
        language sees when its pipeline passed the JSON Schema but not a rule only the models check."""
        try:
            return handler(data)
        except ValidationError as e:
            message = validation_message(e, "workflow input")
            raise ApplicationError(message, type="InvalidRunInput", non_retryable=True) from None


class RunResult(_Model):
    """What a completed run returns."""

    workflow_id: str
    pipeline: str = Field(description="The pipeline's name.")
    status: str = Field(description="completed (a failed or cancelled run raises instead of returning).")
    steps_total: int
    steps_completed: int
    step_runs: int = Field(description="Step activities started, retries and re-runs after a loss included.")
    rehydrations: int = Field(description="How many times a lost sandbox was replaced.")
    final_snapshot: str | None = Field(description="The snapshot of the workspace after the last step.")
    workspace_digest: str | None = Field(
        description="Identifies the final files: equal for runs that left equal workspaces, crashed or not."
    )
    seed_snapshot: str | None = Field(description="The Manifest's files and folders, staged before the run.")
    store: str = Field(description="The snapshot store's URL.")
    checkpoints: list[CheckpointRecord] = Field(description="The snapshots taken, in order (step -1: after setup).")
    usage: TokenUsage = Field(default_factory=TokenUsage, description="Model tokens of every agent step.")
    agents: list[AgentReport] = Field(default_factory=list, description="The last run of each agent step.")
    outputs: list[OutputRecord] = Field(default_factory=list, description="Outputs published.")
    providers: list[str] = Field(
        default_factory=list, description="Every provider the run's sandboxes ran on, in order."
    )


class RunStatus(_Model):
    """Where a run is: the answer to the workflow's ``status`` query."""

    workflow_id: str
    pipeline: str = Field(description="The pipeline's name.")
    phase: str = Field(
        description="starting | provisioning | running | checkpointing | rolling back | rehydrating |"
        " waiting for the store | publishing outputs | completed | failed | cancelled"
    )
    current_step: int | None = Field(description="1-based, for people; null before the first step.")
    current_step_name: str | None
    steps_total: int
    steps_completed: int
    rehydrations: int = Field(description="How many times a lost sandbox was replaced.")
    sandbox: SandboxRef | None = Field(description="The live sandbox, if there is one.")
    last_snapshot: SnapshotRef | None = Field(description="The last checkpoint: what a retry or rehydration restores.")
    checkpoints: list[CheckpointRecord] = Field(description="The snapshots taken so far (step -1: after setup).")
    last_error: str | None = Field(default=None, description="The last loss or failed attempt, if any.")
    waiting_for: str | None = Field(
        default=None,
        description="What the run is waiting out right now, e.g. 'waiting for the store: <cause>'; null otherwise.",
    )
    usage: TokenUsage = Field(default_factory=TokenUsage, description="Model tokens so far.")
    agent: AgentProgress | None = Field(default=None, description="The agent step running now, if any.")


def step_label(pipeline: Pipeline, index: int) -> str:
    step: Step = pipeline.steps[index]
    return f"step {index + 1}/{len(pipeline.steps)} · {step.name}"
