"""`tardigrade snapshot gc` next to a running pipeline: it deletes old runs' data and keeps what the live run
needs - proven by destroying the live run's sandbox right after and watching it rehydrate."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tardigrade.client import start_pipeline
from tardigrade.sandboxes.faults import DestroySandboxDuringStep
from tests.conftest import REPO, InProcessWorkers, pipeline_from


def gc(store: str, address: str, home: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tardigrade.cli",
            "snapshot",
            "gc",
            "--store",
            store,
            "--keep-last",
            "0",
            "--keep-within",
            "0",
            "--grace",
            "0",
            "--address",
            address,
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "TARDIGRADE_HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


async def test_gc_keeps_what_a_running_pipeline_needs(
    workers: InProcessWorkers, local_store: str, tmp_path: Path, temporal_address: str
) -> None:
    gc_done = asyncio.Event()
    destroy = DestroySandboxDuringStep(2, after_seconds=0)

    async def destroy_after_gc(sandbox: Any, labels: Any, exited: Any) -> None:
        if labels.get("step") == "2" and destroy.remaining:
            await gc_done.wait()
            await destroy(sandbox, labels, exited)

    loaded = pipeline_from(
        {
            "name": "gc-live",
            "manifest": {"files": [{"path": "seed.txt", "content": "from the seed"}]},
            "steps": [
                {"name": "write", "run": "head -c 200000 /dev/urandom > data.bin && cp seed.txt copy.txt"},
                {"name": "wait", "run": "sleep 6"},
                {"name": "check", "run": "test -s data.bin && grep -q 'from the seed' copy.txt"},
            ],
        },
        tmp_path,
    )
    client = await workers.start(fault_injector=destroy_after_gc)
    # An earlier run of the same pipeline leaves data that nothing needs any more.
    quick = loaded.pipeline.model_copy(update={"steps": loaded.pipeline.steps[:1]})
    await (
        await start_pipeline(
            client, loaded.model_copy(update={"pipeline": quick}), task_queue=workers.task_queue, store_url=local_store
        )
    ).result()

    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    from tardigrade.client import run_status
    from tests.conftest import wait_for

    await wait_for(lambda: _at_step(run_status(client, handle.id), 2), timeout=60)
    first = await asyncio.to_thread(gc, local_store, temporal_address, workers.home)
    second = await asyncio.to_thread(gc, local_store, temporal_address, workers.home)
    gc_done.set()
    result = await asyncio.wait_for(handle.result(), 90)

    assert first["live_kept"] >= 2, "the live run's seed and last snapshot were reported"
    assert second["packs_deleted"] >= 1 and second["trees_deleted"] >= 1, "the old run's data really went"
    assert result.status == "completed" and result.rehydrations == 1, "rehydrated from what GC kept"


async def _at_step(status: Any, step: int) -> bool:
    current = await status
    return getattr(current, "current_step", None) == step and current.phase == "running"
