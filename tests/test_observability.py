"""What operators watch runs with: search attributes, Prometheus metrics, OpenTelemetry traces, structured logs.

All against the real dev server (tests/conftest.py) and real workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker

from tardigrade.client import connect, start_pipeline
from tardigrade.devserver import EmbeddedTemporal
from tardigrade.observability import JsonLogFormatter, metrics_runtime
from tardigrade.plugin import TardigradePlugin
from tardigrade.sandboxes.faults import DestroySandboxDuringStep
from tests.conftest import InProcessWorkers, fast_timeouts, free_port, pipeline_from, wait_for


async def runs_matching(client: Client, query: str) -> list[str]:
    return [w.id async for w in client.list_workflows(query)]


async def test_runs_are_searchable_by_pipeline_step_phase_and_provider(
    workers: InProcessWorkers, local_store: str, tmp_path: Path
) -> None:
    name = f"searched-{tmp_path.name[-8:].replace('_', '')}"
    loaded = pipeline_from(
        {"name": name, "timeouts": fast_timeouts(),
         "steps": [{"name": "quick", "run": "true"}, {"name": "slow", "run": "sleep 4"},
                   {"name": "last", "run": "true"}]},
        tmp_path,
    )  # fmt: skip
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)

    async def at_step_two() -> list[str] | None:
        found = await runs_matching(client, f'TardigradePipeline = "{name}" AND TardigradeStep = 2')
        return found or None

    assert await wait_for(at_step_two, timeout=30) == [handle.id]
    running = f'TardigradePhase = "running" AND TardigradeProvider = "local" AND TardigradePipeline = "{name}"'
    assert await runs_matching(client, running) == [handle.id]
    await handle.result()

    async def completed() -> list[str] | None:
        return await runs_matching(client, f'TardigradePipeline = "{name}" AND TardigradePhase = "completed"') or None

    assert await wait_for(completed, timeout=30) == [handle.id]
    upserts = [
        e
        async for e in handle.fetch_history_events()
        if e.HasField("upsert_workflow_search_attributes_event_attributes")
    ]
    assert len(upserts) <= 2 * len(loaded.pipeline.steps) + 2, "about one history event per step, not per phase"


async def test_a_server_without_the_attributes_still_runs_pipelines(
    tmp_path: Path, local_store: str, tardigrade_home: Path, monkeypatch: Any
) -> None:
    """Another Temporal server (here: a dev server started without them) has none of our search attributes."""
    import subprocess

    from temporalio.worker import Worker

    from tardigrade.client import connect
    from tardigrade.devserver import temporal_binary
    from tardigrade.plugin import TardigradePlugin

    port = free_port()
    server = subprocess.Popen(
        [temporal_binary(), "server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port", str(port),
         "--db-filename", str(tmp_path / "bare.db"), "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = await wait_for(lambda: _try_connect(f"127.0.0.1:{port}"), timeout=30)
        assert client is not None
        plugin = TardigradePlugin(state_dir=tardigrade_home / "bare")
        client = await connect(f"127.0.0.1:{port}", plugin=plugin)
        loaded = pipeline_from({"name": "plain", "timeouts": fast_timeouts(), "steps": [{"name": "a", "run": "true"}]},
                               tmp_path)  # fmt: skip
        async with Worker(client, task_queue="bare"):
            handle = await start_pipeline(client, loaded, task_queue="bare", store_url=local_store)
            result = await asyncio.wait_for(handle.result(), 60)
        assert result.status == "completed"
    finally:
        server.terminate()
        server.wait(10)


async def _try_connect(address: str) -> Client | None:
    try:
        return await Client.connect(address)
    except Exception:
        return None


async def test_the_embedded_server_restarts_on_a_database_that_has_the_attributes(tmp_path: Path) -> None:
    for _ in range(2):
        server = EmbeddedTemporal(db_file=tmp_path / "t.db", port=free_port(), ui=False, log_file=tmp_path / "log")
        await server.start()
        client = await Client.connect(server.address)
        from tardigrade.client import registered_search_attributes

        assert await registered_search_attributes(client) == {
            "TardigradePipeline",
            "TardigradeStep",
            "TardigradePhase",
            "TardigradeProvider",
        }
        server.stop()


async def scrape(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)


def samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of metric ``name`` in Prometheus text."""
    found = []
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", line)
        if match:
            found.append((match.group(1) or "", float(match.group(2))))
    return found


async def test_prometheus_metrics_hold_temporals_and_ours_with_a_rehydration(
    temporal_address: str, tardigrade_home: Path, local_store: str, tmp_path: Path
) -> None:
    port = free_port()
    plugin = TardigradePlugin(state_dir=tardigrade_home / "metrics", fault_injector=DestroySandboxDuringStep(2))
    client = await connect(temporal_address, plugin=plugin, runtime=metrics_runtime(f"127.0.0.1:{port}"))
    queue = f"metrics-{uuid.uuid4().hex[:8]}"
    steps = [{"name": f"s{i}", "run": f"echo {i} > f{i}; sleep 0.5"} for i in range(1, 4)]
    loaded = pipeline_from({"name": "metered", "timeouts": fast_timeouts(), "steps": steps}, tmp_path)
    async with Worker(client, task_queue=queue):
        handle = await start_pipeline(client, loaded, task_queue=queue, store_url=local_store)
        result = await asyncio.wait_for(handle.result(), 90)
        assert result.status == "completed" and result.rehydrations == 1
        text = await scrape(f"http://127.0.0.1:{port}/metrics")

    checkpoints = samples(text, "tardigrade_checkpoint_seconds_count")
    assert checkpoints and all('provider="local"' in labels for labels, _ in checkpoints)
    assert sum(v for _, v in checkpoints) >= len(result.checkpoints), "every checkpoint is timed"
    assert sum(v for _, v in samples(text, "tardigrade_checkpoint_bytes")) >= 3, "the new bytes are counted"
    assert [v for labels, v in samples(text, "tardigrade_rehydrations") if 'pipeline="metered"' in labels] == [1.0]
    assert [v for _, v in samples(text, "tardigrade_sandboxes")] == [0.0], "both sandboxes destroyed"
    assert samples(text, "temporal_activity_execution_latency_count"), "Temporal's own worker metrics are there too"


@pytest.fixture(scope="module")
def spans() -> Any:
    """Every span finished in this process, kept in memory (the SDK's exporter; the global provider is set once)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


async def test_one_trace_runs_from_the_client_through_the_workflow_and_activities_to_the_sandbox_command(
    workers: InProcessWorkers, local_store: str, tmp_path: Path, spans: Any
) -> None:
    client = await workers.start(tracing=True)
    loaded = pipeline_from({"name": "traced", "timeouts": fast_timeouts(), "steps": [{"name": "a", "run": "true"}]},
                           tmp_path)  # fmt: skip
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    await handle.result()
    finished = {s.context.span_id: s for s in spans.get_finished_spans()}
    [command] = [s for s in finished.values() if s.name == "sandbox exec" and s.attributes["step"] == 1
                 and s.context.trace_id == _trace_of(finished, handle.id)]  # fmt: skip
    chain = []
    span = command
    while span is not None:
        chain.append(span.name)
        span = finished.get(span.parent.span_id) if span.parent else None
    assert chain == [
        "sandbox exec",
        "RunActivity:tardigrade.run_step",
        "StartActivity:tardigrade.run_step",  # scheduled by the workflow, in the trace the client started
        "StartWorkflow:TardigradePipeline",
    ]
    in_trace = {s.name for s in finished.values() if s.context.trace_id == command.context.trace_id}
    assert {"RunWorkflow:TardigradePipeline", "RunActivity:tardigrade.checkpoint"} <= in_trace
    assert command.attributes["provider"] == "local"


def _trace_of(finished: dict[int, Any], workflow_id: str) -> int:
    [start] = [
        s
        for s in finished.values()
        if s.name == "StartWorkflow:TardigradePipeline" and s.attributes.get("temporalWorkflowID") == workflow_id
    ]
    return int(start.context.trace_id)


async def test_json_logs_carry_one_record_per_step_with_its_facts(
    workers: InProcessWorkers, local_store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await workers.start()
    steps = [{"name": "fine", "run": "echo hi"}, {"name": "broken", "run": "exit 3", "retries": 0}]
    loaded = pipeline_from({"name": "logged", "timeouts": fast_timeouts(), "steps": steps}, tmp_path)
    with caplog.at_level(logging.INFO, logger="temporalio.activity"):
        handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    formatter = JsonLogFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if hasattr(r, "tardigrade")]
    mine = [line for line in lines if line.get("activity", {}).get("workflow_id") == handle.id]
    assert [(line["step"], line["step_name"], line["exit_code"], line["ok"]) for line in mine] == [
        (1, "fine", 0, True),
        (2, "broken", 3, False),
    ]
    assert all(line["event"] == "step finished" and line["provider"] == "local" for line in mine)
    assert mine[0]["output_bytes"] == 3 and isinstance(mine[0]["seconds"], float)


async def test_the_worker_command_serves_metrics_and_prints_json_logs(
    worker_processes: Any, temporal_address: str, local_store: str, tmp_path: Path
) -> None:
    port = free_port()
    queue = f"cli-{uuid.uuid4().hex[:8]}"
    worker = worker_processes(
        queue, "observed", env={"TARDIGRADE_METRICS": f"127.0.0.1:{port}", "TARDIGRADE_LOG_FORMAT": "json"}
    )
    worker.host_queue()
    client = await connect(temporal_address)
    steps = [{"name": "a", "run": "true"}]
    loaded = pipeline_from({"name": "cli-observed", "timeouts": fast_timeouts(), "steps": steps}, tmp_path)
    handle = await start_pipeline(client, loaded, task_queue=queue, store_url=local_store)
    await asyncio.wait_for(handle.result(), 60)
    text = await scrape(f"http://127.0.0.1:{port}/metrics")
    assert samples(text, "tardigrade_checkpoint_seconds_count") and samples(text, "temporal_worker_start")
    records = [json.loads(line) for line in worker.log.read_text().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    steps = [r for r in records if r.get("event") == "step finished"]  # a loaded machine may rerun the step
    assert steps and all(
        (r["step"], r["step_name"], r["exit_code"], r["activity"]["workflow_id"]) == (1, "a", 0, handle.id)
        for r in steps
    )


async def test_a_failed_step_is_a_failed_activity_showing_its_output(
    workers: InProcessWorkers, local_store: str, tmp_path: Path
) -> None:
    client = await workers.start()
    steps = [
        {"name": "fine", "run": "true"},
        {"name": "broken", "run": "echo bad thing; exit 4", "retries": 1, "retry_backoff": "1s"},
    ]
    loaded = pipeline_from({"name": "failing", "timeouts": fast_timeouts(), "steps": steps}, tmp_path)
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert "exit code 4" in str(failure.value.cause) or "code 4" in str(failure.value.cause)

    scheduled: dict[int, str] = {}
    failed: list[Any] = []
    async for event in handle.fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            scheduled[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
        elif event.HasField("activity_task_failed_event_attributes"):
            attrs = event.activity_task_failed_event_attributes
            if scheduled[attrs.scheduled_event_id] == "tardigrade.run_step":
                failed.append(attrs.failure)
    assert len(failed) == 2, "each attempt of the step shows as a failed activity (retries: 1)"
    for f in failed:
        assert f.application_failure_info.type == "StepFailed"
        assert f.message == "step 2 (broken) exited with code 4; its output ends with:\nbad thing\n"
