"""What a step changed, when the sandbox knows it without walking: the hint a checkpoint can take instead of a walk.

A provider that controls the sandbox's filesystem (the local provider's overlay upper layer) knows exactly which
paths a step created, modified or deleted. `SnapshotEngine.create(..., changes=ChangeSet(...))` then examines only
those paths and takes everything else from the parent snapshot unchanged: a checkpoint costs what the step
touched, not what the workspace holds. Without a hint, or without a parent, create walks the whole folder.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChangeSet:
    """Paths relative to the snapshot's root (POSIX, no leading ``/``, no ``.`` or ``..`` parts) that may differ
    from the parent snapshot: created, modified, deleted, or replaced by another kind. A folder stands for its whole
    subtree. A path that is not listed, and not under a listed folder, is the parent's, byte for byte."""

    paths: frozenset[str]
