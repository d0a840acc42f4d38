"""Soak: one worker, limited to 1,024 open files, runs pipelines back to back until it has taken 10,000 checkpoints.

    python bench/soak.py [--checkpoints 10000] [--minutes M] [--concurrency 4] [--report-every 10]
                         [--steps 40] [--loss-every 5] [--retry-every 3] [--nofile 1024] [--keep]

Why: a worker runs for weeks. Anything it opens per step and forgets - a descriptor, a thread, a child process, a
scratch file - adds up until it dies with "Too many open files" (issue 15). This runs the real thing long enough
to see such a slope: an embedded Temporal dev server, a worker *process* started with ``RLIMIT_NOFILE`` at
``--nofile`` (what ``ulimit -n 1024`` does), bubblewrap sandboxes and a local store. ``--concurrency`` pipelines
are in flight at once; every ``--loss-every``-th run has its sandbox destroyed mid-step (processes killed, folder
deleted) and rehydrates, and every ``--retry-every``-th run has a step that fails once and is rolled back.

Every ``--report-every`` runs it prints what the worker process holds - open descriptors, RSS, threads, child
processes - and the size of its scratch folder and of the store. At the end, a verdict per resource: flat, or
growing with its slope per 1,000 checkpoints (a least-squares fit over the samples after the first quarter, so
the warm-up of pools and caches does not count). Stops at ``--checkpoints`` or after ``--minutes``, whichever
comes first. Exits 1 if a run failed, the worker died, or descriptors, threads or scratch space grew.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from tardigrade.client import connect, start_pipeline  # noqa: E402
from tardigrade.devserver import EmbeddedTemporal  # noqa: E402
from tardigrade.pipeline import LoadedPipeline, parse_pipeline  # noqa: E402

MARKER = ".soak"  # step 1 writes "<run name> <step to lose the sandbox in, or 0>" here, for the fault injector
THREADS_FILE = "soak-threads.json"  # the worker's Python threads by name, rewritten every second
# Thread pools that grow up to a fixed size as they are needed and then stay: asyncio's default executor
# (asyncio.to_thread; min(32, CPUs + 4) threads) and the Temporal worker's workflow-task executor. Their growth
# says how busy the worker got, not what it leaked; they are shown, and left out of the threads verdict.
GROWING_POOLS = ("asyncio_", "temporal_workflow_")
# How much a resource may rise over the measured part of the soak and still count as flat: pools and caches
# settle at a level, they do not climb with every checkpoint. Samples are taken with runs in flight, so each one
# also counts what those runs hold at that moment; the fitted slope averages that out, and the last sample is
# taken idle, after every run ended.
TOLERANCE = {"fds": 8, "other_threads": 4, "scratch_mib": 2.0, "temp_files": 0}
# What only the runs under way hold (sandbox folders, their commands): judged on the idle sample, which must be 0.
IDLE_ZERO = ("children", "sandboxes")


# -- the worker process ---------------------------------------------------------------------------------------------


class LoseMarkedRuns:
    """Destroys a run's sandbox during the step its marker file names, once per run (the local provider only)."""

    def __init__(self) -> None:
        self.lost: set[str] = set()

    async def __call__(self, sandbox: Any, labels: Mapping[str, str], exited: Awaitable[Any]) -> None:
        from tardigrade.sandboxes.bubblewrap import LocalSandbox
        from tardigrade.sandboxes.faults import DestroySandboxDuringStep

        if not isinstance(sandbox, LocalSandbox) or "step" not in labels:
            return
        try:
            run, lose_at = sandbox.host_path(f"/workspace/{MARKER}").read_text().split()
        except (OSError, ValueError):
            return
        if labels["step"] == lose_at and run not in self.lost:
            self.lost.add(run)
            await DestroySandboxDuringStep(int(lose_at))(sandbox, labels, exited)


async def run_worker(address: str, task_queue: str, state_dir: Path) -> None:
    """The worker under test: plain `TardigradePlugin` + `Worker`, as in worker.py, plus the fault injector."""
    from temporalio.worker import Worker

    from tardigrade.plugin import TardigradePlugin

    # The worker policy grants the soak's own store folder (beside the state folder), as an operator's would.
    plugin = TardigradePlugin(
        state_dir=state_dir, fault_injector=LoseMarkedRuns(), policy=policy_file(state_dir.parent)
    )
    client = await connect(address, plugin=plugin)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"worker {os.getpid()} ready: RLIMIT_NOFILE {soft}/{hard}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    report = asyncio.create_task(report_threads(state_dir / THREADS_FILE))
    async with Worker(client, task_queue=task_queue):
        await stop.wait()
    report.cancel()


async def report_threads(path: Path) -> None:
    """Keep a file with this process's Python threads by name (digits dropped), for the driver to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        names = Counter(re.sub(r"\d+", "", t.name).rstrip("-_") for t in threading.enumerate())
        pools = sum(t.name.startswith(GROWING_POOLS) for t in threading.enumerate())
        path.with_suffix(".tmp").write_text(json.dumps({"pools": pools, "names": dict(sorted(names.items()))}))
        path.with_suffix(".tmp").replace(path)
        await asyncio.sleep(1)


def policy_file(base: Path) -> Path:
    """The worker policy of the soak: its store folder is the one file root."""
    policy = base / "policy.yaml"
    if not policy.exists():
        policy.write_text(f"file_roots: [{base / 'store'}]\n")
    return policy


def start_worker_process(
    address: str, task_queue: str, state_dir: Path, nofile: int, log: Path
) -> subprocess.Popen[bytes]:
    """This script again, in worker mode, with the open-files limit lowered the way `ulimit -n` does it."""

    def limit_open_files() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (cap, cap))

    argv = [sys.executable, __file__, "--worker", address, task_queue, str(state_dir)]
    with open(log, "wb") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit_open_files)


# -- measuring ------------------------------------------------------------------------------------------------------


def folder_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``, not following symlinks."""
    total = files = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
                files += 1
            except FileNotFoundError:
                pass  # deleted while we looked
    return total, files


@dataclass
class Sample:
    runs: int
    checkpoints: int
    seconds: float
    fds: int
    rss_mib: float
    threads: int  # all of the process's threads, Temporal core's own included...
    pool_threads: int  # ...of which this many belong to the growing pools (see GROWING_POOLS)
    other_threads: int  # threads - pool_threads: what must stay flat
    children: int
    scratch_mib: float  # the worker's scratch folders, without the blob index (which grows with the store)
    blob_index_mib: float
    temp_files: int  # tree-/fetch-/restore-/log- files and store writes in flight: should be 0 between runs
    sandboxes: int  # sandbox folders on the worker
    store_mib: float


def sample(worker: psutil.Process, state_dir: Path, store: Path, runs: int, checkpoints: int, started: float) -> Sample:
    scratch = index = 0
    temp_files = 0
    for folder in (state_dir / "scratch").glob("*"):
        for entry in folder.iterdir():
            size = folder_size(entry)[0] if entry.is_dir() else entry.stat().st_size
            if entry.name.startswith("blobs.sqlite"):
                index += size
            else:
                scratch += size
            temp_files += entry.name.startswith(("tree-", "fetch-", "restore-"))
    temp_files += sum(1 for p in state_dir.glob("log-*")) + folder_size(store / ".tmp")[1]
    sandboxes = [p for p in (state_dir / "sandboxes").glob("*") if not p.name.startswith(".")]
    threads, pools = worker.num_threads(), python_threads(state_dir)[0]
    return Sample(
        runs=runs,
        checkpoints=checkpoints,
        seconds=time.monotonic() - started,
        fds=worker.num_fds(),
        rss_mib=worker.memory_info().rss / 2**20,
        threads=threads,
        pool_threads=pools,
        other_threads=threads - pools,
        children=len(worker.children(recursive=True)),
        scratch_mib=scratch / 2**20,
        blob_index_mib=index / 2**20,
        temp_files=temp_files,
        sandboxes=len(sandboxes),
        store_mib=folder_size(store)[0] / 2**20,
    )


def python_threads(state_dir: Path) -> tuple[int, dict[str, int]]:
    """(threads in growing pools, all Python threads by name) as the worker last reported them."""
    try:
        report = json.loads((state_dir / THREADS_FILE).read_text())
    except (OSError, ValueError):
        return 0, {}
    return int(report["pools"]), dict(report["names"])


HEADER = (
    f"{'runs':>6} {'ckpts':>7} {'time':>7} {'ckpt/s':>6} {'fds':>5} {'rss MiB':>8} {'thr':>4} {'pool':>4} {'kids':>4}"
    f" {'scratch MiB':>11} {'index MiB':>9} {'temp':>4} {'sbx':>3} {'store MiB':>9}"
)


def row(s: Sample) -> str:
    rate = s.checkpoints / s.seconds if s.seconds else 0.0
    return (
        f"{s.runs:>6} {s.checkpoints:>7} {s.seconds:>6.0f}s {rate:>6.1f} {s.fds:>5} {s.rss_mib:>8.1f} {s.threads:>4}"
        f" {s.pool_threads:>4} {s.children:>4} {s.scratch_mib:>11.2f} {s.blob_index_mib:>9.2f} {s.temp_files:>4}"
        f" {s.sandboxes:>3} {s.store_mib:>9.1f}"
    )


def slope(samples: list[Sample], field: str) -> tuple[float, float]:
    """Least-squares slope of ``field`` per 1,000 checkpoints, and the rise it implies over the samples' span."""
    xs = [s.checkpoints / 1000 for s in samples]
    ys = [float(getattr(s, field)) for s in samples]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0, 0.0
    per_1000 = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var
    return per_1000, per_1000 * (xs[-1] - xs[0])


def verdict(samples: list[Sample], *, idle: bool) -> bool:
    """Print flat/growing per resource; True if nothing that must stay flat grew. ``idle``: the last sample was
    taken after every run ended."""
    measured = samples[len(samples) // 4 :] if len(samples) >= 4 else samples
    if len(measured) < 2:
        print("verdict: not enough samples for a slope (run longer, or lower --report-every)")
        return True
    print(f"\nverdict over checkpoints {measured[0].checkpoints}-{measured[-1].checkpoints} ({len(measured)} samples):")
    ok = True
    units = {"fds": "descriptors", "other_threads": "threads", "pool_threads": "threads", "children": "processes",
             "sandboxes": "folders", "scratch_mib": "MiB", "temp_files": "files", "rss_mib": "MiB",
             "blob_index_mib": "MiB", "store_mib": "MiB"}  # fmt: skip
    for field, unit in units.items():
        per_1000, rise = slope(measured, field)
        first, last = getattr(measured[0], field), getattr(measured[-1], field)
        span = f"{first:g} -> {last:g}" if isinstance(first, int) else f"{first:.1f} -> {last:.1f}"
        if field in TOLERANCE:
            # Flat: no trend over the samples, and idle at the end no higher than at the first measured sample.
            flat = rise <= TOLERANCE[field] and last <= first + TOLERANCE[field]
            ok &= flat
            state = "flat" if flat else "GROWING"
        elif field in IDLE_ZERO:
            flat = not idle or last == 0
            ok &= flat
            state = "none left once idle" if flat else f"LEFT BEHIND: {last} once idle"
        elif field in ("blob_index_mib", "store_mib"):
            state = "(grows with the data stored)"
        else:
            state = "(informational: a pool that stops at its size)" if field == "pool_threads" else "(informational)"
        print(f"  {field:<15} {span:>17}  slope {per_1000:+9.3f} {unit}/1000 checkpoints  {state}")
    return ok


# -- the driver -----------------------------------------------------------------------------------------------------


def soak_pipeline(run: str, steps: int, lose_at: int, fail_once_at: int) -> LoadedPipeline:
    """Every step appends to a file, so every checkpoint stores something new (like bench/long_pipeline.py)."""
    spec: list[dict[str, Any]] = [{"name": "mark the run", "run": f"echo '{run} {lose_at}' > {MARKER}"}]
    for i in range(2, steps + 1):
        step: dict[str, Any] = {"name": f"step {i}", "run": f"echo {i} >> log.txt"}
        if i == fail_once_at:
            # The first attempt dirties the workspace and fails: the retry starts from a rollback.
            step["run"] = f'[ "$TARDIGRADE_ATTEMPT" = 1 ] && {{ echo half >> log.txt; exit 1; }}; echo {i} >> log.txt'
            step["retries"], step["retry_backoff"] = 1, 0.05  # hardly a wait: the rollback is the point
        spec.append(step)
    pipeline = parse_pipeline({"name": run, "timeouts": {"heartbeat": "2s", "host_pickup": "4s"}, "steps": spec})
    return LoadedPipeline(pipeline=pipeline, path=REPO / "bench" / f"{run}.yaml")


async def drive(args: argparse.Namespace) -> int:
    base = Path(tempfile.mkdtemp(prefix="tardigrade-soak-"))
    state_dir, store = base / "worker", base / "store"
    server = EmbeddedTemporal(db_file=base / "temporal.db", ui=False, log_file=base / "server.log")
    await server.start()
    queue = f"soak-{uuid.uuid4().hex[:6]}"
    log = base / "worker.log"
    process = start_worker_process(server.address, queue, state_dir, args.nofile, log)
    worker = psutil.Process(process.pid)
    failures: list[str] = []
    samples: list[Sample] = []
    try:
        from tardigrade.plugin import TardigradePlugin

        # The client checks pipelines against the worker's policy before starting them.
        client = await connect(
            server.address, plugin=TardigradePlugin(state_dir=base / "client", policy=policy_file(base))
        )
        started = time.monotonic()
        deadline = started + args.minutes * 60 if args.minutes else None
        runs = checkpoints = launched = 0
        in_flight: set[asyncio.Task[Any]] = set()

        async def one(index: int) -> int:
            lose_at = args.steps // 2 + 1 if args.loss_every and index % args.loss_every == 0 else 0
            fail_once_at = args.steps // 3 + 1 if args.retry_every and index % args.retry_every == 1 else 0
            loaded = soak_pipeline(f"soak-{index}", args.steps, lose_at, fail_once_at)
            handle = await start_pipeline(client, loaded, task_queue=queue, store_url=store.as_uri())
            result = await handle.result()
            if result.status != "completed" or (lose_at and result.rehydrations < 1):
                failures.append(f"run {index}: {result.status}, {result.rehydrations} rehydrations")
            return len(result.checkpoints)

        print(f"soak in {base}: {args.concurrency} at a time, {args.steps} steps per run, worker pid {process.pid}")
        print(HEADER, flush=True)

        def enough_launched() -> bool:
            """Whether the runs done and in flight reach the target (or time is up)."""
            coming = checkpoints + len(in_flight) * (args.steps + 1)
            return coming >= args.checkpoints or (deadline is not None and time.monotonic() > deadline)

        while True:
            while not enough_launched() and len(in_flight) < args.concurrency:
                launched += 1
                in_flight.add(asyncio.create_task(one(launched)))
            if not in_flight:
                break
            done, in_flight = await asyncio.wait(in_flight, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            if process.poll() is not None:
                failures.append(f"the worker exited with code {process.returncode}")
                break
            for task in done:
                try:
                    checkpoints += task.result()
                except Exception as e:  # a failed run is a finding, not a reason to stop measuring
                    failures.append(f"{type(e).__name__}: {e}")
                runs += 1
                if runs % args.report_every == 0:
                    samples.append(sample(worker, state_dir, store, runs, checkpoints, started))
                    print(row(samples[-1]), flush=True)
            if failures and checkpoints == 0 and runs >= args.concurrency:
                print(f"every run so far failed, stopping: {failures[0]}")  # nothing to measure
                break
        for task in in_flight:
            task.cancel()
        idle = process.poll() is None and not in_flight
        if idle:
            # Idle long enough for the last sandbox to be destroyed and for idle threads to time out (Temporal
            # core's blocking pool keeps a spare thread for 10 s), so the last sample shows what stays.
            await asyncio.sleep(15)
            samples.append(sample(worker, state_dir, store, runs, checkpoints, started))
            print(row(samples[-1]) + "  (final, idle)")
        flat = verdict(samples, idle=idle)
        print(f"worker's Python threads at the end: {python_threads(state_dir)[1]}")
        soft = next((line for line in log.read_text().splitlines() if "RLIMIT_NOFILE" in line), "worker: ?")
        print(f"\n{runs} runs, {checkpoints} checkpoints in {time.monotonic() - started:.0f} s; {soft}")
        if failures:
            print(f"{len(failures)} failure(s), e.g.: " + "; ".join(failures[:3]))
            print("worker log ends with:\n" + "\n".join(log.read_text().splitlines()[-20:]))
        return 0 if flat and not failures else 1
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        server.stop()
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        asyncio.run(run_worker(sys.argv[2], sys.argv[3], Path(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=10_000, help="stop after this many (default 10,000)")
    parser.add_argument("--minutes", type=float, default=None, help="or after this long, whichever comes first")
    parser.add_argument("--concurrency", type=int, default=4, help="pipelines in flight at once")
    parser.add_argument("--report-every", type=int, default=10, help="print a sample every N finished runs")
    parser.add_argument("--steps", type=int, default=40, help="steps per pipeline (each ends with a checkpoint)")
    parser.add_argument("--loss-every", type=int, default=5, help="every Nth run loses its sandbox (0: never)")
    parser.add_argument("--retry-every", type=int, default=3, help="every Nth run rolls a step back (0: never)")
    parser.add_argument("--nofile", type=int, default=1024, help="the worker's open-files limit (ulimit -n)")
    parser.add_argument("--keep", action="store_true", help="keep the server, worker and store folders")
    sys.exit(asyncio.run(drive(parser.parse_args())))


if __name__ == "__main__":
    main()
