"""The worker policy (issue 9, rows 1, 1b, 4 and 10): nothing a pipeline names makes the worker read, write or
connect outside what its operator granted, and credentials in URLs never reach workflow history.

Attacks first, each run for real: a Temporal dev server, bubblewrap sandboxes, a loopback socket standing in for
an attacker's endpoint. The worker's check is the authoritative one, so those tests give the worker a policy and
the client none (the client would refuse the same pipelines earlier, which has its own tests).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from tardigrade.client import connect, start_pipeline
from tardigrade.pipeline import Pipeline, PipelineError, load_pipeline, parse_pipeline
from tardigrade.plugin import TardigradePlugin
from tardigrade.sandboxes.policy import (
    AppliedPolicy,
    PolicyError,
    PolicyViolation,
    WorkerPolicy,
    load_policy,
    normalize_endpoint,
)
from tests.conftest import fast_timeouts, pipeline_from, run_cli

SECRET = "Zm9vYmFyLXNlY3JldC1zaWduYXR1cmU"  # what an attacker wants to see leave the worker

# -- helpers ----------------------------------------------------------------------------------------------------------


class Listener:
    """A real TCP listener on loopback recording every connection and byte it receives (an attacker's endpoint)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    while chunk := conn.recv(65536):
                        self.received += chunk
                        if b"\r\n\r\n" in self.received:
                            conn.sendall(b"HTTP/1.1 500 Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            break

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def listener() -> Iterator[Listener]:
    served = Listener()
    yield served
    served.close()


class PolicyWorker:
    """A worker (in this process) with an explicit policy, and a client that has none: what the worker refuses is
    refused by the worker, not earlier."""

    def __init__(self, address: str, home: Path) -> None:
        self.address = address
        self.home = home
        self.task_queue = f"policy-{uuid.uuid4().hex[:8]}"
        self.stack = contextlib.AsyncExitStack()

    async def start(self, policy: WorkerPolicy) -> Client:
        plugin = TardigradePlugin(state_dir=self.home / "w", policy=policy)
        worker_client = await connect(self.address, plugin=plugin)
        await self.stack.enter_async_context(Worker(worker_client, task_queue=self.task_queue))
        return await connect(self.address)  # the client's plugin reads TARDIGRADE_POLICY, which these tests unset


@pytest.fixture
async def policy_worker(
    temporal_address: str, tardigrade_home: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[PolicyWorker]:
    monkeypatch.delenv("TARDIGRADE_POLICY")
    pool = PolicyWorker(temporal_address, tardigrade_home)
    yield pool
    await pool.stack.aclose()


def pipeline(tmp_path: Path, **fields: Any) -> dict[str, Any]:
    return {
        "name": "policy",
        "timeouts": fast_timeouts(),
        "steps": [{"name": "write", "run": "mkdir -p out && echo 'import os' > out/evil.pth && echo hi > out/a.txt"}],
        **fields,
    }


async def refused_before_any_step(client: Client, handle: Any) -> ApplicationError:
    """The run failed with one non-retryable PolicyViolation from its first provisioning attempt; no step ran."""
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    cause = failed.value.cause
    while cause is not None and not isinstance(cause, ApplicationError):
        cause = cause.cause
    assert isinstance(cause, ApplicationError), failed.value
    assert cause.type == "PolicyViolation" and cause.non_retryable, cause
    scheduled = []
    async for event in client.get_workflow_handle(handle.id).fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled.append(event.activity_task_scheduled_event_attributes.activity_type.name)
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            assert event.activity_task_started_event_attributes.attempt == 1  # not retried
    assert "tardigrade.run_step" not in scheduled and scheduled.count("tardigrade.provision") == 1, scheduled
    return cause


def applied(tmp_path: Path, **policy: Any) -> AppliedPolicy:
    return AppliedPolicy.for_worker(
        WorkerPolicy.model_validate(policy),
        state_dirs=[tmp_path / "state"],
        own_stores=[(tmp_path / "state" / "snapshots").as_uri()],
    )


# -- row 1: file:// mounts, outputs and stores ------------------------------------------------------------------------


async def test_a_mount_of_proc_self_fails_the_run_before_any_step_with_one_message(
    policy_worker: PolicyWorker, tmp_path: Path, local_store: str
) -> None:
    client = await policy_worker.start(WorkerPolicy(file_roots=[str(tmp_path)]))
    loaded = pipeline_from(
        pipeline(tmp_path, manifest={"mounts": [{"source": "file:///proc/self", "path": "data"}]}), tmp_path
    )
    handle = await start_pipeline(client, loaded, task_queue=policy_worker.task_queue, store_url=local_store)
    cause = await refused_before_any_step(client, handle)
    assert cause.message.startswith("manifest.mounts[0].source: /proc/self")
    assert "(file_roots)" in cause.message and "add one to file_roots in the policy file" in cause.message
    assert cause.message.count("\n") == 0


async def test_a_mount_of_the_workers_credentials_folder_is_refused(
    policy_worker: PolicyWorker, tmp_path: Path, local_store: str
) -> None:
    aws = tmp_path / "worker-home" / ".aws"
    aws.mkdir(parents=True)
    (aws / "credentials").write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    data = tmp_path / "datasets"
    data.mkdir()
    client = await policy_worker.start(WorkerPolicy(file_roots=[str(data), str(tmp_path / "store")]))
    # Also through a symlink planted inside an allowed root: the real path is what counts.
    (data / "innocent").symlink_to(aws)
    for source in (aws.as_uri(), (data / "innocent").as_uri(), f"{data.as_uri()}/../worker-home/.aws"):
        loaded = pipeline_from(
            pipeline(tmp_path, manifest={"mounts": [{"source": source, "path": "data"}]},
                     steps=[{"name": "leak", "run": "cat data/credentials"}]),
            tmp_path,
        )  # fmt: skip
        handle = await start_pipeline(client, loaded, task_queue=policy_worker.task_queue, store_url=local_store)
        cause = await refused_before_any_step(client, handle)
        assert "manifest.mounts[0].source" in cause.message and SECRET not in cause.message


async def test_an_output_into_site_packages_is_refused_and_nothing_is_planted(
    policy_worker: PolicyWorker, tmp_path: Path, local_store: str
) -> None:
    site = tmp_path / "venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    results = tmp_path / "results"
    client = await policy_worker.start(WorkerPolicy(file_roots=[str(results), str(tmp_path / "store")]))
    loaded = pipeline_from(
        pipeline(tmp_path, outputs=[{"path": "out", "to": site.as_uri(), "after": "write"}]), tmp_path
    )
    handle = await start_pipeline(client, loaded, task_queue=policy_worker.task_queue, store_url=local_store)
    cause = await refused_before_any_step(client, handle)
    assert cause.message.startswith("outputs[0].to: ") and "file_roots" in cause.message
    assert list(site.rglob("*")) == []


async def test_a_file_store_outside_the_roots_is_refused(policy_worker: PolicyWorker, tmp_path: Path) -> None:
    client = await policy_worker.start(WorkerPolicy(file_roots=[str(tmp_path / "allowed")]))
    elsewhere = tmp_path / "elsewhere-store"
    loaded = pipeline_from(pipeline(tmp_path), tmp_path)
    handle = await start_pipeline(client, loaded, task_queue=policy_worker.task_queue, store_url=elsewhere.as_uri())
    cause = await refused_before_any_step(client, handle)
    assert cause.message.startswith("store: ") and "file_roots" in cause.message


async def test_allowed_roots_work_end_to_end(policy_worker: PolicyWorker, tmp_path: Path) -> None:
    data, results = tmp_path / "datasets", tmp_path / "results"
    (data / "in").mkdir(parents=True)
    (data / "in" / "x.csv").write_text("1,2\n")
    client = await policy_worker.start(WorkerPolicy(file_roots=[str(data), str(results), str(tmp_path / "store")]))
    loaded = pipeline_from(
        pipeline(
            tmp_path,
            manifest={"mounts": [{"source": (data / "in").as_uri(), "path": "data"}]},
            steps=[{"name": "copy", "run": "mkdir -p out && cp data/x.csv out/"}],
            outputs=[{"path": "out", "to": f"{results.as_uri()}/{{run}}"}],
        ),
        tmp_path,
    )
    store = (tmp_path / "store").as_uri()
    handle = await start_pipeline(client, loaded, task_queue=policy_worker.task_queue, store_url=store)
    result = await handle.result()
    assert result.status == "completed"
    assert [p.read_text() for p in results.rglob("x.csv")] == ["1,2\n"]


def test_the_workers_state_folder_and_dotdot_are_refused_even_inside_a_root(tmp_path: Path) -> None:
    policy = applied(tmp_path, file_roots=[str(tmp_path)])
    for url, use in [
        ((tmp_path / "state").as_uri(), "mount"),
        ((tmp_path / "state" / "sandboxes" / "x" / "fs").as_uri(), "output"),
        ((tmp_path / "state" / "scratch").as_uri(), "store"),
        (tmp_path.as_uri(), "mount"),  # holds the state folder
        (f"{tmp_path.as_uri()}/a/../b", "output"),
    ]:
        with pytest.raises(PolicyViolation):
            policy.check_url(url, "f", use)  # type: ignore[arg-type]
    policy.check_url((tmp_path / "state" / "snapshots").as_uri(), "store", "store")  # its own store
    policy.check_url((tmp_path / "data").as_uri(), "f", "mount")
    with pytest.raises(PolicyViolation, match="file_roots: none"):
        applied(tmp_path).check_url((tmp_path / "data").as_uri(), "f", "mount")


# -- row 1b: nothing undocumented reaches bubblewrap or an SDK ---------------------------------------------------------


def test_ro_binds_and_other_unknown_options_are_refused() -> None:
    base = {"name": "p", "steps": [{"name": "s", "run": "true"}]}
    with pytest.raises(PipelineError, match=r"sandbox\.options: unknown key 'ro_binds'.*local: no options"):
        parse_pipeline({**base, "sandbox": {"options": {"ro_binds": ["/home"]}}})
    with pytest.raises(PipelineError, match=r"unknown key 'image'.*e2b: template, lifetime, native_snapshot"):
        parse_pipeline({**base, "sandbox": {"provider": "e2b", "options": {"image": "x"}}})
    with pytest.raises(PipelineError, match=r"sandbox\.options: lifetime"):
        parse_pipeline({**base, "sandbox": {"provider": "modal", "options": {"lifetime": "forever"}}})
    ok = parse_pipeline({**base, "sandbox": {"provider": ["local", "modal"], "options": {"image": "python:3.12"}}})
    assert ok.sandbox.options == {"image": "python:3.12"}


def test_the_policy_can_narrow_the_providers(tmp_path: Path) -> None:
    policy = applied(tmp_path, providers=["e2b"])
    with pytest.raises(PolicyViolation, match=r"^sandbox\.provider: asks for local.*\(providers\)"):
        policy.check_providers(["local"])
    policy.check_providers(["local", "e2b"])  # the worker skips local and uses e2b


# -- row 4: a pipeline-chosen endpoint gets no request and no credential ----------------------------------------------


async def test_an_az_endpoint_the_policy_does_not_list_receives_nothing(
    policy_worker: PolicyWorker, tmp_path: Path, local_store: str, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", f"sv=2024-01-01&ss=b&srt=sco&sp=rl&sig={SECRET}")
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    client = await policy_worker.start(WorkerPolicy(file_roots=[str(tmp_path)]))
    endpoint = f"http://127.0.0.1:{listener.port}/devstoreaccount1"
    loaded = pipeline_from(
        pipeline(tmp_path, manifest={"mounts": [{"source": f"az://data/x?endpoint={endpoint}", "path": "data"}]}),
        tmp_path,
    )
    handle = await start_pipeline(client, loaded, task_queue=policy_worker.task_queue, store_url=local_store)
    cause = await refused_before_any_step(client, handle)
    assert "manifest.mounts[0].source: names endpoint http://127.0.0.1" in cause.message
    assert "endpoints.az" in cause.message
    assert listener.connections == 0 and SECRET.encode() not in listener.received


def test_endpoints_are_allowed_only_exactly_as_listed(tmp_path: Path) -> None:
    policy = applied(
        tmp_path, endpoints={"s3": ["https://minio.internal:9000/"], "az": ["http://127.0.0.1:10000/acct"]}
    )
    policy.check_url("s3://b/p?endpoint=HTTPS://MINIO.internal:9000", "store", "store")
    policy.check_url("az://c/p?endpoint=http://127.0.0.1:10000/acct", "store", "mount")
    for url in (
        "s3://b/p?endpoint=http://minio.internal:9000",  # plain http is another endpoint
        "s3://b/p?endpoint=https://minio.internal:9001",
        "az://c/p?endpoint=http://127.0.0.1:10000/other",
        "gs://b/p?endpoint=https://minio.internal:9000",
    ):
        with pytest.raises(PolicyViolation):
            policy.check_url(url, "store", "store")
    assert normalize_endpoint("https://h") == "https://h:443"


# -- row 10: credentials in URLs never reach history, and the CLI says why ---------------------------------------------


def _server_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return sorted(tmp_path_factory.getbasetemp().glob("temporal*/temporal.db*"))


@pytest.mark.parametrize(
    "fields",
    [
        {"manifest": {"mounts": [{"source": f"az://c/p?account=a&sv=1&sig={SECRET}", "path": "data"}]}},
        {"outputs": [{"path": "out", "to": f"s3://b/x?X-Amz-Signature={SECRET}"}]},
        {"store": f"az://c/p?account=a&token={SECRET}"},
        {"manifest": {"mounts": [{"source": f"s3://key:{SECRET}@bucket/x", "path": "data"}]}},
        {"outputs": [{"path": "out", "to": f"s3://b/x?endpoint=http://u:{SECRET}@127.0.0.1:9"}]},
    ],
)
async def test_credentials_in_urls_are_refused_before_anything_reaches_history(
    fields: dict[str, Any], temporal_address: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with pytest.raises(PipelineError) as refused:
        pipeline_from(pipeline(tmp_path, **fields), tmp_path)
    message = str(refused.value)
    assert SECRET not in message and "worker its credentials the usual way" in message
    # Built in Python, the same pipeline cannot be made either, so start_pipeline never gets it.
    with pytest.raises(ValueError):
        parse_pipeline(pipeline(tmp_path, **fields))
    client = await connect(temporal_address)
    workflow_id = f"cred-{uuid.uuid4().hex[:8]}"
    good = pipeline_from(pipeline(tmp_path), tmp_path)
    with pytest.raises(PipelineError, match="store carries a credential"):
        await start_pipeline(client, good, workflow_id=workflow_id, store_url=f"s3://b/p?sig={SECRET}")
    with pytest.raises(RPCError) as missing:
        await client.get_workflow_handle(workflow_id).describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND
    for path in _server_files(tmp_path_factory):
        assert SECRET.encode() not in path.read_bytes(), path


def test_the_json_schema_refuses_credentials_and_unknown_options_too() -> None:
    """Clients in other languages check pipelines against the schema before they start a run."""
    schema = jsonschema.Draft7Validator(Pipeline.model_json_schema(mode="validation"))
    base = {"name": "p", "steps": [{"name": "s", "run": "true"}]}
    for bad in (
        {"store": f"az://c?account=a&sig={SECRET}"},
        {"store": f"s3://k:{SECRET}@b/p"},
        {"manifest": {"mounts": [{"source": f"s3://b/p?X-Amz-Credential={SECRET}", "path": "d"}]}},
        {"outputs": [{"path": "out", "to": f"s3://b/p?endpoint=http://u:{SECRET}@h"}]},
        {"sandbox": {"options": {"ro_binds": ["/"]}}},
    ):
        assert not schema.is_valid({**base, **bad}), bad
    for good in ({"store": "/srv/store"}, {"store": "s3://b/p?endpoint=https://minio:9000&region=keyless"}):
        assert schema.is_valid({**base, **good}), good


def test_the_cli_shows_the_real_cause(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\nmanifest: {{mounts: [{{source: 'az://c/p?account=a&sig={SECRET}', path: d}}]}}\n"
                    "steps: [{name: s, run: 'true'}]\n")  # fmt: skip
    shown = run_cli("run", str(path), "--address", "127.0.0.1:1", home=home)
    assert shown.returncode == 2, shown.stderr
    assert "manifest.mounts[0].source: source carries a credential (query parameter 'sig')" in shown.stderr
    assert SECRET not in shown.stderr and "Traceback" not in shown.stderr
    path.write_text("name: p\nsteps: [{name: s, run: 'true'}]\n")
    shown = run_cli("run", str(path), "--store", f"s3://b/p?sig={SECRET}", "--address", "127.0.0.1:1", home=home)
    assert shown.returncode == 2 and "--store carries a credential" in shown.stderr, shown.stderr
    assert SECRET not in shown.stderr


# -- the client's own checks (with a policy) ------------------------------------------------------------------------


async def test_a_client_with_the_policy_refuses_before_starting(
    temporal_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(f"file_roots: ['{tmp_path / 'allowed'}']\n")
    monkeypatch.setenv("TARDIGRADE_POLICY", str(policy_file))
    client = await connect(temporal_address)
    workflow_id = f"early-{uuid.uuid4().hex[:8]}"
    loaded = pipeline_from(
        pipeline(tmp_path, manifest={"mounts": [{"source": "file:///etc", "path": "data"}]}), tmp_path
    )
    with pytest.raises(PolicyViolation, match=r"^manifest\.mounts\[0\]\.source: /etc is a mounted folder"):
        await start_pipeline(client, loaded, workflow_id=workflow_id, store_url=(tmp_path / "allowed").as_uri())
    with pytest.raises(RPCError):
        await client.get_workflow_handle(workflow_id).describe()


def test_source_files_must_stay_inside_the_pipeline_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TARDIGRADE_POLICY")
    outside = tmp_path / "secret.txt"
    outside.write_text(SECRET)
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine")
    (folder / "link.txt").symlink_to(outside)
    path = folder / "p.yaml"
    for source in ("../secret.txt", str(outside), "link.txt"):
        path.write_text(
            f"name: p\nmanifest: {{files: [{{path: a, source: '{source}'}}]}}\nsteps: [{{name: s, run: x}}]\n"
        )
        with pytest.raises(PipelineError, match=r"manifest\.files\[0\]\.source: .* outside the pipeline's folder"):
            load_pipeline(path)
    path.write_text("name: p\nmanifest: {files: [{path: a, source: ok.txt}]}\nsteps: [{name: s, run: x}]\n")
    load_pipeline(path)
    # A policy root lets the operator allow a shared folder.
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(f"file_roots: ['{tmp_path}']\n")
    monkeypatch.setenv("TARDIGRADE_POLICY", str(policy_file))
    path.write_text("name: p\nmanifest: {files: [{path: a, source: ../secret.txt}]}\nsteps: [{name: s, run: x}]\n")
    load_pipeline(path)


# -- the policy file --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("file_roots: [relative/dir]\n", "file_roots: Value error, [0] 'relative/dir' is not an absolute folder"),
        ("file_roots: ['/']\n", "would grant every file of the worker"),
        ("file_root: [/srv]\n", "file_root: unknown key (the policy takes file_roots, endpoints, providers"),
        ("endpoints: {s3: ['ftp://x']}\n", "endpoints.s3: [0] 'ftp://x' is not an http(s)://host[:port][/path] URL"),
        ("endpoints: {gcs: []}\n", "endpoints.gcs: unknown key"),
        ("providers: [docker]\n", "providers: Value error, unknown provider 'docker'"),
        ("file_roots: /srv\n", "file_roots: Input should be a valid list"),
        ("[1, 2]\n", "expected a mapping"),
        ("file_roots: [\n", "not valid YAML"),
    ],
)
def test_a_bad_policy_file_is_one_line_naming_the_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as bad:
        load_policy(path)
    message = str(bad.value).replace("Value error, ", "")
    assert str(path) in message and expected.replace("Value error, ", "") in message, message
    assert "\n" not in message


def test_tardigrade_worker_refuses_a_bad_policy_file_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("file_roots: [relative]\n")
    home = tmp_path / "home"
    home.mkdir()
    shown = run_cli("worker", "--policy", str(path), "--address", "127.0.0.1:1", home=home, timeout=60)
    assert shown.returncode == 2, shown.stderr
    assert shown.stderr.strip().count("\n") == 0 and "file_roots" in shown.stderr and str(path) in shown.stderr
    env = {"TARDIGRADE_POLICY": str(path)}
    shown = run_cli("worker", "--address", "127.0.0.1:1", home=home, env=env, timeout=60)
    assert shown.returncode == 2 and "file_roots" in shown.stderr, shown.stderr


def test_the_default_policy_grants_only_the_workers_own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TARDIGRADE_POLICY")
    monkeypatch.setenv("TARDIGRADE_HOME", str(tmp_path / "home"))
    plugin = TardigradePlugin(state_dir=tmp_path / "home" / "w")
    assert plugin.policy == WorkerPolicy()
    activities = plugin.activities_for("q")
    own = (tmp_path / "home" / "snapshots").as_uri()
    activities.policy.check_url(own, "store", "store")
    for url, use in [(own, "mount"), ((tmp_path / "x").as_uri(), "store"), (Path(sys.prefix).as_uri(), "output")]:
        with pytest.raises(PolicyViolation):
            activities.policy.check_url(url, "f", use)  # type: ignore[arg-type]
    assert os.environ.get("TARDIGRADE_POLICY") is None
