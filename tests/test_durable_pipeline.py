"""The durability contract, end to end: a real Temporal dev server, real bubblewrap sandboxes, a local store."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.worker import Worker

from tardigrade.client import connect, start_pipeline
from tardigrade.pipeline import load_pipeline
from tardigrade.plugin import TardigradePlugin
from tardigrade.sandboxes.faults import DestroySandboxDuringStep
from tardigrade.workflows.state import RunResult
from tests.conftest import EXAMPLE, InProcessWorkers, fast_timeouts, final_workspace, pipeline_from
from tests.history import activity_runs, history_json, run_ids, step_runs


@pytest.fixture(scope="session")
async def reference_run(
    temporal_address: str, tmp_path_factory: pytest.TempPathFactory, test_policy_file: Path
) -> RunResult:
    """The example pipeline, once, with nothing going wrong: the digest every other run must reproduce. (Session
    fixtures start before the autouse policy fixture sets TARDIGRADE_POLICY: the policy is passed here.)"""
    home = tmp_path_factory.mktemp("reference")
    client = await connect(temporal_address, plugin=TardigradePlugin(state_dir=home, policy=test_policy_file))
    task_queue = f"reference-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=task_queue):
        handle = await start_pipeline(  # the worker policy keeps stores out of the worker's own state folder
            client,
            load_pipeline(EXAMPLE),
            task_queue=task_queue,
            store_url=tmp_path_factory.mktemp("reference-store").as_uri(),
        )
        return await handle.result()


async def test_forty_step_pipeline_completes_with_a_reproducible_digest(
    workers: InProcessWorkers, reference_run: RunResult, local_store: str, tmp_path: Path
) -> None:
    client = await workers.start()
    handle = await start_pipeline(client, load_pipeline(EXAMPLE), task_queue=workers.task_queue, store_url=local_store)
    result = await handle.result()

    assert result.status == "completed"
    assert (result.steps_completed, result.steps_total, result.step_runs, result.rehydrations) == (40, 40, 40, 0)
    assert result.workspace_digest == reference_run.workspace_digest
    workspace = final_workspace(result, tmp_path / "final")
    assert (workspace / "reports" / "audit.txt").read_text() == "40 steps, each exactly once\n"
    assert len((workspace / "log" / "steps.log").read_text().splitlines()) == 40
    # One checkpoint after setup and one after every step, each recorded in the result.
    assert [c.step for c in result.checkpoints] == list(range(-1, 40))


async def test_sandbox_destroyed_during_step_22_resumes_there(
    workers: InProcessWorkers, reference_run: RunResult, local_store: str, tmp_path: Path
) -> None:
    injector = DestroySandboxDuringStep(22)
    client = await workers.start(fault_injector=injector)
    handle = await start_pipeline(client, load_pipeline(EXAMPLE), task_queue=workers.task_queue, store_url=local_store)
    result = await handle.result()

    assert injector.fired == 1
    assert result.status == "completed" and result.rehydrations == 1
    assert result.workspace_digest == reference_run.workspace_digest
    runs = await activity_runs(client, handle.id)
    counts = step_runs(runs)
    assert counts == {step: (2 if step == 22 else 1) for step in range(1, 41)}, "steps 1-21 must not run again"
    provisions = [r for r in runs if r.name == "tardigrade.provision"]
    assert len(provisions) == 2
    assert provisions[0].input["restore"] is None
    assert provisions[1].input["restore"]["step"] == 20, "rehydrated from the snapshot taken after step 21"
    assert provisions[1].summary == "rehydrate: new sandbox from the snapshot after step 21"
    workspace = final_workspace(result, tmp_path / "final")
    assert (workspace / "reports" / "audit.txt").read_text() == "40 steps, each exactly once\n"


async def test_history_holds_no_file_contents_and_no_secret_values(
    workers: InProcessWorkers,
    reference_run: RunResult,
    local_store: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}"
    marker = f"FILE-CONTENT-{uuid.uuid4().hex}"
    monkeypatch.setenv("DEMO_API_TOKEN", secret)  # the in-process worker's environment
    (tmp_path / "big.txt").write_text(f"{marker}\n" * 1000)
    loaded = pipeline_from(
        {
            "name": "secrets-and-files",
            "manifest": {
                "files": [
                    {"path": "notes/inline.txt", "content": f"{marker} inline"},
                    {"path": "data/big.txt", "source": "big.txt"},
                ],
                "secrets": ["DEMO_API_TOKEN"],
            },
            "steps": [
                # The secret reaches the sandbox's environment...
                {
                    "name": "use the token",
                    "run": 'test -n "$DEMO_API_TOKEN" && printf %s "$DEMO_API_TOKEN" | sha256sum > token.sha',
                },
                # ...and even a step that prints it does not get it into history.
                {"name": "leak attempt", "run": 'echo "token is $DEMO_API_TOKEN"; cp data/big.txt copy.txt'},
                {"name": "lots of output", "run": "for i in $(seq 20000); do echo line $i $DEMO_API_TOKEN; done"},
            ],
        },
        tmp_path,
    )
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    result = await handle.result()
    assert result.status == "completed"

    history = await history_json(client, handle.id)
    assert secret not in history
    assert marker not in history, "file contents must travel through the store, not history"
    assert "token is ***" in history, "output tails are kept, with secrets masked"
    assert len(history) < 200_000, "20,000 lines of output must not land in history"
    # The example's data never shows up in its history either.
    example_history = await history_json(client, reference_run.workflow_id)
    assert "Customer 1," not in example_history and '"orders": 12000' not in example_history

    # Nor in the store's metadata, nor in the stored log of the long output.
    store_root = Path(local_store.removeprefix("file://"))
    for record in (store_root / "snapshots").iterdir():
        assert secret not in record.read_text()
    logs = list((store_root / "logs").iterdir())
    assert logs, "the full output of the long step is kept in the store"
    import zstandard

    full_log = zstandard.ZstdDecompressor().decompress(logs[0].read_bytes(), max_output_size=1 << 26).decode()
    assert "line 20000 ***" in full_log and secret not in full_log
    # The step really saw the secret.
    import hashlib

    workspace = final_workspace(result, tmp_path / "final")
    assert (workspace / "token.sha").read_text().split()[0] == hashlib.sha256(secret.encode()).hexdigest()


async def test_failed_attempt_is_rolled_back_before_the_retry(
    workers: InProcessWorkers, local_store: str, tmp_path: Path
) -> None:
    loaded = pipeline_from(
        {
            "name": "retry-rollback",
            "steps": [
                {"name": "first", "run": "echo one >> log.txt"},
                {
                    "name": "flaky",
                    # Appends, leaves debris, then fails on its first attempt only.
                    "run": 'echo two >> log.txt; touch debris-$TARDIGRADE_ATTEMPT; test "$TARDIGRADE_ATTEMPT" -ge 2',
                    "retries": 2,
                    "retry_backoff": "0.1s",
                },
            ],
        },
        tmp_path,
    )
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    result = await handle.result()
    workspace = final_workspace(result, tmp_path / "final")
    assert (workspace / "log.txt").read_text() == "one\ntwo\n", "the failed attempt's append was rolled back"
    assert sorted(p.name for p in workspace.glob("debris-*")) == ["debris-2"]
    runs = await activity_runs(client, handle.id)
    assert [r.name for r in runs].count("tardigrade.rollback") == 1
    assert step_runs(runs) == {1: 1, 2: 2}


async def test_a_failing_step_fails_the_run_with_a_useful_message(
    workers: InProcessWorkers, local_store: str, tmp_path: Path
) -> None:
    loaded = pipeline_from(
        {"name": "fails", "steps": [{"name": "ok", "run": "true"}, {"name": "boom", "run": "echo kaput >&2; exit 3"}]},
        tmp_path,
    )
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    message = str(info.value.cause)
    assert "step 2/2 · boom failed (exit code 3)" in message and "kaput" in message
    assert "tardigrade snapshot restore" in message, "says how to inspect the last good workspace"
    await asyncio.sleep(0.5)
    sandboxes = workers.home / "w" / "sandboxes"
    assert [p for p in sandboxes.iterdir() if not p.name.startswith(".")] == [], "the sandbox was destroyed"


async def test_a_missing_secret_fails_fast_and_names_it(
    workers: InProcessWorkers, local_store: str, tmp_path: Path
) -> None:
    loaded = pipeline_from(
        {"name": "no-secret", "manifest": {"secrets": ["NOT_SET_ANYWHERE"]}, "steps": [{"name": "s", "run": "true"}]},
        tmp_path,
    )
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), 30)
    assert "secret NOT_SET_ANYWHERE is not set on this worker" in str(info.value.cause.cause)  # type: ignore[union-attr]


async def test_a_missing_snapshot_is_a_loud_error_not_an_empty_workspace(
    workers: InProcessWorkers, local_store: str, tmp_path: Path
) -> None:
    """The store loses its data, then the sandbox dies: rehydration must fail naming what is missing."""
    store_root = Path(local_store.removeprefix("file://"))
    destroy = DestroySandboxDuringStep(2)

    async def wipe_store_then_destroy(sandbox: Any, labels: Any, exited: Any) -> None:
        if labels.get("step") == "2" and destroy.remaining:
            for pack in (store_root / "packs").rglob("*"):
                if pack.is_file():
                    pack.unlink()
            await destroy(sandbox, labels, exited)

    loaded = pipeline_from(
        {"name": "lost-store", "steps": [{"name": "a", "run": "echo a > a"}, {"name": "b", "run": "sleep 1"}]},
        tmp_path,
    )
    client = await workers.start(fault_injector=wipe_store_then_destroy)
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), 60)
    cause = info.value.cause
    text = f"{cause} {getattr(cause, 'cause', '')}"
    assert "SnapshotCorrupt" in text and "packs/" in text and "is missing" in text
    assert "(file 'workspace/a')" in text, "names the file that cannot be restored"


async def test_long_pipelines_continue_as_new_and_keep_their_sandbox(
    workers: InProcessWorkers, local_store: str, tmp_path: Path
) -> None:
    loaded = pipeline_from(
        {
            "name": "long",
            "steps_per_run": 3,
            "steps": [{"name": f"s{i}", "run": f"echo {i} >> log.txt"} for i in range(8)],
        },
        tmp_path,
    )
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    result = await handle.result()
    assert result.steps_completed == 8 and result.step_runs == 8
    assert len(await run_ids(client, handle.id)) == 3
    runs = await activity_runs(client, handle.id)
    assert [r.name for r in runs].count("tardigrade.provision") == 1, "the sandbox lives across continue-as-new"
    workspace = final_workspace(result, tmp_path / "final")
    assert (workspace / "log.txt").read_text() == "".join(f"{i}\n" for i in range(8))


async def test_status_query_reports_progress(workers: InProcessWorkers, local_store: str, tmp_path: Path) -> None:
    loaded = pipeline_from(
        {
            "name": "watched",
            "timeouts": fast_timeouts(),
            "steps": [{"name": "quick", "run": "true"}, {"name": "slow", "run": "sleep 3"}],
        },
        tmp_path,
    )
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    from tardigrade.client import run_status

    async def at_slow() -> Any:
        status = await run_status(client, handle.id)
        return status if getattr(status, "current_step", None) == 2 and status.phase == "running" else None

    from tests.conftest import wait_for

    status = await wait_for(at_slow, timeout=30)
    assert status.current_step_name == "slow" and status.steps_completed == 1
    assert status.sandbox is not None and status.last_snapshot is not None
    assert (await handle.result()).status == "completed"


async def test_history_per_step_does_not_grow_with_the_pipeline(
    workers: InProcessWorkers, local_store: str, tmp_path: Path
) -> None:
    """Activities get the step they run, not the whole pipeline: a step costs the same history in a long pipeline
    as in a short one (otherwise history grows with steps squared and a long pipeline hits Temporal's limits)."""
    client = await workers.start()

    async def history_per_step(steps: int) -> float:
        loaded = pipeline_from(
            {
                "name": f"len-{steps}",
                "steps": [
                    {"name": f"step number {i}", "run": f"echo {i} > f{i}.txt # {'padding ' * 20}"}
                    for i in range(steps)
                ],
            },
            _mkdir(tmp_path / str(steps)),
        )
        handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
        await handle.result()
        history = await handle.fetch_history()
        scheduled = [e for e in history.events if e.HasField("activity_task_scheduled_event_attributes")]
        return sum(e.ByteSize() for e in scheduled) / steps

    short, long = await history_per_step(5), await history_per_step(40)
    assert long < short * 1.15, f"{long:.0f} bytes per step in a 40-step pipeline vs {short:.0f} in a 5-step one"


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
