"""A worker's limits and graceful shutdown: overload queues instead of failing; SIGTERM lets a step in flight
finish (within --shutdown-grace), then the worker exits.

A real `python worker.py` process (or an in-process worker for the limits), the real dev server and bubblewrap.
After a shutdown the run goes on with a second worker and its files show each step's effect exactly once; a step
longer than the grace is cut at the bound and rehydrates.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from tardigrade.client import connect, start_pipeline
from tardigrade.plugin import TardigradePlugin
from tardigrade.workflows.pipeline import PipelineWorkflow
from tardigrade.workflows.state import RunResult, RunStatus
from tests.conftest import REPO, fast_timeouts, final_workspace, pipeline_from, wait_for


def start_worker(address: str, queue: str, home: Path, *extra: str) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    policy = home / "policy.yaml"
    policy.write_text(f"file_roots: [{home.parent}]\n")  # the test's store lives beside the workers' homes
    return subprocess.Popen(
        [sys.executable, str(REPO / "worker.py"), "--address", address, "--task-queue", queue, *extra],
        env={**os.environ, "TARDIGRADE_HOME": str(home), "TARDIGRADE_POLICY": str(policy)},
        stdout=open(home / "worker.log", "wb"),
        stderr=subprocess.STDOUT,
    )


async def step_running(client: Client, workflow_id: str, step: int) -> bool:
    try:
        status: RunStatus = await client.get_workflow_handle(workflow_id).query(PipelineWorkflow.status)
    except Exception:
        return False
    return status.phase == "running" and status.current_step == step


async def run_step_outcomes(client: Client, workflow_id: str, index: int) -> list[str]:
    """How each run_step of step ``index`` (0-based) ended: completed, failed or timed out."""
    scheduled: set[int] = set()
    ends: list[str] = []
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            attrs = event.activity_task_scheduled_event_attributes
            is_step = attrs.activity_type.name == "tardigrade.run_step"
            if is_step and json.loads(attrs.input.payloads[0].data)["index"] == index:
                scheduled.add(event.event_id)
        field = event.WhichOneof("attributes") or ""
        kind = field.removeprefix("activity_task_").removesuffix("_event_attributes")
        if kind in ("completed", "failed", "timed_out") and getattr(event, field).scheduled_event_id in scheduled:
            ends.append(kind)
    return ends


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


async def test_sigterm_lets_the_step_in_flight_finish_then_the_run_goes_on_elsewhere(
    temporal_address: str, tmp_path: Path
) -> None:
    queue = f"shutdown-{uuid.uuid4().hex[:8]}"
    loaded = pipeline_from(
        {
            "name": "graceful",
            "timeouts": fast_timeouts(),
            "steps": [
                {"name": "one", "run": "echo one >> log.txt"},
                {"name": "slow", "run": "sleep 4; echo two >> log.txt"},
                {"name": "three", "run": "echo three >> log.txt"},
            ],
        },
        tmp_path,
    )
    first = start_worker(temporal_address, queue, tmp_path / "a")
    second = None
    try:
        client = await connect(temporal_address, plugin=TardigradePlugin(state_dir=tmp_path / "client"))
        handle = await start_pipeline(client, loaded, task_queue=queue, store_url=(tmp_path / "store").as_uri())
        await wait_for(lambda: step_running(client, handle.id, 2), timeout=60)
        time.sleep(1.0)  # the step's command is under way
        signalled = time.monotonic()
        first.send_signal(signal.SIGTERM)
        code = first.wait(timeout=60)
        took = time.monotonic() - signalled
        log = (tmp_path / "a" / "worker.log").read_text()
        assert code == 0, log
        # That it waited for the step is checked below (the step's first attempt completed, on this worker); a
        # lower bound on `took` would depend on how late the loaded machine noticed the step start.
        assert took < 30.0, f"the worker waited for the step within the grace: {took:.1f} s"
        assert "steps in flight have 30 s to finish" in log

        second = start_worker(temporal_address, queue, tmp_path / "b")
        result: RunResult = await handle.result()
        assert result.status == "completed"
        # The slow step finished on the stopping worker and reported it; the run went on elsewhere.
        outcomes = await run_step_outcomes(client, handle.id, index=1)
        assert outcomes[0] == "completed", f"the step in flight was cut instead of finishing: {outcomes}"
        assert (final_workspace(result, tmp_path / "final") / "log.txt").read_text() == "one\ntwo\nthree\n"
    finally:
        stop(first)
        if second is not None:
            stop(second)


async def test_a_step_longer_than_the_grace_is_cut_at_the_bound_and_rehydrates(
    temporal_address: str, tmp_path: Path
) -> None:
    queue = f"shutdown-{uuid.uuid4().hex[:8]}"
    loaded = pipeline_from(
        {
            "name": "cut",
            "timeouts": fast_timeouts(),
            "steps": [
                {"name": "one", "run": "echo one >> log.txt"},
                # Far longer than grace + shutdown (< 10 s even on a loaded machine), so an uncut step is told apart
                {"name": "long", "run": "echo started >> log.txt; sleep 16; echo two >> log.txt"},
            ],
        },
        tmp_path,
    )
    first = start_worker(temporal_address, queue, tmp_path / "a", "--shutdown-grace", "1")
    second = None
    try:
        client = await connect(temporal_address, plugin=TardigradePlugin(state_dir=tmp_path / "client"))
        handle = await start_pipeline(client, loaded, task_queue=queue, store_url=(tmp_path / "store").as_uri())
        await wait_for(lambda: step_running(client, handle.id, 2), timeout=60)
        time.sleep(1.0)
        signalled = time.monotonic()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        took = time.monotonic() - signalled
        assert took < 10.0, f"a grace of 1 s bounds the shutdown: {took:.1f} s"

        second = start_worker(temporal_address, queue, tmp_path / "b")
        result: RunResult = await handle.result()
        assert result.status == "completed" and result.rehydrations >= 1, "the cut step ran again from a checkpoint"
        assert (final_workspace(result, tmp_path / "final") / "log.txt").read_text() == "one\nstarted\ntwo\n", (
            "the cut attempt left nothing"
        )
    finally:
        stop(first)
        if second is not None:
            stop(second)


async def test_more_runs_than_max_live_sandboxes_queue_and_all_complete(temporal_address: str, tmp_path: Path) -> None:
    """One sandbox slot, three runs at once: they take turns (never two sandboxes), and none fails."""
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"file_roots: [{tmp_path}]\n")
    plugin = TardigradePlugin(state_dir=tmp_path / "w", max_live_sandboxes=1, policy=policy)
    client = await connect(temporal_address, plugin=plugin)
    steps = [{"name": f"s{i}", "run": f"sleep 0.3; echo {i} >> log.txt"} for i in range(1, 4)]
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            live = [p for p in (tmp_path / "w" / "sandboxes").glob("local-*") if (p / "sandbox.json").exists()]
            most = max(most, len(live))
            await asyncio.sleep(0.05)

    async with Worker(client, task_queue=queue):
        watcher = asyncio.create_task(watch())
        handles = [
            await start_pipeline(
                client,
                pipeline_from({"name": f"queued-{n}", "timeouts": fast_timeouts(), "steps": steps}, tmp_path),
                task_queue=queue,
                store_url=(tmp_path / "store").as_uri(),
            )
            for n in range(3)
        ]
        results = await asyncio.gather(*(h.result() for h in handles))
        watcher.cancel()
    assert [r.status for r in results] == ["completed"] * 3
    assert all(r.rehydrations == 0 for r in results), "waiting for a slot is not taken for a lost sandbox"
    assert most == 1, f"{most} sandboxes were live at once with max_live_sandboxes=1"
    assert plugin.capacity.waited_for_sandbox >= 2, "the second and third runs queued for the slot"
