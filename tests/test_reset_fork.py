"""Reset and fork restore the files too (durability contract, point 5).

Against the real dev server and real bubblewrap sandboxes, with Temporal's own reset API: a run reset to an earlier
event continues on the files its history names - the live sandbox, whose files are ahead, is rolled back first - and
a new run can start from any recorded checkpoint of another (`tardigrade run PIPELINE --from RUN:STEP`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from tardigrade.client import connect, start_pipeline
from tardigrade.fork import ForkError
from tardigrade.pipeline import load_pipeline
from tardigrade.plugin import TardigradePlugin
from tardigrade.workflows.pipeline import PipelineWorkflow
from tardigrade.workflows.state import RunResult, RunStatus
from tests.conftest import EXAMPLE, Cli, InProcessWorkers, final_workspace, pipeline_from, wait_for
from tests.history import ActivityRun, activity_runs, step_runs

AUDIT = "40 steps, each exactly once\n"


@dataclass
class CleanRun:
    result: RunResult
    client: Client  # its worker stays up for the module: a reset of the finished run goes on there


@pytest.fixture(scope="module")
async def clean(temporal_address: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CleanRun]:
    """The example pipeline once, undisturbed: the digest a reset or forked run must reproduce."""
    home = tmp_path_factory.mktemp("clean")
    policy = home / "policy.yaml"
    policy.write_text(f"file_roots: [{home / 'store'}]\n")  # its store: a folder the worker's policy grants
    client = await connect(temporal_address, plugin=TardigradePlugin(state_dir=home / "worker", policy=policy))
    task_queue = f"clean-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=task_queue):
        handle = await start_pipeline(
            client, load_pipeline(EXAMPLE), task_queue=task_queue, store_url=(home / "store").as_uri()
        )
        yield CleanRun(await handle.result(), client)


@pytest.fixture
def clean_run(clean: CleanRun) -> RunResult:
    return clean.result


async def workflow_task_after_checkpoint(client: Client, workflow_id: str, run_id: str, index: int) -> int:
    """The id of the workflow task completed right after the checkpoint of step ``index`` (0-based) completed: the
    event `temporal workflow reset --event-id` takes to go back to just after that checkpoint."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    checkpoint_scheduled: int | None = None
    checkpoint_done = False
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            attrs = event.activity_task_scheduled_event_attributes
            is_checkpoint = attrs.activity_type.name == "tardigrade.checkpoint"
            if is_checkpoint and json.loads(attrs.input.payloads[0].data)["step"] == index:
                checkpoint_scheduled = event.event_id
        elif event.HasField("activity_task_completed_event_attributes"):
            if event.activity_task_completed_event_attributes.scheduled_event_id == checkpoint_scheduled:
                checkpoint_done = True
        elif checkpoint_done and event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            return event.event_id
    raise AssertionError(f"no completed workflow task after the checkpoint of step {index + 1}")


async def reset(client: Client, workflow_id: str, run_id: str, event_id: int) -> str:
    """`temporal workflow reset`, through the same API the CLI and the Web UI use. Returns the new run's id."""
    response = await client.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
            reason="test: go back to an earlier step",
            workflow_task_finish_event_id=event_id,
            request_id=uuid.uuid4().hex,
        )
    )
    return response.run_id


async def runs_of(client: Client, workflow_id: str, run_id: str) -> list[ActivityRun]:
    """The activities one run's history holds (tests.history.activity_runs reads every run of the id)."""
    out = []
    async for event in client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            attrs = event.activity_task_scheduled_event_attributes
            data = json.loads(attrs.input.payloads[0].data) if attrs.input.payloads else {}
            out.append(ActivityRun(attrs.activity_type.name, data, None, None))
    return out


async def steps_done(handle: WorkflowHandle[PipelineWorkflow, RunResult], at_least: int) -> RunStatus | None:
    try:
        status: RunStatus = await handle.query(PipelineWorkflow.status)
    except Exception:
        return None
    return status if status.steps_completed >= at_least else None


async def test_reset_of_a_running_run_from_step_30_to_step_10_rolls_the_live_sandbox_back(
    workers: InProcessWorkers, clean_run: RunResult, local_store: str, tmp_path: Path
) -> None:
    client = await workers.start()
    handle = await start_pipeline(client, load_pipeline(EXAMPLE), task_queue=workers.task_queue, store_url=local_store)
    status = await wait_for(lambda: steps_done(handle, 30), timeout=300)
    assert status.phase != "completed" and status.steps_completed < 40, "reset a run that is still going"
    old_run = (await handle.describe()).run_id
    event_id = await workflow_task_after_checkpoint(client, handle.id, old_run, index=9)  # after step 10

    new_run = await reset(client, handle.id, old_run, event_id)
    result: RunResult = await client.get_workflow_handle(handle.id, run_id=new_run, result_type=RunResult).result()

    assert result.status == "completed"
    assert result.workspace_digest == clean_run.workspace_digest, "the reset run's files equal a clean run's"
    assert (final_workspace(result, tmp_path / "final") / "reports" / "audit.txt").read_text() == AUDIT
    assert result.rehydrations == 0, "the live sandbox was rolled back, not replaced"

    old_history, new_history = await runs_of(client, handle.id, old_run), await runs_of(client, handle.id, new_run)
    assert max(step_runs(old_history)) > 30, "the abandoned run had gone past step 30"
    # The reset run's history: steps 1-10 copied from before the reset point, 11-40 run after it, each once.
    assert step_runs(new_history) == {step: 1 for step in range(1, 41)}
    [step_11] = [r for r in new_history if r.name == "tardigrade.run_step" and r.input["index"] == 10]
    after_10 = next(c for c in result.checkpoints if c.step == 9)
    assert step_11.input["expected"] == f"snapshot:{after_10.snapshot_id}", "step 11 named the checkpoint it needs"
    assert [r.name for r in new_history].count("tardigrade.provision") == 1


async def test_reset_of_a_finished_run_rehydrates_the_snapshot_its_history_names(
    clean: CleanRun, tmp_path: Path
) -> None:
    """The sandbox of a finished run is gone: a reset to step 35 gets a new one with the files after step 35."""
    client, clean_run = clean.client, clean.result
    old_run = (await client.get_workflow_handle(clean_run.workflow_id).describe()).run_id
    event_id = await workflow_task_after_checkpoint(client, clean_run.workflow_id, old_run, index=34)
    new_run = await reset(client, clean_run.workflow_id, old_run, event_id)
    handle = client.get_workflow_handle(clean_run.workflow_id, run_id=new_run, result_type=RunResult)
    result = await handle.result()

    assert result.workspace_digest == clean_run.workspace_digest
    assert result.rehydrations == 1, "the destroyed sandbox was replaced from the snapshot after step 35"
    assert (final_workspace(result, tmp_path / "final") / "reports" / "audit.txt").read_text() == AUDIT


async def test_fork_from_step_20_of_another_run(
    workers: InProcessWorkers, clean_run: RunResult, tmp_path: Path
) -> None:
    client = await workers.start()
    loaded = load_pipeline(EXAMPLE)
    fork = await start_pipeline(client, loaded, task_queue=workers.task_queue, start_from=f"{clean_run.workflow_id}:20")
    result = await fork.result()

    assert result.workspace_digest == clean_run.workspace_digest
    assert result.store == clean_run.store, "a fork restores from, and writes to, its source's store"
    assert (final_workspace(result, tmp_path / "final") / "reports" / "audit.txt").read_text() == AUDIT
    runs = await activity_runs(client, fork.id)
    assert step_runs(runs) == {step: 1 for step in range(21, 41)}, "only steps 21-40 run in the fork"
    [provision] = [r for r in runs if r.name == "tardigrade.provision"]
    source = next(c for c in clean_run.checkpoints if c.step == 19)
    assert provision.input["restore"]["snapshot_id"] == source.snapshot_id
    assert (provision.summary or "").startswith(f"fork: new sandbox from {clean_run.workflow_id}:20")
    assert result.checkpoints[0].snapshot_id == source.snapshot_id and result.steps_completed == 40


async def test_fork_from_a_snapshot_id_with_a_changed_last_step(
    workers: InProcessWorkers, local_store: str, tmp_path: Path
) -> None:
    """Fork from a snapshot id (its step label says where to go on), with the pipeline's later steps changed."""
    steps = [{"name": f"s{i}", "run": f"echo {i} >> log.txt"} for i in range(1, 5)]
    client = await workers.start()
    first = await start_pipeline(
        client, pipeline_from({"name": "forkable", "steps": steps}, tmp_path), task_queue=workers.task_queue,
        store_url=local_store,
    )  # fmt: skip
    done = await first.result()
    after_two = next(c.snapshot_id for c in done.checkpoints if c.step == 1)
    changed = [*steps[:2], {"name": "s3", "run": "echo three >> log.txt"}, steps[3]]
    fork = await start_pipeline(
        client, pipeline_from({"name": "forkable", "steps": changed}, tmp_path), task_queue=workers.task_queue,
        store_url=local_store, start_from=after_two,
    )  # fmt: skip
    result = await fork.result()
    assert (final_workspace(result, tmp_path / "fork") / "log.txt").read_text() == "1\n2\nthree\n4\n"
    assert step_runs(await activity_runs(client, fork.id)) == {3: 1, 4: 1}


async def test_fork_refuses_what_it_cannot_start_from(
    workers: InProcessWorkers, local_store: str, tmp_path: Path, cli: Cli
) -> None:
    client = await workers.start()
    loaded = pipeline_from({"name": "short", "steps": [{"name": "a", "run": "true"}, {"name": "b", "run": "true"}]},
                           tmp_path)  # fmt: skip
    done = await (await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)).result()
    with pytest.raises(ForkError, match="there is no run 'no-such-run'"):
        await start_pipeline(client, loaded, task_queue=workers.task_queue, start_from="no-such-run:1")
    with pytest.raises(ForkError, match="has steps left to run"):
        await start_pipeline(client, loaded, task_queue=workers.task_queue, start_from=f"{done.workflow_id}:2")
    with pytest.raises(ForkError, match="say which step"):
        await start_pipeline(client, loaded, task_queue=workers.task_queue, start_from=done.workflow_id)
    with pytest.raises(ForkError, match="its snapshot is in store"):
        await start_pipeline(
            client, loaded, task_queue=workers.task_queue, start_from=f"{done.workflow_id}:1",
            store_url=(tmp_path / "elsewhere").as_uri(),
        )  # fmt: skip

    proc = cli("run", str(tmp_path / "pipeline.yaml"), "--from", f"{done.workflow_id}:7", "--address", workers.address)
    assert proc.returncode == 2, proc.stderr
    assert f"run {done.workflow_id} recorded no checkpoint after step 7" in proc.stderr
    assert "Traceback" not in proc.stderr
