"""The built-in providers - local (bubblewrap), E2B and Modal - through the importable contract suite.

Every provider class below runs tardigrade.testing's `ProviderContract` (the same suite a third-party provider
runs) plus the checks the kit leaves to each provider: mounts, host-boundness, the held checkpoint, incremental
snapshots. E2B and Modal run here against in-process fakes of their SDK objects (tests/provider_fakes.py) whose
sandboxes are real bubblewrap machines, and live against the real services when their credentials are set (skipped
with the reason otherwise). Beside the suite: rehydration across providers, native-snapshot resume, and
`test_fakes_match_the_installed_sdks`, which keeps the fakes honest: every SDK method the providers call must have
the same parameters (names, kinds, defaults) as in the installed e2b and modal packages.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider, destroy_like_a_crash
from tardigrade.sandboxes.manifest import Mount, SnapshotPaths
from tardigrade.sandboxes.mounts import open_source
from tardigrade.sandboxes.provider import Sandbox, SandboxProvider, SandboxSpec
from tardigrade.sandboxes.remote import RemoteSandbox
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tardigrade.testing import SELECTION, WORKSPACE_SCRIPT, Harness, ProviderContract, sh
from tests.provider_fakes import FakeCloud, bind_e2b, bind_modal, fakes_unavailable


def _live_reason(name: str) -> str | None:
    if name == "e2b-live" and not os.environ.get("E2B_API_KEY"):
        return "live E2B tests need E2B_API_KEY"
    if name == "modal-live" and not (os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET")):
        return "live Modal tests need MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
    return None


@contextlib.asynccontextmanager
async def make_harness(name: str, root: Path) -> AsyncIterator[Harness]:
    """``local``, ``e2b-fake``, ``modal-fake``, ``e2b-live`` or ``modal-live``, as a contract-suite harness."""
    if name.endswith("-live"):
        reason = _live_reason(name)
        if reason:
            pytest.skip(reason)
    elif name.endswith("-fake"):
        reason = fakes_unavailable()
        if reason:
            pytest.skip(reason)
    if name == "local":
        local = LocalSandboxProvider(root / "local")

        async def lose_local(sandbox: Sandbox) -> None:
            assert isinstance(sandbox, LocalSandbox)
            await destroy_like_a_crash(sandbox)

        yield Harness(name, local, lose_local)
        await local.close()
        return
    from tardigrade.sandboxes.e2b import E2BProvider
    from tardigrade.sandboxes.modal import ModalProvider

    cloud = FakeCloud(root / "cloud") if name.endswith("-fake") else None
    provider: SandboxProvider
    if name.startswith("e2b"):
        provider = E2BProvider(root / "e2b", sdk=bind_e2b(cloud) if cloud else None)
    else:
        provider = ModalProvider(root / "modal", sdk=bind_modal(cloud) if cloud else None)

    async def lose_remote(sandbox: Sandbox) -> None:
        if cloud is not None:
            cloud.lose(sandbox.id)
        else:  # live: end it through another handle, as the provider's own timeout would
            handle = await provider.attach(sandbox.id)
            assert isinstance(handle, RemoteSandbox)
            await handle._terminate()

    try:  # a live sandbox cannot reach a listener on this machine: the kit then skips its network probe
        yield Harness(name, provider, lose_remote, local_network=cloud is not None)
    finally:
        if cloud is not None:
            cloud.close()


@pytest.fixture
def dataset(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "dataset"
    (root / "2024").mkdir(parents=True)
    (root / "2024" / "jan.csv").write_text("a,b\n1,2\n")
    (root / "2024" / "feb.csv").write_text("a,b\n3,4\n")
    (root / "notes.tmp").write_text("skip me")
    yield root


class BuiltInContract(ProviderContract):
    """The kit's suite, plus what it leaves to each provider; a subclass names its provider."""

    provider_name = ""

    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        async with make_harness(self.provider_name, tmp_path) as h:
            yield h

    async def test_only_the_local_provider_is_host_bound_and_every_one_tracks_the_held_checkpoint(
        self, harness: Harness, sandbox: Sandbox
    ) -> None:
        assert harness.provider.host_bound == (harness.name == "local")
        assert sandbox.tracks_position, "a reset relies on it (contract point 5): the built-in providers keep it"

    async def test_an_unchanged_sandbox_is_not_read_again(self, sandbox: Sandbox, tmp_path: Path) -> None:
        engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))
        code, out = await sh(sandbox, WORKSPACE_SCRIPT)
        assert code == 0, out
        first = await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
        again = await sandbox.snapshot(engine, selection=SELECTION, parent=first.id, labels={})
        assert again.id == first.id
        assert again.stats is not None and again.stats.files_read == 0, "nothing is read again"

    async def test_mounts_are_read_only_outside_snapshots_and_refreshed(
        self, sandbox: Sandbox, dataset: Path, tmp_path: Path
    ) -> None:
        engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))
        ro = Mount(source=dataset.as_uri(), path="data", exclude=["*.tmp"])
        rw = Mount(source=dataset.as_uri(), path="/home/sandbox/scratch", mode="rw", include=["2024/*"])
        for i, mount in enumerate((ro, rw)):
            stats = await sandbox.mount(i, mount, open_source(mount, i))
            assert stats.objects == 2 and stats.downloaded == 2
        _, out = await sh(
            sandbox,
            "cat data/2024/jan.csv; ls data; echo x > data/new 2>&1 || echo ro-refused;"
            " chmod u+w data 2>&1 || echo chmod-refused; echo y >> ~/scratch/2024/feb.csv && echo rw-ok",
        )
        assert "a,b\n1,2" in out and "notes.tmp" not in out and "ro-refused" in out and "rw-ok" in out, out
        selection = SnapshotPaths(
            include=["/workspace", "/home/sandbox"],
            exclude=["/workspace/data", "/workspace/data/**", "/home/sandbox/scratch", "/home/sandbox/scratch/**"],
        ).selection()  # what a Manifest with these mounts excludes by itself
        snap = await sandbox.snapshot(engine, selection=selection, parent=None, labels={})
        assert not [e.path for e in engine.entries(snap.id) if "data" in e.path or "scratch" in e.path]
        (dataset / "2024" / "mar.csv").write_text("a,b\n5,6\n")
        again = await sandbox.mount(1, rw, open_source(rw, 1))
        # jan.csv is unchanged everywhere and is not copied again; the edited feb.csv is repaired (re-downloaded into
        # the bound folder locally, re-pushed from the worker's staged copy to a remote sandbox) and mar.csv is new.
        assert again.objects == 3 and again.skipped >= 1 and again.downloaded >= 1
        _, out = await sh(sandbox, "cat ~/scratch/2024/feb.csv ~/scratch/2024/mar.csv")
        assert out == "a,b\n3,4\na,b\n5,6\n", out


class TestLocal(BuiltInContract):
    provider_name = "local"


class TestE2BFake(BuiltInContract):
    provider_name = "e2b-fake"


class TestModalFake(BuiltInContract):
    provider_name = "modal-fake"


class LiveContract(BuiltInContract):
    @pytest.fixture
    async def other_harness(self) -> AsyncIterator[Harness | None]:
        yield None  # crossing providers is covered by the fakes (test_rehydration_from_a_snapshot_taken_on_...)


class TestE2BLive(LiveContract):
    provider_name = "e2b-live"


class TestModalLive(LiveContract):
    provider_name = "modal-live"


# -- rehydration across providers -------------------------------------------------------------------------------

CROSS = [("local", "e2b-fake"), ("e2b-fake", "modal-fake"), ("modal-fake", "local")]


@pytest.mark.parametrize(("source", "target"), CROSS, ids=[f"{a}-to-{b}" for a, b in CROSS])
async def test_rehydration_from_a_snapshot_taken_on_another_provider(source: str, target: str, tmp_path: Path) -> None:
    engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))
    async with make_harness(source, tmp_path / "a") as a, make_harness(target, tmp_path / "b") as b:
        origin = await a.provider.create(SandboxSpec())
        code, out = await sh(origin, WORKSPACE_SCRIPT)
        assert code == 0, out
        snap = await origin.snapshot(engine, selection=SELECTION, parent=None, labels={})
        await a.lose(origin)
        fresh = await b.provider.create(SandboxSpec())
        await fresh.restore(engine, snap.id, selection=SELECTION)
        rehydrated = await fresh.snapshot(engine, selection=SELECTION, parent=snap.id, labels={})
        assert rehydrated.digest == snap.digest, "the same files, modes and links on another provider"
        code, out = await sh(fresh, ".venv/bin/python -c 'print(6*7)'; ./run.sh; stat -c '%u:%a' src")
        assert out.split() == ["42", "run", "1000:700"], out
        await fresh.destroy()


# -- native snapshots (E2B create_snapshot, Modal snapshot_filesystem) ------------------------------------------


@pytest.mark.parametrize("name", ["e2b-fake", "modal-fake"])
async def test_native_snapshot_resume_pushes_only_the_difference(name: str, tmp_path: Path) -> None:
    engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))
    async with make_harness(name, tmp_path) as h:
        first = await h.provider.create(SandboxSpec())
        await sh(first, WORKSPACE_SCRIPT)
        snap = await first.snapshot(engine, selection=SELECTION, parent=None, labels={})
        native = await first.native_snapshot()
        assert native
        await h.lose(first)
        second, from_native = await h.provider.create_from(SandboxSpec(), native)
        assert from_native
        await second.adopt_native(engine, snap.id, selection=SELECTION)
        await second.restore(engine, snap.id, selection=SELECTION)
        assert isinstance(second, RemoteSandbox) and second.last_push is not None
        # Nothing is sent but the hard-linked pair (7 bytes), which the engine re-links on every restore.
        assert second.last_push.bytes < 100 and second.last_push.deleted == 0, second.last_push
        assert (await second.snapshot(engine, selection=SELECTION, parent=None, labels={})).digest == snap.digest
        # A native snapshot that no longer exists falls back to a fresh sandbox (and the portable snapshot).
        third, from_native = await h.provider.create_from(SandboxSpec(), "snap-that-was-deleted")
        assert not from_native
        await third.restore(engine, snap.id, selection=SELECTION)
        assert (await third.snapshot(engine, selection=SELECTION, parent=None, labels={})).digest == snap.digest


# -- the fakes against the installed SDKs -----------------------------------------------------------------------


def _params(function: Any) -> list[tuple[str, Any, Any]]:
    params = list(inspect.signature(function).parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [(p.name, p.kind, p.default) for p in params]


def test_fakes_match_the_installed_sdks() -> None:
    import e2b
    import modal
    from e2b.sandbox_async.commands.command import Commands
    from e2b.sandbox_async.commands.command_handle import AsyncCommandHandle
    from e2b.sandbox_async.filesystem.filesystem import Filesystem
    from modal.container_process import ContainerProcess
    from modal.sandbox.sandbox import SandboxFilesystem

    from tests import provider_fakes as f

    pairs: list[tuple[str, Any, Any]] = [
        ("AsyncSandbox.create", f.FakeAsyncSandbox.create, e2b.AsyncSandbox.create),
        ("AsyncSandbox.connect(id)", f.FakeAsyncSandbox.connect, e2b.AsyncSandbox._cls_connect_sandbox),
        ("AsyncSandbox.kill", f.FakeAsyncSandbox.kill, e2b.AsyncSandbox.kill),
        ("AsyncSandbox.is_running", f.FakeAsyncSandbox.is_running, e2b.AsyncSandbox.is_running),
        ("AsyncSandbox.create_snapshot", f.FakeAsyncSandbox.create_snapshot, e2b.AsyncSandbox.create_snapshot),
        ("Commands.run", f.FakeCommands.run, Commands.run),
        ("Commands.list", f.FakeCommands.list, Commands.list),
        ("Commands.kill", f.FakeCommands.kill, Commands.kill),
        ("AsyncCommandHandle.wait", f.FakeCommandHandle.wait, AsyncCommandHandle.wait),
        ("AsyncCommandHandle.kill", f.FakeCommandHandle.kill, AsyncCommandHandle.kill),
        ("Filesystem.read", f.FakeFilesystem.read, Filesystem.read),
        ("Filesystem.write", f.FakeFilesystem.write, Filesystem.write),
        ("modal.Sandbox.create.aio", f._modal_create, modal.Sandbox.create.aio),
        ("modal.Sandbox.from_id.aio", f._modal_from_id, modal.Sandbox.from_id.aio),
        ("modal.Sandbox.exec.aio", f.FakeModalSandbox._exec, modal.Sandbox.exec.aio),
        ("modal.Sandbox.terminate.aio", f.FakeModalSandbox._terminate, modal.Sandbox.terminate.aio),
        ("modal.Sandbox.poll.aio", f.FakeModalSandbox._poll, modal.Sandbox.poll.aio),
        ("modal.Sandbox.snapshot_filesystem.aio", f.FakeModalSandbox._snapshot_filesystem,
         modal.Sandbox.snapshot_filesystem.aio),
        ("SandboxFilesystem.copy_to_local.aio", f.FakeSandboxFilesystem._copy_to_local,
         SandboxFilesystem.copy_to_local.aio),
        ("SandboxFilesystem.copy_from_local.aio", f.FakeSandboxFilesystem._copy_from_local,
         SandboxFilesystem.copy_from_local.aio),
        ("SandboxFilesystem.write_bytes.aio", f.FakeSandboxFilesystem._write_bytes, SandboxFilesystem.write_bytes.aio),
        ("ContainerProcess.wait.aio", f.FakeContainerProcess._wait, ContainerProcess.wait.aio),
        ("ContainerProcess.poll.aio", f.FakeContainerProcess._poll, ContainerProcess.poll.aio),
        ("modal.App.lookup.aio", f._app_lookup, modal.App.lookup.aio),
        ("modal.Image.from_registry", f.FakeImage.from_registry, modal.Image.from_registry),
        ("modal.Image.debian_slim", f.FakeImage.debian_slim, modal.Image.debian_slim),
        ("modal.Image.from_id", f._image_from_id, modal.Image.from_id),
    ]  # fmt: skip
    drift = [f"{name}: fake {_params(fake)} != sdk {_params(real)}" for name, fake, real in pairs
             if _params(fake) != _params(real)]  # fmt: skip
    assert not drift, "\n".join(drift)
    # And the SDK objects the providers use are where the fakes say they are.
    assert hasattr(e2b.AsyncSandbox, "commands") and hasattr(e2b.AsyncSandbox, "files")
    assert isinstance(inspect.getattr_static(modal.Sandbox, "filesystem"), property)
    for cls in (e2b.SandboxNotRunningException, e2b.SandboxNotFoundException, e2b.CommandExitException,
                modal.exception.SandboxTerminatedError, modal.exception.NotFoundError):  # fmt: skip
        assert issubclass(cls, Exception)
