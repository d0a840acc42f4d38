"""The snapshot engine: content-addressed, incremental, verified snapshots of a folder in an object store."""

from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots.engine import SnapshotEngine, SnapshotInfo, VerifyReport, check_snapshot_id
from tardigrade.sandboxes.snapshots.restore import RestoreStats

__all__ = ["RestoreStats", "Selection", "SnapshotEngine", "SnapshotInfo", "VerifyReport", "check_snapshot_id"]
