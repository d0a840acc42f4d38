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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import blake3
import zstandard
from temporalio import activity
from temporalio.exceptions import ApplicationError

from tardigrade.activities.contract import (
    CHECKPOINT,
    DESTROY,
    LIVE_TAIL_BYTES,
    OUTPUT_TAIL_BYTES,
    PROVISION,
    ROLLBACK,
    RUN_STEP,
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
)
from tardigrade.activities.secrets import Redactor, resolve_secrets
from tardigrade.sandboxes.errors import (
    IsolationUnavailable,
    ProviderUnavailable,
    SandboxError,
    SandboxLost,
    SnapshotError,
)
from tardigrade.sandboxes.manifest import SEED_SELECTION
from tardigrade.sandboxes.mounts import MountError, open_source
from tardigrade.sandboxes.outputs import OutputError, open_destination, upload_output
from tardigrade.sandboxes.provider import FaultInjector, Sandbox, SandboxProvider, SandboxSpec
from tardigrade.sandboxes.provider_choice import build_provider, choose
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.store_keys import log_key
from tardigrade.sandboxes.stores import ObjectStore, open_store

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
        except (SandboxLost, SnapshotError, IsolationUnavailable, MountError, OutputError, ProviderUnavailable) as e:
            raise _failure(e) from e

    return wrapper


@contextlib.asynccontextmanager
async def heartbeating(details: Callable[[], Any] = lambda: None) -> AsyncIterator[None]:
    """Heartbeat in the background for as long as the block runs."""
    timeout = activity.info().heartbeat_timeout
    interval = max(0.5, timeout.total_seconds() / 4) if timeout else 5.0

    async def beat() -> None:
        while True:
            activity.heartbeat(details())
            await asyncio.sleep(interval)

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


def sandbox_spec(plan: SandboxPlan) -> SandboxSpec:
    cfg = plan.sandbox
    return SandboxSpec(network=cfg.network, isolation=cfg.isolation, options=dict(cfg.options))


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
    ) -> None:
        self.shared_queue = shared_queue
        self.host_queue = host_queue
        self.state_dir = state_dir
        self._providers: dict[str, SandboxProvider] = dict(providers or {})
        self._fault_injector = fault_injector
        self._engines: dict[str, SnapshotEngine] = {}

    # -- plumbing ---------------------------------------------------------------------------------------------

    def provider(self, name: str) -> SandboxProvider:
        """The provider ``name`` as this worker offers it: injected, or built from the worker's environment."""
        try:
            return self._offered(name)
        except ProviderUnavailable as e:
            raise _failure(e) from None

    def _offered(self, name: str) -> SandboxProvider:
        if name not in self._providers:
            self._providers[name] = build_provider(
                name, self.state_dir, worker_id=self.host_queue, fault_injector=self._fault_injector
            )
        return self._providers[name]

    async def _apply_mounts(self, sandbox: Sandbox, plan: SandboxPlan, phase: dict[str, Any]) -> None:
        """Copy the Manifest's data mounts in (or bring them up to date), with this worker's credentials."""
        mounts = plan.manifest.mounts
        sources: list[ObjectStore] = []
        try:
            for i, mount in enumerate(mounts):
                sources.append(await asyncio.to_thread(open_source, mount, i))
            for i, (mount, source) in enumerate(zip(mounts, sources, strict=True)):
                phase["phase"] = f"data mount {i + 1}/{len(mounts)} at {mount.path}"
                stats = await sandbox.mount(i, mount, source)
                phase[f"mount {i + 1}"] = (
                    f"{stats.objects} objects, {stats.downloaded} copied, {stats.skipped} unchanged, {stats.seconds}s"
                )
        finally:
            for source in sources:
                source.close()

    def engine(self, store_url: str) -> SnapshotEngine:
        if store_url not in self._engines:
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
        secrets = resolve_secrets(plan.manifest.secrets)
        redactor = Redactor(secrets.values())
        try:
            provider = choose(plan.sandbox.preferences, input.avoid_providers, self._offered)
        except ProviderUnavailable as e:
            raise _failure(e) from None
        engine = self.engine(input.store)
        phase: dict[str, Any] = {"phase": "checking data mounts"}
        async with heartbeating(lambda: phase):
            for i, mount in enumerate(plan.manifest.mounts):  # a bad mount fails before a sandbox exists
                (await asyncio.to_thread(open_source, mount, i)).close()
            phase["phase"] = f"creating a {provider.name} sandbox"
            restore = input.restore
            native = restore.native if restore is not None and restore.native_provider == provider.name else None
            sandbox, from_native = await provider.create_from(sandbox_spec(plan), native)
            try:
                if from_native:
                    assert restore is not None
                    # The provider's own snapshot already holds setup's results and the files; the portable
                    # snapshot is restored over it below, rewriting only what differs.
                    phase["phase"] = "resuming from the provider's snapshot"
                    selection = plan.manifest.snapshot.selection()
                    await sandbox.adopt_native(engine, restore.snapshot_id, selection=selection)
                elif input.seed_snapshot:
                    phase["phase"] = "placing manifest files"
                    await sandbox.restore(engine, input.seed_snapshot, selection=SEED_SELECTION)
                await self._apply_mounts(sandbox, plan, phase)
                env = {**plan.manifest.env, **secrets}
                for i, command in enumerate(plan.manifest.setup if not from_native else []):
                    phase["phase"] = f"setup command {i + 1}/{len(plan.manifest.setup)}"
                    result = await sandbox.exec(
                        command, env=env, timeout=plan.timeouts.provision, labels={"setup": str(i + 1)}
                    )
                    _discard_log(result.log_path)  # the tail below is all a failed setup reports
                    if result.exit_code != 0 or result.timed_out:
                        why = "timed out" if result.timed_out else f"exited with code {result.exit_code}"
                        whole = result.output_bytes <= len(result.output_tail)
                        ending = redactor.tail(result.output_tail, OUTPUT_TAIL_BYTES, whole=whole)
                        tail = ending.decode(errors="replace")
                        raise ApplicationError(
                            f"setup command {i + 1} ({redactor.text(command)!r}) {why}. Its output ends with:\n{tail}",
                            type="SetupFailed",
                            non_retryable=True,
                        )
                if input.restore is not None:
                    phase["phase"] = f"restoring the snapshot of step {input.restore.step + 1}"
                    selection = plan.manifest.snapshot.selection()
                    await sandbox.restore(engine, input.restore.snapshot_id, selection=selection)
            except BaseException:
                with contextlib.suppress(Exception):
                    await sandbox.destroy()
                raise
        return self.ref_for(sandbox, provider)

    @activity.defn(name=RUN_STEP)
    @maps_sandbox_errors
    async def run_step(self, input: RunStepInput) -> StepOutcome:
        """Run one step's command to completion, heartbeating; a retry never sees an orphan of the last try."""
        step = input.step
        assert step.run is not None
        secrets = resolve_secrets(input.plan.manifest.secrets)
        redactor = Redactor(secrets.values())
        sandbox = await self._attach(input.sandbox)
        await sandbox.kill_processes()
        live = LiveOutput(redactor)
        async with heartbeating(live.progress):
            result = await sandbox.exec(
                step.run,
                env={
                    **input.plan.manifest.env,
                    **step.env,
                    "TARDIGRADE_STEP": str(input.index + 1),
                    "TARDIGRADE_ATTEMPT": str(input.attempt),
                    **secrets,
                },
                timeout=step.timeout,
                cwd=step.cwd,
                on_output=live.feed,
                labels={"step": str(input.index + 1), "attempt": str(input.attempt)},
                tail_bytes=OUTPUT_TAIL_BYTES + redactor.overlap,
            )
        whole = result.output_bytes <= len(result.output_tail)
        tail = redactor.tail(result.output_tail, OUTPUT_TAIL_BYTES, whole=whole).decode(errors="replace")
        output_log = None
        if result.output_bytes > len(result.output_tail) and result.log_path:
            output_log = await asyncio.to_thread(self.store_log, input.store, Path(result.log_path), redactor)
        else:
            _discard_log(result.log_path)  # the tail holds all of it; one log per step would pile up for the run
        return StepOutcome(
            index=input.index,
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            seconds=round(result.duration, 3),
            output_tail=tail,
            output_bytes=result.output_bytes,
            output_log=output_log,
        )

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
            info = await sandbox.snapshot(
                engine, selection=input.plan.manifest.snapshot.selection(), parent=input.parent, labels=labels
            )
            if input.plan.sandbox.options.get("native_snapshot"):
                native = await sandbox.native_snapshot()
        stats = info.stats
        return SnapshotRef(
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

    @activity.defn(name=ROLLBACK)
    @maps_sandbox_errors
    async def rollback(self, input: RollbackInput) -> RollbackResult:
        """Put a live sandbox back to a snapshot before a step is retried: kill orphans, rewrite what differs."""
        sandbox = await self._attach(input.sandbox)
        phase: dict[str, Any] = {"phase": "restoring"}
        async with heartbeating(lambda: phase):
            stats = await sandbox.restore(
                self.engine(input.store),
                input.snapshot.snapshot_id,
                selection=input.plan.manifest.snapshot.selection(),
            )
            await self._apply_mounts(sandbox, input.plan, phase)  # an rw mount's writes are undone too
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
        try:
            sandbox = await self._attach(ref)
        except (SandboxLost, SandboxError):
            with contextlib.suppress(Exception):  # best effort: what is left locally only costs disk space
                await self._offered(ref.provider).forget(ref.sandbox_id)
            return
        await sandbox.destroy()
