"""Fork from a step: find the snapshot a new run starts from (`tardigrade run PIPELINE --from SNAPSHOT_OR_RUN:STEP`).

``RUN:STEP`` names a run (its workflow id) and a step of it, 1-based (0: right after setup): the checkpoint that
run's history recorded after that step - after a reset, the one of the history as it is now. ``SNAPSHOT`` or
``SNAPSHOT:STEP`` names a snapshot id in the store directly (the step defaults to the one in its labels). Either
way the new run restores those files into a fresh sandbox and goes on with the next step, in the same store.
"""

from __future__ import annotations

import asyncio
import re

from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from tardigrade.activities.contract import CHECKPOINT, CheckpointInput, SnapshotRef
from tardigrade.sandboxes.errors import SnapshotError
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tardigrade.workflows.state import StartPoint

_SNAPSHOT_ID = re.compile(r"^[0-9a-f]{64}$")


class ForkError(ValueError):
    """``--from`` names nothing that can be forked from; the message says what and how to fix it."""


def parse_start(text: str) -> tuple[str, int | None]:
    """Split ``SNAPSHOT_OR_RUN[:STEP]`` into the name and the 1-based step (None: not given)."""
    name, sep, step = text.rpartition(":")
    if not sep or not step.isdigit():
        name, step = text, ""
    if not name:
        raise ForkError(f"--from {text!r}: expected RUN:STEP (a workflow id and a step number) or a snapshot id")
    if not step and not _SNAPSHOT_ID.match(name):
        raise ForkError(f"--from {text!r}: say which step of run {name!r} to fork from, e.g. --from {name}:10")
    return name, int(step) if step else None


async def resolve_start(client: Client, text: str, store_url: str) -> tuple[StartPoint, str]:
    """The start point ``text`` names, and the store it lives in (a run's own store for RUN:STEP)."""
    name, step = parse_start(text)
    if _SNAPSHOT_ID.match(name):
        snapshot = await asyncio.to_thread(_snapshot_in_store, name, step, store_url, text)
        return StartPoint(snapshot=snapshot, source=text), store_url
    assert step is not None
    snapshot, store = await _checkpoint_of_run(client, name, step, text)
    return StartPoint(snapshot=snapshot, source=text), store


def _snapshot_in_store(snapshot_id: str, step: int | None, store_url: str, text: str) -> SnapshotRef:
    engine = SnapshotEngine(open_store(store_url))
    try:
        info = engine.info(snapshot_id)
    except SnapshotError as e:
        raise ForkError(f"--from {text!r}: {e}; pass the store it is in with --store") from None
    finally:
        engine.close()
    if step is None:
        label = info.labels.get("step", "")
        if not label.isdigit():
            raise ForkError(
                f"--from {text!r}: snapshot {snapshot_id[:12]} has no step label; say after which step it was taken:"
                f" --from {snapshot_id}:STEP"
            )
        step = int(label)
    return SnapshotRef(snapshot_id=snapshot_id, digest=info.digest, step=step - 1, files=info.entries, bytes=info.bytes)


async def _checkpoint_of_run(client: Client, workflow_id: str, step: int, text: str) -> tuple[SnapshotRef, str]:
    """The checkpoint the run's history (newest run of the id that reached the step) recorded after ``step``."""
    runs = [w async for w in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    if not runs:
        try:  # visibility may lag a just-started run; the id itself may still exist
            await client.get_workflow_handle(workflow_id).describe()
        except RPCError as e:
            if e.status == RPCStatusCode.NOT_FOUND:
                raise ForkError(f"--from {text!r}: there is no run {workflow_id!r} (see `tardigrade list`)") from None
            raise
    run_ids: list[str | None] = [w.run_id for w in sorted(runs, key=lambda w: w.start_time, reverse=True)]
    run_ids = run_ids or [None]  # not listed yet: the id's latest run
    for run_id in run_ids:
        found = await _checkpoint_in_history(client, workflow_id, run_id, step - 1)
        if found is not None:
            return found
    after = "setup" if step == 0 else f"step {step}"
    raise ForkError(
        f"--from {text!r}: run {workflow_id} recorded no checkpoint after {after} (it has not got there, or that step"
        f" is not checkpointed: see `tardigrade status {workflow_id}`)"
    )


async def _checkpoint_in_history(
    client: Client, workflow_id: str, run_id: str | None, index: int
) -> tuple[SnapshotRef, str] | None:
    converter = client.data_converter
    scheduled: dict[int, CheckpointInput] = {}
    found: tuple[SnapshotRef, str] | None = None
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    event: HistoryEvent
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name == CHECKPOINT:
                [checkpoint] = await converter.decode(attrs.input.payloads, [CheckpointInput])
                scheduled[event.event_id] = checkpoint
        elif event.HasField("activity_task_completed_event_attributes"):
            done = event.activity_task_completed_event_attributes
            checkpoint = scheduled.get(done.scheduled_event_id)
            if checkpoint is None or checkpoint.step != index:
                continue
            [snapshot] = await converter.decode(done.result.payloads, [SnapshotRef])
            found = (snapshot, checkpoint.store)  # the last one: a retried or agent step records several
    return found
