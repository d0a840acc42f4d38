"""Workers as separate processes: SIGKILL one mid-step, and route sandbox work across two of them."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tardigrade.client import connect, start_pipeline
from tardigrade.workflows.pipeline import PipelineWorkflow
from tardigrade.workflows.state import RunResult, RunStatus
from tests.conftest import WorkerProcess, fast_timeouts, final_workspace, pipeline_from, wait_for
from tests.history import activity_runs, step_runs

SLEEP_MARK = "7.77"  # a sleep length no other process on the machine uses, to find orphans by


def appending_pipeline(tmp_path: Path, name: str) -> Any:
    return pipeline_from(
        {
            "name": name,
            "timeouts": fast_timeouts(),
            "manifest": {"directories": ["out"]},
            "steps": [
                {"name": "one", "run": "echo one >> out/log.txt"},
                {"name": "two", "run": "echo two >> out/log.txt; seq 1000 > out/numbers.txt"},
                # Appends, then is killed while it sleeps: the append must not survive into the final result.
                {
                    "name": "three (slow)",
                    "run": f"echo three >> out/log.txt; sleep {SLEEP_MARK}; echo done > out/three",
                },
                {"name": "four", "run": "echo four >> out/log.txt; rm out/numbers.txt"},
            ],
        },
        tmp_path,
    )


def orphans() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline[:1] == ["sleep"] and SLEEP_MARK in cmdline:
            found.append(proc)
    return found


@pytest.mark.parametrize("store", ["file", "s3"])
async def test_worker_killed_mid_step_is_replaced_and_the_step_takes_effect_once(
    store: str,
    temporal_address: str,
    worker_processes: Callable[..., WorkerProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The replacement worker has an empty disk of its own: with S3 it rehydrates from the object store alone."""
    if store == "file":
        local_store = (tmp_path / "store").as_uri()
    else:
        local_store = f"s3://{request.getfixturevalue('s3_bucket')}/runs"  # s3_env set the worker's credentials
    task_queue = f"crash-{uuid.uuid4().hex[:8]}"
    first = worker_processes(task_queue, "first")
    first.host_queue()
    client = await connect(temporal_address)

    # A reference run of the same pipeline with nothing going wrong.
    reference = await (
        await start_pipeline(
            client, appending_pipeline(tmp_path, "reference"), task_queue=task_queue, store_url=local_store
        )
    ).result()

    handle = await start_pipeline(
        client, appending_pipeline(tmp_path, "crash"), task_queue=task_queue, store_url=local_store
    )

    async def sleeping_in_step_three() -> bool:
        status: RunStatus = await handle.query(PipelineWorkflow.status)
        return status.current_step == 3 and status.phase == "running" and bool(orphans())

    await wait_for(sleeping_in_step_three, timeout=60)
    first.kill()
    # The sandbox's command dies with its worker (--die-with-parent): at once, but on a loaded machine the kill
    # can take a moment to land. A survivor would sleep on for the rest of its 7.77 s, past this bound.
    with contextlib.suppress(TimeoutError):
        await wait_for(lambda: orphans() == [], timeout=4)
    assert orphans() == [], "the sandbox's command died with its worker (--die-with-parent)"

    second = worker_processes(task_queue, "second")
    second.host_queue()
    result: RunResult = await asyncio.wait_for(handle.result(), 120)

    assert result.status == "completed" and result.rehydrations >= 1
    assert result.workspace_digest == reference.workspace_digest
    workspace = final_workspace(result, tmp_path / "final")
    assert (workspace / "out" / "log.txt").read_text() == "one\ntwo\nthree\nfour\n", "step three took effect once"
    counts = step_runs(await activity_runs(client, handle.id))
    assert counts[1] == counts[2] == 1, "completed steps are not run again"
    assert counts[3] == 2


async def test_sandbox_activities_run_on_the_worker_that_holds_the_sandbox(
    temporal_address: str, worker_processes: Callable[..., WorkerProcess], local_store: str, tmp_path: Path
) -> None:
    task_queue = f"pair-{uuid.uuid4().hex[:8]}"
    queues = {worker_processes(task_queue, name).host_queue() for name in ("left", "right")}
    client = await connect(temporal_address)
    loaded = pipeline_from(
        {
            "name": "routed",
            "timeouts": fast_timeouts(),
            "steps": [{"name": f"s{i}", "run": f"echo {i} >> log; sleep 0.2"} for i in range(5)],
        },
        tmp_path,
    )
    handles = [await start_pipeline(client, loaded, task_queue=task_queue, store_url=local_store) for _ in range(6)]
    results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 180)
    assert all(r.status == "completed" and r.rehydrations == 0 for r in results)

    hosts_used = set()
    for handle in handles:
        runs = await activity_runs(client, handle.id)
        provision = next(r for r in runs if r.name == "tardigrade.provision")
        sandbox_work = [r for r in runs if r.name in ("tardigrade.run_step", "tardigrade.checkpoint")]
        assert sandbox_work
        for run in sandbox_work:
            assert run.input["sandbox"]["task_queue"] in queues
            assert run.worker == provision.worker, f"{run.name} ran on {run.worker}, sandbox is on {provision.worker}"
        hosts_used.add(provision.worker)
    # Not guaranteed by Temporal, but with six runs both workers practically always get some.
    print(f"sandboxes spread over {len(hosts_used)} worker(s)")
