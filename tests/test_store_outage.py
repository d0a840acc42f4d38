"""A store outage makes a run wait, not fail (issue 11, item 4; durability contract point 9).

The S3 endpoint goes away in the middle of a run - connections refused - for about 20 seconds and comes back on the
same port. The run must wait (its `status` says "waiting for the store: ..."), keep its sandbox (no rehydration),
and complete with the same workspace digest as a run where nothing went wrong, each step's effect exactly once.
An outage longer than the pipeline's ``timeouts.outage`` fails the run, saying so.

moto keeps its objects in memory, so restarting it would lose the bucket. The endpoint the worker talks to is
therefore a TCP forwarder in front of moto, and that is what is stopped and started again on the same port: the
worker sees exactly an S3 endpoint that refuses connections and then answers again, while the objects survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from temporalio.client import WorkflowFailureError

from tardigrade.client import start_pipeline
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import FileStore, StoreError, StoreUnavailable, open_store
from tardigrade.sandboxes.stores.retry import RetryPolicy
from tardigrade.workflows.pipeline import PipelineWorkflow
from tardigrade.workflows.state import RunResult, RunStatus
from tests.conftest import InProcessWorkers, fast_timeouts, pipeline_from, wait_for
from tests.emulators import AZURITE_ACCOUNT, AZURITE_KEY, Emulator, _free_port

STEPS = 6
OUTAGE_SECONDS = 20.0


class Forwarder:
    """A TCP forwarder from a fixed loopback port to an upstream one, which can be stopped and started again:
    stopped, the port refuses connections and every open one is cut."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = _free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            cut, self._open = self._open, set()
        for conn in cut:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def s3_through_forwarder(s3_bucket: str, moto_server: Emulator, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The store URL (the in-process worker finds the endpoint in AWS_ENDPOINT_URL) and its forwarder."""
    forwarder = Forwarder(int(urlsplit(moto_server.endpoint).port or 0))
    forwarder.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{forwarder.port}")
    yield f"s3://{s3_bucket}/runs", forwarder
    forwarder.stop()


def _pipeline(tmp_path: Path, name: str, **timeouts: str) -> Any:
    return pipeline_from(
        {
            "name": name,
            "timeouts": fast_timeouts() | timeouts,
            "manifest": {"directories": ["out"]},
            "steps": [
                {"name": f"step {i}", "run": f"echo {i} >> out/log.txt; seq {i * 3000} > out/n{i}; sleep 1"}
                for i in range(1, STEPS + 1)
            ],
        },
        tmp_path,
    )


async def test_a_store_outage_makes_the_run_wait_and_then_complete(
    workers: InProcessWorkers, s3_through_forwarder: tuple[str, Forwarder], tmp_path: Path
) -> None:
    store_url, forwarder = s3_through_forwarder
    client = await workers.start()
    reference: RunResult = await (
        await start_pipeline(
            client, _pipeline(tmp_path, "reference"), task_queue=workers.task_queue, store_url=store_url
        )
    ).result()

    handle = await start_pipeline(
        client, _pipeline(tmp_path, "outage"), task_queue=workers.task_queue, store_url=store_url
    )

    async def at_step_three() -> bool:
        status: RunStatus = await handle.query(PipelineWorkflow.status)
        return (status.current_step or 0) >= 3

    await wait_for(at_step_three, timeout=60)
    forwarder.stop()
    down_since = time.monotonic()

    async def waiting() -> RunStatus | None:
        status: RunStatus = await handle.query(PipelineWorkflow.status)
        return status if status.waiting_for else None

    status = await wait_for(waiting, timeout=OUTAGE_SECONDS)
    assert status.phase == "waiting for the store"
    assert status.waiting_for is not None and status.waiting_for.startswith("waiting for the store: StoreUnavailable")
    assert "cannot reach" in status.waiting_for
    await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_since)))
    status = await handle.query(PipelineWorkflow.status)
    assert status.phase not in ("failed", "completed"), "the run neither failed nor got past the outage"
    forwarder.start()

    result: RunResult = await asyncio.wait_for(handle.result(), 120)
    assert result.status == "completed"
    assert result.rehydrations == 0, "a store outage is not a lost sandbox"
    assert result.workspace_digest == reference.workspace_digest
    assert result.final_snapshot is not None
    engine = SnapshotEngine(open_store(store_url))
    try:
        engine.restore(result.final_snapshot, tmp_path / "final")
        assert engine.verify(result.final_snapshot).ok
    finally:
        engine.close()
    log = (tmp_path / "final" / "workspace" / "out" / "log.txt").read_text()
    assert log == "".join(f"{i}\n" for i in range(1, STEPS + 1)), "each step took effect exactly once"


async def test_an_outage_longer_than_timeouts_outage_fails_the_run(
    workers: InProcessWorkers, s3_through_forwarder: tuple[str, Forwarder], tmp_path: Path
) -> None:
    store_url, forwarder = s3_through_forwarder
    client = await workers.start()
    handle = await start_pipeline(
        client, _pipeline(tmp_path, "gives-up", outage="4s"), task_queue=workers.task_queue, store_url=store_url
    )

    async def at_step_two() -> bool:
        status: RunStatus = await handle.query(PipelineWorkflow.status)
        return (status.current_step or 0) >= 2

    await wait_for(at_step_two, timeout=60)
    forwarder.stop()
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), 90)
    cause = failure.value.cause
    assert "gave up waiting for the snapshot store" in str(cause) and "timeouts.outage is 4s" in str(cause)


# -- which store errors are outages ------------------------------------------------------------------------------

QUICK = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.01)


def _cloud_store(kind: str, bucket: str) -> Any:
    if kind == "s3":
        from tardigrade.sandboxes.stores.s3 import S3Store

        return S3Store(bucket, "p", retry=QUICK)
    if kind == "gcs":
        from tardigrade.sandboxes.stores.gcs import GCSStore

        return GCSStore(bucket, "p", retry=QUICK)
    from tardigrade.sandboxes.stores.azure import AzureBlobStore

    return AzureBlobStore(bucket, "p", retry=QUICK)


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_an_unreachable_store_is_an_outage_and_a_missing_bucket_is_not(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused connections, after the client's retries, are `StoreUnavailable` (the run waits); a bucket that does
    not exist is a plain `StoreError` (the run fails at once: no retry can create it)."""
    bucket = request.getfixturevalue({"s3": "s3_bucket", "gcs": "gcs_bucket", "azure": "azure_container"}[kind])
    with pytest.raises(StoreError) as missing:
        _cloud_store(kind, "tg-no-such-bucket-here")
    assert not isinstance(missing.value, StoreUnavailable), missing.value

    store = _cloud_store(kind, bucket)
    store.put("x", b"x")
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    if kind == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    elif kind == "gcs":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", dead)
    else:
        monkeypatch.setenv(
            "AZURE_STORAGE_CONNECTION_STRING",
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={dead}/{AZURITE_ACCOUNT};",
        )
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        _cloud_store(kind, bucket)
    store.close()


def test_a_full_folder_store_is_an_outage(tmp_path: Path) -> None:
    """ENOSPC from a folder store waits like an unreachable bucket: someone frees space, the run goes on."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        store = FileStore(mount / "store")
        with pytest.raises(StoreUnavailable, match="is full"):
            store.put("big", b"x" * (1 << 20))
        assert store.put("small", b"x") is True, "a write that fits still works"
    finally:
        subprocess.run(["umount", str(mount)], check=True)
