"""Cancel means stop: a cancelled run kills its step, destroys its sandbox, keeps its last snapshot, ends CANCELED.

Against the real dev server and real bubblewrap sandboxes. The step's command is a `sleep` with a number no other
test uses, so the test can look for it among the machine's processes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import psutil
import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import CancelledError

from tardigrade.client import start_pipeline
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tardigrade.workflows.pipeline import PipelineWorkflow
from tardigrade.workflows.state import RunStatus
from tests.conftest import InProcessWorkers, fast_timeouts, pipeline_from, wait_for
from tests.history import activity_runs


def sleepers(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(marker in part for part in cmdline) and not any("bwrap" in part for part in cmdline[:1]):
            found.append(proc)
    return found


async def wait_until_running(handle: WorkflowHandle[PipelineWorkflow, object], step: int) -> RunStatus:
    async def running() -> RunStatus | None:
        try:
            status: RunStatus = await handle.query(PipelineWorkflow.status)
        except Exception:
            return None
        return status if status.phase == "running" and status.current_step == step else None

    status: RunStatus = await wait_for(running, timeout=60)
    return status


async def cancel_and_wait(client: Client, handle: WorkflowHandle[PipelineWorkflow, object]) -> float:
    started = time.monotonic()
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), 60)
    seconds = time.monotonic() - started
    assert isinstance(info.value.cause, CancelledError), f"expected a cancellation, got {info.value.cause!r}"
    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.CANCELED
    return seconds


async def test_cancel_kills_the_step_destroys_the_sandbox_and_keeps_the_last_snapshot(
    workers: InProcessWorkers, local_store: str, tmp_path: Path
) -> None:
    marker = f"{300 + uuid.uuid4().int % 600}.{uuid.uuid4().int % 1000:03d}"  # a sleep no other test runs
    loaded = pipeline_from(
        {
            "name": "cancel-me",
            "timeouts": fast_timeouts(),
            "steps": [
                {"name": "first", "run": "echo one > one.txt"},
                {"name": "long", "run": f"echo started > started.txt; sleep {marker}"},
                {"name": "never", "run": "echo never > never.txt"},
            ],
        },
        tmp_path,
    )
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    await wait_until_running(handle, step=2)
    await wait_for(lambda: sleepers(f"sleep {marker}"), timeout=30)

    seconds = await cancel_and_wait(client, handle)
    assert seconds < 15, f"cancel took {seconds:.1f} s"

    # Generous bounds for a loaded machine: an unkilled step sleeps for minutes, an undestroyed sandbox stays.
    await wait_for(lambda: not sleepers(f"sleep {marker}"), timeout=60)  # the step's process is gone
    sandboxes = workers.home / "w" / "sandboxes"
    await wait_for(lambda: [p for p in sandboxes.iterdir() if not p.name.startswith(".")] == [], timeout=60)

    runs = await activity_runs(client, handle.id)
    names = [r.name for r in runs]
    assert names.count("tardigrade.provision") == 1, "a cancelled run never rehydrates"
    assert names.count("tardigrade.run_step") == 2, "no step runs after the cancel"
    assert names[-1] == "tardigrade.destroy"

    # The snapshot after step 1 is kept, and restorable.
    checkpoints = [r.input for r in runs if r.name == "tardigrade.checkpoint"]
    assert [c["step"] for c in checkpoints] == [-1, 0]
    engine = SnapshotEngine(open_store(local_store))
    after_first = [i for i in engine.list() if i.labels.get("step") == "1"]
    assert len(after_first) == 1
    engine.restore(after_first[0].id, tmp_path / "kept")
    assert (tmp_path / "kept" / "workspace" / "one.txt").read_text() == "one\n"
    assert not (tmp_path / "kept" / "workspace" / "started.txt").exists()


async def test_a_cancelled_agent_step_makes_no_further_model_calls(
    workers: InProcessWorkers, local_store: str, tmp_path: Path
) -> None:
    marker = f"{300 + uuid.uuid4().int % 600}.{uuid.uuid4().int % 1000:03d}"
    script = [
        {"exec": {"command": "echo a > a.txt"}},
        {"exec": {"command": f"sleep {marker}"}},  # cancelled while this runs
        {"exec": {"command": "echo c > c.txt"}},
        {"finish": {"summary": "never reached"}},
    ]
    loaded = pipeline_from(
        {
            "name": "cancel-agent",
            "timeouts": fast_timeouts(),
            "steps": [{"name": "agent", "agent": "work", "model": {"provider": "scripted", "script": script}}],
        },
        tmp_path,
    )
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    await wait_for(lambda: sleepers(f"sleep {marker}"), timeout=60)

    await cancel_and_wait(client, handle)
    await wait_for(lambda: not sleepers(f"sleep {marker}"), timeout=60)  # an unkilled one sleeps for minutes
    names = [r.name for r in await activity_runs(client, handle.id)]
    assert names.count("tardigrade.model_call") == 2, "the model is not asked again once the run is cancelled"
    assert names.count("tardigrade.agent_tool") == 2
    assert names.count("tardigrade.provision") == 1
