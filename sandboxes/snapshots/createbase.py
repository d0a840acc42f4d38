"""What every way of taking a snapshot shares (create.py walks, spliced.py splices): its inputs, its result.

The walking and the spliced paths take the same ten inputs; they travel as one `CreateInputs` rather than as a
dozen positional parameters repeated in every signature, where two of the same type are easily swapped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tardigrade.sandboxes.selection import Selection
from tardigrade.sandboxes.snapshots.crypto import Encryption
from tardigrade.sandboxes.snapshots.gc import Epoch
from tardigrade.sandboxes.snapshots.packs import KnownBlobs
from tardigrade.sandboxes.stores.base import ObjectStore


@dataclass(frozen=True)
class Published:
    """What publishing a tree did: the snapshot id (the stored tree object's hash, which for a tardigrade-tree/2
    tree is not the flat body's, see merkle.py), whether the tree object was new, and the folder listings and
    bytes it stored (the tree object aside), and how many listings it encoded only to find them stored."""

    snapshot_id: str
    written: bool
    tree_blobs: int = 0
    tree_bytes: int = 0
    tree_deduped: int = 0


#: A spliced tree's parent (its snapshot id) and the (path, whole subtree?) targets the splice replaced: the only
#: places where the new tree can differ from the parent's (splice.py).
Spliced = tuple[str, list[tuple[str, bool]]]

#: ``publish(flat body's id, flat body, side file and its packs or None, Spliced or None)``: see `create_snapshot`.
Publish = Callable[[str, Path, "tuple[Path, frozenset[str]] | None", "Spliced | None"], Published]


@dataclass(frozen=True)
class CreateInputs:
    """One snapshot's inputs, as `create_snapshot` received them (see there)."""

    store: ObjectStore
    root: str
    selection: Selection
    known: KnownBlobs
    scratch: Path
    publish: Publish
    gc_epochs: Sequence[Epoch]
    encryption: Encryption | None
    avoid_packs: frozenset[str]
    store_id: str  # whom the stat cache belongs to: the store's identity, its URL by default


@dataclass
class CreateStats:
    entries: int = 0
    bytes: int = 0  # logical size of all files
    files_read: int = 0
    files_unchanged: int = 0
    files_rechecked: int = 0  # stat unchanged but too fresh to trust (statcache.RACY_NS): hashed again
    skipped_special: list[str] = field(default_factory=list)  # sockets, fifos, devices (first few)
    bytes_new: int = 0
    bytes_stored: int = 0
    packs: int = 0
    tree_written: bool = False
    tree_blobs: int = 0  # folder listings newly stored (tardigrade-tree/2, merkle.py)
    tree_bytes: int = 0  # their stored bytes (the tree object aside)
    tree_deduped: int = 0  # folder listings encoded and hashed, and found stored already
    spliced: bool = False  # the tree is the parent's with only the hinted paths replaced (splice.py)
    seconds: float = 0.0


@dataclass
class CreateResult:
    snapshot_id: str
    digest: str
    stats: CreateStats


@dataclass
class Scan:
    """What the fingerprint walk of a folder found: the walked snapshot reuses it, the walk splice diffs its lines."""

    fingerprint: str
    walked: list[tuple[str, os.stat_result, bool]] | None  # None: too large to hold, walked again when needed
    lines: bytes | None  # the fingerprint's lines, for the walk file (walkfile.py), unless there are too many
    count: int


def scratch_file(scratch: Path, prefix: str) -> Path:
    """A new empty file in the scratch folder, by name only: its descriptor is closed at once (whoever writes it
    opens it again), so nothing stays open if the caller forgets it - unlinking it is still the caller's job."""
    fd, name = tempfile.mkstemp(dir=scratch, prefix=prefix)
    os.close(fd)
    return Path(name)


class NeedsWalk(Exception):
    """A hinted snapshot met what only a full walk gets right (hard links, packs GC condemned): walk after all."""
