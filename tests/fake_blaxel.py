"""An in-process fake of the ``blaxel`` SDK's sandbox objects, backed by real machines: only the RPC layer is fake.

Blaxel cannot be reached from the test machines, so the tests swap the SDK *objects* (as for E2B, Modal and
Daytona, tests/provider_fakes.py): `FakeBlaxel` stands in for ``blaxel.core`` with a ``SandboxInstance`` and a
``Snapshot`` bound to one `FakeBlaxelWorld`, whose sandboxes are real bubblewrap machines from a `FakeCloud`.
Commands really run (as root, as Blaxel's sandbox API runs them), files really move, killed processes really die.

Fidelity: method names and signatures match the installed SDK (tests/test_blaxel.py compares them with
`inspect.signature`); the fakes take the SDK's own request forms (``SandboxCreateConfiguration``, a process dict
read by the real ``ProcessRequest.from_dict``, ``SandboxUpdateNetwork``) and return its own models (``Sandbox``
with ``Status``/``SandboxState``, ``ProcessResponse``, ``SuccessResponse``, ``SandboxForkResponse``); errors are the
SDK's classes: ``SandboxAPIError`` (404) for an unknown sandbox, ``ResponseError`` (404) for a missing file or
process, ``SnapshotAPIError`` (404) for an unknown snapshot, and ``httpx.RemoteProtocolError`` when a held exec
request drops with its machine. Output goes to the log callbacks one line at a time, without its newline, as the
sandbox API's stream sends it.

Lifecycle: `standby` freezes every process of a machine (SIGSTOP) and the next request thaws it (SIGCONT), as
Blaxel resumes a sandbox from standby with its memory and processes; `archive` stops the machine and keeps its
disk (unarchive boots it again on that disk); a deleted sandbox is TERMINATED, a lost machine (`FakeCloud.lose`)
is FAILED. Not modelled: images (every sandbox is "a Debian-like machine with the host's /usr"), memory, regions,
TTLs, and domain filtering beyond "open or not" (any network configuration closes the machine's network).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from blaxel.core.client.models import Env, Metadata, Sandbox, SandboxForkResponse
from blaxel.core.client.models import SandboxSpec as BlaxelSandboxSpec
from blaxel.core.client.models.sandbox_fork_response_type import SandboxForkResponseType
from blaxel.core.client.models.sandbox_state import SandboxState
from blaxel.core.client.models.status import Status
from blaxel.core.sandbox.client.models import ProcessResponse, SuccessResponse
from blaxel.core.sandbox.client.models.process_request import ProcessRequest
from blaxel.core.sandbox.client.models.process_response_status import ProcessResponseStatus
from blaxel.core.sandbox.default.sandbox import (
    ARCHIVE_MAX_WAIT_MS,
    ARCHIVE_WAIT_POLL_MS,
    SandboxAPIError,
)
from blaxel.core.sandbox.types import (
    ProcessRequestWithLog,
    ProcessResponseWithLog,
    ResponseError,
    SandboxCreateConfiguration,
    SandboxUpdateNetwork,
)
from blaxel.core.snapshot import SnapshotAPIError

from tests.provider_fakes import FakeCloud, FakeMachine, MachineGone, MachineProcess

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _sandbox_api_error(status: int, message: str) -> ResponseError:
    return ResponseError(httpx.Response(status, json={"error": message}))


@dataclass
class _Record:
    """What the control plane knows of one sandbox."""

    name: str
    configuration: SandboxCreateConfiguration
    network: bool
    status: str = "DEPLOYED"
    state: str = "RUNNING"
    processes: dict[str, MachineProcess] = field(default_factory=dict)  # the sandbox API's processes, by name


class FakeBlaxelWorld:
    """One Blaxel workspace: sandboxes (machines of a `FakeCloud`) by name, and snapshots by id."""

    def __init__(self, cloud: FakeCloud) -> None:
        self.cloud = cloud
        self.records: dict[str, _Record] = {}
        self.snapshots: dict[str, tuple[str, str]] = {}  # snapshot id -> (the cloud's disk image, source name)
        self.network_updates: list[tuple[str, Any]] = []

    # -- the control plane's view --------------------------------------------------------------------------------

    def status(self, name: str) -> str:
        record = self.records[name]
        if record.status == "DEPLOYED":
            machine = self.cloud.machines.get(name)
            if machine is None or not machine.running:
                record.status = "FAILED"  # the VM died under it
        return record.status

    def model(self, name: str) -> Sandbox:
        record = self.records[name]
        return Sandbox(
            metadata=Metadata(name=name),
            spec=BlaxelSandboxSpec(),
            status=Status(self.status(name)),
            state=SandboxState(record.state),
        )

    def live(self, name: str) -> FakeMachine:
        """The machine behind a sandbox API request; a sandbox in standby resumes, processes and all."""
        record = self.records.get(name)
        if record is None or self.status(name) != "DEPLOYED":
            raise _sandbox_api_error(404, f"sandbox {name} not found")
        machine = self.cloud.machines[name]
        if record.state == "STANDBY":
            assert machine.process is not None
            os.killpg(machine.process.pid, signal.SIGCONT)
            record.state = "RUNNING"
        return machine

    # -- what the tests do to it ---------------------------------------------------------------------------------

    def standby(self, name: str) -> None:
        """Idle long enough: Blaxel freezes the VM with its memory and processes."""
        machine = self.cloud.machines[name]
        assert machine.process is not None and machine.running
        os.killpg(machine.process.pid, signal.SIGSTOP)
        self.records[name].state = "STANDBY"

    def archive(self, name: str) -> None:
        """The disk is kept, memory and processes are not."""
        self.cloud.machines[name].kill()
        self.records[name].status = "ARCHIVED"
        self.records[name].state = "STANDBY"
        self.records[name].processes.clear()

    async def boot(self, name: str, configuration: SandboxCreateConfiguration, image: str | None = None) -> None:
        network = not configuration.network  # none given: Blaxel's default, open
        if name in self.cloud.machines:  # a machine of that name was deleted: the name is free again
            self.cloud.machines.pop(name)
        machine = await self.cloud.start_machine(prefix="bl-", image=image, network=network)
        # Blaxel addresses sandboxes by name: the machine takes it.
        self.cloud.machines.pop(machine.id)
        machine.id = name
        self.cloud.machines[name] = machine
        self.records[name] = _Record(name, configuration, network)

    def close(self) -> None:
        for machine in self.cloud.machines.values():
            if machine.process is not None and machine.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(machine.process.pid, signal.SIGCONT)
        self.cloud.close()


class FakeSandboxProcess:
    """`blaxel.core.sandbox.default.process.SandboxProcess`."""

    def __init__(self, instance: FakeSandboxInstance) -> None:
        self._instance = instance

    @property
    def _record(self) -> _Record:
        return self._instance._world.records[self._instance.metadata.name]

    async def exec(self, process: ProcessRequest | ProcessRequestWithLog | dict[str, Any]) -> Any:
        callbacks: dict[str, Callable[[str], None] | None] = {"on_log": None, "on_stdout": None, "on_stderr": None}
        if isinstance(process, ProcessRequestWithLog):
            for key in callbacks:
                callbacks[key] = getattr(process, key)
            process = process.to_dict()
        if isinstance(process, dict):
            process = dict(process)
            for key in callbacks:
                if key in process:
                    callbacks[key] = process.pop(key)
            parsed = ProcessRequest.from_dict(process)  # the SDK's own reading of the dict: unknown keys fail here
            assert parsed is not None
            process = parsed
        name = str(process.name) if process.name else uuid.uuid4().hex
        machine = self._instance._world.live(self._instance.metadata.name)
        running = self._record.processes.get(name)
        if running is not None and not running._task.done():
            raise _sandbox_api_error(400, f"process with name '{name}' already exists and is running")
        env = process.env.to_dict() if process.env else {}

        def lines(stream: str) -> tuple[Callable[[bytes], None], Callable[[], None]]:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            pending = [""]

            def emit(line: str) -> None:
                for key in ("on_log", "on_stdout" if stream == "out" else "on_stderr"):
                    callback = callbacks[key]
                    if callback is not None:
                        callback(line)

            def feed(data: bytes) -> None:
                pending[0] += decoder.decode(data)
                *complete, pending[0] = pending[0].split("\n")
                for line in complete:
                    emit(line)

            def flush() -> None:
                rest = pending[0] + decoder.decode(b"", final=True)
                if rest:
                    emit(rest)

            return feed, flush

        out, flush_out = lines("out")
        err, flush_err = lines("err")
        cwd = str(process.working_dir) if process.working_dir else "/"
        try:
            started = await machine.start_process(
                str(process.command), env={"PATH": _PATH, "HOME": "/blaxel", **env}, cwd=cwd, uid=0,
                on_stdout=out, on_stderr=err,
            )  # fmt: skip
        except MachineGone:
            raise _sandbox_api_error(404, f"sandbox {self._instance.metadata.name} not found") from None
        self._record.processes[name] = started
        response = ProcessResponse(
            command=str(process.command), completed_at="", exit_code=0, logs="", name=name, pid=str(started.pid),
            started_at="", status=ProcessResponseStatus.RUNNING, stderr="", stdout="", working_dir=cwd,
        )  # fmt: skip
        if not process.wait_for_completion:
            return response
        try:
            status = await started.wait()
        except MachineGone:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body") from None
        flush_out()
        flush_err()
        response.exit_code = int(status["code"])
        response.status = ProcessResponseStatus.COMPLETED if status["code"] == 0 else ProcessResponseStatus.FAILED
        return ProcessResponseWithLog(response, lambda: None)

    async def kill(self, identifier: str) -> SuccessResponse:
        machine = self._instance._world.live(self._instance.metadata.name)
        running = self._record.processes.get(identifier)
        if running is None or running._task.done():
            raise _sandbox_api_error(404, "process not found")
        try:
            await machine.call("kill", pid=running.pid)
        except MachineGone:
            raise _sandbox_api_error(404, "process not found") from None
        return SuccessResponse(message="Process killed successfully")


class FakeSandboxFileSystem:
    """`blaxel.core.sandbox.default.filesystem.SandboxFileSystem`: files move as root."""

    def __init__(self, instance: FakeSandboxInstance) -> None:
        self._instance = instance

    async def read_binary(self, path: str) -> bytes:
        machine = self._instance._world.live(self._instance.metadata.name)
        data = bytearray()
        try:
            async for chunk in machine.read_file(path, 0):
                data += chunk
        except FileNotFoundError:
            raise _sandbox_api_error(404, f"file not found: {path}") from None
        except MachineGone:
            raise _sandbox_api_error(404, f"sandbox {self._instance.metadata.name} not found") from None
        return bytes(data)

    async def write_binary(self, path: str, content: bytes | bytearray | str) -> SuccessResponse:
        machine = self._instance._world.live(self._instance.metadata.name)
        data = Path(content).read_bytes() if isinstance(content, str) else bytes(content)  # str: a local path

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        try:
            await machine.write_file(path, 0, chunks())
        except MachineGone:
            raise _sandbox_api_error(404, f"sandbox {self._instance.metadata.name} not found") from None
        except PermissionError as e:
            raise _sandbox_api_error(403, str(e)) from None
        return SuccessResponse(message="File written", path=path)


class FakeSandboxSnapshots:
    """`blaxel.core.sandbox.default.snapshot.SandboxSnapshots`."""

    def __init__(self, instance: FakeSandboxInstance) -> None:
        self._instance = instance

    async def create(self, name: str | None = None) -> FakeSnapshot:
        world = self._instance._world
        source = self._instance.metadata.name
        machine = world.live(source)
        try:
            image = await world.cloud.snapshot(machine)
        except MachineGone:
            raise SandboxAPIError(f"sandbox {source} not found", status_code=404) from None
        snapshot_id = f"snap_{uuid.uuid4().hex[:12]}"
        world.snapshots[snapshot_id] = (image, source)
        return type(self._instance)._snapshot_class(snapshot_id, name or snapshot_id)


class FakeSandboxInstance:
    """`blaxel.core.SandboxInstance`; bound to a world by `FakeBlaxel`."""

    _world: FakeBlaxelWorld
    _snapshot_class: type[FakeSnapshot]

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.process = FakeSandboxProcess(self)
        self.fs = FakeSandboxFileSystem(self)
        self.snapshots = FakeSandboxSnapshots(self)

    @property
    def metadata(self) -> Metadata:
        return self.sandbox.metadata

    @property
    def status(self) -> Any:
        return self.sandbox.status

    @classmethod
    async def create(
        cls,
        sandbox: Sandbox | SandboxCreateConfiguration | dict[str, Any] | None = None,
        safe: bool = False,
        create_if_not_exist: bool = False,
        timeout: int | None = None,
        *,
        mount_drives: list[Any] | None = None,
    ) -> FakeSandboxInstance:
        if isinstance(sandbox, dict):
            sandbox = SandboxCreateConfiguration.from_dict(sandbox)
        if not isinstance(sandbox, SandboxCreateConfiguration):
            raise ValueError(f"the fake takes a SandboxCreateConfiguration, not {type(sandbox).__name__}")
        name = sandbox.name or f"sandbox-{uuid.uuid4().hex[:10]}"  # unnamed: the platform assigns one
        if name in cls._world.records and cls._world.status(name) not in ("TERMINATED", "FAILED"):
            raise SandboxAPIError(f"sandbox {name} already exists", status_code=409)
        await cls._world.boot(name, sandbox)
        return cls(cls._world.model(name))

    @classmethod
    async def get(cls, sandbox_name: str) -> FakeSandboxInstance:
        if sandbox_name not in cls._world.records:
            raise SandboxAPIError(f"Sandbox '{sandbox_name}' not found", status_code=404)
        return cls(cls._world.model(sandbox_name))

    @classmethod
    async def delete(cls, sandbox_name: str) -> Sandbox:
        world = cls._world
        if sandbox_name not in world.records or world.status(sandbox_name) == "TERMINATED":
            raise SandboxAPIError(f"Sandbox '{sandbox_name}' not found", status_code=404)
        machine = world.cloud.machines.get(sandbox_name)
        if machine is not None:
            if machine.process is not None and machine.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(machine.process.pid, signal.SIGCONT)
            machine.kill()
        world.records[sandbox_name].status = "TERMINATED"  # still readable for its retention, as on Blaxel
        return world.model(sandbox_name)

    @classmethod
    async def unarchive(
        cls, sandbox_name: str, *, wait: bool = True, max_wait: int = ARCHIVE_MAX_WAIT_MS,
        interval: int = ARCHIVE_WAIT_POLL_MS,
    ) -> FakeSandboxInstance:  # fmt: skip
        world = cls._world
        record = world.records.get(sandbox_name)
        if record is None:
            raise SandboxAPIError(f"Sandbox '{sandbox_name}' not found", status_code=404)
        if record.status != "ARCHIVED":
            raise SandboxAPIError(f"Sandbox {sandbox_name} is {record.status} while it should unarchive")
        old = world.cloud.machines[sandbox_name]
        machine = FakeMachine(world.cloud, sandbox_name, old.rootfs, old.network)
        await machine.start()
        world.cloud.machines[sandbox_name] = machine
        record.status, record.state = "DEPLOYED", "RUNNING"
        return cls(world.model(sandbox_name))

    @classmethod
    async def update_network(cls, sandbox_name: str, network: SandboxUpdateNetwork) -> FakeSandboxInstance:
        if sandbox_name not in cls._world.records:
            raise SandboxAPIError(f"Sandbox '{sandbox_name}' not found", status_code=404)
        cls._world.network_updates.append((sandbox_name, network.network))
        return cls(cls._world.model(sandbox_name))


class FakeSnapshot:
    """`blaxel.core.Snapshot`: a workspace resource that outlives the sandbox it was taken from."""

    _world: FakeBlaxelWorld

    def __init__(self, snapshot_id: str, name: str) -> None:
        self.id = snapshot_id
        self.name = name

    @classmethod
    async def get(cls, snapshot_id: str) -> FakeSnapshot:
        if snapshot_id not in cls._world.snapshots:
            raise SnapshotAPIError(f"snapshot {snapshot_id} not found", status_code=404)
        return cls(snapshot_id, snapshot_id)

    async def fork(
        self,
        target_name: str,
        target_type: str = "sandbox",
        port: int | None = None,
        traffic: int | None = None,
        custom_domain: str | None = None,
        prefix: str | None = None,
        envs: Sequence[Env | dict[str, str]] | None = None,
    ) -> SandboxForkResponse:
        world = self._world
        if self.id not in world.snapshots:
            raise SnapshotAPIError(f"snapshot {self.id} not found", status_code=404)
        image, source = world.snapshots[self.id]
        await world.boot(target_name, world.records[source].configuration, image)  # the source's settings
        return SandboxForkResponse(name=target_name, snapshot_id=self.id, type_=SandboxForkResponseType.SANDBOX)


class FakeBlaxel:
    """Stands in for ``blaxel.core``: ``SandboxInstance`` and ``Snapshot`` bound to one world."""

    def __init__(self, world: FakeBlaxelWorld) -> None:
        self.world = world
        self.Snapshot: type[FakeSnapshot] = type("BoundFakeSnapshot", (FakeSnapshot,), {"_world": world})
        self.SandboxInstance: type[FakeSandboxInstance] = type(
            "BoundFakeSandboxInstance", (FakeSandboxInstance,), {"_world": world, "_snapshot_class": self.Snapshot}
        )


def fake_blaxel(root: Path) -> tuple[FakeBlaxelWorld, FakeBlaxel]:
    world = FakeBlaxelWorld(FakeCloud(root))
    return world, FakeBlaxel(world)
