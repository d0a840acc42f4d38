"""Reading a run's Temporal history the way an auditor would: which activities ran, with what, on which worker."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from temporalio.client import Client


@dataclass
class ActivityRun:
    name: str
    input: dict[str, Any]
    worker: str | None  # identity of the worker that started it
    summary: str | None
    attempts: int = 0  # the attempt that ended it (retries are not events of their own); 0: never started


async def run_ids(client: Client, workflow_id: str) -> list[str]:
    """Every run of a workflow id (continue-as-new makes several), oldest first."""
    runs = [w async for w in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    return [w.run_id for w in sorted(runs, key=lambda w: w.start_time)]


def _decoded_payloads(node: Any, out: list[str]) -> None:
    """Payload data is base64 in history JSON; decode it all, or a scan for secrets would find nothing."""
    if isinstance(node, dict):
        if "data" in node and isinstance(node["data"], str) and "metadata" in node:
            out.append(base64.b64decode(node["data"]).decode("utf-8", errors="replace"))
        for value in node.values():
            _decoded_payloads(value, out)
    elif isinstance(node, list):
        for value in node:
            _decoded_payloads(value, out)


async def history_json(client: Client, workflow_id: str) -> str:
    """Every run's history as JSON, followed by every payload decoded: what a scan for leaks must read."""
    parts = []
    for run_id in await run_ids(client, workflow_id):
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        text = history.to_json()
        parts.append(text)
        _decoded_payloads(json.loads(text), parts)
    return "\n".join(parts)


async def activity_runs(client: Client, workflow_id: str) -> list[ActivityRun]:
    out: list[ActivityRun] = []
    for run_id in await run_ids(client, workflow_id):
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        scheduled: dict[int, ActivityRun] = {}
        async for event in handle.fetch_history_events():
            if event.HasField("activity_task_scheduled_event_attributes"):
                attrs = event.activity_task_scheduled_event_attributes
                payloads = attrs.input.payloads
                data = json.loads(payloads[0].data) if payloads else {}
                summary = None
                if event.user_metadata.HasField("summary"):
                    summary = json.loads(event.user_metadata.summary.data)
                run = ActivityRun(attrs.activity_type.name, data, None, summary)
                scheduled[event.event_id] = run
                out.append(run)
            elif event.HasField("activity_task_started_event_attributes"):
                attrs2 = event.activity_task_started_event_attributes
                scheduled[attrs2.scheduled_event_id].worker = attrs2.identity
                scheduled[attrs2.scheduled_event_id].attempts = attrs2.attempt
    return out


def step_runs(runs: list[ActivityRun]) -> dict[int, int]:
    """How many times each step (1-based) was started: a shell step's run_step, an agent step's agent_start (an
    agent step resumed mid-way with `checkpoint: every_tool_call` does not start again, so it is not counted)."""
    counts: dict[int, int] = {}
    for run in runs:
        if run.name in ("tardigrade.run_step", "tardigrade.agent_start"):
            step = run.input["index"] + 1
            counts[step] = counts.get(step, 0) + 1
    return counts
