"""The provisioning recipe: how a fresh sandbox is made ready to run a pipeline's next step, on any provider.

The same steps for every provider, in this order: check the data mounts can be opened (a bad one fails before a
sandbox exists), wait for room on the worker, create the sandbox (from the provider's own snapshot when it has
one), place the Manifest's files, copy the data mounts in, run the setup commands, restore the last checkpoint,
and record which snapshot the files now equal. A failure anywhere destroys the half-made sandbox.

It lives here, apart from Temporal, so a provider author can read the whole recipe in one place and a test can run
it without a worker; activities/sandbox.py only wraps it with heartbeats, cancellation and the mapping of errors
onto Temporal failures. The worker's bookkeeping (`Capacity`) and its secrets (`Mask`, ``secret_env``) come in
as plain objects so nothing here reaches up into the activities layer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tardigrade.sandboxes.errors import SandboxError
from tardigrade.sandboxes.exec_log import OutputMask
from tardigrade.sandboxes.manifest import SEED_SELECTION, Manifest, Mount
from tardigrade.sandboxes.mounts import open_source
from tardigrade.sandboxes.policy import AppliedPolicy
from tardigrade.sandboxes.provider import Sandbox, SandboxProvider, SandboxSpec
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import ObjectStore

#: Progress of a provision, shown in its heartbeats: "phase" says what it is doing now.
Phase = dict[str, Any]


class SetupFailed(SandboxError):
    """A Manifest setup command exited non-zero or timed out; the message ends with its (masked) output."""


class Capacity(Protocol):
    """The worker's limits on live sandboxes and snapshots at once (activities/capacity.py's `WorkerCapacity`)."""

    async def reserve(self, phase: Phase) -> None: ...

    def unreserve(self) -> None: ...

    def snapshot_slot(self) -> AbstractAsyncContextManager[None]: ...


class Mask(OutputMask, Protocol):
    """Hides secret values in what a failure message quotes (activities/secrets.py's `Redactor` fits)."""

    def text(self, text: str) -> str: ...

    def tail(self, data: bytes, limit: int, *, whole: bool) -> bytes: ...


@dataclass(frozen=True)
class RestorePoint:
    """The checkpoint a rehydrated sandbox resumes from: the portable snapshot, and the provider's own one if any."""

    snapshot_id: str
    step: int  # 0-based index of the step it was taken after
    native: str | None = None  # a provider-native snapshot id, usable only by ``native_provider``
    native_provider: str | None = None


@dataclass(frozen=True)
class ProvisionRequest:
    """Everything the recipe needs from a run's plan (already checked against the worker's policy)."""

    manifest: Manifest
    spec: SandboxSpec
    setup_timeout: float  # each setup command's timeout, seconds
    seed_snapshot: str | None  # the Manifest's files as a snapshot, placed before setup
    restore: RestorePoint | None  # None on a run's first provision
    mask: Mask
    secret_env: Callable[[Sandbox], Awaitable[dict[str, str]]]  # the plain secrets' environment for this sandbox
    output_tail_bytes: int  # how much of a failed setup command's output its message quotes
    # The state marker a ready sandbox holds, given its id (the workflow checks it before the next step).
    ready_position: Callable[[str], str]


def _discard_log(log_path: str | None) -> None:
    """Delete a command's full-output log that nobody will read (it lives in the sandbox's state folder)."""
    if log_path:
        Path(log_path).unlink(missing_ok=True)


async def check_mounts(mounts: list[Mount]) -> None:
    """Open (and close) every data mount's source, so a bad one fails before a sandbox exists."""
    for i, mount in enumerate(mounts):
        (await asyncio.to_thread(open_source, mount, i)).close()


async def apply_mounts(sandbox: Sandbox, mounts: list[Mount], policy: AppliedPolicy, phase: Phase) -> None:
    """Copy the Manifest's data mounts in (or bring them up to date), with this worker's credentials."""
    sources: list[ObjectStore] = []
    try:
        for i, mount in enumerate(mounts):
            policy.check_url(mount.source, f"manifest.mounts[{i}].source", "mount")
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


async def provision(
    provider: SandboxProvider,
    request: ProvisionRequest,
    engine: SnapshotEngine,
    *,
    policy: AppliedPolicy,
    capacity: Capacity,
    phase: Phase,
) -> Sandbox:
    """Create a sandbox on ``provider`` and bring it to the state ``request`` names. On success the capacity
    reservation is the caller's to settle (`created` or `unreserve`); on failure it is released and the sandbox
    destroyed."""
    manifest = request.manifest
    await check_mounts(manifest.mounts)
    phase["phase"] = f"creating a {provider.name} sandbox"
    restore = request.restore
    native = restore.native if restore is not None and restore.native_provider == provider.name else None
    await capacity.reserve(phase)  # a full worker queues the provision rather than failing it
    try:
        sandbox, from_native = await provider.create_from(request.spec, native)
    except BaseException:
        capacity.unreserve()
        raise
    try:
        if from_native:
            assert restore is not None
            # The provider's own snapshot already holds setup's results and the files; the portable
            # snapshot is restored over it below, rewriting only what differs.
            phase["phase"] = "resuming from the provider's snapshot"
            await sandbox.adopt_native(engine, restore.snapshot_id, selection=manifest.snapshot.selection())
        elif request.seed_snapshot:
            phase["phase"] = "placing manifest files"
            await sandbox.restore(engine, request.seed_snapshot, selection=SEED_SELECTION)
        await apply_mounts(sandbox, manifest.mounts, policy, phase)
        env = {**manifest.env, **await request.secret_env(sandbox)}
        for i, command in enumerate(manifest.setup if not from_native else []):
            phase["phase"] = f"setup command {i + 1}/{len(manifest.setup)}"
            result = await sandbox.exec(
                command, env=env, timeout=request.setup_timeout, labels={"setup": str(i + 1)}, mask=request.mask
            )
            _discard_log(result.log_path)  # the tail below is all a failed setup reports
            if result.exit_code != 0 or result.timed_out:
                why = "timed out" if result.timed_out else f"exited with code {result.exit_code}"
                whole = result.output_bytes <= len(result.output_tail)
                tail = request.mask.tail(result.output_tail, request.output_tail_bytes, whole=whole)
                raise SetupFailed(
                    f"setup command {i + 1} ({request.mask.text(command)!r}) {why}."
                    f" Its output ends with:\n{tail.decode(errors='replace')}"
                )
        if restore is not None:
            phase["phase"] = f"restoring the snapshot of step {restore.step + 1}"
            async with capacity.snapshot_slot():
                await sandbox.restore(engine, restore.snapshot_id, selection=manifest.snapshot.selection())
        if sandbox.tracks_position:
            await sandbox.hold_position(request.ready_position(sandbox.id))
    except BaseException:
        capacity.unreserve()
        with contextlib.suppress(Exception):
            await sandbox.destroy()
        raise
    return sandbox
