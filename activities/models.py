"""What crosses between the workflow and the activities - and so what Temporal's history holds.

Only ids, digests, exit codes, counters and bounded, redacted output tails. Never file contents (those go
through the snapshot store) and never secret values (secrets travel by name and are resolved on the worker).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tardigrade.pipeline import Pipeline, SandboxConfig, Step, Timeouts
from tardigrade.sandboxes.manifest import Manifest, Output

#: The most output a step result carries into history; the full log goes to the snapshot store.
OUTPUT_TAIL_BYTES = 2048

# Activity names: the workflow refers to activities by these, so it never imports their implementation.
PROVISION = "tardigrade.provision"
RUN_STEP = "tardigrade.run_step"
CHECKPOINT = "tardigrade.checkpoint"
ROLLBACK = "tardigrade.rollback"
DESTROY = "tardigrade.destroy"
UPLOAD_OUTPUTS = "tardigrade.upload_outputs"  # publish outputs from a checkpointed snapshot (shared queue)
AGENT_START = "tardigrade.agent_start"  # agent steps: store the conversation's root (shared queue)
MODEL_CALL = "tardigrade.model_call"  # one model turn (shared queue: any worker)
AGENT_TOOL = "tardigrade.agent_tool"  # one tool call in the sandbox (the sandbox's queue)

#: The most of an agent's text (replies, summaries) and of a tool's output that history carries, per item.
AGENT_TEXT_BYTES = 400
#: Where conversation nodes live in the store (activities/conversation.py).
CONVERSATION_NODES = "agent/nodes/"
#: Model-call errors no retry can fix: the workflow's retry policy must not retry them either.
MODEL_FATAL_ERRORS = ("ModelRequestRejected", "ModelNotConfigured", "ScriptExhausted", "StoreError")


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
    native: str | None = None  # the provider's own snapshot taken with it (sandbox option native_snapshot)
    native_provider: str | None = None


class SandboxPlan(_Model):
    """What sandbox activities need to know of a pipeline: its Manifest, sandbox settings and timeouts - never its
    steps, so an activity's input (and history) does not grow with the length of the pipeline."""

    pipeline: str  # the pipeline's name, for labels
    manifest: Manifest
    sandbox: SandboxConfig
    timeouts: Timeouts

    @classmethod
    def of(cls, pipeline: Pipeline) -> SandboxPlan:
        return cls(
            pipeline=pipeline.name, manifest=pipeline.manifest, sandbox=pipeline.sandbox, timeouts=pipeline.timeouts
        )


class ProvisionInput(_Model):
    run_id: str
    plan: SandboxPlan
    store: str
    seed_snapshot: str | None
    restore: SnapshotRef | None = None  # rehydration: make the new sandbox equal this snapshot
    reason: str = "start"
    avoid_providers: list[str] = Field(default_factory=list)  # lost since the last completed step: try others first


class OutputsInput(_Model):
    pipeline: str  # the pipeline's name, for {pipeline} in destinations
    store: str
    run_id: str
    snapshot: SnapshotRef
    step: int | None  # the step whose checkpoint is published; None at the end of the run
    outputs: dict[int, Output]  # the outputs due now, by their index in the pipeline's `outputs`


class OutputRecord(_Model):
    index: int
    step: int | None
    destination: str  # redacted URL
    snapshot_id: str
    files: int
    bytes: int
    created: int  # objects written by the attempt that succeeded (the rest were already there)
    manifest: str


class RunStepInput(_Model):
    sandbox: SandboxRef
    plan: SandboxPlan
    step: Step
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
    reason: str | None = None  # why an agent step did not finish (e.g. it used all its turns)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class CheckpointInput(_Model):
    sandbox: SandboxRef
    plan: SandboxPlan
    store: str
    run_id: str
    step: int
    parent: str | None


class RollbackInput(_Model):
    sandbox: SandboxRef
    plan: SandboxPlan
    store: str
    snapshot: SnapshotRef


class RollbackResult(_Model):
    files_written: int
    deleted: int
    seconds: float


class CheckpointRecord(_Model):
    step: int
    snapshot_id: str
    turn: int | None = None  # set for the snapshots an agent step takes after its tool calls (every_tool_call)


# -- agent steps ------------------------------------------------------------------------------------------------
# The conversation lives in the snapshot store as a chain of content-addressed nodes (activities/conversation.py);
# history carries only the refs (64 hex digits), call ids, short descriptions and token counts.


class TokenUsage(_Model):
    input_tokens: int = 0
    output_tokens: int = 0
    model_calls: int = 0  # calls the model answered; a reply reused after a restart is not counted twice

    def plus(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            model_calls=self.model_calls + other.model_calls,
        )


class AgentStartInput(_Model):
    store: str
    run_id: str  # the workflow run: replies are reused within a run, never across runs
    index: int
    attempt: int  # a retry after the step failed starts a new conversation
    label: str
    step: Step
    env: dict[str, str]  # the Manifest's and the step's variables (no secrets: those are names below)
    secrets: list[str]


class AgentStartResult(_Model):
    conversation: str  # ref of the root node: instructions, tools, model config, the task


class ModelCallInput(_Model):
    store: str
    conversation: str  # the head ref: everything said so far
    tool_results: list[str] = Field(default_factory=list)  # refs of tool results to append before the call
    nudge: bool = False  # append a reminder to call a tool or finish (the last reply called none)
    turn: int


class ToolCallRef(_Model):
    call_id: str
    name: str
    description: str  # short and redacted, for summaries: "exec: wc -l data.csv"
    read_only: bool


class ModelCallResult(_Model):
    conversation: str  # the new head: the reply appended
    turn: int
    tool_calls: list[ToolCallRef]
    finish_summary: str | None = None  # the model called finish (bounded, redacted)
    text: str = ""  # the reply's text (bounded, redacted)
    usage: TokenUsage
    replayed: bool = False  # this exact request was answered before in this run; the stored reply was reused


class ToolCallInput(_Model):
    sandbox: SandboxRef
    store: str
    root: str  # the conversation's root: tool settings (env, cwd, secrets by name)
    node: str  # the node holding the call
    call_id: str
    index: int
    turn: int


class ToolCallResult(_Model):
    call_id: str
    name: str
    ok: bool  # False: the error went back to the model as the result
    result: str  # ref of the stored result item the model will read
    preview: str = ""  # bounded, redacted; never file contents
    output_bytes: int = 0
    output_log: str | None = None  # store key of the full output when the model saw a truncated one
    exit_code: int | None = None
    seconds: float = 0.0


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
