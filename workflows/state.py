"""The pipeline workflow's own state and what it reports: `RunInput`, `RunState`, `RunStatus`, `RunResult`.

`RunState` is everything a run needs to carry on; it is passed through continue-as-new and seeds a fork. The
status query and the result are what clients (the CLI, your code, other languages) read. Pure pydantic models,
imported by the workflow and by clients alike.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tardigrade.activities.contract import OutputRecord, SandboxRef, SnapshotRef, TokenUsage, ToolCallRef
from tardigrade.pipeline import Pipeline, Step


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


class RunInput(_Model):
    """The workflow's input: a pipeline whose Manifest files were already staged in the store as a seed snapshot."""

    pipeline: Pipeline
    store: str
    seed_snapshot: str | None = None
    state: RunState | None = None


class RunResult(_Model):
    workflow_id: str
    pipeline: str
    status: str
    steps_total: int
    steps_completed: int
    step_runs: int
    rehydrations: int
    final_snapshot: str | None
    workspace_digest: str | None
    seed_snapshot: str | None
    store: str
    checkpoints: list[CheckpointRecord]
    usage: TokenUsage = Field(default_factory=TokenUsage)
    agents: list[AgentReport] = Field(default_factory=list)
    outputs: list[OutputRecord] = Field(default_factory=list)
    providers: list[str] = Field(default_factory=list)  # every provider the run's sandboxes ran on, in order


class RunStatus(_Model):
    workflow_id: str
    pipeline: str
    phase: str  # provisioning | running | checkpointing | rolling back | rehydrating | completed | failed
    current_step: int | None  # 1-based for people; None before the first step
    current_step_name: str | None
    steps_total: int
    steps_completed: int
    rehydrations: int
    sandbox: SandboxRef | None
    last_snapshot: SnapshotRef | None
    checkpoints: list[CheckpointRecord]
    last_error: str | None = None
    usage: TokenUsage = Field(default_factory=TokenUsage)
    agent: AgentProgress | None = None  # the agent step running now


def step_label(pipeline: Pipeline, index: int) -> str:
    step: Step = pipeline.steps[index]
    return f"step {index + 1}/{len(pipeline.steps)} · {step.name}"
