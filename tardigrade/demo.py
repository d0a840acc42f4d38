"""`tardigrade demo`: the 40-step example pipeline loses its sandbox at step 22 and finishes anyway.

Everything runs in this process except the Temporal dev server (a subprocess, unless --address is given): a
worker with the plugin, and a fault injector that really kills the sandbox's processes and deletes its folder
while step N runs. The workflow knows nothing of the injector; it notices the loss like it would in production.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from temporalio.worker import Worker

from tardigrade.cli.progress import RunProgress
from tardigrade.client import Connection, connect, new_workflow_id, start_pipeline
from tardigrade.devserver import EmbeddedTemporal, resolve_address
from tardigrade.pipeline import PipelineError, load_pipeline
from tardigrade.sandboxes.faults import DestroySandboxDuringStep
from tardigrade.workflows.state import RunResult

# tardigrade/examples links to the repository's examples/, so a checkout and an installed wheel both have it.
EXAMPLE = Path(__file__).resolve().parent / "examples" / "data-pipeline.yaml"


async def run_demo(
    *,
    crash_at_step: int = 22,
    address: str | Connection | None = None,
    keep_server: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo; ``say`` receives its lines (default: print them, with a progress bar on a terminal)."""
    loaded = load_pipeline(EXAMPLE)
    steps = loaded.pipeline.steps
    if not 0 <= crash_at_step <= len(steps):
        raise PipelineError(f"--crash-at-step must be between 0 (no crash) and {len(steps)}")
    tell: Callable[[str], None] = say or print
    target = address if isinstance(address, Connection) else resolve_address(address)
    server = None
    if target is None:
        server = EmbeddedTemporal()
        await server.start()
        target = server.address
        if keep_server:
            server.write_state_file()
        tell(f"Temporal dev server on {target} (SQLite: {server.db_file}); Web UI: {server.ui_url}")
    injector = DestroySandboxDuringStep(crash_at_step) if crash_at_step else None
    try:
        from tardigrade.plugin import TardigradePlugin

        client = await connect(target, plugin=TardigradePlugin(fault_injector=injector), timeout=10)
        # A queue of its own, so the in-process worker (with the fault injector) is the one that runs it.
        task_queue = f"tardigrade-demo-{uuid.uuid4().hex[:8]}"
        workflow_id = new_workflow_id(f"demo-{loaded.pipeline.name}")
        started = time.monotonic()
        async with Worker(client, task_queue=task_queue):
            handle = await start_pipeline(client, loaded, task_queue=task_queue, workflow_id=workflow_id)
            crash = f"; its sandbox will be destroyed during step {crash_at_step}" if crash_at_step else ""
            tell(f"Running {loaded.pipeline.name} ({len(steps)} steps) as workflow {workflow_id}{crash}.")
            with RunProgress([s.name for s in steps], say=say) as progress:
                watcher = asyncio.create_task(progress.watch(handle))
                try:
                    result: RunResult = await handle.result()
                finally:
                    watcher.cancel()
                progress.show_completed(result.steps_completed)
        seconds = time.monotonic() - started
    finally:
        if server is not None and not keep_server:
            server.stop()
    ui = server.workflow_url(workflow_id) if server else None
    reran = result.step_runs - result.steps_total
    tell(
        f"Done in {seconds:.1f} s: {result.steps_completed}/{result.steps_total} steps, "
        f"{result.rehydrations} rehydration(s), {result.step_runs} step runs ({reran} re-run after a loss)."
    )
    for agent in result.agents:
        model = steps[agent.step].model
        kind = "scripted model, no API call" if model is not None and model.provider == "scripted" else "model"
        calls = f"{agent.turns} turns, {agent.tool_calls} tool calls"
        tell(f"  agent step {agent.step + 1} ({kind}): {calls} - {agent.summary}")
    tell(f"  final snapshot    {result.final_snapshot}")
    tell(f"  workspace digest  {result.workspace_digest}")
    tell(f"  snapshot store    {result.store}")
    if ui:
        tell(f"  Web UI            {ui}" + ("" if keep_server else "  (the server stopped; --keep-server keeps it)"))
    if server is not None and keep_server and server.process is not None:
        tell(f"  The server keeps running (pid {server.process.pid}); stop it with `tardigrade server --stop`.")
    out = result.model_dump()
    out.update({"seconds": round(seconds, 2), "web_ui": ui, "crash_at_step": crash_at_step or None})
    return out
