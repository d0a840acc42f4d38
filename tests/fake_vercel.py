"""An in-process fake of the ``vercel`` SDK's async sandbox client, backed by real machines: only the RPC layer is fake.

Vercel cannot be reached from the test machines, so the tests swap the SDK *handles* the provider drives:
`FakeSandboxClient` for ``vercel.sandbox.SandboxClient``, its `FakeVercelSandbox` for ``Sandbox``, and the pinned
`FakeRuntimeSession` (``SandboxRuntimeSession``, with ``fs``) whose processes (`FakeProcess`) really run in a
bubblewrap machine from a `FakeCloud` (tests/provider_fakes.py). Each session is one machine; a sandbox keeps its
name across sessions.

Fidelity: signatures match the installed SDK (tests/test_vercel.py compares them with `inspect.signature`), and
the fakes take and return the SDK's own classes: `SnapshotSource`, `NetworkPolicy`, `SandboxResources`,
`SandboxStatus`; output readers subclass its `TextReader`; errors are its `SandboxApiError` (with a real HTTP
response: 404 ``not_found``, 410 ``sandbox_stopped`` for an ended session, as the API answers),
`SandboxStreamError` for a log stream cut by a stopped session, and `SandboxPathNotFoundError`. Modelled as on
Vercel: ``sudo`` runs as root with ``HOME=/root`` and the rest of the environment kept; without it, and in the files
API, the image's user (uid 1000 here, as ``vercel-sandbox``); a session's lifetime (``execution_time_limit``, or
the test's ``lifetimes``) after which it stops - a non-persistent sandbox's disk is then gone, a persistent one is
snapshotted first; ``snapshot()`` ends its session; a resumed session boots from the sandbox's current snapshot.
Not modelled: images, resources, regions, and network policies beyond deny-all versus anything else.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Awaitable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx2
from vercel.sandbox import (
    NetworkPolicy,
    SandboxApiError,
    SandboxPathNotFoundError,
    SandboxResources,
    SandboxStatus,
    SandboxStreamError,
    SandboxUploadSizeMismatchError,
    SnapshotSource,
    TextReader,
)
from vercel.sandbox._internal.models import _OMITTED  # the SDK's own "leave unchanged" default

from tests.provider_fakes import USER_UID, FakeCloud, FakeMachine, MachineGone

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def api_error(status: int, code: str, message: str) -> SandboxApiError:
    request = httpx2.Request("POST", "https://vercel.com/api/v2/sandboxes")
    data = {"error": {"code": code, "message": message}}
    return SandboxApiError(httpx2.Response(status, request=request, json=data), message, data=data)


def _stopped(session_id: str) -> SandboxApiError:
    return api_error(410, "sandbox_stopped", f"session {session_id} is stopped")


def _copy_owners(source: Path, target: Path) -> None:
    """Give ``target``'s files the owners of ``source``'s: a VM disk keeps them, shutil.copytree does not."""
    for path in [target, *target.rglob("*")]:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(source / path.relative_to(target))
            os.lchown(path, st.st_uid, st.st_gid)


async def _save_disk(cloud: FakeCloud, machine: FakeMachine) -> str:
    image = await cloud.snapshot(machine)
    await asyncio.to_thread(_copy_owners, machine.rootfs, cloud.images / image)
    return image


def _seconds(value: int | float | timedelta | None) -> float | None:
    return value.total_seconds() if isinstance(value, timedelta) else value


class _Operation:
    """The SDK's single-use awaitable operations (`CreateSandboxOperation`, `SandboxSessionOperation`)."""

    def __init__(self, work: Awaitable[Any]) -> None:
        self._work = work

    def __await__(self) -> Generator[Any, None, Any]:
        return self._work.__await__()


@dataclass
class _Record:
    """The service's view of one named sandbox."""

    name: str
    persistent: bool
    network: bool
    params: dict[str, Any]
    machine_id: str | None = None
    current_snapshot: str | None = None
    stopped: bool = False  # its current session was stopped (by us, a snapshot, or its lifetime)
    destroyed: bool = False
    expiry: asyncio.Task[None] | None = field(default=None, repr=False)


class FakeTextReader(TextReader):
    """A process's (merged) output, as text chunks decoded as the SDK decodes them."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._closed = False

    def feed(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            self._queue.put_nowait(text)

    def end(self, error: BaseException | None = None) -> None:
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._queue.put_nowait(tail)
        self._queue.put_nowait(error)

    @property
    def closed(self) -> bool:
        return self._closed

    async def receive(self) -> str:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            raise anyio.EndOfStream
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        return item

    async def read(self, size: int = -1) -> str:
        parts = []
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                parts.append(await self.receive())
        return "".join(parts)

    async def readline(self) -> str:
        return await self.receive()

    async def aclose(self) -> None:
        self._closed = True


class FakeProcess:
    """`vercel.sandbox.Process`."""

    def __init__(self, session: FakeRuntimeSession, process: Any, stdout: FakeTextReader) -> None:
        self._session = session
        self._process = process
        self.id = f"cmd_{uuid.uuid4().hex[:12]}"
        self.stdout: FakeTextReader | None = stdout
        self.stderr: FakeTextReader | None = None
        self.returncode: int | None = None
        self._follow = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        assert self.stdout is not None
        try:
            status = await self._process.wait()
        except MachineGone:
            self.stdout.end(SandboxStreamError("the session stopped", code="sandbox_stopped"))
            raise _stopped(self._session.id) from None
        self.returncode = int(status["code"])
        self.stdout.end()

    async def wait(self) -> int:
        await asyncio.shield(self._follow)
        assert self.returncode is not None
        return self.returncode

    async def kill(self) -> None:
        machine = self._session._live()
        try:
            await machine.call("kill", pid=self._process.pid)
        except MachineGone:
            raise _stopped(self._session.id) from None


class FakeFilesystem:
    """`vercel.sandbox.SandboxFilesystem` of a session: files move as the image's user (uid 1000)."""

    def __init__(self, session: FakeRuntimeSession) -> None:
        self._session = session

    async def read_bytes(self, path: str, *, cwd: str | None = None) -> bytes:
        machine = self._session._live()
        data = bytearray()
        try:
            async for chunk in machine.read_file(path, USER_UID):
                data += chunk
        except FileNotFoundError:
            cause = api_error(404, "file_not_found", f"{path}: no such file")
            raise SandboxPathNotFoundError(path, operation="read_bytes", cwd=cwd, cause=cause) from None
        except PermissionError as e:
            raise api_error(403, "forbidden", f"{path}: {e}") from None
        except MachineGone:
            raise _stopped(self._session.id) from None
        return bytes(data)

    def open(
        self,
        path: str,
        mode: str = "r",
        *,
        cwd: str | None = None,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
        size: int | None = None,
        permissions: int | None = None,
    ) -> FakeBinaryReader | FakeBinaryWriter:
        if mode == "rb":
            return FakeBinaryReader(self, path, cwd)
        assert mode == "wb", "the fake models binary handles only"
        return FakeBinaryWriter(self, path, size)

    async def write_bytes(self, path: str, data: bytes, *, cwd: str | None = None, mode: int | None = None) -> None:
        machine = self._session._live()

        async def chunks() -> Any:
            yield bytes(data)

        try:
            await machine.write_file(path, USER_UID, chunks())
        except PermissionError as e:
            raise api_error(403, "forbidden", f"{path}: {e}") from None
        except MachineGone:
            raise _stopped(self._session.id) from None


class FakeBinaryReader:
    """`vercel.sandbox.SandboxBinaryReader`: a file streamed out of the machine."""

    def __init__(self, filesystem: FakeFilesystem, path: str, cwd: str | None) -> None:
        self._fs = filesystem
        self._path = path
        self._cwd = cwd
        self._buffer = bytearray()
        self._chunks: Any = None
        self._eof = False

    async def __aenter__(self) -> FakeBinaryReader:
        machine = self._fs._session._live()
        self._chunks = machine.read_file(self._path, USER_UID).__aiter__()
        await self._fill(1)  # a missing file fails on open, as the SDK's reader does on enter
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _fill(self, want: int) -> None:
        while not self._eof and (want < 0 or len(self._buffer) < want):
            try:
                self._buffer += await self._chunks.__anext__()
            except StopAsyncIteration:
                self._eof = True
            except FileNotFoundError:
                cause = api_error(404, "file_not_found", f"{self._path}: no such file")
                raise SandboxPathNotFoundError(self._path, operation="open", cwd=self._cwd, cause=cause) from None
            except PermissionError as e:
                raise api_error(403, "forbidden", f"{self._path}: {e}") from None
            except MachineGone:
                raise _stopped(self._fs._session.id) from None

    async def read(self, size: int = -1) -> bytes:
        await self._fill(size)
        take = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        data = bytes(self._buffer[:take])
        del self._buffer[:take]
        return data

    async def aclose(self) -> None:
        if self._chunks is not None:
            with contextlib.suppress(Exception):
                await self._chunks.aclose()


class FakeBinaryWriter:
    """`vercel.sandbox.SandboxBinaryWriter`: bytes streamed into a file of the machine, which must come to the
    declared ``size`` (the SDK's `SandboxUploadSizeMismatchError` otherwise)."""

    def __init__(self, filesystem: FakeFilesystem, path: str, size: int | None) -> None:
        self._fs = filesystem
        self._path = path
        self._size = size
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
        self._written = 0
        self._task: asyncio.Future[None] | None = None

    async def __aenter__(self) -> FakeBinaryWriter:
        machine = self._fs._session._live()

        async def chunks() -> Any:
            while (chunk := await self._queue.get()) is not None:
                yield chunk

        self._task = asyncio.ensure_future(machine.write_file(self._path, USER_UID, chunks()))
        return self

    async def write(self, data: bytes, /) -> int:
        assert self._task is not None
        if self._task.done():
            await self._task
        self._written += len(data)
        await self._queue.put(bytes(data))
        return len(data)

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        assert self._task is not None
        await self._queue.put(None)
        try:
            await self._task
        except PermissionError as e:
            raise api_error(403, "forbidden", f"{self._path}: {e}") from None
        except MachineGone:
            raise _stopped(self._fs._session.id) from None
        if exc_type is None and self._size is not None and self._written != self._size:
            raise SandboxUploadSizeMismatchError(
                self._path, declared=self._size, consumed=self._written, early_end=self._written < self._size
            )


class FakeSnapshot:
    """`vercel.sandbox.Snapshot`."""

    def __init__(self, snapshot_id: str, session_id: str) -> None:
        self.id = snapshot_id
        self.source_session_id = session_id
        self.status = "created"


class FakeRuntimeSession:
    """`vercel.sandbox.SandboxRuntimeSession`: one machine; its calls never resume anything."""

    def __init__(self, client: FakeSandboxClient, record: _Record, machine_id: str) -> None:
        self._client = client
        self._record = record
        self.id = machine_id
        self.sandbox_name = record.name
        self.fs = FakeFilesystem(self)
        self.status: SandboxStatus = self._state()

    def _state(self) -> SandboxStatus:
        machine = self._client.cloud.machines.get(self.id)
        if self._record.machine_id != self.id or self._record.stopped or self._record.destroyed:
            return SandboxStatus.STOPPED
        if machine is None or not machine.running:
            return SandboxStatus.FAILED
        return SandboxStatus.RUNNING

    def _live(self) -> FakeMachine:
        if self._state() != SandboxStatus.RUNNING:
            raise _stopped(self.id)
        return self._client.cloud.machines[self.id]

    async def refresh(self, *, include_system_routes: bool | None = None) -> FakeRuntimeSession:
        if self._record.destroyed:
            raise api_error(404, "not_found", f"sandbox {self._record.name} not found")
        self.status = self._state()
        return self

    async def create_process(
        self,
        command: str,
        args: Sequence[str] | None = None,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        sudo: bool = False,
        kill_after: float | timedelta | None = None,
        stdin: int | None = None,
        stdout: int = subprocess.PIPE,
        stderr: int = subprocess.PIPE,
    ) -> FakeProcess:
        machine = self._live()
        environment = {"PATH": _PATH, "HOME": "/home/vercel-sandbox", **(env or {})}
        if sudo:
            environment["HOME"] = "/root"  # Vercel's sudo: HOME is root's, PATH and the rest are kept
        reader = FakeTextReader()
        assert stderr == subprocess.STDOUT, "the provider merges its output; the fake models only that"
        try:
            process = await machine.start_process(
                shlex.join([command, *(args or ())]), env=environment, cwd=cwd or "/",
                uid=0 if sudo else USER_UID, on_stdout=reader.feed, on_stderr=reader.feed,
            )  # fmt: skip
        except MachineGone:
            raise _stopped(self.id) from None
        return FakeProcess(self, process, reader)

    async def snapshot(self, *, expiration: Any = None) -> FakeSnapshot:
        """Vercel's snapshot: the session stops once its disk is saved."""
        machine = self._live()
        try:
            image = await _save_disk(self._client.cloud, machine)
        except MachineGone:
            raise _stopped(self.id) from None
        snapshot_id = f"snap_{uuid.uuid4().hex[:16]}"
        self._client.snapshots[snapshot_id] = image
        self._record.current_snapshot = snapshot_id
        self._client._stop(self._record)
        self.status = SandboxStatus.STOPPED
        return FakeSnapshot(snapshot_id, self.id)

    async def stop(self) -> FakeRuntimeSession:
        self._client._stop(self._record)
        self.status = SandboxStatus.STOPPED
        return self


class FakeVercelSandbox:
    """`vercel.sandbox.Sandbox`: a handle on a named sandbox."""

    def __init__(self, client: FakeSandboxClient, record: _Record) -> None:
        self._client = client
        self._record = record
        self.name = record.name
        self.current_session: FakeRuntimeSession | None = (
            FakeRuntimeSession(client, record, record.machine_id) if record.machine_id else None
        )

    @property
    def status(self) -> SandboxStatus:
        if self.current_session is None:
            return SandboxStatus.STOPPED
        return self.current_session._state()

    async def update(
        self, *, ports: list[int] | None = None, execution_time_limit: Any = None, resources: Any = None,
        persistent: bool | None = None, network_policy: Any = None, network_id: Any = _OMITTED,
        env: dict[str, str] | None = None, tags: dict[str, str] | None = None, mounts: Any = None,
        snapshot_expiration: Any = None, snapshot_retention: Any = _OMITTED, current_snapshot_id: str | None = None,
        region: str | None = None, failover_regions: Iterable[str] | None = None,
    ) -> FakeVercelSandbox:  # fmt: skip
        if current_snapshot_id is not None:
            if current_snapshot_id not in self._client.snapshots:
                raise api_error(404, "not_found", f"snapshot {current_snapshot_id} not found")
            self._record.current_snapshot = current_snapshot_id
        if persistent is not None:
            self._record.persistent = persistent
        return self

    def session(self) -> _Operation:
        """Acquire the running current session, resuming the sandbox on a new one if it is stopped."""

        async def acquire() -> FakeRuntimeSession:
            record = self._record
            if record.destroyed:
                raise api_error(404, "not_found", f"sandbox {record.name} not found")
            current = FakeRuntimeSession(self._client, record, record.machine_id or "")
            if current._state() != SandboxStatus.RUNNING:
                await self._client._start_session(record)
                current = FakeRuntimeSession(self._client, record, record.machine_id or "")
            self.current_session = current
            return current

        return _Operation(acquire())

    async def stop(self) -> FakeVercelSandbox:
        self._client._stop(self._record)
        return self

    async def destroy(self, *, delete_orphan_snapshots: bool = False) -> FakeVercelSandbox:
        record = self._record
        if record.destroyed:
            raise api_error(404, "not_found", f"sandbox {record.name} not found")
        self._client._stop(record)
        record.destroyed = True
        return self


class FakeSandboxClient:
    """`vercel.sandbox.SandboxClient` bound to one `FakeCloud`. ``lifetimes`` (seconds), when given, replace the
    requested ``execution_time_limit`` of the next sandboxes created, one each: a plan maximum the test controls."""

    def __init__(self, cloud: FakeCloud) -> None:
        self.cloud = cloud
        self.sandboxes: dict[str, _Record] = {}
        self.snapshots: dict[str, str] = {}  # snapshot id -> the cloud's disk image
        self.lifetimes: list[float] = []
        self.expired: list[str] = []

    def lose(self, name: str) -> None:
        """The VM under the sandbox's current session crashes and its disk is gone."""
        machine_id = self.sandboxes[name].machine_id
        if machine_id:
            self.cloud.lose(machine_id)

    def _stop(self, record: _Record) -> None:
        machine = self.cloud.machines.get(record.machine_id or "")
        record.stopped = True
        if record.expiry is not None and record.expiry is not asyncio.current_task():
            record.expiry.cancel()
        if machine is not None:
            machine.kill()
            if not record.persistent:  # a non-persistent sandbox's filesystem ends with its session
                shutil.rmtree(machine.rootfs, ignore_errors=True)

    async def _expire(self, record: _Record, seconds: float) -> None:
        await asyncio.sleep(seconds)
        machine = self.cloud.machines.get(record.machine_id or "")
        if record.persistent and machine is not None and machine.running:  # persistence: saved on stop
            image = await _save_disk(self.cloud, machine)
            snapshot_id = f"snap_{uuid.uuid4().hex[:16]}"
            self.snapshots[snapshot_id] = image
            record.current_snapshot = snapshot_id
        self.expired.append(record.name)
        self._stop(record)

    async def _start_session(self, record: _Record) -> None:
        image = self.snapshots[record.current_snapshot] if record.current_snapshot else None
        machine = await self.cloud.start_machine(prefix="vc-", image=image, network=record.network)
        if image is not None:
            await asyncio.to_thread(_copy_owners, self.cloud.images / image, machine.rootfs)
        record.machine_id = machine.id
        record.stopped = False
        lifetime = self.lifetimes.pop(0) if self.lifetimes else _seconds(record.params["execution_time_limit"])
        if lifetime:
            record.expiry = asyncio.ensure_future(self._expire(record, lifetime))
            self.cloud.background.add(record.expiry)  # type: ignore[arg-type]

    def create_sandbox(
        self,
        *,
        name: str | None = None,
        image: str | None = None,
        source: SnapshotSource | Any | None = None,
        ports: list[int] | None = None,
        execution_time_limit: int | float | timedelta | None = None,
        resources: SandboxResources | None = None,
        persistent: bool | None = None,
        network_policy: NetworkPolicy | None = None,
        network_id: str | None = None,
        env: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        mounts: Any = None,
        snapshot_expiration: Any = None,
        snapshot_retention: Any = None,
        region: str | None = None,
        failover_regions: Iterable[str] | None = None,
        destroy: bool = True,
        **private_parameters: Any,
    ) -> _Operation:
        async def create() -> FakeVercelSandbox:
            sandbox_name = name or f"sbx_{uuid.uuid4().hex[:12]}"
            if sandbox_name in self.sandboxes and not self.sandboxes[sandbox_name].destroyed:
                raise api_error(409, "conflict", f"sandbox {sandbox_name} already exists")
            snapshot = None
            if source is not None:
                assert isinstance(source, SnapshotSource), "the fake models snapshot sources only"
                if source.snapshot_id not in self.snapshots:
                    raise api_error(404, "not_found", f"snapshot {source.snapshot_id} not found")
                snapshot = source.snapshot_id
            record = _Record(
                name=sandbox_name,
                persistent=True if persistent is None else persistent,  # Vercel's default: persistent
                network=network_policy is None or network_policy.mode != "deny-all",
                params={"execution_time_limit": execution_time_limit, "resources": resources, "image": image,
                        "network_policy": network_policy, "tags": dict(tags or {}), "region": region},
                current_snapshot=snapshot,
            )  # fmt: skip
            self.sandboxes[sandbox_name] = record
            await self._start_session(record)
            return FakeVercelSandbox(self, record)

        return _Operation(create())

    async def get_sandbox(
        self, *, name: str, include_system_routes: bool | None = None, **private_parameters: Any
    ) -> FakeVercelSandbox:
        record = self.sandboxes.get(name)
        if record is None or record.destroyed:
            raise api_error(404, "not_found", f"sandbox {name} not found")
        return FakeVercelSandbox(self, record)

    async def aclose(self) -> None:
        return None


def fake_vercel(root: Path) -> tuple[FakeCloud, FakeSandboxClient]:
    cloud = FakeCloud(root)
    return cloud, FakeSandboxClient(cloud)
