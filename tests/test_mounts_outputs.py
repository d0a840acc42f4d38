"""Data in and out, end to end on a real Temporal dev server: mounts from moto (S3), fake-gcs-server and azurite,
outputs published exactly once, clear errors for bad mounts, and a run that fails over from its lost local
sandbox to a (fake) E2B sandbox from the portable snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker

from tardigrade.client import connect, start_pipeline
from tardigrade.pipeline import PipelineError, load_pipeline
from tardigrade.plugin import TardigradePlugin
from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.e2b import E2BProvider
from tardigrade.sandboxes.faults import DestroySandboxDuringStep
from tardigrade.sandboxes.provider import FaultInjector, Sandbox, SandboxProvider
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tardigrade.workflows.state import RunResult
from tests.conftest import fast_timeouts, pipeline_from
from tests.emulators import AZURITE_KEY, S3_ACCESS_KEY, S3_SECRET_KEY, azure_service, gcs_client, s3_client
from tests.history import activity_runs, history_json, step_runs
from tests.provider_fakes import FakeCloud, bind_e2b, fakes_unavailable

DATA = {"ds/a.csv": b"id,v\n1,10\n2,20\n", "ds/sub/b.csv": b"id,w\n3,30\n", "ds/ignore.skip": b"not me"}
CREDENTIAL_MARKERS = (S3_SECRET_KEY, S3_ACCESS_KEY, AZURITE_KEY, "AWS_", "AZURE_STORAGE", "STORAGE_EMULATOR_HOST")


class Workers:
    """In-process workers whose plugins get providers of the test's choosing."""

    def __init__(self, address: str, home: Path) -> None:
        self.address = address
        self.home = home
        self.task_queue = f"data-{uuid.uuid4().hex[:8]}"
        self.stack = contextlib.AsyncExitStack()

    async def start(
        self, *, providers: Mapping[str, SandboxProvider] | None = None, fault_injector: FaultInjector | None = None
    ) -> Client:
        plugin = TardigradePlugin(state_dir=self.home / "w", providers=providers, fault_injector=fault_injector)
        client = await connect(self.address, plugin=plugin)
        await self.stack.enter_async_context(Worker(client, task_queue=self.task_queue))
        return client


@pytest.fixture
async def data_workers(temporal_address: str, tardigrade_home: Path) -> AsyncIterator[Workers]:
    pool = Workers(temporal_address, tardigrade_home)
    yield pool
    await pool.stack.aclose()


def upload(kind: str, bucket: str) -> None:
    for key, body in DATA.items():
        if kind == "s3":
            s3_client().put_object(Bucket=bucket, Key=key, Body=body)
        elif kind == "gcs":
            gcs_client().bucket(bucket).blob(key).upload_from_file(io.BytesIO(body), size=len(body))
        else:
            azure_service().get_container_client(bucket).upload_blob(key, body)


class ScanAtStep:
    """A provider hook that, while step ``step`` runs, reads every file the local sandbox can see through its own
    folders (its filesystem and its mounts) and records any credential marker it finds."""

    def __init__(self, step: int, then: FaultInjector | None = None) -> None:
        self.step = step
        self.then = then
        self.scanned = 0
        self.found: list[str] = []

    async def __call__(self, sandbox: Sandbox, labels: Mapping[str, str], exited: Awaitable[Any]) -> None:
        if labels.get("step") == str(self.step) and isinstance(sandbox, LocalSandbox) and not self.scanned:
            for folder in (sandbox.fs, sandbox.dir / "mounts"):
                for path in folder.rglob("*"):
                    if path.is_file() and not path.is_symlink():
                        self.scanned += 1
                        text = path.read_bytes().decode(errors="replace")
                        self.found += [f"{path}: {m}" for m in CREDENTIAL_MARKERS if m in text]
        if self.then is not None:
            await self.then(sandbox, labels, exited)


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
async def test_mount_round_trip(
    kind: str, request: pytest.FixtureRequest, data_workers: Workers, local_store: str, tmp_path: Path
) -> None:
    bucket = request.getfixturevalue({"s3": "s3_bucket", "gcs": "gcs_bucket", "azure": "azure_container"}[kind])
    upload(kind, bucket)
    source = {"s3": f"s3://{bucket}/ds", "gcs": f"gs://{bucket}/ds", "azure": f"az://{bucket}/ds"}[kind]
    expected = "".join(
        f"{hashlib.sha256(DATA[k]).hexdigest()}  data/{k.removeprefix('ds/')}\n" for k in ("ds/a.csv", "ds/sub/b.csv")
    )
    loaded = pipeline_from(
        {
            "name": f"mount-{kind}",
            "timeouts": fast_timeouts(),
            "manifest": {
                "mounts": [{"source": source, "path": "data", "exclude": ["*.skip"]}],
                "snapshot": {"include": ["/workspace", "/home/sandbox"]},
            },
            "steps": [
                {"name": "read", "run": "sha256sum data/a.csv data/sub/b.csv > seen-1.txt; ls -R data > tree.txt;"
                 " (echo x > data/new.txt) 2>/dev/null && echo writable > ro.txt || echo refused > ro.txt;"
                 " (chmod u+w data) 2>/dev/null || echo chmod-refused >> ro.txt; env > env.txt"},
                {"name": "lost here", "run": "sleep 1; sha256sum data/a.csv data/sub/b.csv > seen-2.txt"},
                {"name": "after", "run": "cat /proc/self/environ | tr '\\0' '\\n' > environ.txt"},
            ],
        },
        tmp_path,
    )  # fmt: skip
    scan = ScanAtStep(3)
    destroy = DestroySandboxDuringStep(2, after_seconds=0.3)

    async def hooks(sandbox: Sandbox, labels: Mapping[str, str], exited: Awaitable[Any]) -> None:
        await destroy(sandbox, labels, exited)
        await scan(sandbox, labels, exited)

    client = await data_workers.start(fault_injector=hooks)
    handle = await start_pipeline(client, loaded, task_queue=data_workers.task_queue, store_url=local_store)
    result = await handle.result()

    assert result.status == "completed" and result.rehydrations == 1 and destroy.fired == 1
    engine = SnapshotEngine(open_store(result.store))
    assert result.final_snapshot is not None
    workspace = tmp_path / "final"
    engine.restore(result.final_snapshot, workspace)
    ws = workspace / "workspace"
    assert (ws / "seen-1.txt").read_text() == expected
    assert (ws / "seen-2.txt").read_text() == expected, "the rehydrated sandbox got the mount again"
    assert "ignore.skip" not in (ws / "tree.txt").read_text()
    assert (ws / "ro.txt").read_text() == "refused\nchmod-refused\n", "ro is enforced by the kernel"
    assert not [e.path for e in engine.entries(result.final_snapshot) if e.path.startswith("workspace/data")], (
        "mounted data is never in a snapshot"
    )
    # No credential in the sandbox: not in its environment, not in any file it can see, not in history.
    for name in ("env.txt", "environ.txt"):
        text = (ws / name).read_text()
        assert not [m for m in CREDENTIAL_MARKERS if m in text], f"{name}: {text}"
    assert scan.scanned > 0 and scan.found == []
    history = await history_json(client, handle.id)
    assert not [m for m in (S3_SECRET_KEY, S3_ACCESS_KEY, AZURITE_KEY) if m in history]
    runs = await activity_runs(client, handle.id)
    assert [r.name for r in runs].count("tardigrade.provision") == 2


async def test_outputs_are_published_exactly_once_across_retries(
    s3_bucket: str, data_workers: Workers, local_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = s3_client()
    s3.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    try:
        await _outputs_exactly_once(s3, s3_bucket, data_workers, local_store, tmp_path, monkeypatch)
    finally:  # the bucket fixture deletes current objects only; give moto back every version too
        listed = s3.list_object_versions(Bucket=s3_bucket)
        for v in [*listed.get("Versions", []), *listed.get("DeleteMarkers", [])]:
            s3.delete_object(Bucket=s3_bucket, Key=v["Key"], VersionId=v["VersionId"])


async def _outputs_exactly_once(
    s3: Any, s3_bucket: str, data_workers: Workers, local_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = pipeline_from(
        {
            "name": "outputs",
            "timeouts": fast_timeouts(),
            "steps": [
                {"name": "build", "run": "mkdir -p out && echo first > out/a.txt"},
                {"name": "flaky", "retries": 1, "retry_backoff": "0.1s",
                 "run": "echo attempt-$TARDIGRADE_ATTEMPT > out/b.txt; echo more >> out/a.txt;"
                        " test $TARDIGRADE_ATTEMPT -ge 2"},
                {"name": "finish", "run": "echo done > out/c.txt"},
            ],
            "outputs": [
                {"path": "out", "to": f"s3://{s3_bucket}/runs/{{run}}/"},
                {"path": "out/a.txt", "to": f"s3://{s3_bucket}/steps/{{run}}/{{step}}/", "after": "flaky"},
            ],
        },
        tmp_path,
    )  # fmt: skip
    # The network drops after the first object of the first upload: the activity is retried and must neither
    # duplicate nor overwrite what already arrived.
    from tardigrade.sandboxes.outputs import open_destination as real_open

    failures = {"left": 1}

    def flaky_open(url: str, index: int) -> Any:
        store = real_open(url, index)
        if failures["left"] and "/runs/" in url:
            failures["left"] -= 1
            real_put_file = store.put_file
            puts = {"n": 0}

            def put_file(key: str, path: Path) -> bool:
                puts["n"] += 1
                if puts["n"] == 2:
                    raise ConnectionError("injected: connection reset by peer")
                return real_put_file(key, path)

            store.put_file = put_file  # type: ignore[method-assign]
        return store

    monkeypatch.setattr("tardigrade.activities.sandbox.open_destination", flaky_open)
    client = await data_workers.start()
    handle = await start_pipeline(client, loaded, task_queue=data_workers.task_queue, store_url=local_store)
    result = await handle.result()

    assert failures["left"] == 0
    versions = s3.list_object_versions(Bucket=s3_bucket).get("Versions", [])
    by_key: dict[str, int] = {}
    for v in versions:
        by_key[v["Key"]] = by_key.get(v["Key"], 0) + 1
    assert by_key and all(n == 1 for n in by_key.values()), f"every object written once: {by_key}"

    def read(key: str) -> bytes:
        return bytes(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())

    run = handle.id
    assert read(f"runs/{run}/a.txt") == b"first\nmore\n", "the failed attempt's append was rolled back first"
    assert read(f"runs/{run}/b.txt") == b"attempt-2\n" and read(f"runs/{run}/c.txt") == b"done\n"
    assert read(f"steps/{run}/2/a.txt") == b"first\nmore\n"
    assert not any(b"attempt-1" in read(v["Key"]) for v in versions), "nothing of the failed attempt is published"
    assert {f"runs/{run}/_tardigrade/{result.final_snapshot}.json", f"runs/{run}/a.txt"} <= set(by_key)
    end = [o for o in result.outputs if o.step is None]
    assert len(end) == 1 and end[0].files == 3 and end[0].created == 2, "the retry found one object in place"
    assert [o.step for o in result.outputs] == [1, None]
    runs = await activity_runs(client, handle.id)
    assert step_runs(runs) == {1: 1, 2: 2, 3: 1}


def test_bad_mount_urls_are_refused_when_the_pipeline_is_loaded(tmp_path: Path) -> None:
    base: dict[str, Any] = {"name": "bad", "steps": [{"name": "s", "run": "true"}]}
    cases = [
        ({"source": "ftp://host/data", "path": "data"}, "manifest.mounts[0].source", "unknown scheme 'ftp'"),
        ({"source": "s3://", "path": "data"}, "manifest.mounts[0].source", "names no bucket"),
        ({"source": "s3://key:secret@bucket/x", "path": "data"}, "manifest.mounts[0].source", "credentials"),
        ({"source": "s3://b/x", "path": "/etc/data"}, "manifest.mounts[0].path", "system folder"),
    ]
    for mount, field, message in cases:
        (tmp_path / "p.yaml").write_text(__import__("yaml").safe_dump({**base, "manifest": {"mounts": [mount]}}))
        with pytest.raises(PipelineError) as info:
            load_pipeline(tmp_path / "p.yaml")
        assert field in str(info.value) and message in str(info.value), str(info.value)
        assert "secret" not in str(info.value).replace("credentials", "")


async def _fails_before_any_step(
    workers: Workers, loaded: Any, store: str, monkeypatch: pytest.MonkeyPatch | None = None
) -> str:
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=store)
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), 60)
    runs = await activity_runs(client, handle.id)
    assert "tardigrade.run_step" not in [r.name for r in runs], "no step may run"
    assert [r.name for r in runs].count("tardigrade.provision") == 1, "not retried: it cannot get better"
    cause = info.value.cause
    return f"{cause} {getattr(cause, 'cause', '')}"


async def test_a_missing_bucket_fails_before_any_step(
    s3_bucket: str, data_workers: Workers, local_store: str, tmp_path: Path
) -> None:
    missing = f"{s3_bucket}-gone"
    loaded = pipeline_from(
        {"name": "nobucket", "manifest": {"mounts": [{"source": f"s3://{missing}/x", "path": "data"}]},
         "steps": [{"name": "s", "run": "true"}]}, tmp_path,
    )  # fmt: skip
    text = await _fails_before_any_step(data_workers, loaded, local_store)
    assert "MountError" in text and "manifest.mounts[0]" in text and f"bucket '{missing}' does not exist" in text


async def test_no_credentials_on_the_worker_fails_before_any_step(
    s3_bucket: str, data_workers: Workers, local_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    loaded = pipeline_from(
        {"name": "nocreds", "manifest": {"mounts": [{"source": f"s3://{s3_bucket}/x", "path": "data"}]},
         "steps": [{"name": "s", "run": "true"}]}, tmp_path,
    )  # fmt: skip
    text = await _fails_before_any_step(data_workers, loaded, local_store)
    assert "MountError" in text and "no AWS credentials found" in text and "manifest.mounts[0]" in text


# -- switching providers --------------------------------------------------------------------------------------

FAILOVER_STEPS = [
    {"name": "venv", "run": "mkdir -p .venv/bin && ln -s /usr/bin/python3 .venv/bin/python && echo 1 >> log.txt"},
    {"name": "data", "run": "cp data/2024/jan.csv copy.csv && echo 2 >> log.txt"},
    {"name": "lost here", "run": "sleep 1; echo 3 >> log.txt"},
    {"name": "use data", "run": "(echo x > data/x) 2>/dev/null && echo writable > ro.txt || echo refused > ro.txt;"
     " .venv/bin/python -c 'print(4)' >> log.txt"},
    {"name": "finish", "run": "echo 5 >> log.txt; stat -c %u copy.csv > owner.txt"},
]  # fmt: skip


async def test_a_lost_local_sandbox_fails_over_to_e2b_from_the_portable_snapshot(
    data_workers: Workers, local_store: str, tmp_path: Path
) -> None:
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    dataset = tmp_path / "dataset" / "2024"
    dataset.mkdir(parents=True)
    (dataset / "jan.csv").write_text("a,b\n1,2\n")
    spec = {
        "name": "failover",
        "timeouts": fast_timeouts(),
        "sandbox": {"provider": ["local", "e2b"]},
        "manifest": {"mounts": [{"source": (tmp_path / "dataset").as_uri(), "path": "data"}]},
        "steps": FAILOVER_STEPS,
    }
    reference = pipeline_from({**spec, "name": "failover-reference", "sandbox": {"provider": "local"}}, tmp_path)
    loaded = pipeline_from(spec, tmp_path)
    cloud = FakeCloud(tmp_path / "cloud")
    destroy = DestroySandboxDuringStep(3, after_seconds=0.3, times=0)  # armed after the reference run
    providers: dict[str, SandboxProvider] = {
        "local": LocalSandboxProvider(data_workers.home / "local", worker_id="failover", fault_injector=destroy),
        "e2b": E2BProvider(data_workers.home / "e2b", sdk=bind_e2b(cloud)),
    }
    try:
        client = await data_workers.start(providers=providers)
        ref = await (await start_pipeline(client, reference, task_queue=data_workers.task_queue,
                                          store_url=local_store)).result()  # fmt: skip
        destroy.remaining = 1
        handle = await start_pipeline(client, loaded, task_queue=data_workers.task_queue, store_url=local_store)
        result: RunResult = await handle.result()
    finally:
        cloud.close()
    assert ref.providers == ["local"] and ref.rehydrations == 0
    assert destroy.fired == 1 and result.rehydrations == 1
    assert result.providers == ["local", "e2b"], "rehydrated on the next provider of the list"
    assert result.workspace_digest == ref.workspace_digest, "the same files as a run that never failed"
    workspace = tmp_path / "final"
    SnapshotEngine(open_store(result.store)).restore(result.final_snapshot or "", workspace)
    assert (workspace / "workspace" / "log.txt").read_text() == "1\n2\n3\n4\n5\n"
    assert (workspace / "workspace" / "ro.txt").read_text() == "refused\n", "the mount is read-only on E2B too"
    assert (workspace / "workspace" / "owner.txt").read_text() == "1000\n"
    runs = await activity_runs(client, handle.id)
    provisions = [r for r in runs if r.name == "tardigrade.provision"]
    assert [p.input["avoid_providers"] for p in provisions] == [[], ["local"]]
    assert "preferring a provider other than local" in (provisions[1].summary or "")
    assert step_runs(runs) == {1: 1, 2: 1, 3: 2, 4: 1, 5: 1}
    e2b_runs = [r for r in runs if r.input.get("sandbox", {}).get("provider") == "e2b"]
    assert e2b_runs and all(r.input["sandbox"]["host_bound"] is False for r in e2b_runs)
    assert all(r.input["sandbox"]["task_queue"] == data_workers.task_queue for r in e2b_runs), (
        "remote sandboxes are served from the shared queue: any worker can attach"
    )
