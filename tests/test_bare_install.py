"""The bare install (no extras) runs the main job, in a fresh venv that holds only what `pip install` gave it.

The development venv has every extra installed, so it cannot see a missing install step; this one can. It is
built once per test session from the checkout (a real wheel build, not an editable install) and used from a
folder outside the checkout, so nothing of the repository is on its import path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

# What the optional extras bring. The test means nothing if one of them sneaked into the bare install.
OPTIONAL_PACKAGES = (
    "cryptography",
    "boto3",
    "google.cloud.storage",
    "azure.storage.blob",
    "openai",
    "e2b",
    "modal",
    "daytona",
    "runloop_api_client",
    "vercel",
    "blaxel",
    "httpx",
)


class BareVenv:
    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        self.home = home
        self.bin = root / "bin"
        self.cwd = home  # outside the checkout

    def run(
        self, *argv: str, timeout: float = 240, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("TARDIGRADE_", "TEMPORAL_", "PYTHON"))}
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            cwd=cwd or self.cwd,
            timeout=timeout,
            env={**clean, "TARDIGRADE_HOME": str(self.home), **(env or {})},
        )

    def tardigrade(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.bin / "tardigrade"), *args, **kw)  # type: ignore[arg-type]

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.bin / "python"), "-c", code)


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareVenv]:
    root = tmp_path_factory.mktemp("bare-venv")
    home = tmp_path_factory.mktemp("bare-home")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    # Build from a clean copy of the tracked files: an in-tree build would reuse a stale build/ folder.
    source = tmp_path_factory.mktemp("bare-source") / "tardigrade"
    source.mkdir()
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():
            target.symlink_to(os.readlink(REPO / name))
        elif (REPO / name).exists():  # tracked but deleted in the working tree: not part of the build
            shutil.copy2(REPO / name, target)
    done = subprocess.run(
        [str(root / "bin" / "pip"), "install", "-q", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"pip install of the checkout failed:\n{done.stdout}\n{done.stderr}"
    yield BareVenv(root, home)


def test_no_optional_extra_is_installed(bare: BareVenv) -> None:
    probe = bare.python(
        "import importlib, json\n"
        "found = []\n"
        f"for name in {list(OPTIONAL_PACKAGES)!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        found.append(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "print(json.dumps(found))"
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == []


def test_nothing_of_ours_lands_beside_a_users_modules(bare: BareVenv) -> None:
    site = bare.python("import sysconfig; print(sysconfig.get_paths()['purelib'])")
    top = {p.name for p in Path(site.stdout.strip()).iterdir()}
    assert "tardigrade" in top
    assert not top & {"workflows", "activities", "sandboxes", "examples", "tests", "bench"}


def test_help_and_the_demo_with_a_lost_sandbox(bare: BareVenv) -> None:
    helped = bare.tardigrade("--help")
    assert helped.returncode == 0 and "demo" in helped.stdout, helped.stderr
    done = bare.tardigrade("demo", "--crash-at-step", "22", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["status"] == "completed" and out["steps_completed"] == 40
    assert out["rehydrations"] == 1 and out["step_runs"] == 41


def test_worker_runs_a_shell_pipeline(bare: BareVenv, temporal_address: str, tmp_path: Path) -> None:
    queue = f"bare-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [str(bare.bin / "tardigrade"), "worker", "--address", temporal_address, "--task-queue", queue],
        cwd=bare.cwd,
        env={**os.environ, "TARDIGRADE_HOME": str(tmp_path / "worker-home")},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        pipeline = tmp_path / "shell.yaml"
        pipeline.write_text(
            "name: bare-shell\nsteps:\n"
            "  - {name: write, run: 'echo one > a.txt'}\n"
            "  - {name: append, run: 'echo two >> a.txt && test \"$(wc -l < a.txt)\" = 2'}\n"
        )
        done = bare.tardigrade(
            "run", str(pipeline), "--address", temporal_address, "--task-queue", queue, "--wait", "--json"
        )
        assert done.returncode == 0, f"{done.stderr}\nworker log:\n{log.read_text()}"
        out = json.loads(done.stdout)
        assert out["status"] == "completed" and out["steps_completed"] == 2
    finally:
        worker.terminate()
        worker.wait(timeout=30)


@pytest.mark.parametrize(
    ("store", "extra"),
    [("s3://bucket/prefix", "s3"), ("gs://bucket/prefix", "gcs"), ("az://account/container", "azure")],
)
def test_a_missing_store_extra_is_one_line_naming_it(bare: BareVenv, store: str, extra: str) -> None:
    done = bare.tardigrade("snapshot", "ls", "--store", store)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert f"pip install 'tardigrade-temporal[{extra}]'" in done.stderr


def test_encryption_without_cryptography_is_one_line_naming_the_extra(bare: BareVenv, tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    key = bare.tardigrade("snapshot", "keygen")
    assert key.returncode == 0, key.stderr
    done = bare.tardigrade(
        "snapshot",
        "create",
        str(folder),
        "--store",
        (tmp_path / "store").as_uri(),
        env={"TARDIGRADE_ENCRYPTION_KEY": key.stdout.strip().split("=", 1)[1]},
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "pip install 'tardigrade-temporal[encryption]'" in done.stderr


USER_ACTIVITIES = """
from temporalio import activity


@activity.defn
async def greet(name: str) -> str:
    return f"hello, {name}"
"""

USER_WORKFLOWS = """
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities import greet


@workflow.defn
class Greet:
    @workflow.run
    async def run(self, name: str) -> str:
        return await workflow.execute_activity(greet, name, start_to_close_timeout=timedelta(seconds=30))
"""

USER_MAIN = """
import asyncio, json, sys, uuid

from temporalio.client import Client
from temporalio.worker import Worker

from tardigrade import TardigradePlugin, load_pipeline, start_pipeline
from activities import greet
from workflows import Greet


async def main(address: str, pipeline: str) -> None:
    client = await Client.connect(address, plugins=[TardigradePlugin()])
    queue = "user-" + uuid.uuid4().hex[:8]
    async with Worker(client, task_queue=queue, workflows=[Greet], activities=[greet]):
        greeting = await client.execute_workflow(Greet.run, "tardigrade", id="greet-" + queue, task_queue=queue)
        handle = await start_pipeline(client, load_pipeline(pipeline), task_queue=queue)
        result = await handle.result()
    print(json.dumps({"greeting": greeting, "status": result.status, "steps": result.steps_completed}))


asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_a_user_project_with_its_own_activities_and_workflows(
    bare: BareVenv, temporal_address: str, tmp_path: Path
) -> None:
    """Temporal's templates put activities.py and workflows.py beside the worker: ours must not shadow them."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "activities.py").write_text(USER_ACTIVITIES)
    (project / "workflows.py").write_text(USER_WORKFLOWS)
    (project / "main.py").write_text(USER_MAIN)
    (project / "pipeline.yaml").write_text("name: user-pipeline\nsteps:\n  - {name: hi, run: echo hi > hi.txt}\n")
    done = bare.run(str(bare.bin / "python"), "main.py", temporal_address, "pipeline.yaml", cwd=project)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"greeting": "hello, tardigrade", "status": "completed", "steps": 1}
