"""The activity contract: what crosses between the workflows and the activities, and so what history holds.

One module for both sides: the activities' names (the workflow calls them by name, never importing their code),
their inputs and results, grouped by direction, and the error types that no retry can fix. Only ids, digests,
exit codes, counters and bounded, redacted output tails travel here: never file contents (those go through the
snapshot store) and never secret values (secrets travel by name and are resolved on the worker).

Pure pydantic models: the workflow sandbox imports this module, so it must not import anything with I/O.
The workflow's own state and the run's result (`RunState`, `RunResult`, `RunStatus`) are in workflows/state.py.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tardigrade.pipeline import Pipeline, SandboxConfig, Step, Timeouts
from tardigrade.sandboxes.manifest import Manifest, Output, SecretEntry

# -- names ------------------------------------------------------------------------------------------------------

# Sandbox activities: run on the worker that hosts the sandbox (its own queue) unless noted.
PROVISION = "tardigrade.provision"  # shared queue: any worker may create the sandbox
RUN_STEP = "tardigrade.run_step"
CHECKPOINT = "tardigrade.checkpoint"
ROLLBACK = "tardigrade.rollback"
DESTROY = "tardigrade.destroy"
UPLOAD_OUTPUTS = "tardigrade.upload_outputs"  # publish outputs from a checkpointed snapshot (shared queue)
# Agent activities.
AGENT_START = "tardigrade.agent_start"  # store the conversation's root (shared queue)
MODEL_CALL = "tardigrade.model_call"  # one model turn (shared queue: any worker)
AGENT_TOOL = "tardigrade.agent_tool"  # one tool call in the sandbox (the sandbox's queue)
FUNCTION_TOOL = "tardigrade.function_tool"  # one call of a function tool, outside the sandbox (shared queue)

# -- limits on what history carries ------------------------------------------------------------------------------

#: The most output a step result carries into history; the full log goes to the snapshot store.
OUTPUT_TAIL_BYTES = 2048
#: The end of a running step's output that its heartbeats carry, for `tardigrade logs --follow`. Heartbeats are not
#: history; only the attempt of a worker that died keeps its last one (in the timeout failure).
LIVE_TAIL_BYTES = 8192
#: The most of an agent's text (replies, summaries) and of a tool's output that history carries, per item.
AGENT_TEXT_BYTES = 400

# -- errors no retry can fix (ApplicationError types) ----------------------------------------------------------

#: A step's command failed (non-zero exit, timeout, a sandbox limit): the run_step activity fails with this type and
#: the `StepOutcome` as its detail, so the Web UI shows a failed activity; the workflow reads the outcome from it
#: and applies the step's `retries:` as for any failed step. Not a lost sandbox.
STEP_FAILED = "StepFailed"

#: A sandbox activity found the sandbox's files in another state than the one its history names (the workflow was
#: reset, or a stale activity wrote after it): the workflow rolls back to its last checkpoint, or rehydrates.
SANDBOX_DIVERGED = "SandboxDiverged"

#: A service the run needs is down: the snapshot store unreachable, throttling or full (`StoreUnavailable`, raised
#: once the store client's own retries gave up). Neither the sandbox's fault nor fatal: the workflow keeps the
#: sandbox, waits with backoff for up to the pipeline's ``timeouts.outage``, and tries again.
OUTAGE_ERRORS = ("StoreUnavailable",)

#: Sandbox activities: no new sandbox can fix these; the run stops and says what to change.
SANDBOX_FATAL_ERRORS = (
    "SecretMissing",
    "LimitExceeded",  # a checkpoint of a sandbox over its disk limit (sandboxes/limits.py)
    "SetupFailed",
    "IsolationUnavailable",
    "ProviderUnavailable",
    "SnapshotMissing",
    "SnapshotCorrupt",
    "UnsafeTree",
    "SnapshotError",
    "StoreError",
    "MountError",
    "OutputError",
    "OutputConflict",
    "PolicyViolation",
)
#: Publishing outputs: a conflict or a missing snapshot stays so; a flaky bucket is retried.
OUTPUT_FATAL_ERRORS = ("OutputError", "OutputConflict", "SnapshotMissing", "SnapshotCorrupt", "PolicyViolation")
#: Model calls: the workflow's retry policy must not retry these either.
MODEL_FATAL_ERRORS = (
    "ModelRequestRejected",
    "ModelNotConfigured",
    "ScriptExhausted",
    "StoreError",
    "PolicyViolation",
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- shared references -------------------------------------------------------------------------------------------


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


def snapshot_position(snapshot_id: str) -> str:
    """The position of a sandbox whose files equal this snapshot (after a restore, rollback or checkpoint)."""
    return f"snapshot:{snapshot_id}"


def setup_position(sandbox_id: str) -> str:
    """The position of a new sandbox right after its Manifest and setup commands, before any snapshot."""
    return f"setup:{sandbox_id}"


class SandboxPlan(_Model):
    """What sandbox activities need to know of a pipeline: its Manifest, sandbox settings and timeouts - never its
    steps, so an activity's input (and history) does not grow with the length of the pipeline."""

    pipeline: str  # the pipeline's name, for labels
    manifest: Manifest
    sandbox: SandboxConfig
    timeouts: Timeouts
    # The pipeline's outputs: the worker checks their destinations against its policy at provisioning, so a
    # forbidden one fails the run before any step rather than after the last one.
    outputs: list[Output] = Field(default_factory=list)

    @classmethod
    def of(cls, pipeline: Pipeline) -> SandboxPlan:
        return cls(
            pipeline=pipeline.name,
            manifest=pipeline.manifest,
            sandbox=pipeline.sandbox,
            timeouts=pipeline.timeouts,
            outputs=pipeline.outputs,
        )


# -- workflow -> sandbox activities -----------------------------------------------------------------------------


class ProvisionInput(_Model):
    run_id: str
    plan: SandboxPlan
    store: str
    seed_snapshot: str | None
    restore: SnapshotRef | None = None  # rehydration: make the new sandbox equal this snapshot
    reason: str = "start"
    avoid_providers: list[str] = Field(default_factory=list)  # lost since the last completed step: try others first


class RunStepInput(_Model):
    sandbox: SandboxRef
    plan: SandboxPlan
    step: Step
    store: str
    index: int
    attempt: int
    # The state the step must start from ("snapshot:ID", or the position a step without a checkpoint left): a
    # sandbox found in another (after a reset) is rolled back to that snapshot first. None: do not check.
    expected: str | None = None


class CheckpointInput(_Model):
    sandbox: SandboxRef
    plan: SandboxPlan
    store: str
    run_id: str
    step: int
    parent: str | None
    expected: str | None = None  # the position the files must be in (what the last step left); None: do not check


class RollbackInput(_Model):
    sandbox: SandboxRef
    plan: SandboxPlan
    store: str
    snapshot: SnapshotRef


class OutputsInput(_Model):
    pipeline: str  # the pipeline's name, for {pipeline} in destinations
    store: str
    run_id: str
    snapshot: SnapshotRef
    step: int | None  # the step whose checkpoint is published; None at the end of the run
    outputs: dict[int, Output]  # the outputs due now, by their index in the pipeline's `outputs`


# -- sandbox activities -> workflow (besides SandboxRef and SnapshotRef) ------------------------------------------


class StepOutcome(_Model):
    index: int
    exit_code: int
    timed_out: bool = False
    seconds: float
    output_tail: str = ""  # redacted, at most OUTPUT_TAIL_BYTES
    output_bytes: int = 0
    output_log: str | None = None  # store key of the full (redacted) output when it exceeds the tail
    reason: str | None = None  # why an agent step did not finish (e.g. it used all its turns)
    limit: str | None = None  # the sandbox limit the step hit (memory, pids, disk, tmp); `reason` says more
    position: str | None = None  # the position the step left the files in (checked by the next activity)
    rolled_back_first: bool = False  # the sandbox was not where history said (a reset): rolled back before running

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.limit is None


class StepProgress(_Model):
    """What a running step's heartbeats carry: how much it printed, and the end of that output, redacted.
    ``tail`` is the redacted output from byte ``tail_start`` to ``tail_end`` (offsets in the redacted stream), so a
    reader polling it can print exactly what is new."""

    output_bytes: int = 0  # what the command printed so far, before redaction
    tail_start: int = 0
    tail_end: int = 0
    tail: str = ""


class RollbackResult(_Model):
    files_written: int
    deleted: int
    seconds: float


class OutputRecord(_Model):
    index: int
    step: int | None
    destination: str  # redacted URL
    snapshot_id: str
    files: int
    bytes: int
    created: int  # objects written by the attempt that succeeded (the rest were already there)
    manifest: str


# -- agent activities, both ways ----------------------------------------------------------------------------------
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
    secrets: list[SecretEntry]  # names, or {name, hosts} for brokered ones; never values


class AgentStartResult(_Model):
    conversation: str  # ref of the root node: instructions, tools, model config, the task


class ModelCallInput(_Model):
    store: str
    conversation: str  # the head ref: everything said so far
    tool_results: list[str] = Field(default_factory=list)  # refs of tool results to append before the call
    nudge: bool = False  # append a reminder to call a tool or finish (the last reply called none)
    turn: int


class FunctionToolLimits(_Model):
    """How a function tool's calls run, as registered on the worker (see tardigrade/function_tools.py)."""

    timeout: float  # seconds per attempt
    max_attempts: int  # then the error goes back to the model as the result


class ToolCallRef(_Model):
    call_id: str
    name: str
    description: str  # short and redacted, for summaries: "exec: wc -l data.csv"
    read_only: bool  # cannot change the sandbox's files: runs beside other such calls, needs no checkpoint
    function: FunctionToolLimits | None = None  # a function tool (runs on the worker, not in the sandbox)


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
    expected: str | None = None  # the position the files must be in before the call; None: do not check


class FunctionToolInput(_Model):
    store: str
    root: str  # the conversation's root: which function tools the step offers, the secrets to mask
    node: str  # the node holding the call
    call_id: str
    index: int
    turn: int
    max_attempts: int  # the last attempt stores the error for the model instead of failing


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
    position: str | None = None  # the files' new position, if the call could change them
