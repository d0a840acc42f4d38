"""Sandbox activities: the thin layer between the workflow and sandboxes/.

Each activity attaches to a sandbox by id, does one thing through the provider or the snapshot engine,
heartbeats while it works (so a dead worker is noticed in seconds, not at a timeout of minutes), and maps
provider errors onto Temporal failures the workflow can act on:

* ``SandboxLost`` (non-retryable): the sandbox is gone; the workflow provisions a fresh one from the last snapshot.
* ``MountError``, ``OutputError``/``OutputConflict``, ``ProviderUnavailable`` (non-retryable): a data mount or an
  output's bucket cannot be used with this worker's credentials, or no provider the pipeline names is offered.
* ``SecretMissing``, ``SetupFailed``, ``IsolationUnavailable``, snapshot errors (non-retryable): retrying the
  same thing cannot help; the run fails with a message that says what to fix.
* anything else: retried by the activity's retry policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import blake3
import zstandard
from temporalio import activity
from temporalio.exceptions import ApplicationError

from tardigrade import config
from tardigrade.activities import telemetry
from tardigrade.activities.capacity import WorkerCapacity
from tardigrade.activities.contract import (
    CHECKPOINT,
    DESTROY,
    LIVE_TAIL_BYTES,
    OUTPUT_TAIL_BYTES,
    PROVISION,
    ROLLBACK,
    RUN_STEP,
    SANDBOX_DIVERGED,
    STEP_FAILED,
    UPLOAD_OUTPUTS,
    CheckpointInput,
    OutputRecord,
    OutputsInput,
    ProvisionInput,
    RollbackInput,
    RollbackResult,
    RunStepInput,
    SandboxPlan,
    SandboxRef,
    SnapshotRef,
    StepOutcome,
    StepProgress,
    setup_position,
    snapshot_position,
)
from tardigrade.activities.secrets import Redactor, resolve_secrets
from tardigrade.sandboxes.errors import (
    IsolationUnavailable,
    ProviderUnavailable,
    SandboxError,
    SandboxLost,
    SnapshotError,
)
from tardigrade.sandboxes.limits import LimitExceeded
from tardigrade.sandboxes.mounts import MountError
from tardigrade.sandboxes.network.policy import NetworkPolicy
from tardigrade.sandboxes.network.rules import NetworkRule
from tardigrade.sandboxes.outputs import OutputError, open_destination, upload_output
from tardigrade.sandboxes.policy import AppliedPolicy, PolicyViolation, resolve_policy
from tardigrade.sandboxes.provider import FaultInjector, Sandbox, SandboxProvider, SandboxSpec
from tardigrade.sandboxes.provider_choice import build_provider, choose
from tardigrade.sandboxes.provisioning import ProvisionRequest, RestorePoint, SetupFailed, apply_mounts
from tardigrade.sandboxes.provisioning import provision as provision_sandbox
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.store_keys import log_key
from tardigrade.sandboxes.stores import open_store

#: How much of a failed step's output tail its failure message shows (the whole tail is in the outcome).
STEP_FAILED_TAIL = 400

P = ParamSpec("P")
R = TypeVar("R")


def _failure(error: Exception, redactor: Redactor | None = None) -> ApplicationError:
    message = str(error) if redactor is None else redactor.text(str(error))
    return ApplicationError(message, type=type(error).__name__, non_retryable=True)


def maps_sandbox_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn the errors retrying cannot fix into non-retryable failures the workflow can tell apart by type."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (
            SandboxLost,
            SnapshotError,
            IsolationUnavailable,
            MountError,
            OutputError,
            ProviderUnavailable,
            PolicyViolation,
            LimitExceeded,
            SetupFailed,
        ) as e:
            raise _failure(e) from e

    return wrapper


@contextlib.asynccontextmanager
async def heartbeating(details: Callable[[], Any] = lambda: None) -> AsyncIterator[None]:
    """Heartbeat in the background for as long as the block runs.

    The first beat comes after one interval, not at once: the server counts the heartbeat timeout from the
    activity's start, so a beat at once detects nothing sooner, yet it costs every short activity (a no-op step's
    run and checkpoint) a server write and delays its completion behind that RPC (bench/step_overhead.py)."""
    timeout = activity.info().heartbeat_timeout
    interval = max(0.5, timeout.total_seconds() / 4) if timeout else 5.0

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval)
            activity.heartbeat(details())

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class LiveOutput:
    """The redacted end of a running command's output, for its heartbeats (`tardigrade logs --follow`). Redacts as
    a stream, holding back the last few bytes that could be the start of a secret split across two chunks."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.raw_bytes = 0
        self.emitted = 0  # redacted bytes released so far
        self._pending = b""
        self._ring = bytearray()

    def feed(self, chunk: bytes) -> None:
        self.raw_bytes += len(chunk)
        data = self.redactor.bytes(self._pending + chunk)
        keep = min(self.redactor.overlap, len(data))
        released, self._pending = data[: len(data) - keep], data[len(data) - keep :]
        self.emitted += len(released)
        self._ring += released
        del self._ring[:-LIVE_TAIL_BYTES]

    def progress(self) -> StepProgress:
        ring = bytes(self._ring)
        start = 0
        while start < min(3, len(ring)) and ring[start] & 0xC0 == 0x80:  # a character cut in two at the front
            start += 1
        end = len(ring)
        for back in range(1, min(4, len(ring) - start) + 1):  # and one not yet complete at the end
            byte = ring[end - back]
            if byte & 0xC0 == 0xC0:  # a lead byte: is its character complete?
                need = 4 if byte >= 0xF0 else 3 if byte >= 0xE0 else 2
                end = end if back >= need else end - back
                break
            if byte < 0x80:
                break
        first = self.emitted - len(ring)
        return StepProgress(
            output_bytes=self.raw_bytes,
            tail_start=first + start,
            tail_end=first + end,
            tail=ring[start:end].decode(errors="replace"),
        )


def _discard_log(log_path: str | None) -> None:
    """Delete a command's full-output log that nobody will read (it lives in the sandbox's state folder)."""
    if log_path:
        Path(log_path).unlink(missing_ok=True)


def diverged(sandbox: Sandbox, held: str | None, expected: str, doing: str) -> ApplicationError:
    """The sandbox's files are not in the state history names (a reset, or a stale activity wrote after it)."""
    return ApplicationError(
        f"sandbox {sandbox.id} holds {held or 'an unrecorded state'}, not {expected} as the run's history says"
        f" (was the workflow reset?); {doing}",
        type=SANDBOX_DIVERGED,
        non_retryable=True,
    )


async def mark_changing(sandbox: Sandbox, kind: str) -> str:
    """Record, before the files change, that they are about to: the token the workflow passes to the next
    activity. A crash mid-way leaves the token, never a false claim that the files still equal a snapshot."""
    position = f"{kind}:{uuid.uuid4().hex}"
    if sandbox.tracks_position:
        await sandbox.hold_position(position)
    return position


def sandbox_spec(plan: SandboxPlan, policy: AppliedPolicy | None = None) -> SandboxSpec:
    """The sandbox a plan asks for; its limits resolved (defaults filled in) under the policy's ceilings."""
    cfg = plan.sandbox
    limits = policy.limits_for(cfg.limits) if policy is not None else cfg.limits.resolved()
    network_policy = policy.policy.network if policy is not None else NetworkPolicy()
    return SandboxSpec(
        network=NetworkRule.parse(cfg.network),
        isolation=cfg.isolation,
        options=dict(cfg.options),
        limits=limits,
        network_policy=network_policy,
    )


class SandboxActivities:
    """The activities of one worker process. Holds its providers and one snapshot engine per store."""

    def __init__(
        self,
        *,
        shared_queue: str,
        host_queue: str,
        state_dir: Path,
        providers: Mapping[str, SandboxProvider] | None = None,
        fault_injector: FaultInjector | None = None,
        policy: AppliedPolicy | None = None,
    ) -> None:
        self.shared_queue = shared_queue
        self.host_queue = host_queue
        self.state_dir = state_dir
        # What pipelines may reach (sandboxes/policy.py): checked before any URL a pipeline names is opened.
        self.policy = policy or AppliedPolicy.for_worker(
            resolve_policy(None),
            state_dirs=[state_dir, config.state_dir()],
            own_stores=[config.default_store_url()],
        )
        self._providers: dict[str, SandboxProvider] = dict(providers or {})
        self._fault_injector = fault_injector
        self._engines: dict[str, SnapshotEngine] = {}
        self.capacity = WorkerCapacity()  # the plugin sets the worker's limits (max live sandboxes, snapshots)
        self._live: set[str] = set()  # ids of the sandboxes provisioned here and not destroyed (for a metric)

    # -- plumbing ---------------------------------------------------------------------------------------------

    def provider(self, name: str) -> SandboxProvider:
        """The provider ``name`` as this worker offers it: injected, or built from the worker's environment."""
        try:
            return self._offered(name)
        except ProviderUnavailable as e:
            raise _failure(e) from None

    def _offered(self, name: str) -> SandboxProvider:
        if not self.policy.allows_provider(name):
            allowed = ", ".join(self.policy.policy.providers or [])
            raise ProviderUnavailable(f"the worker policy does not allow the {name} provider (providers: {allowed})")
        if name not in self._providers:
            self._providers[name] = build_provider(
                name, self.state_dir, worker_id=self.host_queue, fault_injector=self._fault_injector
            )
        return self._providers[name]

    async def _apply_mounts(self, sandbox: Sandbox, plan: SandboxPlan, phase: dict[str, Any]) -> None:
        """Copy the Manifest's data mounts in (or bring them up to date), with this worker's credentials."""
        await apply_mounts(sandbox, plan.manifest.mounts, self.policy, phase)

    def check_plan(self, plan: SandboxPlan, store: str, run_id: str) -> None:
        """Everything the run names against the worker's policy: raises one `PolicyViolation` naming the field."""
        self.policy.check_run(
            store=store,
            mount_sources=[m.source for m in plan.manifest.mounts],
            output_urls=[o.destination(run=run_id, step=None, pipeline=plan.pipeline) for o in plan.outputs],
            providers=plan.sandbox.preferences,
            limits=plan.sandbox.limits,
            network=plan.sandbox.network,
            secrets=plan.manifest.secrets,
        )

    def engine(self, store_url: str) -> SnapshotEngine:
        if store_url not in self._engines:
            self.policy.check_url(store_url, "store", "store")
            scratch = self.state_dir / "scratch" / blake3.blake3(store_url.encode()).hexdigest()[:16]
            self._engines[store_url] = SnapshotEngine(open_store(store_url), scratch_dir=scratch)
        return self._engines[store_url]

    async def _attach(self, ref: SandboxRef) -> Sandbox:
        return await self.provider(ref.provider).attach(ref.sandbox_id)

    def ref_for(self, sandbox: Sandbox, provider: SandboxProvider) -> SandboxRef:
        return SandboxRef(
            provider=provider.name,
            sandbox_id=sandbox.id,
            task_queue=self.host_queue if provider.host_bound else self.shared_queue,
            host_bound=provider.host_bound,
            worker=self.host_queue,
        )

    async def close(self) -> None:
        for provider in self._providers.values():
            await provider.close()
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()

    def all(self) -> list[Callable[..., Any]]:
        return [self.provision, self.run_step, self.checkpoint, self.rollback, self.upload_outputs, self.destroy]

    # -- activities -------------------------------------------------------------------------------------------

    @activity.defn(name=PROVISION)
    @maps_sandbox_errors
    async def provision(self, input: ProvisionInput) -> SandboxRef:
        """Create a sandbox on this worker: Manifest files, setup commands, and (rehydrating) the last snapshot."""
        plan = input.plan
        self.check_plan(plan, input.store, input.run_id)  # before anything is opened, created or resolved
        secrets = resolve_secrets(plan.manifest.secrets)
        redactor = Redactor(secrets.values)
        try:
            provider = choose(plan.sandbox.preferences, input.avoid_providers, self._offered)
        except ProviderUnavailable as e:
            raise _failure(e) from None
        engine = self.engine(input.store)
        restore = input.restore
        restored = restore.snapshot_id if restore is not None else None
        request = ProvisionRequest(
            manifest=plan.manifest,
            spec=sandbox_spec(plan, self.policy),
            setup_timeout=plan.timeouts.provision,
            seed_snapshot=input.seed_snapshot,
            restore=None
            if restore is None
            else RestorePoint(restore.snapshot_id, restore.step, restore.native, restore.native_provider),
            mask=redactor,
            secret_env=secrets.env_for,
            output_tail_bytes=OUTPUT_TAIL_BYTES,
            ready_position=lambda sandbox_id: snapshot_position(restored) if restored else setup_position(sandbox_id),
        )
        phase: dict[str, Any] = {"phase": "checking data mounts"}
        async with heartbeating(lambda: phase):  # the recipe itself is provider-neutral: sandboxes/provisioning.py
            sandbox = await provision_sandbox(
                provider, request, engine, policy=self.policy, capacity=self.capacity, phase=phase
            )
        if provider.host_bound:
            self.capacity.created(sandbox.id)
        else:  # lives elsewhere, and may be destroyed through another worker: not this worker's to count
            self.capacity.unreserve()
        self._live.add(sandbox.id)
        telemetry.sandboxes_live(len(self._live))
        return self.ref_for(sandbox, provider)

    @activity.defn(name=RUN_STEP)
    @maps_sandbox_errors
    async def run_step(self, input: RunStepInput) -> StepOutcome:
        """Run one step's command to completion, heartbeating; a retry never sees an orphan of the last try."""
        step = input.step
        assert step.run is not None
        secrets = resolve_secrets(input.plan.manifest.secrets)
        redactor = Redactor(secrets.values)
        sandbox = await self._attach(input.sandbox)
        secret_env = await secrets.env_for(sandbox)
        await sandbox.kill_processes()
        phase: dict[str, Any] = {"phase": "checking the sandbox holds the last checkpoint"}
        async with heartbeating(lambda: phase):
            rolled_back = await self.realign(sandbox, input.expected, input.plan, input.store, phase)
        position = await mark_changing(sandbox, f"step{input.index + 1}")
        live = LiveOutput(redactor)
        where: dict[str, str | int] = {
            "step": input.index + 1,
            "provider": input.sandbox.provider,
            "sandbox": input.sandbox.sandbox_id,
        }
        with telemetry.span("sandbox exec", where):
            async with heartbeating(live.progress):
                result = await sandbox.exec(
                    step.run,
                    env={
                        **input.plan.manifest.env,
                        **step.env,
                        "TARDIGRADE_STEP": str(input.index + 1),
                        "TARDIGRADE_ATTEMPT": str(input.attempt),
                        **secret_env,
                    },
                    timeout=step.timeout,
                    cwd=step.cwd,
                    on_output=live.feed,
                    labels={"step": str(input.index + 1), "attempt": str(input.attempt)},
                    tail_bytes=OUTPUT_TAIL_BYTES + redactor.overlap,
                    mask=redactor,  # the full-output log on the worker's disk never holds a secret
                )
        whole = result.output_bytes <= len(result.output_tail)
        tail = redactor.tail(result.output_tail, OUTPUT_TAIL_BYTES, whole=whole).decode(errors="replace")
        output_log = None
        if result.output_bytes > len(result.output_tail) and result.log_path:
            output_log = await asyncio.to_thread(self.store_log, input.store, Path(result.log_path), redactor)
        else:
            _discard_log(result.log_path)  # the tail holds all of it; one log per step would pile up for the run
        outcome = StepOutcome(
            index=input.index,
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            seconds=round(result.duration, 3),
            output_tail=tail,
            output_bytes=result.output_bytes,
            output_log=output_log,
            position=position,
            rolled_back_first=rolled_back,
            # A breach is a step failure (retried only as the step's `retries:` say), never a lost sandbox.
            limit=result.limit.limit if result.limit else None,
            reason=result.limit.message if result.limit else None,
        )
        telemetry.step_finished(
            step.name,
            outcome,
            {**where, "attempt": input.attempt, "timed_out": result.timed_out, "limit": outcome.limit},
        )
        if not outcome.ok:  # a failed activity in the Web UI, with the outcome for the workflow to decide on
            why = outcome.reason or (
                f"timed out after {step.timeout:g} s" if outcome.timed_out else f"exited with code {outcome.exit_code}"
            )
            ending = f"; its output ends with:\n{tail[-STEP_FAILED_TAIL:]}" if tail else ""
            raise ApplicationError(
                f"step {input.index + 1} ({step.name}) {why}{ending}", outcome, type=STEP_FAILED, non_retryable=True
            )
        return outcome

    async def realign(
        self, sandbox: Sandbox, expected: str | None, plan: SandboxPlan, store: str, phase: dict[str, Any]
    ) -> bool:
        """Make sure the sandbox's files are in the state ``expected`` names before they are used: a sandbox that
        holds another (its workflow was reset to an earlier event) is rolled back to that snapshot first. Returns
        whether it had to be. A state that is not a snapshot cannot be rebuilt here: `SandboxDiverged`."""
        if expected is None or not sandbox.tracks_position:
            return False
        held = await sandbox.held_position()
        if held == expected:
            return False
        snapshot_id = expected.removeprefix("snapshot:")
        if snapshot_id == expected:
            raise diverged(sandbox, held, expected, "the run goes back to its last checkpoint")
        activity.logger.warning("sandbox %s holds %s, not %s: rolling back first", sandbox.id, held, expected)
        await mark_changing(sandbox, "rollback")
        phase["phase"] = f"rolling back to {snapshot_id[:12]} (the sandbox was ahead of the run's history)"
        async with self.capacity.snapshot_slot():
            await sandbox.restore(self.engine(store), snapshot_id, selection=plan.manifest.snapshot.selection())
        await self._apply_mounts(sandbox, plan, phase)
        await sandbox.hold_position(expected)
        return True

    def store_log(self, store_url: str, log_path: Path, redactor: Redactor) -> str:
        """Keep a step's full output (redacted, compressed, content-addressed) where history cannot bloat."""
        store = self.engine(store_url).store
        raw = tempfile.NamedTemporaryFile(dir=self.state_dir, prefix="log-", delete=False)  # noqa: SIM115
        compressed = Path(raw.name + ".zst")
        try:
            with raw:
                redactor.copy(log_path, raw)
            hasher = blake3.blake3()
            with open(raw.name, "rb") as src:
                while block := src.read(1 << 20):
                    hasher.update(block)
            with open(raw.name, "rb") as src, open(compressed, "wb") as dst:
                zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
            key = log_key(hasher.hexdigest())
            store.put_file(key, compressed)
            return key
        finally:
            Path(raw.name).unlink(missing_ok=True)
            compressed.unlink(missing_ok=True)
            log_path.unlink(missing_ok=True)

    @activity.defn(name=CHECKPOINT)
    @maps_sandbox_errors
    async def checkpoint(self, input: CheckpointInput) -> SnapshotRef:
        """Snapshot the sandbox after a step. Only what changed since the last snapshot is read and stored."""
        sandbox = await self._attach(input.sandbox)
        engine = self.engine(input.store)
        labels = {"pipeline": input.plan.pipeline, "run": input.run_id, "step": str(input.step + 1)}
        native = None
        async with heartbeating():
            if input.expected is not None and sandbox.tracks_position:
                held = await sandbox.held_position()
                if held != input.expected:  # the step's effects are not (only) what is there: redo the step
                    raise diverged(sandbox, held, input.expected, "not checkpointing; the step runs again")
            async with self.capacity.snapshot_slot():  # queued behind the worker's other snapshots, heartbeating
                info = await sandbox.snapshot(
                    engine, selection=input.plan.manifest.snapshot.selection(), parent=input.parent, labels=labels
                )
            if input.plan.sandbox.options.get("native_snapshot"):
                native = await sandbox.native_snapshot()
            if sandbox.tracks_position:
                await sandbox.hold_position(snapshot_position(info.id))
        stats = info.stats
        ref = SnapshotRef(
            snapshot_id=info.id,
            digest=info.digest,
            step=input.step,
            files=stats.entries if stats else info.entries,
            bytes=info.bytes,
            bytes_new=stats.bytes_new if stats else 0,
            seconds=round(stats.seconds, 3) if stats else 0.0,
            native=native,
            native_provider=input.sandbox.provider if native else None,
        )
        telemetry.checkpoint_taken(ref, input.sandbox.provider)
        return ref

    @activity.defn(name=ROLLBACK)
    @maps_sandbox_errors
    async def rollback(self, input: RollbackInput) -> RollbackResult:
        """Put a live sandbox back to a snapshot before a step is retried: kill orphans, rewrite what differs."""
        sandbox = await self._attach(input.sandbox)
        phase: dict[str, Any] = {"phase": "restoring"}
        async with heartbeating(lambda: phase):
            await mark_changing(sandbox, "rollback")
            async with self.capacity.snapshot_slot():
                stats = await sandbox.restore(
                    self.engine(input.store),
                    input.snapshot.snapshot_id,
                    selection=input.plan.manifest.snapshot.selection(),
                )
            await self._apply_mounts(sandbox, input.plan, phase)  # an rw mount's writes are undone too
            if sandbox.tracks_position:
                await sandbox.hold_position(snapshot_position(input.snapshot.snapshot_id))
        return RollbackResult(files_written=stats.files_written, deleted=stats.deleted, seconds=round(stats.seconds, 3))

    @activity.defn(name=UPLOAD_OUTPUTS)
    @maps_sandbox_errors
    async def upload_outputs(self, input: OutputsInput) -> list[OutputRecord]:
        """Publish outputs from a checkpointed snapshot (not from the sandbox): create-only writes, so a retry
        re-sends identical bytes and never overwrites or duplicates anything."""
        engine = self.engine(input.store)
        progress: dict[str, Any] = {"files": 0}
        records = []
        async with heartbeating(lambda: progress):
            for index, output in input.outputs.items():
                url = output.destination(run=input.run_id, step=input.step, pipeline=input.pipeline)
                self.policy.check_url(url, f"outputs[{index}].to", "output")
                destination = await asyncio.to_thread(open_destination, url, index)
                try:
                    stats = await asyncio.to_thread(
                        upload_output,
                        engine,
                        input.snapshot.snapshot_id,
                        output,
                        index,
                        destination,
                        scratch=self.state_dir,
                        progress=lambda s: progress.update(files=s.files, output=s.index),
                    )
                finally:
                    destination.close()
                records.append(
                    OutputRecord(
                        index=index,
                        step=input.step,
                        destination=stats.destination,
                        snapshot_id=input.snapshot.snapshot_id,
                        files=stats.files,
                        bytes=stats.bytes,
                        created=stats.created,
                        manifest=stats.manifest,
                    )
                )
        return records

    @activity.defn(name=DESTROY)
    async def destroy(self, ref: SandboxRef) -> None:
        """Best effort: a sandbox that is already gone is fine."""
        self.capacity.gone(ref.sandbox_id)
        self._live.discard(ref.sandbox_id)
        telemetry.sandboxes_live(len(self._live))
        try:
            sandbox = await self._attach(ref)
        except (SandboxLost, SandboxError):
            with contextlib.suppress(Exception):  # best effort: what is left locally only costs disk space
                await self._offered(ref.provider).forget(ref.sandbox_id)
            return
        await sandbox.destroy()
