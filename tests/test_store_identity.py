"""A snapshot reported as created can always be restored (issue 11, item 1), on every kind of store.

Worker-local caches (the blob index, the stat cache, cached trees) used to be keyed by the store's URL, so a URL
that came to name another store - a second endpoint with a bucket of the same name, an emptied or recreated
bucket, a deleted prefix, a deleted pack - made `create` succeed with a tree pointing at packs the store did not
hold, and `restore` fail later. Each test here builds that situation against a real store (folder, moto,
fake-gcs-server, azurite), takes a snapshot through caches that remember the old store, and then restores it with
a fresh engine and verifies every object it needs.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.store_keys import IDENTITY, PACKS
from tardigrade.sandboxes.stores import ObjectStore, open_store
from tardigrade.sandboxes.stores.identity import ensure_identity, read_identity
from tests.emulators import (
    _MOTO_ATOMIC_WRITES,
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    _azurite_command,
    _fake_gcs_binary,
    _free_port,
    _run,
    azure_service,
    gcs_client,
    s3_client,
)

SMALL_FILES = 40


def _fill(root: Path, tag: str, count: int = SMALL_FILES) -> None:
    """A workspace whose files land in packs: small files, and one large one that is chunked."""
    (root / tag).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / tag / f"f{i}.txt").write_bytes(f"{tag} file {i}\n".encode() * 50)
    (root / tag / "big.bin").write_bytes(os.urandom(3 << 20))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _engine(url: str, scratch: Path) -> SnapshotEngine:
    return SnapshotEngine(open_store(url), scratch_dir=scratch, encryption=None)


def _assert_restorable(url: str, snapshot_id: str, workspace: Path, tmp_path: Path) -> None:
    """Restore with an engine that has no caches at all, as another worker or the CLI would, and verify."""
    fresh = _engine(url, tmp_path / f"fresh-{snapshot_id[:8]}")
    try:
        target = tmp_path / f"restored-{snapshot_id[:8]}"
        fresh.restore(snapshot_id, target)
        assert _files(target) == _files(workspace)
        report = fresh.verify(snapshot_id)
        assert report.ok, report.problems
    finally:
        fresh.close()


def _delete_all(store: ObjectStore, prefix: str = "") -> int:
    keys = [info.key for info in store.list(prefix)]
    for key in keys:
        store.delete(key)
    return len(keys)


# -- identity ----------------------------------------------------------------------------------------------------


def test_identity_is_created_once_and_never_replaced(store_url: str) -> None:
    store = open_store(store_url)
    try:
        assert read_identity(store) is None
        seen: list[str] = []
        threads = [threading.Thread(target=lambda: seen.append(ensure_identity(store))) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(seen)) == 1, "racing openers must agree on one identity"
        # The write is create-only on every backend: a second writer cannot replace it.
        assert store.put(IDENTITY, b'{"format": "tardigrade-store/1", "id": "' + b"0" * 32 + b'"}') is False
        assert read_identity(store) == seen[0]
        engine = SnapshotEngine(store, encryption=None)
        assert engine.identity == seen[0]
        engine.close()
    finally:
        store.close()


def test_a_foreign_identity_object_is_a_clear_error(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    store.put(IDENTITY, b"not ours")
    with pytest.raises(Exception, match="not a Tardigrade store identity"):
        SnapshotEngine(store, encryption=None)


# -- the store behind the URL changes ----------------------------------------------------------------------------


@contextmanager
def _another_store_behind(url: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``url`` name a different, empty store: a second endpoint holding a bucket of the same name (or, for a
    folder, a new folder at the same path)."""
    if kind == "file":
        folder = Path(url.removeprefix("file://"))
        folder.rename(folder.with_name("store-before"))
        yield
        return
    port = _free_port()
    workdir = tmp_path / f"second-{kind}"
    workdir.mkdir()
    bucket = url.split("/")[2]
    if kind == "s3":
        cmd = [sys.executable, "-c", _MOTO_ATOMIC_WRITES, "-H", "127.0.0.1", "-p", str(port)]
        with _run("moto_server-2", cmd, port, "/moto-api/", workdir) as emu:
            monkeypatch.setenv("AWS_ENDPOINT_URL", emu.endpoint)
            client = s3_client()
            client.create_bucket(Bucket=bucket)
            client.close()
            yield
    elif kind == "gcs":
        binary = _fake_gcs_binary()
        assert binary is not None
        cmd = [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
        cmd += ["-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"]
        with _run("fake-gcs-server-2", cmd, port, "/storage/v1/b", workdir) as emu:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.endpoint)
            client = gcs_client()
            client.create_bucket(bucket)
            client.close()
            yield
    else:
        base = _azurite_command()
        assert base is not None
        cmd = [*base, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence"]
        cmd += ["--disableTelemetry", "--skipApiVersionCheck", "--loose", "--silent"]
        with _run("azurite-2", cmd, port, f"/{AZURITE_ACCOUNT}?comp=list", workdir) as emu:
            monkeypatch.setenv(
                "AZURE_STORAGE_CONNECTION_STRING",
                f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={emu.endpoint}/{AZURITE_ACCOUNT};",
            )
            service = azure_service()
            service.create_container(bucket)
            service.close()
            yield


def _kind(url: str) -> str:
    return {"file": "file", "s3": "s3", "gs": "gcs", "az": "azure"}[url.split(":", 1)[0]]


def test_same_url_another_store(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's reproduction: a snapshot to one store, then the same files to another store behind the same
    URL, with the caches (same scratch folder, same stat cache) of the first."""
    workspace, scratch, cache = tmp_path / "ws", tmp_path / "scratch", tmp_path / "statcache"
    _fill(workspace, "a")
    first = _engine(store_url, scratch)
    before = first.create(workspace, cache_path=cache)
    first_identity = first.identity
    first.close()

    with _another_store_behind(store_url, _kind(store_url), tmp_path, monkeypatch):
        second = _engine(store_url, scratch)
        try:
            assert second.identity != first_identity
            after = second.create(workspace, cache_path=cache)
            assert after.digest == before.digest
            assert after.stats is not None and after.stats.files_read > 0, "nothing was uploaded to the new store"
        finally:
            second.close()
        _assert_restorable(store_url, after.id, workspace, tmp_path)


def test_emptied_store(store_url: str, tmp_path: Path) -> None:
    """A long-lived engine (a worker) whose store is emptied - a deleted prefix, a recreated bucket."""
    workspace, cache = tmp_path / "ws", tmp_path / "statcache"
    _fill(workspace, "a")
    engine = _engine(store_url, tmp_path / "scratch")
    try:
        before = engine.create(workspace, cache_path=cache)
        old_identity = engine.identity
        assert _delete_all(engine.raw_store) > 0
        unchanged = engine.create(workspace, cache_path=cache)  # nothing changed in the workspace
        assert engine.identity != old_identity
        assert unchanged.digest == before.digest
        _assert_restorable(store_url, unchanged.id, workspace, tmp_path)

        _fill(workspace, "b")
        _delete_all(engine.raw_store)
        edited = engine.create(workspace, cache_path=cache)
        _assert_restorable(store_url, edited.id, workspace, tmp_path)
    finally:
        engine.close()


def test_deleted_pack_is_stored_again(store_url: str, tmp_path: Path) -> None:
    """One pack deleted behind the engine's back (identity unchanged): the next snapshot notices, whether the
    workspace changed or not, and in a new process with the old caches too."""
    workspace, cache, scratch = tmp_path / "ws", tmp_path / "statcache", tmp_path / "scratch"
    _fill(workspace, "a")
    engine = _engine(store_url, scratch)
    try:
        first = engine.create(workspace, cache_path=cache)
        packs_a = {info.key for info in engine.raw_store.list(PACKS)}
        _fill(workspace, "b")
        engine.create(workspace, cache_path=cache)

        # The pack holding a/ goes; b/ changes, a/ does not (its files come from the stat cache).
        for key in packs_a:
            engine.raw_store.delete(key)
        (workspace / "b" / "f0.txt").write_bytes(b"edited\n")
        edited = engine.create(workspace, cache_path=cache)
        assert engine.identity == read_identity(engine.raw_store)
        _assert_restorable(store_url, edited.id, workspace, tmp_path)

        # Nothing changed at all (the no-op checkpoint's fast path), and a pack of the last tree is deleted.
        for info in list(engine.raw_store.list(PACKS)):
            engine.raw_store.delete(info.key)
        same = engine.create(workspace, cache_path=cache)
        assert same.digest == edited.digest
        _assert_restorable(store_url, same.id, workspace, tmp_path)
    finally:
        engine.close()

    # A new process (a restarted worker, the CLI) with the same scratch folder and stat cache.
    store = open_store(store_url)
    _delete_all(store, PACKS)
    store.close()
    again = _engine(store_url, scratch)
    try:
        latest = again.create(workspace, cache_path=cache)
    finally:
        again.close()
    assert latest.digest == same.digest != first.digest
    _assert_restorable(store_url, latest.id, workspace, tmp_path)
