"""A 1,000-step pipeline: per-step overhead, and how big each run's history gets with continue-as-new.

    python bench/long_pipeline.py [--steps 1000] [--steps-per-run 200]

Runs against a fresh embedded Temporal dev server with an in-process worker, a bubblewrap sandbox and a local
store. Every step appends a line to a file (so the workspace changes every step and every checkpoint writes),
and the run must end with exactly one line per step. Prints wall time per step and, for each run of the chain,
its event count and history size next to Temporal's limits (51,200 events, 50 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from temporalio.worker import Worker  # noqa: E402

from tardigrade.client import connect, start_pipeline  # noqa: E402
from tardigrade.devserver import EmbeddedTemporal  # noqa: E402
from tardigrade.pipeline import LoadedPipeline, parse_pipeline  # noqa: E402
from tardigrade.plugin import TardigradePlugin  # noqa: E402
from tardigrade.sandboxes.snapshots import SnapshotEngine  # noqa: E402
from tardigrade.sandboxes.stores import open_store  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--steps-per-run", type=int, default=200)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="tardigrade-long-"))
    server = EmbeddedTemporal(db_file=base / "temporal.db", ui=False, log_file=base / "server.log")
    await server.start()
    try:
        pipeline = parse_pipeline(
            {
                "name": "long",
                "steps_per_run": args.steps_per_run,
                "steps": [{"name": f"step {i}", "run": f"echo {i} >> log.txt"} for i in range(args.steps)],
            }
        )
        policy = base / "policy.yaml"  # the worker policy grants the bench's own store folder
        policy.write_text(f"file_roots: [{base / 'store'}]\n")
        client = await connect(server.address, plugin=TardigradePlugin(state_dir=base / "worker", policy=policy))
        queue = f"long-{uuid.uuid4().hex[:6]}"
        store = (base / "store").as_uri()
        async with Worker(client, task_queue=queue):
            started = time.monotonic()
            handle = await start_pipeline(
                client, LoadedPipeline(pipeline=pipeline, path=base / "p.yaml"), task_queue=queue, store_url=store
            )
            result = await handle.result()
            seconds = time.monotonic() - started
        per_step = seconds / args.steps * 1000
        print(f"{args.steps} steps in {seconds:.1f} s: {per_step:.0f} ms per step (run + checkpoint)")

        runs = [w async for w in client.list_workflows(f"WorkflowId = '{handle.id}'")]
        print(f"{len(runs)} runs (continue-as-new every {args.steps_per_run} steps):")
        biggest = 0
        for w in sorted(runs, key=lambda w: w.start_time):
            history = await client.get_workflow_handle(handle.id, run_id=w.run_id).fetch_history()
            size = sum(e.ByteSize() for e in history.events)
            biggest = max(biggest, size)
            print(f"  run {w.run_id[:8]}: {len(history.events):>6} events, {size / 1024:>7.0f} KiB")
        print(f"largest run: {biggest / 2**20:.1f} MiB of Temporal's 50 MB limit ({biggest / 50e6:.1%})")

        engine = SnapshotEngine(open_store(store), scratch_dir=base / "check")
        assert result.final_snapshot
        engine.restore(result.final_snapshot, base / "final")
        lines = (base / "final" / "workspace" / "log.txt").read_text().split()
        ok = lines == [str(i) for i in range(args.steps)]
        print(f"final log: {len(lines)} lines, each step exactly once: {ok}")
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
