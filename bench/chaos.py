"""Chaos: random faults injected into concurrent 40-step runs; every run must still end with the crash-free files.

    python bench/chaos.py [--faults 100] [--concurrency 4] [--steps 40] [--kinds KIND,...] [--outage-seconds 5]
                          [--gap 2] [--seed N] [--keep]

Why: the durability contract promises that whatever fails - a sandbox, a worker, the Temporal server, the store -
a run's files are never lost or wrong. This starts the real parts (an embedded Temporal dev server on a SQLite
file, two `python worker.py` processes, bubblewrap sandboxes, a moto S3 server and a folder store on a small
tmpfs), keeps ``--concurrency`` runs going (half on each store), and injects ``--faults`` faults one after another,
each chosen at random from ``--kinds``:

    sandbox      a live sandbox's processes killed and its folder deleted (a dead container)
    worker-kill  a worker SIGKILLed, and started again
    worker-term  a worker SIGTERMed (graceful shutdown), and started again
    server-kill  the Temporal dev server SIGKILLed and restarted on the same database and port
    s3-outage    the S3 server frozen (SIGSTOP) for --outage-seconds, then thawed
    disk-full    the folder store's tmpfs filled up for --outage-seconds, then freed

Store outages longer than the store client's own retries fail a run until outages wait instead of failing (issue
11, item 4): leave s3-outage and disk-full out of --kinds, or keep --outage-seconds short, until then.

After each fault it measures the time to recover: until every run that was in flight has completed another step
(or finished). At the end every run must have completed with the digest of a crash-free run, each step's effect
exactly once (the last step audits the log) and every recorded snapshot verified readable. It prints faults
injected, runs completed, time to recover per kind (median, max) and extra activities (beyond a crash-free run's).
Exits 1 if anything is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle  # noqa: E402
from temporalio.service import RPCError  # noqa: E402

from tardigrade.client import connect, start_pipeline  # noqa: E402
from tardigrade.devserver import EmbeddedTemporal  # noqa: E402
from tardigrade.pipeline import LoadedPipeline, parse_pipeline  # noqa: E402
from tardigrade.plugin import TardigradePlugin  # noqa: E402
from tardigrade.sandboxes.snapshots import SnapshotEngine  # noqa: E402
from tardigrade.sandboxes.stores import open_store  # noqa: E402
from tardigrade.workflows.pipeline import PipelineWorkflow  # noqa: E402
from tardigrade.workflows.state import RunResult  # noqa: E402

KINDS = ("sandbox", "worker-kill", "worker-term", "server-kill", "s3-outage", "disk-full")
#: The audit step: fails if any step's line is missing or there twice.
AUDIT = 'test "$(sort -n log.txt | uniq | wc -l)" -eq "$(wc -l < log.txt)" && test "$(wc -l < log.txt)" -eq {n}'
RECOVERY_TIMEOUT = 240.0
SANDBOX_WAIT = 60.0  # for a run in flight to have a sandbox to destroy
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "chaos",
    "AWS_SECRET_ACCESS_KEY": "chaos",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def chaos_pipeline(name: str, steps: int) -> LoadedPipeline:
    """Each step appends its number (after a short pause, so faults land mid-step); the last audits the log."""
    spec: list[dict[str, Any]] = [
        {"name": f"step {i}", "run": f"sleep 0.{i % 4 + 1}; echo {i} >> log.txt"} for i in range(1, steps)
    ]
    spec.append({"name": "audit", "run": AUDIT.format(n=steps - 1) + " && echo ok > audit.txt"})
    timeouts = {"heartbeat": "2s", "host_pickup": "4s"}
    pipeline = parse_pipeline({"name": name, "timeouts": timeouts, "max_rehydrations": 50, "steps": spec})
    return LoadedPipeline(pipeline=pipeline, path=REPO / "bench" / f"{name}.yaml")


@dataclass
class Fault:
    kind: str
    recovery: float | None = None  # seconds until every run in flight moved on; None: nothing was in flight
    note: str = ""


@dataclass
class Run:
    handle: WorkflowHandle[Any, Any]
    store: str
    result: RunResult | None = None
    error: str | None = None


@dataclass
class Cluster:
    """The real parts, each of which a fault can take down."""

    base: Path
    args: argparse.Namespace
    server: EmbeddedTemporal = field(init=False)
    moto: subprocess.Popen[bytes] | None = None
    moto_endpoint: str = ""
    tmpfs: Path | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    queue: str = field(default_factory=lambda: f"chaos-{uuid.uuid4().hex[:6]}")

    async def start(self) -> None:
        (self.base / "policy.yaml").write_text(f"file_roots: [{self.base / 'store'}]\n")
        self.server = EmbeddedTemporal(db_file=self.base / "temporal.db", ui=False, log_file=self.base / "server.log")
        await self.server.start()
        if "s3-outage" in self.args.kinds or self.args.s3:
            self.start_moto()
        self.mount_tmpfs()
        for name in ("a", "b"):
            self.start_worker(name)

    def start_moto(self) -> None:
        from tests.emulators import _MOTO_ATOMIC_WRITES

        port = _free_port()
        log = open(self.base / "moto.log", "wb")  # noqa: SIM115 - the child owns it
        self.moto = subprocess.Popen(
            [sys.executable, "-c", _MOTO_ATOMIC_WRITES, "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.moto_endpoint = f"http://127.0.0.1:{port}"
        import boto3

        deadline = time.monotonic() + 30
        while True:
            try:
                s3 = boto3.client(
                    "s3",
                    endpoint_url=self.moto_endpoint,
                    aws_access_key_id="chaos",
                    aws_secret_access_key="chaos",
                    region_name="us-east-1",
                )
                s3.create_bucket(Bucket="chaos")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def mount_tmpfs(self) -> None:
        """The folder store on a 256 MiB tmpfs, so "disk full" is real; a plain folder if mounting is refused."""
        folder = self.base / "store"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(folder)], capture_output=True)
        if done.returncode == 0:
            self.tmpfs = folder
        elif "disk-full" in self.args.kinds:
            print(f"cannot mount a tmpfs ({done.stderr.decode().strip()}): no disk-full faults", flush=True)
            self.args.kinds = [k for k in self.args.kinds if k != "disk-full"]

    @property
    def stores(self) -> list[str]:
        out = [(self.base / "store").as_uri()]
        if self.moto is not None:
            out.append("s3://chaos/runs")
        return out

    def start_worker(self, name: str) -> None:
        home = self.base / f"worker-{name}"
        home.mkdir(exist_ok=True)
        policy = self.base / "policy.yaml"
        env = {**os.environ, **AWS_ENV, "TARDIGRADE_HOME": str(home), "TARDIGRADE_POLICY": str(policy)}
        if self.moto_endpoint:
            env["AWS_ENDPOINT_URL"] = self.moto_endpoint
        argv = [sys.executable, str(REPO / "worker.py"), "--address", self.server.address, "--task-queue", self.queue]
        argv += ["--shutdown-grace", "5"]
        with open(self.base / f"worker-{name}.log", "ab") as log:
            self.workers[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    async def stop(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        if self.moto is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.moto.pid, signal.SIGCONT)
            self.moto.kill()
            self.moto.wait()
        self.server.stop()
        if self.tmpfs is not None:
            subprocess.run(["umount", "-l", str(self.tmpfs)], capture_output=True)

    # -- faults ---------------------------------------------------------------------------------------------------

    async def inject(self, kind: str, rng: random.Random) -> str:
        """Cause one fault; returns what was done (or why nothing could be)."""
        if kind == "sandbox":
            return await asyncio.to_thread(self.destroy_a_sandbox, rng)
        if kind in ("worker-kill", "worker-term"):
            name = rng.choice(sorted(self.workers))
            process = self.workers[name]
            process.send_signal(signal.SIGKILL if kind == "worker-kill" else signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 60)
            self.start_worker(name)
            return f"worker {name} (pid {process.pid}) exited with {code}; started again"
        if kind == "server-kill":
            assert self.server.process is not None
            pid = self.server.process.pid
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(self.server.process.wait)
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            await self.server.start()
            return f"server pid {pid} killed; restarted on the same database"
        if kind == "s3-outage":
            assert self.moto is not None
            os.kill(self.moto.pid, signal.SIGSTOP)
            await asyncio.sleep(self.args.outage_seconds)
            os.kill(self.moto.pid, signal.SIGCONT)
            return f"S3 frozen for {self.args.outage_seconds:g} s"
        if kind == "disk-full":
            assert self.tmpfs is not None
            filler = self.tmpfs / "filler"
            free = shutil.disk_usage(self.tmpfs).free
            with open(filler, "wb") as f:
                with contextlib.suppress(OSError):
                    os.posix_fallocate(f.fileno(), 0, max(0, free - (1 << 20)))
                with contextlib.suppress(OSError):  # then the last pages, until the filesystem says no
                    f.seek(0, os.SEEK_END)
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
            left = shutil.disk_usage(self.tmpfs).free
            await asyncio.sleep(self.args.outage_seconds)
            filler.unlink()
            return f"store disk full ({left} bytes left) for {self.args.outage_seconds:g} s"
        raise ValueError(kind)

    def destroy_a_sandbox(self, rng: random.Random) -> str:
        """What a dead container does: every process of the sandbox killed, its folder gone. Runs launched a moment
        ago may not have their sandbox yet (on a loaded machine provisioning takes seconds): wait for one."""
        deadline = time.monotonic() + SANDBOX_WAIT
        while not (live := self.live_sandboxes()):
            if time.monotonic() > deadline:
                return "no live sandbox"
            time.sleep(0.05)
        victim = rng.choice(live)
        with contextlib.suppress(FileNotFoundError):
            (victim / "sandbox.json").unlink()  # gone at once, as bubblewrap.destroy_like_a_crash marks it
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(victim) in part for part in proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        shutil.rmtree(victim, ignore_errors=True)
        return f"sandbox {victim.name} destroyed"

    def live_sandboxes(self) -> list[Path]:
        return [
            p
            for name in self.workers
            for p in (self.base / f"worker-{name}" / "sandboxes").glob("local-*")
            if (p / "sandbox.json").exists()
        ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def progress(client: Client, runs: list[Run]) -> dict[str, int | None]:
    """Steps completed per run in flight (None: finished); a run that cannot answer now is left out."""
    out: dict[str, int | None] = {}
    for run in runs:
        try:
            description = await run.handle.describe()
            if description.status != WorkflowExecutionStatus.RUNNING:
                out[run.handle.id] = None
                continue
            status = await run.handle.query(PipelineWorkflow.status, rpc_timeout=_seconds(3))
            out[run.handle.id] = status.steps_completed
        except Exception:
            continue
    return out


def _seconds(value: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=value)


async def recovered(client: Client, before: dict[str, int | None], started: float) -> float | None:
    """Seconds until every run that was in flight completed another step or finished (None: none was)."""
    waiting = {wid for wid, steps in before.items() if steps is not None}
    if not waiting:
        return None
    runs = {wid: client.get_workflow_handle(wid) for wid in waiting}
    deadline = started + RECOVERY_TIMEOUT
    while waiting and time.monotonic() < deadline:
        now = await progress(client, [Run(runs[wid], "") for wid in waiting])
        for wid, steps in now.items():
            if steps is None or steps > (before[wid] or 0):
                waiting.discard(wid)
        if waiting:
            await asyncio.sleep(0.5)
    return time.monotonic() - started if not waiting else float("inf")


async def count_activities(client: Client, workflow_id: str) -> int:
    count = 0
    async for execution in client.list_workflows(f"WorkflowId = '{workflow_id}'"):
        async for event in client.get_workflow_handle(workflow_id, run_id=execution.run_id).fetch_history_events():
            count += event.HasField("activity_task_scheduled_event_attributes")
    return count


def verify_snapshots(result: RunResult) -> list[str]:
    engine = SnapshotEngine(open_store(result.store))
    try:
        bad = []
        for record in result.checkpoints:
            report = engine.verify(record.snapshot_id)
            if not report.ok:
                bad.append(f"{result.workflow_id}: snapshot {record.snapshot_id[:12]}: {report.problems[0].problem}")
        return bad
    finally:
        engine.close()


async def drive(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="tardigrade-chaos-"))
    cluster = Cluster(base, args)
    faults: list[Fault] = []
    runs: list[Run] = []
    problems: list[str] = []
    try:
        for key, value in AWS_ENV.items():
            os.environ.setdefault(key, value)
        await cluster.start()
        if cluster.moto_endpoint:
            os.environ["AWS_ENDPOINT_URL"] = cluster.moto_endpoint
        # The same policy as the workers': the client checks pipelines against it before starting them.
        plugin = TardigradePlugin(state_dir=base / "client", policy=base / "policy.yaml")
        client = await connect(cluster.server.address, plugin=plugin)
        print(f"chaos in {base}: kinds {', '.join(args.kinds)}; stores {', '.join(cluster.stores)}", flush=True)

        reference = await (
            await start_pipeline(client, chaos_pipeline("chaos-ref", args.steps), task_queue=cluster.queue,
                                 store_url=cluster.stores[0])
        ).result()  # fmt: skip
        crash_free_activities = await count_activities(client, reference.workflow_id)
        print(f"crash-free run: digest {(reference.workspace_digest or '')[:16]}…, {crash_free_activities} activities")

        launched = 0

        async def launch() -> None:
            nonlocal launched
            store = cluster.stores[launched % len(cluster.stores)]
            launched += 1
            handle = await start_pipeline(
                client, chaos_pipeline(f"chaos-{launched}", args.steps), task_queue=cluster.queue, store_url=store
            )
            runs.append(Run(handle, store))

        async def collect(run: Run) -> None:
            while True:
                try:
                    run.result = await run.handle.result()
                    return
                except RPCError:  # the server is down (a fault): ask again once it is back
                    await asyncio.sleep(1.0)
                except Exception as e:
                    run.error = f"{type(e).__name__}: {getattr(e, 'cause', None) or e}"
                    return

        collectors: list[asyncio.Task[None]] = []
        started = time.monotonic()
        while len(faults) < args.faults:
            in_flight = [r for r in runs if r.result is None and r.error is None]
            while len(in_flight) < args.concurrency:
                await launch()
                collectors.append(asyncio.create_task(collect(runs[-1])))
                in_flight.append(runs[-1])
            await asyncio.sleep(rng.uniform(0.2, args.gap))
            before = await progress(client, in_flight)
            kind = args.kinds[len(faults) % len(args.kinds)] if args.cycle else rng.choice(args.kinds)
            fault_started = time.monotonic()
            note = await cluster.inject(kind, rng)
            recovery = await recovered(client, before, fault_started)
            faults.append(Fault(kind, recovery, note))
            shown = "-" if recovery is None else f"{recovery:.1f} s"
            print(f"fault {len(faults):>3} {kind:<12} recovered in {shown:>8}  {note}", flush=True)
        await asyncio.gather(*collectors)
        wall = time.monotonic() - started

        completed = [r for r in runs if r.result is not None and r.result.status == "completed"]
        for run in runs:
            if run.error:
                problems.append(f"{run.handle.id}: {run.error}")
        extra = 0
        for run in completed:
            assert run.result is not None
            if run.result.workspace_digest != reference.workspace_digest:
                problems.append(f"{run.handle.id}: digest {run.result.workspace_digest} differs from the crash-free")
            problems += await asyncio.to_thread(verify_snapshots, run.result)
            extra += await count_activities(client, run.handle.id) - crash_free_activities

        print(f"\n{len(faults)} faults injected in {wall:.0f} s; {len(completed)}/{len(runs)} runs completed")
        print(f"{'kind':<12} {'count':>5} {'recover median':>15} {'max':>8}")
        for kind in args.kinds:
            times = [f.recovery for f in faults if f.kind == kind and f.recovery is not None]
            count = sum(f.kind == kind for f in faults)
            median = f"{statistics.median(times):.1f} s" if times else "-"
            worst = f"{max(times):.1f} s" if times else "-"
            print(f"{kind:<12} {count:>5} {median:>15} {worst:>8}")
        print(f"extra activities beyond crash-free runs: {extra} ({extra / max(1, len(completed)):.1f} per run)")
        verified = sum(len(r.result.checkpoints) for r in completed if r.result)
        print(f"each run's files: digest of the crash-free run, audit passed; {verified} snapshots verified")
        if problems:
            print(f"{len(problems)} PROBLEM(S):\n  " + "\n  ".join(problems[:10]))
        return 0 if not problems and len(completed) == len(runs) else 1
    finally:
        await cluster.stop()
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=100, help="faults to inject (default 100)")
    parser.add_argument("--concurrency", type=int, default=4, help="runs in flight at once (default 4)")
    parser.add_argument("--steps", type=int, default=40, help="steps per run, the last an audit (default 40)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"fault kinds, comma-separated (default all: {KINDS})")
    parser.add_argument("--outage-seconds", type=float, default=5.0, help="length of s3-outage and disk-full")
    parser.add_argument("--gap", type=float, default=2.0, help="at most this long between a recovery and the next")
    parser.add_argument("--s3", action="store_true", help="run half the runs on S3 even without s3-outage faults")
    parser.add_argument("--cycle", action="store_true", help="inject the kinds in turn rather than at random")
    parser.add_argument("--seed", type=int, default=None, help="random seed, to repeat a sequence of faults")
    parser.add_argument("--keep", action="store_true", help="keep the server, workers' and stores' folders")
    args = parser.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown or not args.kinds:
        parser.error(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    return args


def main() -> None:
    sys.exit(asyncio.run(drive(parse_args())))


if __name__ == "__main__":
    main()
