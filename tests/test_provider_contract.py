"""One contract every sandbox provider passes: local (bubblewrap), E2B and Modal.

E2B and Modal run here against in-process fakes of their SDK objects (tests/provider_fakes.py) whose sandboxes are
real bubblewrap machines, and live against the real services when their credentials are set (skipped with the
reason otherwise). `test_fakes_match_the_installed_sdks` keeps the fakes honest: every SDK method the providers
call must have the same parameters (names, kinds, defaults) as in the installed e2b and modal packages.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider, destroy_like_a_crash
from tardigrade.sandboxes.errors import SandboxLost
from tardigrade.sandboxes.manifest import Mount, SnapshotPaths
from tardigrade.sandboxes.mounts import open_source
from tardigrade.sandboxes.provider import Sandbox, SandboxProvider, SandboxSpec
from tardigrade.sandboxes.remote import RemoteSandbox
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tests.provider_fakes import FakeCloud, bind_e2b, bind_modal, fakes_unavailable

PROVIDERS = ("local", "e2b-fake", "modal-fake", "e2b-live", "modal-live")
SELECTION = SnapshotPaths(include=["/workspace", "~/.config"]).selection()


@dataclass
class Harness:
    name: str
    provider: SandboxProvider
    lose: Callable[[Sandbox], Awaitable[None]]  # kill the sandbox behind the provider's back, as a crash would
    cloud: FakeCloud | None = None


def _live_reason(name: str) -> str | None:
    if name == "e2b-live" and not os.environ.get("E2B_API_KEY"):
        return "live E2B tests need E2B_API_KEY"
    if name == "modal-live" and not (os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET")):
        return "live Modal tests need MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
    return None


@contextlib.asynccontextmanager
async def make_harness(name: str, root: Path) -> AsyncIterator[Harness]:
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

    try:
        yield Harness(name, provider, lose_remote, cloud)
    finally:
        if cloud is not None:
            cloud.close()


@pytest.fixture(params=PROVIDERS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    async with make_harness(request.param, tmp_path) as h:
        yield h


@pytest.fixture
async def sandbox(harness: Harness) -> AsyncIterator[Sandbox]:
    sb = await harness.provider.create(SandboxSpec())
    yield sb
    with contextlib.suppress(Exception):
        await sb.destroy()


async def sh(sandbox: Sandbox, command: str, timeout: float = 60, **kw: Any) -> tuple[int, str]:
    result = await sandbox.exec(command, env=kw.pop("env", {}), timeout=timeout, **kw)
    return result.exit_code, result.output_tail.decode(errors="replace")


# -- commands ---------------------------------------------------------------------------------------------------


async def test_exec_runs_as_uid_1000_in_the_portable_layout_and_streams_output(sandbox: Sandbox) -> None:
    chunks: list[bytes] = []
    result = await sandbox.exec(
        "id -u; pwd; echo HOME=$HOME; echo GIVEN=$GIVEN; echo to-stderr >&2; seq 20000; exit 7",
        env={"GIVEN": "yes"}, timeout=60, on_output=chunks.append, tail_bytes=64,
    )  # fmt: skip
    streamed = b"".join(chunks)
    assert result.exit_code == 7 and not result.timed_out
    assert streamed.startswith(b"1000\n/workspace\nHOME=/home/sandbox\nGIVEN=yes\n")
    assert b"to-stderr\n" in streamed and streamed.endswith(b"19999\n20000\n")
    assert result.output_bytes == len(streamed) and len(result.output_tail) == 64
    code, out = await sh(sandbox, "pwd", cwd="/home/sandbox")
    assert (code, out) == (0, "/home/sandbox\n")


async def test_a_timeout_kills_the_command_and_everything_it_started(sandbox: Sandbox) -> None:
    result = await sandbox.exec("(sleep 2; echo late > late.txt) & sleep 60", env={}, timeout=1)
    assert result.timed_out and result.duration < 10
    await asyncio.sleep(2.5)
    code, out = await sh(sandbox, "ls")
    assert code == 0 and "late.txt" not in out, "the timed-out command's background child must be dead"


async def test_kill_processes_and_cancellation_kill_running_commands(sandbox: Sandbox) -> None:
    running = asyncio.create_task(sandbox.exec("sleep 2; echo done > killed.txt", env={}, timeout=30))
    await asyncio.sleep(0.8)
    await sandbox.kill_processes()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(running, 10)
    cancelled = asyncio.create_task(sandbox.exec("sleep 2; echo done > cancelled.txt", env={}, timeout=30))
    await asyncio.sleep(0.8)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.sleep(2.5)
    code, out = await sh(sandbox, "ls")
    assert code == 0 and "killed.txt" not in out and "cancelled.txt" not in out


async def test_network_is_off_unless_allowed(harness: Harness) -> None:
    if harness.name.endswith("-live"):
        pytest.skip("needs a listener the sandbox could reach; checked against the fakes and locally")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    probe = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('ok')\""
    try:
        closed = await harness.provider.create(SandboxSpec(network=False))
        code, out = await sh(closed, probe)
        assert code != 0 and "ok" not in out
        await closed.destroy()
    finally:
        listener.close()


# -- files ------------------------------------------------------------------------------------------------------


async def test_file_io(sandbox: Sandbox) -> None:
    payload = bytes(range(256)) * 64
    await sandbox.write_file("dir/sub/data.bin", payload, mode=0o755)
    assert await sandbox.read_file("/workspace/dir/sub/data.bin") == payload
    assert await sandbox.read_file("dir/sub/data.bin", limit=10) == payload[:10]
    code, out = await sh(sandbox, "stat -c '%a %u' dir/sub/data.bin")
    assert out.split() == ["755", "1000"], "written as the sandbox user, with the mode asked for"
    await sandbox.make_dirs("~/.config/tool")
    code, _ = await sh(sandbox, "test -d ~/.config/tool")
    assert code == 0
    with pytest.raises(FileNotFoundError):
        await sandbox.read_file("nope.txt")


# -- loss -------------------------------------------------------------------------------------------------------


async def test_loss_is_detected_during_a_command_and_on_attach(harness: Harness, sandbox: Sandbox) -> None:
    async def lose_soon() -> None:
        await asyncio.sleep(0.5)
        await harness.lose(sandbox)

    killer = asyncio.create_task(lose_soon())
    with pytest.raises(SandboxLost):
        await sandbox.exec("sleep 30", env={}, timeout=60)
    await killer
    assert not await sandbox.alive()
    with pytest.raises(SandboxLost):
        await harness.provider.attach(sandbox.id)


async def test_attach_by_id_reaches_the_same_sandbox(harness: Harness, sandbox: Sandbox) -> None:
    await sandbox.write_file("mark.txt", b"here")
    again = await harness.provider.attach(sandbox.id)
    assert await again.read_file("mark.txt") == b"here"
    assert harness.provider.host_bound == (harness.name == "local")


async def test_the_held_position_survives_attach_and_the_sandbox_cannot_forge_it(
    harness: Harness, sandbox: Sandbox
) -> None:
    """What a reset relies on (contract point 5): which checkpoint the files hold, kept out of the sandbox's reach."""
    assert sandbox.tracks_position and await sandbox.held_position() is None
    await sandbox.hold_position("snapshot:" + "a" * 64)
    again = await harness.provider.attach(sandbox.id)
    assert await again.held_position() == "snapshot:" + "a" * 64
    forge = "for f in /tmp/.tardigrade/position /workspace/position; do echo forged > $f; done 2>/dev/null; true"
    await sandbox.exec(forge, env={}, timeout=30)
    assert await again.held_position() == "snapshot:" + "a" * 64


# -- snapshots --------------------------------------------------------------------------------------------------

WORKSPACE_SCRIPT = r"""
set -e
mkdir -p src/pkg empty .venv/bin ~/.config/tool
printf 'print("hi")\n' > src/pkg/main.py
printf '#!/bin/sh\necho run\n' > run.sh && chmod 755 run.sh
ln -s /usr/bin/python3 .venv/bin/python           # venvs hold absolute symlinks
ln -s ../src/pkg/main.py .venv/bin/main
echo shared > src/a.txt && ln src/a.txt src/b.txt  # a hard link
head -c 3000000 /dev/urandom > big.bin             # chunked by the engine
printf 'caf\xc3\xa9' > 'ünïcødé name.txt'
echo 'k=v' > ~/.config/tool/settings
chmod 700 src
"""


def listing(tree: Path) -> dict[str, tuple[str, int, str]]:
    out = {}
    for path in sorted(tree.rglob("*")):
        st = os.lstat(path)
        rel = path.relative_to(tree).as_posix()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", 0, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("d", stat.S_IMODE(st.st_mode), "")
        else:
            out[rel] = ("f", stat.S_IMODE(st.st_mode), path.read_bytes().hex()[:64] + str(st.st_size))
    return out


async def test_snapshot_round_trip_and_rollback(sandbox: Sandbox, tmp_path: Path) -> None:
    engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))
    code, out = await sh(sandbox, WORKSPACE_SCRIPT)
    assert code == 0, out
    first = await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
    again = await sandbox.snapshot(engine, selection=SELECTION, parent=first.id, labels={})
    assert again.id == first.id, "an unchanged sandbox snapshots to the same id"
    assert again.stats is not None and again.stats.files_read == 0, "and nothing is read again"
    # A failed attempt's mess: edits, deletions, new files, a type change, a mode change.
    code, out = await sh(sandbox, "echo changed >> src/pkg/main.py; rm -rf empty run.sh; touch junk; rm big.bin;"
                         " mkdir big.bin; chmod 644 .venv; echo x > ~/.config/tool/settings")  # fmt: skip
    assert code == 0, out
    await sandbox.restore(engine, first.id, selection=SELECTION)
    after = await sandbox.snapshot(engine, selection=SELECTION, parent=first.id, labels={})
    assert after.digest == first.digest
    engine.restore(first.id, tmp_path / "expected")
    engine.restore(after.id, tmp_path / "actual")
    assert listing(tmp_path / "actual") == listing(tmp_path / "expected")
    code, out = await sh(sandbox, "./run.sh && .venv/bin/python -c 'print(1+1)' && cat ~/.config/tool/settings"
                         " && stat -c %h src/a.txt")  # fmt: skip
    assert out.split() == ["run", "2", "k=v", "2"], out


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


# -- mounts -----------------------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "dataset"
    (root / "2024").mkdir(parents=True)
    (root / "2024" / "jan.csv").write_text("a,b\n1,2\n")
    (root / "2024" / "feb.csv").write_text("a,b\n3,4\n")
    (root / "notes.tmp").write_text("skip me")
    yield root


async def test_mounts_are_read_only_outside_snapshots_and_refreshed(
    sandbox: Sandbox, dataset: Path, tmp_path: Path
) -> None:
    if isinstance(sandbox, RemoteSandbox) and os.environ.get("E2B_API_KEY") and "live" in str(tmp_path):
        pytest.skip("file:// sources are on this worker")
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
