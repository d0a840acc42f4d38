"""Load: many concurrent pipelines on one worker - do they all complete, how fast, and what does the worker hold?

    python bench/load.py [--runs 50] [--steps 40] [--max-sandboxes 64] [--max-snapshots 2] [--keep]

Why: a worker on a small machine gets more runs than it has cores. It must queue them (its limits: live sandboxes,
snapshots at once) rather than fail them, and its memory and descriptors must stay bounded. This starts the real
thing - an embedded Temporal dev server, one `python worker.py` process with the limits given, bubblewrap
sandboxes, a local store - then ``--runs`` pipelines of ``--steps`` no-op steps (each appends a line, so every
checkpoint stores something) all at once, and prints:

* runs completed (and any that did not), wall time, throughput in steps per second;
* per-step overhead: from a step being scheduled to its checkpoint being recorded, from each run's history
  (median, p99, max) - the cost of a no-op step under this load, queueing included; and the same for one run alone;
* the worker's peak RSS and open descriptors (its children not counted), and how often a run had to queue.

Exits 1 if a run did not complete or a workspace is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
from temporalio.client import Client  # noqa: E402

from tardigrade.client import connect, start_pipeline  # noqa: E402
from tardigrade.devserver import EmbeddedTemporal  # noqa: E402
from tardigrade.pipeline import LoadedPipeline, parse_pipeline  # noqa: E402
from tardigrade.plugin import TardigradePlugin  # noqa: E402
from tardigrade.sandboxes.snapshots import SnapshotEngine  # noqa: E402
from tardigrade.sandboxes.stores import open_store  # noqa: E402
from tardigrade.workflows.state import RunResult  # noqa: E402


def noop_pipeline(name: str, steps: int, host_pickup: float | None = None) -> LoadedPipeline:
    spec = [{"name": f"step {i}", "run": f"echo {i} >> log.txt"} for i in range(1, steps + 1)]
    timeouts = {"host_pickup": f"{host_pickup}s"} if host_pickup else {}
    pipeline = parse_pipeline({"name": name, "steps": spec, "timeouts": timeouts})
    return LoadedPipeline(pipeline=pipeline, path=REPO / "bench" / f"{name}.yaml")


def start_worker(address: str, queue: str, base: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """`python worker.py` with the limits under test; its policy grants the bench's own folder for the store."""
    home = base / "worker"
    home.mkdir(parents=True)
    policy = base / "policy.yaml"
    policy.write_text(f"file_roots: [{base / 'store'}]\n")
    argv = [sys.executable, str(REPO / "worker.py"), "--address", address, "--task-queue", queue]
    argv += ["--max-sandboxes", str(args.max_sandboxes), "--max-snapshots", str(args.max_snapshots)]
    env = {**os.environ, "TARDIGRADE_HOME": str(home), "TARDIGRADE_POLICY": str(policy)}
    with open(base / "worker.log", "wb") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


class Peaks:
    """Samples the worker process's RSS and open descriptors twice a second."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.rss = 0
        self.fds = 0
        self.samples = 0

    async def watch(self) -> None:
        while True:
            try:
                self.rss = max(self.rss, self.process.memory_info().rss)
                self.fds = max(self.fds, self.process.num_fds())
                self.samples += 1
            except psutil.Error:
                return
            await asyncio.sleep(0.5)


async def step_overheads(client: Client, workflow_id: str) -> list[float]:
    """Seconds from each step's run_step being scheduled to its checkpoint completing, from the run's history."""
    scheduled: dict[int, tuple[str, int]] = {}  # event id -> (activity, step index)
    began: dict[int, float] = {}
    out: list[float] = []
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        at = event.event_time.ToDatetime().timestamp()
        if event.HasField("activity_task_scheduled_event_attributes"):
            attrs = event.activity_task_scheduled_event_attributes
            data = json.loads(attrs.input.payloads[0].data) if attrs.input.payloads else {}
            name = attrs.activity_type.name
            if name == "tardigrade.run_step":
                scheduled[event.event_id] = (name, data["index"])
                began[data["index"]] = at
            elif name == "tardigrade.checkpoint" and data.get("step", -1) >= 0:
                scheduled[event.event_id] = (name, data["step"])
        elif event.HasField("activity_task_completed_event_attributes"):
            name, index = scheduled.get(event.activity_task_completed_event_attributes.scheduled_event_id, ("", -1))
            if name == "tardigrade.checkpoint" and index in began:
                out.append(at - began.pop(index))
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def check_workspace(result: RunResult, steps: int, scratch: Path) -> str | None:
    """The final log must hold every step's line once, in order."""
    assert result.final_snapshot is not None
    engine = SnapshotEngine(open_store(result.store))
    try:
        into = scratch / result.workflow_id
        engine.restore(result.final_snapshot, into)
        lines = (into / "workspace" / "log.txt").read_text().split()
        shutil.rmtree(into, ignore_errors=True)
    finally:
        engine.close()
    expected = [str(i) for i in range(1, steps + 1)]
    return None if lines == expected else f"{result.workflow_id}: log has {len(lines)} lines, not 1..{steps} once"


async def run_batch(
    client: Client, queue: str, store: str, runs: int, steps: int, host_pickup: float | None = None
) -> tuple[list[Any], float]:
    started = time.monotonic()
    handles = await asyncio.gather(
        *(
            start_pipeline(client, noop_pipeline(f"load-{i}", steps, host_pickup), task_queue=queue, store_url=store)
            for i in range(runs)
        )
    )
    results = await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
    return results, time.monotonic() - started


async def drive(args: argparse.Namespace) -> int:
    base = Path(tempfile.mkdtemp(prefix="tardigrade-load-"))
    store = (base / "store").as_uri()
    server = EmbeddedTemporal(db_file=base / "temporal.db", ui=False, log_file=base / "server.log")
    await server.start()
    queue = f"load-{uuid.uuid4().hex[:6]}"
    worker = start_worker(server.address, queue, base, args)
    peaks = Peaks(worker.pid)
    watcher = asyncio.create_task(peaks.watch())
    problems: list[str] = []
    try:
        plugin = TardigradePlugin(state_dir=base / "client", policy=base / "policy.yaml")  # the worker's policy
        client = await connect(server.address, plugin=plugin)
        print(f"load in {base}: worker pid {worker.pid}, {os.cpu_count()} cores", flush=True)

        # One run alone first: the overhead of a no-op step with nothing else going on.
        [alone], _ = await run_batch(client, queue, store, 1, args.steps)
        if isinstance(alone, BaseException):
            raise alone
        solo = await step_overheads(client, alone.workflow_id)
        print(
            f"1 run alone: per-step overhead median {statistics.median(solo) * 1000:.0f} ms,"
            f" p99 {percentile(solo, 99) * 1000:.0f} ms",
            flush=True,
        )

        results, wall = await run_batch(client, queue, store, args.runs, args.steps, args.host_pickup)
        completed = [r for r in results if isinstance(r, RunResult) and r.status == "completed"]
        for r in results:
            if isinstance(r, BaseException):
                problems.append(f"{type(r).__name__}: {r}")
        for r in completed:
            if problem := await asyncio.to_thread(check_workspace, r, args.steps, base / "check"):
                problems.append(problem)
        overheads: list[float] = []
        for r in completed:
            overheads += await step_overheads(client, r.workflow_id)
        steps_done = sum(r.steps_completed for r in completed)
        log = (base / "worker.log").read_text()
        print(f"\n{len(completed)}/{args.runs} runs of {args.steps} steps completed in {wall:.1f} s")
        print(f"throughput          {steps_done / wall:.1f} steps/s ({steps_done} steps, each with a checkpoint)")
        if overheads:
            print(
                f"per-step overhead   median {statistics.median(overheads) * 1000:.0f} ms, p99"
                f" {percentile(overheads, 99) * 1000:.0f} ms, max {max(overheads) * 1000:.0f} ms"
                f" (scheduled -> checkpoint recorded, queueing included; {len(overheads)} steps)"
            )
        print(f"worker peak RSS     {peaks.rss / 2**20:.0f} MiB ({peaks.samples} samples)")
        print(f"worker peak fds     {peaks.fds}")
        print(f"limits              --max-sandboxes {args.max_sandboxes} --max-snapshots {args.max_snapshots}")
        rehydrations = sum(r.rehydrations for r in completed)
        print(f"rehydrations        {rehydrations} (host_pickup {args.host_pickup or 15:g} s)")
        if "Traceback" in log:
            print("worker log has tracebacks; first lines:\n" + "\n".join(log.splitlines()[:20]))
        if problems:
            print(f"{len(problems)} problem(s): " + "; ".join(problems[:5]))
        return 0 if len(completed) == args.runs and not problems else 1
    finally:
        watcher.cancel()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        server.stop()
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="pipelines started at once (default 50)")
    parser.add_argument("--steps", type=int, default=40, help="no-op steps per pipeline (default 40)")
    parser.add_argument("--max-sandboxes", type=int, default=64, help="the worker's --max-sandboxes")
    parser.add_argument("--max-snapshots", type=int, default=2, help="the worker's --max-snapshots")
    parser.add_argument(
        "--host-pickup",
        type=float,
        default=None,
        help="the pipelines' timeouts.host_pickup in seconds (default: the pipeline default, 15): on a saturated"
        " machine a step may wait longer than that to be picked up, and is then taken for a lost sandbox",
    )
    parser.add_argument("--keep", action="store_true", help="keep the server, worker and store folders")
    sys.exit(asyncio.run(drive(parser.parse_args())))


if __name__ == "__main__":
    main()
