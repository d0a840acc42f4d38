"""What one no-op step costs, checkpoint included, and where that time goes.

    python bench/step_overhead.py [--steps 200] [--runs 1] [--no-overlay] [--json]
        [--dynamic-config KEY=VALUE ...] [--sqlite-pragma PRAGMA=VALUE ...]

Runs a pipeline of N steps that do nothing (`true`) on a fresh embedded Temporal dev server (SQLite file, as
`tardigrade demo` uses), with a real in-process worker, the bubblewrap sandbox and a local store. A step's cost is
the time from its run_step activity being scheduled to the next step's being scheduled: run, checkpoint, and every
Temporal round trip between. No number here is guessed; each comes from one of two clocks on the same machine:

* the workflow history's event timestamps (the server's clock): how long each activity and workflow task waited
  to be picked up (schedule-to-start) and how long it took (start-to-close);
* the worker's own timings (wall clock too): an activity interceptor times each activity's Python body, and the
  sandbox's methods are wrapped to time the parts of it (attach, killing orphans, reading and writing the held
  position, the whole command from spawn to exit, the snapshot, heartbeat calls and how many were made).

"SDK start" is the history's ActivityTaskStarted (the server handing the task out) to the Python body: the
response's way back to the worker, decoding and dispatch. "SDK finish" is the body's end to ActivityTaskCompleted:
encoding and the completion RPC, which waits behind a heartbeat RPC still in flight. The phases of a step add up
to its total (checked); a step that was retried or rehydrated is counted, not measured. The machine's load average
is printed beside the figures: on a shared 2-core machine it moves every number, so compare runs taken together.

The server starts with the embedded server's own settings (tardigrade/devserver.py); ``--dynamic-config`` and
``--sqlite-pragma`` change them, e.g. ``--dynamic-config history.transferProcessorMaxPollRPS=20 --sqlite-pragma
journal_mode=delete`` for the server as it was before it had any (Temporal's defaults: a no-op step then waits for
the transfer queue's 50 ms ticks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from temporalio import activity  # noqa: E402
from temporalio import client as temporal_client  # noqa: E402
from temporalio.api.enums.v1 import EventType  # noqa: E402
from temporalio.api.history.v1 import HistoryEvent  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.worker import (  # noqa: E402
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
)

from tardigrade.activities.contract import CHECKPOINT, RUN_STEP, SnapshotRef, StepOutcome  # noqa: E402
from tardigrade.client import start_pipeline  # noqa: E402
from tardigrade.devserver import (  # noqa: E402
    DEV_SERVER_DYNAMIC_CONFIG,
    DEV_SERVER_SQLITE_PRAGMAS,
    EmbeddedTemporal,
)
from tardigrade.pipeline import LoadedPipeline, parse_pipeline  # noqa: E402
from tardigrade.plugin import TardigradePlugin  # noqa: E402
from tardigrade.sandboxes import bubblewrap  # noqa: E402
from tardigrade.sandboxes.bubblewrap import LocalSandboxProvider  # noqa: E402


def activity_key() -> str:
    """The running activity, as history names it (activity ids restart at 1 in every workflow)."""
    info = activity.info()
    return f"{info.workflow_id}/{info.activity_id}"


@dataclass
class WorkerClock:
    """The worker's own timings, keyed by `activity_key`: the body's span, and named parts inside it."""

    body: dict[str, tuple[float, float]] = field(default_factory=dict)
    parts: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))

    def add(self, part: str, seconds: float) -> None:
        if activity.in_activity():
            parts = self.parts[activity_key()]
            parts[part] += seconds
            parts[f"{part} count"] += 1


CLOCK = WorkerClock()


class _TimedActivity(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        started = time.time()
        try:
            return await self.next.execute_activity(input)
        finally:
            CLOCK.body[activity_key()] = (started, time.time())


class ActivityTimer(temporal_client.Interceptor, Interceptor):
    """Times every activity's Python body on the worker. Given to the client (and so a client interceptor too),
    it also serves the plugin's host worker, which is where the sandbox activities run."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _TimedActivity(next)


def _timed_async(part: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            CLOCK.add(part, time.perf_counter() - started)

    return wrapper


def _timed_sync(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            CLOCK.add(part, time.perf_counter() - started)

    return wrapper


@contextlib.contextmanager
def timing_the_sandbox() -> Iterator[None]:
    """Wrap the local sandbox's methods (and the heartbeat call) so each activity's parts are timed."""
    box, provider = bubblewrap.LocalSandbox, bubblewrap.LocalSandboxProvider
    patches: list[tuple[Any, str, Any]] = [
        (provider, "attach", _timed_async("provider.attach", provider.attach)),
        *(
            (box, name, _timed_async(f"sandbox.{name}", getattr(box, name)))
            for name in ("kill_processes", "held_position", "hold_position", "exec", "snapshot")
        ),
        (activity, "heartbeat", _timed_sync("activity.heartbeat", activity.heartbeat)),
    ]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _t(event: HistoryEvent) -> float:
    return event.event_time.ToNanoseconds() / 1e9


@dataclass
class ActivitySpan:
    activity_id: str
    kind: str
    scheduled: float
    started: float = 0.0
    completed: float = 0.0
    result: Any = None


@dataclass
class WorkflowTask:
    scheduled: float
    started: float = 0.0
    completed: float = 0.0


async def read_history(client: Client, workflow_id: str) -> tuple[list[ActivitySpan], list[WorkflowTask]]:
    """The run's activities and workflow tasks with their server timestamps, results decoded."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    activities: dict[int, ActivitySpan] = {}
    tasks: dict[int, WorkflowTask] = {}
    for event in history.events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            activities[event.event_id] = ActivitySpan(attrs.activity_id, attrs.activity_type.name, _t(event))
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            activities[event.activity_task_started_event_attributes.scheduled_event_id].started = _t(event)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            done = event.activity_task_completed_event_attributes
            span = activities[done.scheduled_event_id]
            span.completed = _t(event)
            hint = {RUN_STEP: StepOutcome, CHECKPOINT: SnapshotRef}.get(span.kind)
            if hint is not None:
                [span.result] = await client.data_converter.decode(done.result.payloads, [hint])
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            tasks[event.event_id] = WorkflowTask(_t(event))
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            tasks[event.workflow_task_started_event_attributes.scheduled_event_id].started = _t(event)
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            tasks[event.workflow_task_completed_event_attributes.scheduled_event_id].completed = _t(event)
    return list(activities.values()), list(tasks.values())


#: Per step: totals (ms), phases (ms, adding up to the total), facts that are not phases (counts, inner times).
Figures = tuple[list[float], dict[str, list[float]], dict[str, list[float]]]

#: Every measured step: its total and its phases (ms), to show where the slowest ones lost their time.
STEPS: list[tuple[float, dict[str, float]]] = []

#: Where each measured phase belongs in the summary (the brief's categories).
CATEGORIES = {
    "schedule-to-start": "Temporal: activity dispatch (schedule-to-start)",
    "workflow task": "Temporal: workflow tasks (dispatch + run + persist)",
    "SDK": "activity start/finish in the SDK (decode, dispatch, complete)",
    "sandbox.exec": "sandbox command (bubblewrap chain + `true`)",
    "sandbox.snapshot": "the snapshot (engine)",
    "heartbeat": "heartbeat calls (worker side)",
}


def category(phase: str) -> str:
    for key, name in CATEGORIES.items():
        if key in phase:
            return name
    return "rest of the activity bodies (attach, positions, bookkeeping)"


def breakdown(workflow_id: str, activities: list[ActivitySpan], tasks: list[WorkflowTask]) -> Figures:
    """Per step: its total (run_step scheduled to the next step's run_step scheduled), its phases (ms, adding up
    to the total) and facts that are not time (counts)."""
    runs = [a for a in activities if a.kind == RUN_STEP]
    checkpoints = {a.result.step: a for a in activities if a.kind == CHECKPOINT and a.result is not None}
    totals: list[float] = []
    phases: dict[str, list[float]] = defaultdict(list)
    facts: dict[str, list[float]] = defaultdict(list)

    for run, following in itertools.pairwise(runs):
        # Only a step that ran once, checkpointed once and was followed by the next step is a no-op step's cost;
        # one that was retried or rehydrated (a lost sandbox, a heartbeat timeout) is counted, not measured.
        cp = checkpoints.get(run.result.index) if run.result is not None else None
        clean = (
            cp is not None
            and following.result is not None
            and following.result.index == run.result.index + 1
            and run.completed <= cp.scheduled <= cp.completed <= following.scheduled
            and sum(1 for a in activities if run.scheduled < a.scheduled < following.scheduled) == 1
        )
        if not clean:
            facts["steps not measured: retried or rehydrated"].append(1)
            continue
        assert cp is not None
        total = (following.scheduled - run.scheduled) * 1000
        totals.append(total)
        step: dict[str, float] = {}
        for span, label in ((run, "run_step"), (cp, "checkpoint")):
            step[f"{label}: schedule-to-start (matching, poll)"] = span.started - span.scheduled
            key = f"{workflow_id}/{span.activity_id}"
            body = CLOCK.body[key]
            parts = CLOCK.parts.get(key, {})
            step[f"{label}: SDK start (history start -> Python body)"] = body[0] - span.started
            inside = 0.0
            for part, seconds in sorted(parts.items()):
                if part.endswith(" count"):
                    facts[f"{label}: {part}"].append(seconds)
                    continue
                step[f"{label}: {part}"] = seconds
                inside += seconds
            step[f"{label}: rest of the activity body"] = (body[1] - body[0]) - inside
            step[f"{label}: SDK finish (body end -> completed event)"] = span.completed - body[1]
        for label, after, before in (
            ("run_step -> checkpoint", run.completed, cp.scheduled),
            ("checkpoint -> next step", cp.completed, following.scheduled),
        ):
            wfts = [t for t in tasks if after <= t.scheduled and t.completed <= before]
            facts[f"workflow tasks {label}"].append(len(wfts))
            step[f"workflow task {label}: schedule-to-start"] = sum(t.started - t.scheduled for t in wfts)
            step[f"workflow task {label}: start-to-complete"] = sum(t.completed - t.started for t in wfts)
            step[f"workflow task {label}: server between events"] = (before - after) - sum(
                t.completed - t.scheduled for t in wfts
            )
        for name, seconds in step.items():
            phases[name].append(seconds * 1000)
        STEPS.append((total, {name: seconds * 1000 for name, seconds in step.items()}))
        accounted = sum(step.values()) * 1000
        assert abs(accounted - total) < 1.0, f"phases add up to {accounted:.1f} ms of {total:.1f} ms"
        facts["run_step: the command itself (StepOutcome.seconds, ms)"].append(run.result.seconds * 1000)
        facts["checkpoint: SnapshotRef.seconds (ms)"].append(cp.result.seconds * 1000)
    return totals, phases, facts


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


async def one_run(
    base: Path, steps: int, overlay: bool, dynamic_config: dict[str, str], sqlite_pragmas: dict[str, str]
) -> Figures:
    server = EmbeddedTemporal(
        db_file=base / "temporal.db",
        ui=False,
        log_file=base / "server.log",
        dynamic_config=dynamic_config,
        sqlite_pragmas=sqlite_pragmas,
    )
    await server.start()
    try:
        pipeline = parse_pipeline(
            {
                "name": "noop",
                "steps_per_run": steps,  # one history: no continue-as-new inside the measured steps
                "steps": [{"name": f"noop {i}", "run": "true"} for i in range(steps)],
            }
        )
        policy = base / "policy.yaml"  # the worker policy grants the bench's own store folder
        policy.write_text(f"file_roots: [{base / 'store'}]\n")
        state = base / "worker"
        providers = None if overlay else {"local": LocalSandboxProvider(state / "sandboxes", overlay=False)}
        plugin = TardigradePlugin(state_dir=state, policy=policy, providers=providers)
        client = await Client.connect(server.address, plugins=[plugin], interceptors=[ActivityTimer()])
        queue = f"noop-{uuid.uuid4().hex[:6]}"
        with timing_the_sandbox():
            async with Worker(client, task_queue=queue):
                handle = await start_pipeline(
                    client,
                    LoadedPipeline(pipeline=pipeline, path=base / "p.yaml"),
                    task_queue=queue,
                    store_url=(base / "store").as_uri(),
                )
                result = await handle.result()
        if result.steps_completed != steps:
            raise SystemExit(f"the run completed {result.steps_completed} of {steps} steps: {result}")
        return breakdown(handle.id, *await read_history(client, handle.id))
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="no-op steps per run (default 200)")
    parser.add_argument("--runs", type=int, default=1, help="runs, each on a fresh server (default 1)")
    parser.add_argument("--no-overlay", action="store_true", help="the local provider without overlay layers")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--dynamic-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a server setting over the embedded server's own (repeatable): history.transferProcessorMaxPollRPS=20",
    )
    parser.add_argument(
        "--sqlite-pragma",
        action="append",
        default=[],
        metavar="PRAGMA=VALUE",
        help="a SQLite pragma over the embedded server's own (repeatable), e.g. journal_mode=delete",
    )
    args = parser.parse_args()
    for item in args.dynamic_config + args.sqlite_pragma:
        if "=" not in item:
            parser.error(f"{item!r}: give KEY=VALUE")
    dynamic_config = dict(item.split("=", 1) for item in args.dynamic_config)
    sqlite_pragmas = dict(item.split("=", 1) for item in args.sqlite_pragma)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (a step's cost ends where the next step starts)")

    settings = {
        **DEV_SERVER_DYNAMIC_CONFIG,
        **dynamic_config,
        **{f"sqlite {k}": v for k, v in {**DEV_SERVER_SQLITE_PRAGMAS, **sqlite_pragmas}.items()},
    }
    load_before = os.getloadavg()[0]
    totals: list[float] = []
    phases: dict[str, list[float]] = defaultdict(list)
    facts: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.runs):
        base = Path(tempfile.mkdtemp(prefix="tardigrade-overhead-"))
        try:
            run_totals, run_phases, run_facts = await one_run(
                base,
                args.steps,
                overlay=not args.no_overlay,
                dynamic_config=dynamic_config,
                sqlite_pragmas=sqlite_pragmas,
            )
        finally:
            shutil.rmtree(base, ignore_errors=True)
        totals += run_totals
        for name, values in run_phases.items():
            phases[name] += values
        for name, values in run_facts.items():
            facts[name] += values
    unmeasured = len(facts.pop("steps not measured: retried or rehydrated", []))
    mean_total = statistics.fmean(totals)
    by_category: dict[str, float] = defaultdict(float)
    for name, values in phases.items():
        by_category[category(name)] += statistics.fmean(values)
    categories = dict(sorted(by_category.items(), key=lambda kv: -kv[1]))
    summary = {
        "steps_measured": len(totals),
        "steps_not_measured": unmeasured,  # retried or rehydrated: their time is recovery, not overhead
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cpus": os.cpu_count(),
        "server_settings": settings,
        "median_ms": round(statistics.median(totals), 1),
        "p99_ms": round(percentile(totals, 99), 1),
        "mean_ms": round(mean_total, 1),
        "categories_mean_ms": {name: round(ms, 1) for name, ms in categories.items()},
        "phases_median_ms": {name: round(statistics.median(v), 2) for name, v in phases.items()},
        "phases_mean_ms": {name: round(statistics.fmean(v), 2) for name, v in phases.items()},
        "facts_median": {name: round(statistics.median(v), 2) for name, v in facts.items()},
        "slowest_steps_ms": [
            {"total": round(total, 1), **{name: round(ms, 1) for name, ms in step.items()}}
            for total, step in sorted(STEPS, key=lambda ts: -ts[0])[:3]
        ],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"{len(totals)} no-op steps (run + checkpoint){' without overlays' if args.no_overlay else ''}:"
        f" median {summary['median_ms']} ms, p99 {summary['p99_ms']} ms, mean {summary['mean_ms']} ms"
        f"   (load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    print("server settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if unmeasured:
        print(f"{unmeasured} steps not measured: they were retried or rehydrated (see the worker's log above)")
    print(f"\n{'where the time of a step goes (means; they add up to the mean step)':<66} {'ms':>7} {'share':>6}")
    for name, ms in categories.items():
        print(f"  {name:<64} {ms:>7.1f} {ms / mean_total:>6.0%}")
    print(f"\n{'phase':<66} {'median':>7} {'mean':>7}")
    for name, values in phases.items():
        print(f"  {name:<64} {statistics.median(values):>7.2f} {statistics.fmean(values):>7.2f}")
    print("\nthe slowest steps, and their three longest phases (ms):")
    for total, step in sorted(STEPS, key=lambda ts: -ts[0])[:3]:
        longest = sorted(step.items(), key=lambda kv: -kv[1])[:3]
        print(f"  {total:7.1f}: " + ", ".join(f"{name} {ms:.1f}" for name, ms in longest))
    print(f"\n{'facts (per step)':<66} {'median':>7}")
    for name, values in facts.items():
        print(f"  {name:<64} {statistics.median(values):>7.2f}")


if __name__ == "__main__":
    asyncio.run(main())
