"""Errors raised by sandboxes and the snapshot engine, each naming what failed and what to do about it.

The activities layer maps these onto Temporal failures: `SandboxLost` makes the workflow rehydrate into a fresh
sandbox; the snapshot errors are non-retryable because retrying cannot bring back a missing or corrupt object.
"""

from __future__ import annotations


class TardigradeError(Exception):
    """Base class for everything Tardigrade raises on purpose."""


class SandboxLost(TardigradeError):
    """The sandbox is gone (killed, deleted, timed out at the provider). Its files are lost with it."""

    def __init__(self, sandbox_id: str, reason: str) -> None:
        super().__init__(f"sandbox {sandbox_id} is lost: {reason}")
        self.sandbox_id = sandbox_id
        self.reason = reason


class SandboxError(TardigradeError):
    """A sandbox could not be created or configured (not a loss: retrying the same thing will fail again)."""


class UnsafePath(SandboxError):
    """A path would lead outside its folder or through a symlink, or names something that is not a regular file
    (a FIFO, a socket, a device). Raised before anything is read, written or created there."""


class IsolationUnavailable(SandboxError):
    """The pipeline requires isolation the worker cannot provide (e.g. bubblewrap is not installed)."""


class SnapshotError(TardigradeError):
    """Base class for snapshot failures; all of them leave already-stored snapshots untouched."""


class SnapshotMissing(SnapshotError):
    def __init__(self, snapshot_id: str, store_url: str, detail: str = "") -> None:
        msg = f"snapshot {snapshot_id} does not exist in store {store_url}"
        super().__init__(f"{msg} ({detail})" if detail else msg)
        self.snapshot_id = snapshot_id


class SnapshotCorrupt(SnapshotError):
    """An object is missing or does not match its hash. Names the snapshot, the path and the object."""

    def __init__(self, snapshot_id: str, path: str | None, key: str, problem: str) -> None:
        where = f" (file {path!r})" if path else ""
        super().__init__(f"snapshot {snapshot_id}{where}: object {key} {problem}")
        self.snapshot_id = snapshot_id
        self.path = path
        self.key = key


class UnsafeTree(SnapshotError):
    """A tree would write outside the restore target or through a symlink. Nothing of it is written."""

    def __init__(self, snapshot_id: str, path: str, reason: str) -> None:
        super().__init__(f"refusing to restore snapshot {snapshot_id}: entry {path!r} {reason}")
        self.path = path


class WorkspaceChanged(SnapshotError):
    """A file changed while it was being snapshotted (something is still writing to the workspace)."""


class ProviderUnavailable(SandboxError):
    """The pipeline asks for a sandbox provider this worker does not offer (not installed or not configured)."""
