"""Where everything lives in a snapshot store: one place for the key layout, as restic has for its repository.

    packs/ab/<pack>          blobs packed together: file content and trees' folder listings (pack name = hash of
                             its index)
    index/ab/<pack>          a pack's index: which blobs it holds, at which offsets
    trees/ab/<snapshot>      a snapshot's tree object: the root of its folder listings, or a flat tree (snapshot
                             id = hash of the object; snapshots/merkle.py)
    snapshots/<snapshot>     a snapshot's record: labels, parent, counts - what `snapshot ls` and GC list
    gc/condemned/<epoch>     garbage collection's marks; gc/deleted/<epoch> once swept; gc/lock
    logs/<hash>.zst          full (redacted) output of a step whose tail did not fit in history
    agent/nodes|items|replies/<hash>.json   agent conversations, content-addressed
    identity                 which store this is: a random id, written once (stores/identity.py)

The two-character fan-out keeps listings of one folder small on stores that are file systems. Pure functions and
constants: the snapshot engine, GC, the activities and the CLI all name keys through this module.
"""

from __future__ import annotations

PACKS = "packs/"
INDEX = "index/"
TREES = "trees/"
RECORDS = "snapshots/"
GC_CONDEMNED = "gc/condemned/"
GC_DELETED = "gc/deleted/"
GC_LOCK = "gc/lock"
LOGS = "logs/"
AGENT_NODES = "agent/nodes/"
AGENT_ITEMS = "agent/items/"
AGENT_REPLIES = "agent/replies/"
IDENTITY = "identity"


def pack_key(pack: str) -> str:
    return f"{PACKS}{pack[:2]}/{pack}"


def index_key(pack: str) -> str:
    return f"{INDEX}{pack[:2]}/{pack}"


def tree_key(snapshot_id: str) -> str:
    return f"{TREES}{snapshot_id[:2]}/{snapshot_id}"


def record_key(snapshot_id: str) -> str:
    return f"{RECORDS}{snapshot_id}"


def log_key(content_hash: str) -> str:
    return f"{LOGS}{content_hash}.zst"


def agent_node_key(ref: str) -> str:
    """A conversation node: a step's `output_log` names the last one."""
    return f"{AGENT_NODES}{ref}.json"
