"""The embedded Temporal server's settings: what it starts with, what a caller may change, what it refuses, and
that an activity on the workflow's own queue really is handed back in the workflow task's completion (eager)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from tardigrade.devserver import DEV_SERVER_DYNAMIC_CONFIG, EmbeddedTemporal
from tests.conftest import free_port


def _settings_of(pid: int) -> list[str]:
    """The ``--dynamic-config-value`` arguments the server process was started with."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--dynamic-config-value"]


async def test_the_server_starts_with_its_settings_and_a_callers_value_replaces_one(tmp_path: Path) -> None:
    server = EmbeddedTemporal(
        db_file=tmp_path / "t.db",
        port=free_port(),
        ui=False,
        log_file=tmp_path / "log",
        dynamic_config={"history.transferProcessorMaxPollRPS": "500", "limit.maxIDLength": "300"},
    )
    await server.start()
    try:
        assert server.process is not None
        settings = _settings_of(server.process.pid)
    finally:
        server.stop()
    assert DEV_SERVER_DYNAMIC_CONFIG["history.transferProcessorMaxPollRPS"] != "500"
    assert sorted(settings) == [
        "history.transferProcessorMaxPollRPS=500",  # the caller's, once: not the default beside it
        "limit.maxIDLength=300",
        "system.enableActivityEagerExecution=true",
    ]


async def test_the_database_keeps_a_private_write_ahead_log_and_a_restart_keeps_runs(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    for attempt in range(2):
        server = EmbeddedTemporal(db_file=db, port=free_port(), ui=False, log_file=tmp_path / "log")
        await server.start()
        try:
            client = await Client.connect(server.address)
            queue = f"wal-{uuid.uuid4().hex[:8]}"
            runner = UnsandboxedWorkflowRunner()
            async with Worker(
                client, task_queue=queue, workflows=[OneActivity], activities=[noop], workflow_runner=runner
            ):
                assert await client.execute_workflow(OneActivity.run, id=f"wal-{attempt}", task_queue=queue) == "done"
            if attempt == 1:  # the first server's run is still there, and done
                assert await client.get_workflow_handle("wal-0").result() == "done"
            for name in ("t.db", "t.db-wal", "t.db-shm"):
                assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name  # history is in there
        finally:
            server.stop()
    with contextlib.closing(sqlite3.connect(db)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"history.transferProcessorMaxPollRPS": "fast"}, "value for history.transferProcessorMaxPollRPS must be JSON"),
        ({"history.x=1 --headless": "1"}, "key 'history.x=1 --headless' is not a dotted name"),
        ({"": "1"}, "key '' is not a dotted name"),
    ],
)
def test_a_setting_the_server_would_refuse_or_misread_is_a_clear_error(
    tmp_path: Path, settings: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        EmbeddedTemporal(db_file=tmp_path / "t.db", ui=False, dynamic_config=settings)


@activity.defn(name="settings_test.noop")
async def noop() -> str:
    return "done"


@workflow.defn(name="SettingsTestWorkflow")
class OneActivity:
    @workflow.run
    async def run(self) -> str:
        result: str = await workflow.execute_activity(noop, start_to_close_timeout=timedelta(seconds=30))
        return result


def _eager_count(metrics_port: int) -> float:
    """The server's own count of activities it handed out eagerly (``activity_eager_execution``), 0 if none yet."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("activity_eager_execution")
    )


async def test_an_activity_on_the_workflows_own_queue_runs_eagerly(tmp_path: Path) -> None:
    metrics_port = free_port()
    server = EmbeddedTemporal(
        db_file=tmp_path / "t.db", port=free_port(), ui=False, log_file=tmp_path / "log", metrics_port=metrics_port
    )
    await server.start()
    try:
        client = await Client.connect(server.address)
        queue = f"eager-{uuid.uuid4().hex[:8]}"
        before = await asyncio.to_thread(_eager_count, metrics_port)
        # Unsandboxed: this test is about the server, and the sandbox would re-import this module's fixtures.
        runner = UnsandboxedWorkflowRunner()
        async with Worker(client, task_queue=queue, workflows=[OneActivity], activities=[noop], workflow_runner=runner):
            result = await client.execute_workflow(OneActivity.run, id=queue, task_queue=queue)
        assert result == "done"
        # The server publishes its metrics every second or so: wait for the count, up to a deadline.
        count = before
        for _ in range(50):
            count = await asyncio.to_thread(_eager_count, metrics_port)
            if count > before:
                break
            await asyncio.sleep(0.2)
        assert count == before + 1
    finally:
        server.stop()
