"""The `tardigrade` command as users run it: a subprocess, against the real dev server, printing JSON."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import WorkerProcess, run_cli


def tardigrade(*args: str, home: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, home=home, timeout=timeout)


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_demo_loses_its_sandbox_at_step_22_and_finishes(temporal_address: str, tmp_path: Path) -> None:
    out = as_json(tardigrade("demo", "--address", temporal_address, "--json", home=tmp_path))
    assert out["status"] == "completed"
    assert out["steps_completed"] == out["steps_total"] == 40
    assert out["rehydrations"] == 1 and out["crash_at_step"] == 22
    assert out["step_runs"] == 41, "only step 22 ran twice"
    for key in ("workflow_id", "final_snapshot", "workspace_digest"):
        assert out[key]


def test_run_status_and_result_with_a_separate_worker(
    temporal_address: str, worker_processes: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    queue = f"cli-{uuid.uuid4().hex[:8]}"
    worker_processes(queue, "cli-worker").host_queue()
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: cli\nsteps:\n  - {name: hello, run: echo hello > hello.txt}\n")
    started = as_json(
        tardigrade("run", str(pipeline), "--address", temporal_address, "--task-queue", queue, "--json", home=tmp_path)
    )
    workflow_id = started["workflow_id"]
    result = as_json(tardigrade("result", workflow_id, "--address", temporal_address, "--json", home=tmp_path))
    assert result["status"] == "completed" and result["steps_completed"] == 1
    status = as_json(tardigrade("status", workflow_id, "--address", temporal_address, "--json", home=tmp_path))
    assert status["final_snapshot"] == result["final_snapshot"]

    restored = tmp_path / "restored"
    proc = tardigrade(
        "snapshot", "restore", result["final_snapshot"], str(restored), "--store", result["store"], home=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert (restored / "workspace" / "hello.txt").read_text() == "hello\n"


def test_snapshot_commands(tmp_path: Path) -> None:
    store = (tmp_path / "store").as_uri()
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    created = as_json(tardigrade("snapshot", "create", str(folder), "--store", store, "--json", home=tmp_path))
    assert created["entries"] == 1 and created["bytes_new"] == 1
    listed = as_json(tardigrade("snapshot", "ls", "--store", store, "--json", home=tmp_path))
    assert [s["id"] for s in listed] == [created["snapshot_id"]]
    verified = as_json(
        tardigrade("snapshot", "verify", created["snapshot_id"], "--store", store, "--json", home=tmp_path)
    )
    assert verified["ok"] and verified["files"] == 1

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious").write_text("x")
    refused = tardigrade(
        "snapshot", "restore", created["snapshot_id"], str(tmp_path / "busy"), "--store", store, home=tmp_path
    )
    assert refused.returncode == 2 and "is not empty" in refused.stderr
    assert (tmp_path / "busy" / "precious").exists()

    missing = tardigrade("snapshot", "restore", "f" * 64, str(tmp_path / "new"), "--store", store, home=tmp_path)
    assert missing.returncode == 2 and f"there is no snapshot {'f' * 64}" in missing.stderr
    assert not (tmp_path / "new").exists()
    bad_store = tardigrade("snapshot", "ls", "--store", "ftp://x/y", home=tmp_path)
    assert bad_store.returncode == 2 and "unknown scheme 'ftp'" in bad_store.stderr
