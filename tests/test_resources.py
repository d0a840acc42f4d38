"""A worker must be able to run for weeks: what it opens for a run is released when the run is over (issue 15).

One worker process runs warm-up pipelines, then ~180 more checkpoints (~240 in all) with ~60 restores - rollbacks
of steps that fail once, rehydrations after sandboxes destroyed mid-step - three pipelines at a time, and cancels
runs in the middle of a step, against the real dev server and real bubblewrap. Open descriptors, threads, child
processes and leftover scratch files must come back to where they were after the warm-up, which opened what a
worker keeps for its life (connections, pools, the blob index). This counts resources and times nothing: the
settle loop only gives a worker that is done a moment to finish closing things.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import CancelledError

from tardigrade.client import NoWorker, run_status, start_pipeline
from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.faults import DestroySandboxDuringStep
from tardigrade.sandboxes.provider import Sandbox, SandboxSpec
from tardigrade.workflows.state import RunStatus
from tests.conftest import InProcessWorkers, fast_timeouts, pipeline_from, wait_for

STEPS = 28  # per pipeline; each step appends to a file, so every checkpoint stores something new
PIPELINES = 6  # after the warm-up: 6 x (28 steps + the setup checkpoint) = 174 checkpoints, 48 restores
WARM_UP_STEPS = 20
AT_ONCE = 3
FAILS_ONCE = range(4, STEPS + 1, 4)  # these steps exit 1 on their first attempt: a rollback (diff-restore) each
LOST_AT = 15  # the sandbox is destroyed during this step: a rehydration (full restore) per pipeline
SETTLE_SECONDS = 15.0

# Caches that are meant to stay (bounded or growing with the store, not with the number of runs).
_KEPT = ("blobs.sqlite", "trees")


@dataclass(frozen=True)
class Usage:
    """What the worker process holds. Thread names are normalised (digits dropped) so a pool that replaced
    one thread with another counts as the same."""

    fds: int
    deleted_files: tuple[str, ...]  # open descriptors to files already unlinked: the signature of issue 15
    os_threads: int  # all of the process's threads (Temporal's core has its own) but the growing pools'
    python_threads: tuple[tuple[str, int], ...]
    children: int
    scratch_files: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"{self.fds} descriptors ({len(self.deleted_files)} of deleted files), {self.os_threads} threads,"
            f" {self.children} child processes, {len(self.scratch_files)} scratch files"
        )

    def leaks_against(self, base: Usage) -> list[str]:
        problems = []
        if self.fds > base.fds:
            held = len(self.deleted_files)
            problems.append(f"open descriptors {base.fds} -> {self.fds} ({held} of them to deleted files)")
        if self.os_threads > base.os_threads:
            problems.append(f"threads {base.os_threads} -> {self.os_threads}: {dict(self.python_threads)}")
        if Counter(dict(self.python_threads)) - Counter(dict(base.python_threads)):
            problems.append(f"python threads {dict(base.python_threads)} -> {dict(self.python_threads)}")
        if self.children > base.children:
            problems.append(f"child processes {base.children} -> {self.children}")
        if set(self.scratch_files) - set(base.scratch_files):
            new = sorted(set(self.scratch_files) - set(base.scratch_files))
            problems.append(f"{len(new)} new scratch file(s), e.g. {new[:5]}")
        return problems


# Pools that grow up to a fixed size as they are needed and then stay: asyncio's default executor
# (asyncio.to_thread) and the Temporal worker's workflow-task executor. How far they grew says how busy the worker
# was, not what it leaked, so their threads are left out of the counts. Our own pools are counted.
_GROWING_POOLS = ("asyncio_", "temporal_workflow_")


def _pool_threads() -> int:
    return sum(t.name.startswith(_GROWING_POOLS) for t in threading.enumerate())


def _python_threads() -> tuple[tuple[str, int], ...]:
    threads = [t.name for t in threading.enumerate() if not t.name.startswith(_GROWING_POOLS)]
    return tuple(sorted(Counter("".join(c for c in n if not c.isdigit()).rstrip("-_") for n in threads).items()))


def _scratch_files(home: Path, store: Path) -> tuple[str, ...]:
    """Files a finished run should not leave behind: temporary files, sandbox folders, store writes in flight."""
    found = []
    for folder in (home, store / ".tmp"):
        for dirpath, dirnames, filenames in os.walk(folder):
            rel = Path(dirpath).relative_to(folder)
            if rel.parts[:1] == ("scratch",) and len(rel.parts) == 2:
                dirnames[:] = [d for d in dirnames if d not in _KEPT]
                filenames = [f for f in filenames if not f.startswith(_KEPT)]
            if rel.parts[:1] == ("sandboxes",) and len(rel.parts) == 1:
                dirnames[:] = [d for d in dirnames if d != ".workers"]  # each worker's lock, held while it runs
            found += [str(rel / name) for name in filenames]
            found += [str(rel / name) + "/" for name in dirnames if rel.parts[:1] == ("sandboxes",)]
    return tuple(sorted(found))


def usage(home: Path, store: Path) -> Usage:
    me = psutil.Process()
    deleted = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
        if target.endswith(" (deleted)"):
            deleted.append(target)
    return Usage(
        fds=me.num_fds(),
        deleted_files=tuple(sorted(deleted)),
        os_threads=me.num_threads() - _pool_threads(),
        python_threads=_python_threads(),
        children=len(me.children(recursive=True)),
        scratch_files=_scratch_files(home, store),
    )


async def settled(home: Path, store: Path, base: Usage | None) -> Usage:
    """The usage once it stops changing (or matches ``base``), so the comparison is not a race."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    last = usage(home, store)
    while loop.time() < deadline:
        await asyncio.sleep(0.5)
        now = usage(home, store)
        if (base is not None and not now.leaks_against(base)) or (base is None and now == last):
            return now
        last = now
    return last


class LoseEachPipelineOnce:
    """Destroys the sandbox during step ``step`` once per pipeline (told apart by the name.txt step 1 writes)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.lost: set[str] = set()

    async def __call__(self, sandbox: Sandbox, labels: Mapping[str, str], exited: Awaitable[Any]) -> None:
        if labels.get("step") != str(self.step) or not isinstance(sandbox, LocalSandbox):
            return
        name = sandbox.host_path("/workspace/name.txt").read_text()
        if name not in self.lost:
            self.lost.add(name)
            await DestroySandboxDuringStep(self.step)(sandbox, labels, exited)


def pipeline(name: str, steps_total: int, tmp_path: Path) -> Any:
    steps: list[dict[str, Any]] = [{"name": "name the workspace", "run": f"echo {name} > name.txt"}]
    for i in range(2, steps_total + 1):
        step: dict[str, Any] = {"name": f"step {i}", "run": f"echo {i} >> log.txt"}
        if i in FAILS_ONCE:
            # The first attempt dirties the workspace and fails; the retry must start from the checkpoint.
            step["run"] = f'[ "$TARDIGRADE_ATTEMPT" = 1 ] && {{ echo half >> log.txt; exit 1; }}; echo {i} >> log.txt'
            step["retries"], step["retry_backoff"] = 1, 0.05  # hardly a wait: the rollback is the point
        steps.append(step)
    (tmp_path / name).mkdir()
    return pipeline_from({"name": name, "timeouts": fast_timeouts(), "steps": steps}, tmp_path / name)


async def run_all(
    workers: InProcessWorkers, client: Any, names: list[str], steps: int, tmp_path: Path, store: str
) -> int:
    """Run the pipelines, ``AT_ONCE`` at a time; returns how many rehydrations they needed in all."""
    gate = asyncio.Semaphore(AT_ONCE)
    retried = len([i for i in FAILS_ONCE if i <= steps])

    async def one(name: str) -> int:
        async with gate:
            loaded = pipeline(name, steps, tmp_path)
            handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=store)
            result = await handle.result()
            assert result.status == "completed" and result.steps_completed == steps, result
            assert result.step_runs == steps + retried + result.rehydrations, result
            return result.rehydrations

    return sum(await asyncio.gather(*(one(n) for n in names)))


async def cancel_while_running(workers: InProcessWorkers, client: Any, name: str, tmp_path: Path, store: str) -> None:
    """Start a run whose second step hangs, and cancel it in the middle of that step: the step is cancelled (its
    activity, its command) and the sandbox destroyed, like a user's `tardigrade cancel`."""
    (tmp_path / name).mkdir()
    hang = {"name": "hang", "run": "echo started; sleep 120"}
    spec = {"name": name, "timeouts": fast_timeouts(), "steps": [{"name": "one", "run": "echo 1 > a"}, hang]}
    handle = await start_pipeline(client, pipeline_from(spec, tmp_path / name), task_queue=workers.task_queue,
                                  store_url=store)  # fmt: skip

    async def hanging() -> bool:
        try:
            status = await run_status(client, handle.id)
        except NoWorker:
            return False  # its first workflow task has not run yet
        return isinstance(status, RunStatus) and status.phase == "running" and status.current_step == 2

    await wait_for(hanging, timeout=30, interval=0.2)
    await asyncio.sleep(1)  # well into the command
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert isinstance(failure.value.cause, CancelledError)


async def test_a_worker_releases_what_each_run_opened(workers: InProcessWorkers, tmp_path: Path) -> None:
    store = tmp_path / "store"
    injector = LoseEachPipelineOnce(LOST_AT)
    client = await workers.start(fault_injector=injector)
    home = workers.home / "w"

    # The first runs open what stays open for the worker's life: connections, thread pools, the blob index.
    warm_up = [f"warm-up-{i}" for i in range(AT_ONCE)]
    losses = await run_all(workers, client, warm_up, WARM_UP_STEPS, tmp_path, store.as_uri())
    await cancel_while_running(workers, client, "cancelled-warm-up", tmp_path, store.as_uri())
    before = await settled(home, store, None)

    runs = [f"run-{i}" for i in range(PIPELINES)]
    losses += await run_all(workers, client, runs, STEPS, tmp_path, store.as_uri())
    for i in range(3):
        await cancel_while_running(workers, client, f"cancelled-{i}", tmp_path, store.as_uri())
    after = await settled(home, store, before)

    assert losses == len(injector.lost) == AT_ONCE + PIPELINES, "every injected loss must have been rehydrated"
    print(f"\nafter the warm-up: {before.summary()}\nafter {PIPELINES} + 3 more runs: {after.summary()}")
    assert not after.leaks_against(before), "\n".join(after.leaks_against(before))
    # pytest's own output capture holds unlinked temporary files in /tmp from the start: only new ones count.
    kept = Counter(after.deleted_files) - Counter(before.deleted_files)
    assert not kept, f"descriptors of deleted files are still open, e.g. {list(kept)[:3]}"


async def test_a_command_cancelled_or_timed_out_mid_flood_leaves_no_pipe_open(tmp_path: Path) -> None:
    """A command's output is read until it ends - unless the step is cancelled or times out. If asyncio had paused
    the pipe because the reader fell behind, it never learns that the pipe closed; the pipe must still go."""
    provider = LocalSandboxProvider(tmp_path / "sandboxes")
    sandbox = await provider.create(SandboxSpec())
    me = psutil.Process()
    await sandbox.exec("true", env={}, timeout=10)  # the first command sets up what stays (the child watcher)
    before = me.num_fds()
    for _ in range(3):
        command = asyncio.create_task(sandbox.exec("yes", env={}, timeout=60))
        await asyncio.sleep(0.3)
        command.cancel()
        with pytest.raises(asyncio.CancelledError):
            await command
        timed_out = await sandbox.exec("yes", env={}, timeout=0.3)
        assert timed_out.timed_out
    await wait_for(lambda: me.num_fds() <= before, timeout=30)  # a pipe left open stays open: no bound is too long
    await provider.close()
