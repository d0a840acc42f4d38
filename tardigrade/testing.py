"""The sandbox provider contract, importable: a new provider proves itself with one test file.

Every provider - local, E2B, Modal, Daytona, or one a third party registers in the ``tardigrade.providers``
entry-point group (sandboxes/provider_kit.py) - must keep the same promises: commands run as uid 1000 in
``/workspace`` with ``HOME=/home/sandbox`` and stream their output; a timeout, `kill_processes` or a cancellation
kills the command and everything it started; network is off by default; files keep bytes, modes and owner; a lost
sandbox raises `SandboxLost` (during a command, and on ``attach``); the held checkpoint survives ``attach`` and is
out of the sandbox's reach; a portable snapshot round-trips a real workspace (venv symlinks, hard links, exec bits,
a large file) and rolls a messed-up workspace back to the same digest; and a snapshot taken on the provider
restores on the local provider (and back) with the same digest.

Use (needs pytest and pytest-asyncio)::

    import pytest
    from tardigrade.testing import Harness, ProviderContract

    class TestAcmeVM(ProviderContract):
        @pytest.fixture
        async def harness(self, tmp_path):
            provider = AcmeProvider(tmp_path / "acme")
            async def lose(sandbox):                 # end it behind the provider's back, as a crash would
                await acme_admin.force_delete(sandbox.id)
            yield Harness("acme", provider, lose)
            await provider.close()

``Harness(local_network=False)`` skips the check that needs the sandbox to reach a listener on this machine (a
hosted sandbox cannot; network isolation is then checked by the provider's own tests). Override
``other_harness`` to run the cross-provider rehydration against something else than the local provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tardigrade.sandboxes.errors import SandboxLost
from tardigrade.sandboxes.manifest import SnapshotPaths
from tardigrade.sandboxes.provider import Sandbox, SandboxProvider, SandboxSpec
from tardigrade.sandboxes.remote import RemoteSandbox
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store

SELECTION = SnapshotPaths(include=["/workspace", "~/.config"]).selection()

#: A workspace with what real ones hold: a venv's absolute symlinks, a hard link, exec bits, an empty folder, a
#: 3 MB file (chunked by the engine), a non-ASCII name, a private folder, and a file under ~/.config.
WORKSPACE_SCRIPT = r"""
set -e
mkdir -p src/pkg empty .venv/bin ~/.config/tool
printf 'print("hi")\n' > src/pkg/main.py
printf '#!/bin/sh\necho run\n' > run.sh && chmod 755 run.sh
ln -s /usr/bin/python3 .venv/bin/python
ln -s ../src/pkg/main.py .venv/bin/main
echo shared > src/a.txt && ln src/a.txt src/b.txt
head -c 3000000 /dev/urandom > big.bin
printf 'caf\xc3\xa9' > 'ünïcødé name.txt'
echo 'k=v' > ~/.config/tool/settings
chmod 700 src
"""


@dataclass
class Harness:
    """A provider under test and a way to lose one of its sandboxes behind its back."""

    name: str
    provider: SandboxProvider
    lose: Callable[[Sandbox], Awaitable[None]]
    local_network: bool = True  # its sandboxes could reach a listener on this machine if the network were open


async def sh(sandbox: Sandbox, command: str, timeout: float = 60, **kw: Any) -> tuple[int, str]:
    """Run ``command``; (exit code, the output's tail as text)."""
    result = await sandbox.exec(command, env=kw.pop("env", {}), timeout=timeout, **kw)
    return result.exit_code, result.output_tail.decode(errors="replace")


def listing(tree: Path) -> dict[str, tuple[str, int, str]]:
    """A restored tree as comparable data: type, mode and content (or link target) per path."""
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


def signature_drift(pairs: list[tuple[str, Any, Any]]) -> list[str]:
    """For a fake of a provider's SDK: the faked methods, as ``(name, fake, real)``, whose parameters (names, kinds,
    defaults) or async-ness differ from the installed SDK's - so an SDK upgrade that breaks the provider fails."""

    def params(function: Any) -> list[tuple[str, Any, Any, bool]]:
        found = list(inspect.signature(function).parameters.values())
        if found and found[0].name in ("self", "cls"):
            found = found[1:]
        is_async = inspect.iscoroutinefunction(inspect.unwrap(function)) or inspect.iscoroutinefunction(function)
        return [(p.name, p.kind, p.default, is_async) for p in found]

    return [
        f"{name}: fake {params(fake)} != sdk {params(real)}"
        for name, fake, real in pairs
        if params(fake) != params(real)
    ]


async def native_snapshot_round_trip(
    provider: SandboxProvider,
    engine: SnapshotEngine,
    *,
    spec: SandboxSpec,
    lose: Callable[[str], object],
    unusable: Callable[[str], str],
    after_native: Callable[[Sandbox, str], Awaitable[None]] | None = None,
) -> tuple[RemoteSandbox, str]:
    """What ``native_snapshot: true`` promises, checked the same way for every provider that has one: a sandbox
    made from the native snapshot after the first is lost needs (almost) nothing pushed to match the portable
    snapshot, and when the native snapshot cannot be used (``unusable(native)`` deletes or expires it and returns
    the id to try) the sandbox is rebuilt from the portable one with the same digest. ``lose(sandbox_id)`` ends a
    sandbox behind the provider's back. Returns the sandbox made from the native snapshot, and its id."""
    first = await provider.create(spec)
    assert (await sh(first, WORKSPACE_SCRIPT))[0] == 0
    snap = await first.snapshot(engine, selection=SELECTION, parent=None, labels={})
    native = await first.native_snapshot()
    assert native
    if after_native is not None:
        await after_native(first, native)
    lose(first.id)
    second, from_native = await provider.create_from(spec, native)
    assert from_native and isinstance(second, RemoteSandbox)
    await second.adopt_native(engine, snap.id, selection=SELECTION)
    await second.restore(engine, snap.id, selection=SELECTION)
    assert second.last_push is not None and second.last_push.bytes < 100 and second.last_push.deleted == 0
    assert (await second.snapshot(engine, selection=SELECTION, parent=None, labels={})).digest == snap.digest
    third, from_native = await provider.create_from(spec, unusable(native))
    assert not from_native
    await third.restore(engine, snap.id, selection=SELECTION)
    assert (await third.snapshot(engine, selection=SELECTION, parent=None, labels={})).digest == snap.digest
    return second, native


class ProviderContract:
    """Subclass it in a test file and define the ``harness`` fixture; every test below then runs against it."""

    pytestmark = [pytest.mark.asyncio]

    @pytest_asyncio.fixture
    async def harness(self) -> AsyncIterator[Harness]:
        raise NotImplementedError("define a `harness` fixture in your ProviderContract subclass")
        yield  # pragma: no cover

    @pytest_asyncio.fixture
    async def other_harness(self, tmp_path: Path) -> AsyncIterator[Harness | None]:
        """The provider a snapshot crosses to and from: the local (bubblewrap) one where it can run."""
        if shutil.which("bwrap") is None:
            yield None
            return
        from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider, destroy_like_a_crash

        local = LocalSandboxProvider(tmp_path / "other-local")

        async def lose(sandbox: Sandbox) -> None:
            assert isinstance(sandbox, LocalSandbox)
            await destroy_like_a_crash(sandbox)

        yield Harness("local", local, lose)
        await local.close()

    @pytest_asyncio.fixture
    async def sandbox(self, harness: Harness) -> AsyncIterator[Sandbox]:
        sb = await harness.provider.create(SandboxSpec())
        yield sb
        with contextlib.suppress(Exception):
            await sb.destroy()

    # -- commands -----------------------------------------------------------------------------------------------

    async def test_exec_runs_as_uid_1000_in_the_portable_layout_and_streams_output(self, sandbox: Sandbox) -> None:
        chunks: list[bytes] = []
        result = await sandbox.exec(
            "id -u; pwd; echo HOME=$HOME; echo GIVEN=$GIVEN; echo to-stderr >&2; seq 20000; exit 7",
            env={"GIVEN": "yes"}, timeout=60, on_output=chunks.append, tail_bytes=64,
        )  # fmt: skip
        streamed = b"".join(chunks)
        assert result.exit_code == 7 and not result.timed_out
        # stdout and stderr may arrive as two streams (Runloop, Blaxel): only their order within each is given.
        stdout = streamed.replace(b"to-stderr\n", b"", 1)
        assert b"to-stderr\n" in streamed and stdout.startswith(b"1000\n/workspace\nHOME=/home/sandbox\nGIVEN=yes\n")
        assert stdout.endswith(b"19999\n20000\n")
        assert result.output_bytes == len(streamed) and len(result.output_tail) == 64
        code, out = await sh(sandbox, "pwd", cwd="/home/sandbox")
        assert (code, out) == (0, "/home/sandbox\n")

    async def test_a_timeout_kills_the_command_and_everything_it_started(self, sandbox: Sandbox) -> None:
        result = await sandbox.exec("(sleep 2; echo late > late.txt) & sleep 60", env={}, timeout=1)
        assert result.timed_out and result.duration < 10
        await asyncio.sleep(2.5)
        code, out = await sh(sandbox, "ls")
        assert code == 0 and "late.txt" not in out, "the timed-out command's background child must be dead"

    async def test_kill_processes_and_cancellation_kill_running_commands(self, sandbox: Sandbox) -> None:
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

    async def test_network_is_off_by_default(self, harness: Harness) -> None:
        if not harness.local_network:
            pytest.skip(f"{harness.name} sandboxes cannot reach this machine whatever their network")
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('ok')\""
        try:
            closed = await harness.provider.create(SandboxSpec())
            code, out = await sh(closed, probe)
            assert code != 0 and "ok" not in out
            await closed.destroy()
        finally:
            listener.close()

    # -- files --------------------------------------------------------------------------------------------------

    async def test_file_io(self, sandbox: Sandbox) -> None:
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

    # -- loss ---------------------------------------------------------------------------------------------------

    async def test_loss_is_detected_during_a_command_and_on_attach(self, harness: Harness, sandbox: Sandbox) -> None:
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

    async def test_attach_by_id_reaches_the_same_sandbox(self, harness: Harness, sandbox: Sandbox) -> None:
        await sandbox.write_file("mark.txt", b"here")
        again = await harness.provider.attach(sandbox.id)
        assert await again.read_file("mark.txt") == b"here"

    async def test_the_held_position_survives_attach_and_the_sandbox_cannot_forge_it(
        self, harness: Harness, sandbox: Sandbox
    ) -> None:
        if not sandbox.tracks_position:
            pytest.skip(f"{harness.name} does not track the held checkpoint (every restore is then a full one)")
        assert await sandbox.held_position() is None
        await sandbox.hold_position("snapshot:" + "a" * 64)
        again = await harness.provider.attach(sandbox.id)
        assert await again.held_position() == "snapshot:" + "a" * 64
        forge = "for f in /tmp/.tardigrade/position /workspace/position; do echo forged > $f; done 2>/dev/null; true"
        await sandbox.exec(forge, env={}, timeout=30)
        assert await again.held_position() == "snapshot:" + "a" * 64

    # -- snapshots ----------------------------------------------------------------------------------------------

    async def test_snapshot_round_trip_and_rollback(self, sandbox: Sandbox, tmp_path: Path) -> None:
        engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))
        code, out = await sh(sandbox, WORKSPACE_SCRIPT)
        assert code == 0, out
        first = await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
        again = await sandbox.snapshot(engine, selection=SELECTION, parent=first.id, labels={})
        assert again.id == first.id, "an unchanged sandbox snapshots to the same id"
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

    async def test_a_snapshot_crosses_to_another_provider_and_back(
        self, harness: Harness, other_harness: Harness | None, tmp_path: Path
    ) -> None:
        if other_harness is None:
            pytest.skip("no other provider to cross to (the local one needs bubblewrap: apt-get install bubblewrap)")
        engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))
        for source, target in ((harness, other_harness), (other_harness, harness)):
            origin = await source.provider.create(SandboxSpec())
            code, out = await sh(origin, WORKSPACE_SCRIPT)
            assert code == 0, out
            snap = await origin.snapshot(engine, selection=SELECTION, parent=None, labels={})
            await source.lose(origin)
            fresh = await target.provider.create(SandboxSpec())
            await fresh.restore(engine, snap.id, selection=SELECTION)
            rehydrated = await fresh.snapshot(engine, selection=SELECTION, parent=snap.id, labels={})
            assert rehydrated.digest == snap.digest, f"{source.name} -> {target.name}: the same files, modes, links"
            code, out = await sh(fresh, ".venv/bin/python -c 'print(6*7)'; ./run.sh; stat -c '%u:%a' src")
            assert out.split() == ["42", "run", "1000:700"], out
            await fresh.destroy()
