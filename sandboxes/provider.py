"""The provider-neutral sandbox interface: what a workflow step needs from any sandbox.

A `SandboxProvider` creates sandboxes from a `SandboxSpec` and re-attaches to one by id; a `Sandbox` runs shell
commands with streaming output and timeouts, moves files, and takes and restores portable snapshots through a
`SnapshotEngine`. Providers translate their own "it is gone" errors into `SandboxLost`; everything above this
layer (activities, workflows) only ever sees that.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tardigrade.sandboxes.errors import SandboxError
from tardigrade.sandboxes.exec_log import OutputMask
from tardigrade.sandboxes.limits import LimitBreach, Limits
from tardigrade.sandboxes.manifest import Mount
from tardigrade.sandboxes.network.policy import NetworkPolicy
from tardigrade.sandboxes.network.rules import NetworkRule
from tardigrade.sandboxes.snapshots import RestoreStats, Selection, SnapshotEngine, SnapshotInfo
from tardigrade.sandboxes.stores import ObjectStore

if TYPE_CHECKING:
    from tardigrade.sandboxes.mounts import MountStats
    from tardigrade.sandboxes.network.broker import HostSecret

OutputCallback = Callable[[bytes], None]


@dataclass(frozen=True)
class SandboxSpec:
    """How to create a sandbox. Secrets are not here: they are resolved per command, on the worker."""

    network: NetworkRule | bool = False  # off/internet/allowlist (sandboxes/network/rules.py); a bool is read as one
    isolation: str = "required"  # "required" | "preferred" (local provider: run unisolated if bwrap is missing)
    options: Mapping[str, Any] = field(default_factory=dict)  # provider-specific (template, image, cpu, ...)
    limits: Limits = field(default_factory=Limits)  # sandboxes/limits.py; None fields mean the defaults
    # The worker's side: which internal addresses stay reachable (from its policy, not from the pipeline).
    network_policy: NetworkPolicy = field(default_factory=NetworkPolicy)

    def __post_init__(self) -> None:
        object.__setattr__(self, "network", NetworkRule.parse(self.network))

    @property
    def network_rule(self) -> NetworkRule:
        """``network``, always as a `NetworkRule` (never test ``network`` for truth: a rule object is truthy)."""
        return NetworkRule.parse(self.network)


@dataclass
class ExecResult:
    exit_code: int
    timed_out: bool
    duration: float
    output_tail: bytes  # the last bytes of combined stdout+stderr
    output_bytes: int  # total bytes produced
    log_path: str | None = None  # full output, on the worker's disk, if the provider keeps it
    limit: LimitBreach | None = None  # the sandbox limit that ended the command (sandboxes/limits.py)


class Sandbox(abc.ABC):
    """One live sandbox. Paths are sandbox paths (``/workspace/...``)."""

    id: str
    provider: str

    @abc.abstractmethod
    async def exec(
        self,
        command: str,
        *,
        env: Mapping[str, str],
        timeout: float | None,
        cwd: str = "/workspace",
        on_output: OutputCallback | None = None,
        labels: Mapping[str, str] | None = None,
        tail_bytes: int = 4096,
        mask: OutputMask | None = None,
    ) -> ExecResult:
        """Run ``sh -c command`` to completion (or timeout, which kills it). Raises `SandboxLost` if the sandbox
        dies meanwhile. Cancelling the call kills the command's whole process tree. The full-output log (if the
        provider keeps one) is an `ExecLog`: 0600, secrets masked with ``mask`` before they reach the disk."""

    @abc.abstractmethod
    async def kill_processes(self) -> None:
        """Kill everything running in the sandbox (orphans of an abandoned attempt included)."""

    @abc.abstractmethod
    async def alive(self) -> bool: ...

    @abc.abstractmethod
    async def read_file(self, path: str, *, limit: int | None = None) -> bytes: ...

    @abc.abstractmethod
    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None: ...

    @abc.abstractmethod
    async def make_dirs(self, path: str) -> None: ...

    @abc.abstractmethod
    async def snapshot(
        self,
        engine: SnapshotEngine,
        *,
        selection: Selection,
        parent: str | None,
        labels: Mapping[str, str],
    ) -> SnapshotInfo:
        """Store the selected paths; unchanged files are not re-read when the provider can tell."""

    @abc.abstractmethod
    async def restore(self, engine: SnapshotEngine, snapshot_id: str, *, selection: Selection) -> RestoreStats:
        """Make the selected paths equal the snapshot (full restore or rollback, rewriting only what differs)."""

    @abc.abstractmethod
    async def mount(self, index: int, mount: Mount, source: ObjectStore) -> MountStats:
        """Copy (or bring up to date) the data of ``mount`` from ``source`` - a store the worker opened with its
        own credentials - so the sandbox sees it at ``mount.path``, read-only unless ``mount.mode`` is rw. Data is
        staged outside the sandbox's snapshot selection; unchanged objects already in place are not copied."""

    async def broker_secrets(self, secrets: Sequence[HostSecret]) -> dict[str, str]:
        """Broker these secrets for the sandbox's next commands: its egress proxy adds each value to HTTPS request
        headers for the secret's hosts. Returns the variables the commands get instead of the values: each name
        with an opaque placeholder (the same for the sandbox's whole life), and the CA bundle variables. A
        provider whose sandboxes cannot reach a worker-side proxy refuses (the default)."""
        raise SandboxError(
            f"secrets {', '.join(s.name for s in secrets)} are brokered ({{name, hosts}}), which needs the worker's"
            f" egress proxy next to the sandbox; the {self.provider} provider cannot route a sandbox's traffic"
            " through it. Run this pipeline on the local provider, or list these secrets by name only (their values"
            " then enter the sandbox's environment)"
        )

    async def native_snapshot(self) -> str | None:
        """Take the provider's own snapshot of the whole sandbox (``native_snapshot`` option), if it has them:
        faster to resume from on the same provider. Portable snapshots stay the source of truth."""
        return None

    async def adopt_native(self, engine: SnapshotEngine, snapshot_id: str, *, selection: Selection) -> None:  # noqa: B027
        """Called on a sandbox created from the native snapshot taken with portable snapshot ``snapshot_id``,
        before that portable snapshot is restored into it, so the restore can skip what is already in place."""

    #: Whether `held_position` / `hold_position` record anything (the activities check positions only if so).
    tracks_position = False

    async def held_position(self) -> str | None:
        """Which state the sandbox's files are in, as last recorded by `hold_position` (None: nothing recorded).
        Kept where the sandbox's own processes cannot write it, so a reset workflow can tell whether the files
        still equal what its history says, or must be rolled back first."""
        return None

    async def hold_position(self, position: str) -> None:  # noqa: B027 - optional hook
        """Record which state the sandbox's files are in: a checkpoint (``snapshot:ID``) or the token of the
        activity that changed them last. Written before a change starts, so a crash mid-way leaves no false claim."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Kill and delete the sandbox. Destroying a sandbox that is already gone is not an error."""


class SandboxProvider(abc.ABC):
    name: str
    #: True if a sandbox lives on the worker that created it (its activities must be routed to that worker).
    host_bound: bool

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> Sandbox: ...

    async def create_from(self, spec: SandboxSpec, native_snapshot: str | None) -> tuple[Sandbox, bool]:
        """Create a sandbox, starting from the provider's own snapshot when one is given and still exists (the
        portable snapshot is then applied as a diff). Returns the sandbox and whether it came from that snapshot.
        The default ignores native snapshots."""
        return await self.create(spec), False

    @abc.abstractmethod
    async def attach(self, sandbox_id: str) -> Sandbox:
        """The live sandbox with this id. Raises `SandboxLost` if it no longer exists."""

    async def forget(self, sandbox_id: str) -> None:  # noqa: B027 - optional hook
        """Drop what this worker keeps locally for a sandbox that turned out to be gone (`attach` raised
        `SandboxLost`), since nobody will `destroy` it through this worker. The default keeps nothing."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release provider resources when the worker stops."""


# A hook the demo and the tests use to destroy a sandbox while a command runs, the way a dead container would.
FaultInjector = Callable[["Sandbox", Mapping[str, str], Awaitable[Any]], Awaitable[None]]
