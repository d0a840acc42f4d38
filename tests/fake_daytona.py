"""An in-process fake of the ``daytona`` SDK's async client, backed by real machines: only the RPC layer is fake.

As for E2B and Modal (tests/provider_fakes.py), Daytona cannot be reached from the test machines, so the tests swap
the SDK *objects*: `FakeAsyncDaytona` for ``daytona.AsyncDaytona``, whose sandboxes (`FakeDaytonaSandbox`, with
``process`` and ``fs``) are real bubblewrap machines from a `FakeCloud`. Commands really run (as the sandbox's
``os_user``), files really move, and sessions' processes really die when their session is deleted.

Fidelity: method names and signatures match the installed SDK (tests/test_daytona.py compares them with
`inspect.signature`); the fakes take the SDK's own parameter models (``CreateSandboxFromSnapshotParams``,
``SessionExecuteRequest``) and return its own result models (``SessionExecuteResponse``, ``Command``); errors are
the SDK's classes: ``DaytonaNotFoundError`` for an unknown or deleted sandbox, snapshot or session,
``DaytonaFileNotFoundError`` for a missing file, ``DaytonaConnectionError`` when a log stream drops with its machine.
Output streams to the log callbacks as text, as the SDK decodes it. Not modelled: images and resources (every
sandbox is "an empty Debian-like machine with the host's /usr"), auto-stop timers, and network beyond on/off.
A stopped sandbox keeps its disk and starts again on it, as on Daytona.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import daytona
from daytona.common.process import SessionExecuteResponse
from daytona_toolbox_api_client_async.models import Command

from tests.provider_fakes import USER_UID, FakeCloud, FakeMachine, MachineGone, MachineProcess

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _not_found(what: str) -> daytona.DaytonaNotFoundError:
    return daytona.DaytonaNotFoundError(f"{what} not found", status_code=404)


class _SessionCommand:
    """A command started in a session: its output kept for the log stream, its exit code once it ends."""

    def __init__(self, command: str, process: MachineProcess, chunks: list[tuple[str, bytes]], changed: asyncio.Event):
        self.id = uuid.uuid4().hex
        self.command = command
        self.process = process
        self.chunks = chunks
        self.changed = changed
        self.exit_code: int | None = None
        self.lost = False
        self.finished = asyncio.Event()
        self._task = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        try:
            status = await self.process.wait()
            self.exit_code = int(status["code"])
        except MachineGone:
            self.lost = True
        finally:
            self.finished.set()
            self.changed.set()


class FakeDaytonaProcess:
    """`daytona._async.process.AsyncProcess`: sessions of commands."""

    def __init__(self, sandbox: FakeDaytonaSandbox) -> None:
        self._sandbox = sandbox
        # Sessions live in the sandbox (its daemon), not in a handle: another handle on it sees the same ones.
        self._sessions = sandbox._client.sessions.setdefault(sandbox.id, {})

    def _session(self, session_id: str) -> dict[str, _SessionCommand]:
        self._sandbox._live()
        if session_id not in self._sessions:
            raise _not_found(f"session {session_id}")
        return self._sessions[session_id]

    async def create_session(self, session_id: str, request_timeout: float | None = None) -> None:
        self._sandbox._live()
        if session_id in self._sessions:
            raise daytona.DaytonaConflictError(f"session {session_id} already exists", status_code=409)
        self._sessions[session_id] = {}

    async def delete_session(self, session_id: str, request_timeout: float | None = None) -> None:
        machine = self._sandbox._live()
        commands = self._session(session_id)
        del self._sessions[session_id]
        for command in commands.values():
            if not command.finished.is_set():
                with contextlib.suppress(MachineGone):
                    await machine.call("kill", pid=command.process.pid)

    async def execute_session_command(
        self, session_id: str, req: daytona.SessionExecuteRequest, timeout: int | None = None
    ) -> SessionExecuteResponse:
        session = self._session(session_id)
        machine = self._sandbox._live()
        chunks: list[tuple[str, bytes]] = []
        changed = asyncio.Event()

        def keep(stream: str) -> Callable[[bytes], None]:
            def feed(data: bytes) -> None:
                chunks.append((stream, data))
                changed.set()

            return feed

        uid = self._sandbox._uid
        try:
            process = await machine.start_process(
                req.command, env={"PATH": _PATH, "HOME": "/root" if uid == 0 else "/home/daytona"}, cwd="/",
                uid=uid, on_stdout=keep("out"), on_stderr=keep("err"),
            )  # fmt: skip
        except MachineGone:
            raise _not_found(f"sandbox {self._sandbox.id}") from None
        command = _SessionCommand(req.command, process, chunks, changed)
        session[command.id] = command
        if not (req.run_async or req.var_async):
            await command.finished.wait()
            return SessionExecuteResponse(cmd_id=command.id, exit_code=command.exit_code)
        return SessionExecuteResponse(cmd_id=command.id)

    async def get_session_command(
        self, session_id: str, command_id: str, request_timeout: float | None = None
    ) -> Command:
        command = self._session(session_id).get(command_id)
        if command is None:
            raise _not_found(f"command {command_id}")
        return Command(command=command.command, exit_code=command.exit_code, id=command.id)

    async def get_session_command_logs_async(
        self,
        session_id: str,
        command_id: str,
        on_stdout: Callable[[str], Awaitable[None] | None],
        on_stderr: Callable[[str], Awaitable[None] | None],
    ) -> None:
        command = self._session(session_id).get(command_id)
        if command is None:
            raise _not_found(f"command {command_id}")
        decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in ("out", "err")}
        sent = 0
        while True:
            command.changed.clear()
            while sent < len(command.chunks):
                stream, data = command.chunks[sent]
                sent += 1
                text = decoders[stream].decode(data)
                if text:
                    result = (on_stdout if stream == "out" else on_stderr)(text)
                    if asyncio.iscoroutine(result):
                        await result
            if command.finished.is_set():
                break
            await command.changed.wait()
        if command.lost:  # the websocket dropped with the machine
            raise daytona.DaytonaConnectionError("Failed to get session command logs: connection closed")


class FakeDaytonaFileSystem:
    """`daytona._async.filesystem.AsyncFileSystem`: files move as the sandbox's ``os_user``."""

    def __init__(self, sandbox: FakeDaytonaSandbox) -> None:
        self._sandbox = sandbox

    async def upload_file(self, src: str | bytes, dst: str, timeout: int = 30 * 60) -> None:
        machine = self._sandbox._live()

        async def chunks() -> AsyncIterator[bytes]:
            if isinstance(src, bytes):
                yield src
                return
            with open(src, "rb") as f:
                while block := f.read(1 << 20):
                    yield block

        try:
            await machine.write_file(dst, self._sandbox._uid, chunks())
        except MachineGone:
            raise _not_found(f"sandbox {self._sandbox.id}") from None
        except PermissionError as e:
            raise daytona.DaytonaFileAccessDeniedError(f"Failed to upload file: {e}", status_code=403) from None

    async def download_file(self, *args: str) -> bytes | None:
        machine = self._sandbox._live()
        remote_path = args[0]
        local_path = args[1] if len(args) >= 2 and not str(args[1]).isdigit() else None
        data = bytearray()
        try:
            if local_path is None:
                async for chunk in machine.read_file(remote_path, self._sandbox._uid):
                    data += chunk
                return bytes(data)
            with open(local_path, "wb") as out:
                async for chunk in machine.read_file(remote_path, self._sandbox._uid):
                    out.write(chunk)
            return None
        except FileNotFoundError:
            raise daytona.DaytonaFileNotFoundError(f"Failed to download file: {remote_path}", status_code=404) from None
        except MachineGone:
            raise _not_found(f"sandbox {self._sandbox.id}") from None


class FakeDaytonaSandbox:
    """`daytona.AsyncSandbox`: a handle on a machine of the cloud, looked up by id on every call."""

    def __init__(self, client: FakeAsyncDaytona, sandbox_id: str, uid: int) -> None:
        self._client = client
        self.id = sandbox_id
        self._uid = uid
        self.state = "started"
        self.process = FakeDaytonaProcess(self)
        self.fs = FakeDaytonaFileSystem(self)

    def _machine(self) -> FakeMachine:
        machine = self._client.cloud.machines.get(self.id)
        if machine is None or not machine.rootfs.is_dir() or self.id in self._client.deleted:
            raise _not_found(f"sandbox {self.id}")
        return machine

    def _live(self) -> FakeMachine:
        machine = self._machine()
        if self.id in self._client.stopped:
            raise daytona.DaytonaBadRequestError(f"sandbox {self.id} is not started", status_code=400)
        if not machine.running:
            raise _not_found(f"sandbox {self.id}")
        return machine

    async def refresh_data(self, request_timeout: float | None = None) -> None:
        machine = self._machine()
        if self.id in self._client.stopped:
            self.state = "stopped"
        else:
            self.state = "started" if machine.running else "error"

    async def stop(self, timeout: float | None = 60, force: bool = False) -> None:
        self._machine().kill()  # the disk stays
        self._client.stopped.add(self.id)
        self.state = "stopped"

    async def start(self, timeout: float | None = 60) -> None:
        old = self._machine()
        if old.running:
            return
        machine = FakeMachine(self._client.cloud, self.id, old.rootfs, old.network)
        await machine.start()
        self._client.cloud.machines[self.id] = machine
        self._client.stopped.discard(self.id)
        self._client.sessions.get(self.id, {}).clear()  # a restarted daemon has no sessions
        self.state = "started"

    async def delete(self, timeout: float | None = 60, wait: bool = False) -> None:
        await self._client.delete(self)  # type: ignore[arg-type]

    async def create_snapshot(self, name: str, timeout: float | None = 60) -> None:
        try:
            image = await self._client.cloud.snapshot(self._live())
        except MachineGone:
            raise _not_found(f"sandbox {self.id}") from None
        self._client.snapshots[name] = image


class FakeAsyncDaytona:
    """`daytona.AsyncDaytona` bound to one `FakeCloud`."""

    def __init__(self, cloud: FakeCloud) -> None:
        self.cloud = cloud
        self.snapshots: dict[str, str] = {}  # Daytona snapshot name -> the cloud's disk image
        self.stopped: set[str] = set()
        self.deleted: set[str] = set()
        self.uids: dict[str, int] = {}
        self.sessions: dict[str, dict[str, dict[str, _SessionCommand]]] = {}  # sandbox -> session -> commands
        self.created_with: dict[str, Any] = {}

    async def create(
        self,
        params: daytona.CreateSandboxFromSnapshotParams | daytona.CreateSandboxFromImageParams | None = None,
        *,
        timeout: float = 60,
        on_snapshot_create_logs: Callable[[str], None] | None = None,
    ) -> FakeDaytonaSandbox:
        params = params or daytona.CreateSandboxFromSnapshotParams()
        image = None
        snapshot = getattr(params, "snapshot", None)
        if snapshot:
            if snapshot not in self.snapshots:
                raise _not_found(f"snapshot {snapshot}")
            image = self.snapshots[snapshot]
        machine = await self.cloud.start_machine(
            prefix="dt-",
            image=image,
            network=params.network_block_all is not True,  # Daytona's default: open
        )
        uid = 0 if params.os_user == "root" else USER_UID
        self.uids[machine.id] = uid
        self.created_with[machine.id] = params
        return FakeDaytonaSandbox(self, machine.id, uid)

    async def get(self, sandbox_id_or_name: str, request_timeout: float | None = None) -> FakeDaytonaSandbox:
        machine = self.cloud.machines.get(sandbox_id_or_name)
        if machine is None or sandbox_id_or_name in self.deleted or not machine.rootfs.is_dir():
            raise _not_found(f"sandbox {sandbox_id_or_name}")
        sandbox = FakeDaytonaSandbox(self, machine.id, self.uids[machine.id])
        await sandbox.refresh_data()
        return sandbox

    async def delete(self, sandbox: FakeDaytonaSandbox, timeout: float = 60, wait: bool = False) -> None:
        machine = self.cloud.machines.get(sandbox.id)
        if machine is None or sandbox.id in self.deleted:
            raise _not_found(f"sandbox {sandbox.id}")
        machine.kill()
        self.deleted.add(sandbox.id)
        sandbox.state = "destroyed"


def fake_daytona(root: Path) -> tuple[FakeCloud, FakeAsyncDaytona]:
    cloud = FakeCloud(root)
    return cloud, FakeAsyncDaytona(cloud)
