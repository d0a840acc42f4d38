"""The snapshot engine: content-addressed, incremental, verified snapshots of a folder in an object store."""

from sandboxes.selection import Selection
from sandboxes.snapshots.engine import SnapshotEngine, SnapshotInfo, VerifyReport, check_snapshot_id
from sandboxes.snapshots.restore import RestoreStats

__all__ = ["RestoreStats", "Selection", "SnapshotEngine", "SnapshotInfo", "VerifyReport", "check_snapshot_id"]
