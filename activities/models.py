"""What crosses between the workflow and the activities - and so what Temporal's history holds.

Only ids, digests, exit codes, counters and bounded, redacted output tails. Never file contents (those go
through the snapshot store) and never secret values (secrets travel by name and are resolved on the worker).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tardigrade.pipeline import Pipeline, Step

#: The most output a step result carries into history; the full log goes to the snapshot store.
OUTPUT_TAIL_BYTES = 2048

# Activity names: the workflow refers to activities by these, so it never imports their implementation.
PROVISION = "tardigrade.provision"
RUN_STEP = "tardigrade.run_step"
CHECKPOINT = "tardigrade.checkpoint"
ROLLBACK = "tardigrade.rollback"
DESTROY = "tardigrade.destroy"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SandboxRef(_Model):
    """A live sandbox and where its activities must run."""

    provider: str
    sandbox_id: str
    task_queue: str  # the creating worker's own queue for host-bound providers, else the shared queue
    host_bound: bool
    worker: str  # identity of the worker that created it, for people reading history


class SnapshotRef(_Model):
    snapshot_id: str
    digest: str
    step: int  # index of the last step it includes; -1 is the state right after setup
    files: int = 0
    bytes: int = 0
    bytes_new: int = 0  # content that was not in the store before this snapshot
    seconds: float = 0.0


class ProvisionInput(_Model):
    run_id: str
    pipeline: Pipeline
    store: str
    seed_snapshot: str | None
    restore: SnapshotRef | None = None  # rehydration: make the new sandbox equal this snapshot
    reason: str = "start"


class RunStepInput(_Model):
    sandbox: SandboxRef
    pipeline: Pipeline
    store: str
    index: int
    attempt: int


class StepOutcome(_Model):
    index: int
    exit_code: int
    timed_out: bool = False
    seconds: float
    output_tail: str = ""  # redacted, at most OUTPUT_TAIL_BYTES
    output_bytes: int = 0
    output_log: str | None = None  # store key of the full (redacted) output when it exceeds the tail

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class CheckpointInput(_Model):
    sandbox: SandboxRef
    pipeline: Pipeline
    store: str
    run_id: str
    step: int
    parent: str | None


class RollbackInput(_Model):
    sandbox: SandboxRef
    pipeline: Pipeline
    store: str
    snapshot: SnapshotRef


class RollbackResult(_Model):
    files_written: int
    deleted: int
    seconds: float


class CheckpointRecord(_Model):
    step: int
    snapshot_id: str


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


def step_label(pipeline: Pipeline, index: int) -> str:
    step: Step = pipeline.steps[index]
    return f"step {index + 1}/{len(pipeline.steps)} · {step.name}"
