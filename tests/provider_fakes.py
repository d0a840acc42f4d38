"""In-process fakes of the E2B and Modal SDK objects, backed by real machines: only the network/RPC layer is fake.

E2B and Modal cannot be reached from the test machines, and faking their wire protocols (Connect-RPC, gRPC) is
impractical, so the tests swap the SDK *objects*: `FakeAsyncSandbox` for ``e2b.AsyncSandbox`` and `FakeModal`
for the ``modal`` module's ``Sandbox``/``App``/``Image`` (with their ``.aio`` interface). Everything behind them is
real: a `FakeCloud` starts each sandbox as a bubblewrap "machine" - its own root filesystem in a folder on the host
(the VM's disk), its own pid/ipc/uts namespaces (and no network unless asked), and an agent (tests/fake_envd.py)
running as root inside that starts processes as root or as uid 1000, streams their output, kills them, and reads
and writes files as a given uid. Commands really run, files really move, processes really outlive their command
and die with their machine; `lose` kills a machine and wipes its disk, as a reclaimed VM.

Fidelity: method names and signatures match the installed SDKs (tests/test_provider_contract.py compares them with
`inspect.signature`); errors are the SDKs' own exception classes, raised where the SDKs raise them (E2B:
``SandboxNotRunningException`` from a dead sandbox's envd, ``SandboxNotFoundException`` from ``connect``,
``FileNotFoundException``, ``CommandExitException``; Modal: ``NotFoundError`` from ``from_id``,
``SandboxTerminatedError`` from a finished sandbox, ``SandboxFilesystemNotFoundError``). What the fakes do not
model: E2B templates and Modal images beyond "an empty Debian-like machine with the host's /usr", resource limits,
sandbox lifetimes, and network policy beyond on/off.

The machines run as real root on the host (without a user namespace), so that root and uid 1000 are distinct users
inside, as in a real sandbox; the fakes therefore need the tests to run as root (CI does).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import e2b
import modal
import modal.exception
from e2b.sandbox.commands.command_handle import CommandExitException, CommandResult
from e2b.sandbox.commands.main import ProcessInfo
from e2b.sandbox.filesystem.filesystem import FileType, WriteInfo
from e2b.sandbox.sandbox_api import SnapshotInfo
from modal.stream_type import StreamType

AGENT = Path(__file__).with_name("fake_envd.py")
USER_UID = 1000
_ETC = ["alternatives", "ssl", "ca-certificates", "resolv.conf", "hosts", "nsswitch.conf", "localtime",
        "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "passwd", "group", "python3", "python3.11", "debian_version",
        "os-release"]  # fmt: skip
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def fakes_unavailable() -> str | None:
    """Why the fakes cannot run here, or None."""
    if os.geteuid() != 0:
        return "the E2B/Modal fakes run sandboxes as real root and uid 1000, which needs root (CI runs as root)"
    if shutil.which("bwrap") is None:
        return "the E2B/Modal fakes need bubblewrap: apt-get install -y bubblewrap"
    return None


# -- machines -------------------------------------------------------------------------------------------------------


class MachineGone(Exception):
    """The machine was killed or its disk is gone; each SDK fake turns this into its SDK's own error."""


class FakeMachine:
    """One sandbox: a root filesystem folder, a bubblewrap process tree, an agent on a Unix socket."""

    def __init__(self, cloud: FakeCloud, machine_id: str, rootfs: Path, network: bool) -> None:
        self.cloud = cloud
        self.id = machine_id
        self.rootfs = rootfs
        self.network = network
        self.socket_dir = Path(tempfile.mkdtemp(prefix="fe-", dir="/tmp"))  # short: sun_path holds 108 bytes
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        # Bytes that crossed the SDK layer: file contents read out / written in, and command output streamed back.
        self.traffic = {"download": 0, "upload": 0, "output": 0}

    async def start(self) -> None:
        for link in ("lib", "lib64", "bin", "sbin"):  # bubblewrap makes these; a disk copied from an image has them
            if (self.rootfs / link).is_symlink():
                (self.rootfs / link).unlink()
        folders = (("tmp", 0o1777), ("root", 0o700), ("home", 0o755), ("etc", 0o755), ("opt/fake-envd", 0o755))
        for folder, mode in folders:
            (self.rootfs / folder).mkdir(parents=True, exist_ok=True)
            os.chmod(self.rootfs / folder, mode)
        argv = [
            "bwrap", "--bind", str(self.rootfs), "/", "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/sbin", "/sbin", "--proc", "/proc", "--dev", "/dev",
            "--bind", str(self.socket_dir), "/run/fake-envd", "--ro-bind", str(AGENT), "/opt/fake-envd/envd.py",
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "fake-sandbox", "--die-with-parent",
        ]  # fmt: skip
        for name in _ETC:
            argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        if not self.network:
            argv.append("--unshare-net")
        argv += ["--clearenv", "--setenv", "PATH", _PATH, "/usr/bin/python3", "/opt/fake-envd/envd.py",
                 "/run/fake-envd/envd.sock"]  # fmt: skip
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        # Python starting in bubblewrap takes a tenth of a second on an idle machine, seconds on a loaded one.
        for _ in range(1500):
            if await self._listening():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"fake machine {self.id} did not start (bwrap exited {self.process.returncode})")
            await asyncio.sleep(0.02)
        raise RuntimeError(f"fake machine {self.id} did not start its agent in 30 s")

    async def _listening(self) -> bool:
        """The agent accepts connections: its socket file appears at bind(), a moment before listen()."""
        try:
            _, writer = await asyncio.open_unix_connection(str(self.socket_dir / "envd.sock"))
        except OSError:
            return False
        writer.close()
        return True

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.rootfs.is_dir()

    def kill(self, exit_code: int = 137) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.exit_code is None:
            self.exit_code = exit_code
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    # -- the agent's RPC ------------------------------------------------------------------------------------------

    async def _connect(self, request: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not self.running:
            raise MachineGone(self.id)
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket_dir / "envd.sock"), limit=1 << 20)
        except OSError:
            raise MachineGone(self.id) from None
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        return reader, writer

    @staticmethod
    async def _frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        try:
            head = await reader.readexactly(5)
            return head[:1], await reader.readexactly(struct.unpack(">I", head[1:])[0])
        except (asyncio.IncompleteReadError, ConnectionError):
            raise MachineGone("the connection to the machine dropped") from None

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        reader, writer = await self._connect({"op": op, **args})
        try:
            kind, payload = await self._frame(reader)
            assert kind == b"X", kind
            result: dict[str, Any] = json.loads(payload)
            return result
        finally:
            writer.close()

    async def start_process(
        self, cmd: str, *, env: dict[str, str], cwd: str, uid: int,
        on_stdout: Callable[[bytes], Awaitable[None] | None], on_stderr: Callable[[bytes], Awaitable[None] | None],
    ) -> MachineProcess:  # fmt: skip
        reader, writer = await self._connect({"op": "exec", "cmd": cmd, "env": env, "cwd": cwd, "uid": uid})
        kind, payload = await self._frame(reader)
        if kind == b"X":
            writer.close()
            raise OSError(json.loads(payload)["error"])
        return MachineProcess(self, json.loads(payload)["pid"], reader, writer, on_stdout, on_stderr)

    async def read_file(self, path: str, uid: int) -> AsyncIterator[bytes]:
        reader, writer = await self._connect({"op": "read", "path": path, "uid": uid})
        try:
            while True:
                kind, payload = await self._frame(reader)
                if kind == b"O":
                    self.traffic["download"] += len(payload)
                    yield payload
                    continue
                status = json.loads(payload)
                if status["code"] != 0:
                    missing = "No such file" in status["stderr"]
                    raise (FileNotFoundError if missing else PermissionError)(status["stderr"])
                return
        finally:
            writer.close()

    async def write_file(self, path: str, uid: int, chunks: AsyncIterable[bytes]) -> None:
        reader, writer = await self._connect({"op": "write", "path": path, "uid": uid})
        try:
            async for chunk in chunks:
                for start in range(0, len(chunk), 1 << 20):
                    piece = chunk[start : start + (1 << 20)]
                    self.traffic["upload"] += len(piece)
                    writer.write(b"D" + struct.pack(">I", len(piece)) + piece)
                    await writer.drain()
            writer.write(b"Z" + struct.pack(">I", 0))
            await writer.drain()
            _, payload = await self._frame(reader)
            status = json.loads(payload)
            if status["code"] != 0:
                raise PermissionError(status["stderr"])
        finally:
            writer.close()


class MachineProcess:
    """A process the agent started; output is forwarded to the callbacks by a task."""

    def __init__(
        self, machine: FakeMachine, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        on_stdout: Callable[[bytes], Awaitable[None] | None], on_stderr: Callable[[bytes], Awaitable[None] | None],
    ) -> None:  # fmt: skip
        self.machine = machine
        self.pid = pid
        self._reader, self._writer = reader, writer
        self._on = {b"O": on_stdout, b"E": on_stderr}
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> dict[str, Any]:
        try:
            while True:
                kind, payload = await self.machine._frame(self._reader)
                if kind == b"X":
                    status: dict[str, Any] = json.loads(payload)
                    return status
                self.machine.traffic["output"] += len(payload)
                result = self._on[kind](payload)
                if asyncio.iscoroutine(result):
                    await result
        finally:
            self._writer.close()

    async def wait(self) -> dict[str, Any]:
        return await asyncio.shield(self._task)

    async def kill(self) -> bool:
        return bool((await self.machine.call("kill", pid=self.pid))["ok"])


class FakeCloud:
    """The provider's side: machines by id, and native snapshots (copies of a machine's disk) by id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.machines: dict[str, FakeMachine] = {}
        self.images = root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self._ids = itertools.count(1)
        self.created: list[str] = []
        self.background: set[asyncio.Future[None]] = set()

    async def start_machine(self, *, prefix: str, image: str | None, network: bool) -> FakeMachine:
        machine_id = f"{prefix}{uuid.uuid4().hex[:12]}"
        rootfs = self.root / "machines" / machine_id
        if image is not None:
            source = self.images / image
            if not source.is_dir():
                raise KeyError(image)
            await asyncio.to_thread(shutil.copytree, source, rootfs, symlinks=True)
        else:
            rootfs.mkdir(parents=True)
        machine = FakeMachine(self, machine_id, rootfs, network)
        await machine.start()
        self.machines[machine_id] = machine
        self.created.append(machine_id)
        return machine

    async def snapshot(self, machine: FakeMachine) -> str:
        """A copy of the machine's disk (its mount points are empty folders on the host side)."""
        if not machine.running:
            raise MachineGone(machine.id)
        image = f"snap-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(shutil.copytree, machine.rootfs, self.images / image, symlinks=True)
        return image

    def lose(self, machine_id: str) -> None:
        """Kill the machine and wipe its disk, as a crashed or reclaimed VM."""
        machine = self.machines[machine_id]
        machine.kill()
        shutil.rmtree(machine.rootfs, ignore_errors=True)

    def close(self) -> None:
        for machine in self.machines.values():
            machine.kill()
        for task in self.background:
            task.cancel()


def _uid(user: str | None, default: int) -> int:
    if user is None:
        return default
    return 0 if user == "root" else USER_UID


async def _as_chunks(data: str | bytes | IO[Any] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(data, str):
        yield data.encode()
    elif isinstance(data, bytes | bytearray | memoryview):
        yield bytes(data)
    elif hasattr(data, "__aiter__"):
        async for chunk in data:
            yield chunk
    else:
        while chunk := data.read(1 << 20):
            yield chunk if isinstance(chunk, bytes) else chunk.encode()


# -- E2B ------------------------------------------------------------------------------------------------------------


def _e2b_gone(machine_id: str) -> e2b.SandboxNotRunningException:
    # What the SDK raises when envd's proxy answers 502 "sandbox ... was not found".
    return e2b.SandboxNotRunningException(
        f"The sandbox {machine_id} was not found: The sandbox was killed or reached its timeout."
    )


class FakeCommandHandle:
    """`e2b.AsyncCommandHandle`: wait() raises `CommandExitException` for a non-zero exit, as the SDK does."""

    def __init__(self, process: MachineProcess, machine_id: str, timeout: float | None) -> None:
        self._process = process
        self._machine_id = machine_id
        self._timeout = timeout or None  # 0 means no limit
        self.pid = process.pid

    async def wait(self) -> CommandResult:
        try:
            status = await asyncio.wait_for(self._process.wait(), self._timeout)
        except TimeoutError:
            raise e2b.TimeoutException("context deadline exceeded: the command ran longer than its timeout") from None
        except MachineGone:
            raise _e2b_gone(self._machine_id) from None
        if status.get("signal"):
            # envd reports a signalled process as exit code -1 with Go's error text.
            raise CommandExitException(stdout="", stderr="", exit_code=-1, error="signal: killed")
        if status["code"] != 0:
            raise CommandExitException(stdout="", stderr="", exit_code=status["code"], error=None)
        return CommandResult(stdout="", stderr="", exit_code=0, error=None)

    async def kill(self) -> bool:
        try:
            return await self._process.kill()
        except MachineGone:
            raise _e2b_gone(self._machine_id) from None


class FakeCommands:
    def __init__(self, sandbox: FakeAsyncSandbox) -> None:
        self._sandbox = sandbox

    async def run(
        self,
        cmd: str,
        background: bool | None = None,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        stdin: bool | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        *,
        retain_output: bool = True,
    ) -> Any:
        machine = self._sandbox._machine
        uid = _uid(user, USER_UID)
        home = "/root" if uid == 0 else "/home/user"
        env = {"PATH": _PATH, "HOME": home, "USER": "root" if uid == 0 else "user", **(envs or {})}

        def decoder(callback: Callable[[str], Any] | None) -> Callable[[bytes], Any]:
            import codecs

            incremental = codecs.getincrementaldecoder("utf-8")(errors="replace")  # as the SDK decodes output

            def feed(data: bytes) -> Any:
                text = incremental.decode(data)
                return callback(text) if callback is not None and text else None

            return feed

        try:
            process = await machine.start_process(
                cmd, env=env, cwd=cwd or home, uid=uid, on_stdout=decoder(on_stdout), on_stderr=decoder(on_stderr)
            )
        except MachineGone:
            raise _e2b_gone(machine.id) from None
        except OSError as e:
            raise e2b.InvalidArgumentException(f"cannot start the command: {e}") from None
        handle = FakeCommandHandle(process, machine.id, timeout)
        if background:
            return handle
        return await handle.wait()

    async def list(self, request_timeout: float | None = None) -> list[ProcessInfo]:
        try:
            pids = (await self._sandbox._machine.call("list"))["pids"]
        except MachineGone:
            raise _e2b_gone(self._sandbox.sandbox_id) from None
        return [ProcessInfo(pid=pid, tag=None, cmd="/bin/sh", args=[], envs={}, cwd=None) for pid in pids]

    async def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        try:
            return bool((await self._sandbox._machine.call("kill", pid=pid))["ok"])
        except MachineGone:
            raise _e2b_gone(self._sandbox.sandbox_id) from None


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


class FakeFileStream:
    """`e2b.AsyncFileStreamReader`: an async iterator of bytes that must be consumed or closed."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], machine_id: str) -> None:
        self._chunks = chunks
        self._machine_id = machine_id

    def __aiter__(self) -> FakeFileStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except MachineGone:
            raise _e2b_gone(self._machine_id) from None

    async def aclose(self) -> None:
        await self._chunks.aclose()


class FakeFilesystem:
    def __init__(self, sandbox: FakeAsyncSandbox) -> None:
        self._sandbox = sandbox

    async def read(
        self,
        path: str,
        format: Literal["text", "bytes", "stream"] = "text",
        user: str | None = None,
        request_timeout: float | None = None,
        gzip: bool = False,
        stream_idle_timeout: float | None = None,
    ) -> Any:
        machine = self._sandbox._machine
        chunks = machine.read_file(path, _uid(user, USER_UID))
        if format == "stream":
            # The SDK checks the response status before handing out the stream: a missing file fails here.
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = b""
            except FileNotFoundError:
                raise e2b.FileNotFoundException(f"path '{path}' does not exist") from None
            except PermissionError as e:
                raise e2b.SandboxException(f"permission denied: {e}") from None
            except MachineGone:
                raise _e2b_gone(machine.id) from None
            return FakeFileStream(_prepend(first, chunks), machine.id)
        data = bytearray()
        try:
            async for chunk in chunks:
                data += chunk
        except FileNotFoundError:
            raise e2b.FileNotFoundException(f"path '{path}' does not exist") from None
        except PermissionError as e:
            raise e2b.SandboxException(f"permission denied: {e}") from None
        except MachineGone:
            raise _e2b_gone(machine.id) from None
        return data if format == "bytes" else data.decode()

    async def write(
        self,
        path: str,
        data: str | bytes | IO[Any] | AsyncIterable[bytes],
        user: str | None = None,
        request_timeout: float | None = None,
        gzip: bool = False,
        use_octet_stream: bool | None = None,
        metadata: dict[str, str] | None = None,
    ) -> WriteInfo:
        machine = self._sandbox._machine
        try:
            await machine.write_file(path, _uid(user, USER_UID), _as_chunks(data))
        except PermissionError as e:
            raise e2b.SandboxException(f"permission denied: {e}") from None
        except MachineGone:
            raise _e2b_gone(machine.id) from None
        return WriteInfo(name=os.path.basename(path), type=FileType.FILE, path=path)


class FakeAsyncSandbox:
    """`e2b.AsyncSandbox` over a `FakeCloud`. Use `bind_e2b(cloud)` to get a class bound to one cloud."""

    cloud: FakeCloud

    def __init__(self, machine: FakeMachine) -> None:
        self._machine = machine
        self.sandbox_id = machine.id
        self.commands = FakeCommands(self)
        self.files = FakeFilesystem(self)

    @classmethod
    async def create(
        cls,
        template: str | None = None,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        secure: bool | None = None,
        allow_internet_access: bool | None = None,
        mcp: Any = None,
        network: Any = None,
        iam: Any = None,
        lifecycle: Any = None,
        volume_mounts: Any = None,
        logger: Any = None,
        idempotency_key: str | None = None,
        **opts: Any,
    ) -> FakeAsyncSandbox:
        image = None if template in (None, "base") else template
        try:
            machine = await cls.cloud.start_machine(
                prefix="e2b-",
                image=image,
                network=allow_internet_access is not False,  # the SDK's default: open
            )
        except KeyError:
            raise e2b.NotFoundException(f"template '{template}' not found") from None
        (machine.rootfs / "home" / "user").mkdir(parents=True, exist_ok=True)
        os.chown(machine.rootfs / "home" / "user", USER_UID, USER_UID)
        return cls(machine)

    @classmethod
    async def connect(
        cls, sandbox_id: str, timeout: int | None = None, logger: Any = None, *, on_resume: str = "restore",
        **opts: Any,
    ) -> FakeAsyncSandbox:  # fmt: skip
        machine = cls.cloud.machines.get(sandbox_id)
        if machine is None or not machine.running:
            raise e2b.SandboxNotFoundException(f"Sandbox {sandbox_id} not found")
        return cls(machine)

    async def is_running(self, request_timeout: float | None = None) -> bool:
        return self._machine.running

    async def kill(self, **opts: Any) -> bool:
        was = self._machine.running
        self._machine.kill()
        return was

    async def create_snapshot(self, name: str | None = None, *, mode: str | None = None, **opts: Any) -> SnapshotInfo:
        try:
            image = await self.cloud.snapshot(self._machine)
        except MachineGone:
            raise _e2b_gone(self.sandbox_id) from None
        return SnapshotInfo(snapshot_id=image, names=[image])


def bind_e2b(cloud: FakeCloud) -> type[FakeAsyncSandbox]:
    return type("BoundFakeAsyncSandbox", (FakeAsyncSandbox,), {"cloud": cloud})


# -- Modal ----------------------------------------------------------------------------------------------------------


class _Aio:
    """Modal's synchronicity wrappers: ``obj.method.aio(...)`` is the async form. The fakes offer only that."""

    def __init__(self, function: Callable[..., Awaitable[Any]], binding: str) -> None:
        self.function = function
        self.binding = binding  # "instance" | "class" | "static"

    def __get__(self, obj: Any, objtype: Any = None) -> _BoundAio:
        if self.binding == "static":
            return _BoundAio(self.function, None)
        if self.binding == "class":
            return _BoundAio(self.function, objtype)
        return _BoundAio(self.function, obj)


class _BoundAio:
    def __init__(self, function: Callable[..., Awaitable[Any]], bound: Any) -> None:
        self.function = function
        self.bound = bound

    def aio(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        if self.bound is None:
            return self.function(*args, **kwargs)
        return self.function(self.bound, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the Modal fake offers only the .aio interface (the blocking one would stall the loop)")


def aio_method(function: Callable[..., Awaitable[Any]]) -> Any:
    return _Aio(function, "instance")


def aio_classmethod(function: Callable[..., Awaitable[Any]]) -> Any:
    return _Aio(function, "class")


def _modal_gone(machine_id: str) -> modal.exception.SandboxTerminatedError:
    return modal.exception.SandboxTerminatedError(f"Sandbox {machine_id} has finished")


class FakeStreamReader:
    """`modal.io_streams.StreamReader` for ``text=False``: async iteration yields bytes as they arrive."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def feed(self, data: bytes | None) -> None:
        self._queue.put_nowait(data)

    def __aiter__(self) -> FakeStreamReader:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._queue.get()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class FakeContainerProcess:
    def __init__(self, process: MachineProcess, stdout: FakeStreamReader, stderr: FakeStreamReader, sid: str) -> None:
        self._process = process
        self.stdout = stdout
        self.stderr = stderr
        self._sid = sid
        self._returncode: int | None = None

    async def _wait(self) -> int:
        try:
            status = await self._process.wait()
        except MachineGone:
            raise _modal_gone(self._sid) from None
        finally:
            self.stdout.feed(None)
            self.stderr.feed(None)
        self._returncode = int(status["code"])  # 128 + signal for a signalled process, as Modal reports it
        return self._returncode

    async def _poll(self) -> int | None:
        return self._returncode if self._process._task.done() else None

    wait = aio_method(_wait)
    poll = aio_method(_poll)


class FakeSandboxFilesystem:
    def __init__(self, sandbox: FakeModalSandbox) -> None:
        self._sandbox = sandbox

    async def _copy_to_local(self, remote_path: str, local_path: str | os.PathLike[str]) -> None:
        machine = self._sandbox._live()
        tmp = Path(local_path).with_name(f".modal-sandbox-fs-tmp-{uuid.uuid4().hex[:6]}")
        try:
            with open(tmp, "wb") as f:
                async for chunk in machine.read_file(remote_path, 0):
                    f.write(chunk)
            tmp.replace(local_path)
        except FileNotFoundError:
            raise modal.exception.SandboxFilesystemNotFoundError(f"{remote_path}: no such file") from None
        except MachineGone:
            raise _modal_gone(machine.id) from None
        finally:
            tmp.unlink(missing_ok=True)

    async def _copy_from_local(self, local_path: str | os.PathLike[str], remote_path: str) -> None:
        machine = self._sandbox._live()
        with open(local_path, "rb") as f:
            try:
                await machine.write_file(remote_path, 0, _as_chunks(f))
            except MachineGone:
                raise _modal_gone(machine.id) from None

    async def _read_bytes(self, remote_path: str) -> bytes:
        machine = self._sandbox._live()
        data = bytearray()
        try:
            async for chunk in machine.read_file(remote_path, 0):
                data += chunk
        except FileNotFoundError:
            raise modal.exception.SandboxFilesystemNotFoundError(f"{remote_path}: no such file") from None
        return bytes(data)

    async def _write_bytes(self, data: bytes | bytearray | memoryview, remote_path: str) -> None:
        await self._sandbox._live().write_file(remote_path, 0, _as_chunks(bytes(data)))

    copy_to_local = aio_method(_copy_to_local)
    copy_from_local = aio_method(_copy_from_local)
    read_bytes = aio_method(_read_bytes)
    write_bytes = aio_method(_write_bytes)


async def _image_from_id(cls: type[FakeImage], image_id: str, client: Any = None) -> FakeImage:
    return cls(image_id, "snapshot")


class FakeImage:
    def __init__(self, object_id: str | None = None, description: str = "debian-slim") -> None:
        self.object_id = object_id
        self.description = description

    @classmethod
    def from_registry(
        cls, tag: str, secret: Any = None, *, setup_dockerfile_commands: list[str] = [],  # noqa: B006 - as the SDK
        force_build: bool = False, add_python: str | None = None, **kwargs: Any,
    ) -> FakeImage:  # fmt: skip
        return cls(None, tag)

    @classmethod
    def debian_slim(cls, python_version: str | None = None, force_build: bool = False) -> FakeImage:
        return cls(None, "debian-slim")

    from_id = aio_classmethod(lambda cls, *args, **kwargs: _image_from_id(cls, *args, **kwargs))


async def _app_lookup(
    name: str, *, client: Any = None, environment_name: str | None = None, create_if_missing: bool = False
) -> FakeApp:
    return FakeApp(name)


class FakeApp:
    def __init__(self, name: str) -> None:
        self.name = name

    lookup = _Aio(_app_lookup, "static")


class FakeModalSandbox:
    cloud: FakeCloud

    def __init__(self, machine: FakeMachine, env: dict[str, str]) -> None:
        self._machine = machine
        self.object_id = machine.id
        self._env = env
        self.filesystem = FakeSandboxFilesystem(self)
        self.created_with: dict[str, Any] = {}

    def _live(self) -> FakeMachine:
        if not self._machine.running:
            raise _modal_gone(self._machine.id)
        return self._machine

    create = aio_classmethod(lambda cls, *args, **kwargs: _modal_create(cls, *args, **kwargs))
    from_id = aio_classmethod(lambda cls, *args, **kwargs: _modal_from_id(cls, *args, **kwargs))

    async def _exec(
        self,
        *args: str,
        stdout: StreamType = StreamType.PIPE,
        stderr: StreamType = StreamType.PIPE,
        timeout: int | None = None,
        workdir: str | None = None,
        env: dict[str, str | None] | None = None,
        secrets: Collection[Any] | None = None,
        text: bool = True,
        bufsize: Literal[-1, 1] = -1,
        pty: bool = False,
        _pty_info: Any = None,
        pty_info: Any = None,
    ) -> FakeContainerProcess:
        machine = self._live()
        out, err = FakeStreamReader(), FakeStreamReader()
        merged = {**self._env, **{k: v for k, v in (env or {}).items() if v is not None}}
        command = " ".join(_shell_quote(a) for a in args)
        try:
            process = await machine.start_process(
                command, env={"PATH": _PATH, "HOME": "/root", **merged}, cwd=workdir or "/", uid=0,
                on_stdout=out.feed, on_stderr=err.feed,
            )  # fmt: skip
        except MachineGone:
            raise _modal_gone(machine.id) from None
        return FakeContainerProcess(process, out, err, machine.id)

    async def _terminate(self, *, wait: bool = False) -> int | None:
        self._machine.kill(exit_code=137)
        return self._machine.exit_code if wait else None

    async def _poll(self) -> int | None:
        return None if self._machine.running else (self._machine.exit_code or 137)

    async def _snapshot_filesystem(self, timeout: int = 55, *, ttl: int | None = 2592000) -> FakeImage:
        try:
            image = await self.cloud.snapshot(self._live())
        except MachineGone:
            raise _modal_gone(self._machine.id) from None
        return FakeImage(image, "snapshot")

    exec = aio_method(_exec)
    terminate = aio_method(_terminate)
    poll = aio_method(_poll)
    snapshot_filesystem = aio_method(_snapshot_filesystem)


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


async def _modal_create(
    cls: type[FakeModalSandbox],
    *args: str,
    app: Any = None,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    image: Any = None,
    env: dict[str, str | None] | None = None,
    secrets: Collection[Any] | None = None,
    network_file_systems: dict[Any, Any] = {},  # noqa: B006 - the SDK's own default
    timeout: int | None = 300,
    idle_timeout: int | None = None,
    workdir: str | None = None,
    gpu: str | None = None,
    cloud: str | None = None,
    region: str | Sequence[str] | None = None,
    cpu: float | tuple[float, float] | None = None,
    memory: int | tuple[int, int] | None = None,
    runtime: Literal["gvisor", "vm"] | None = None,
    block_network: bool = False,
    outbound_cidr_allowlist: Sequence[str] | None = None,
    outbound_domain_allowlist: Sequence[str] | None = None,
    _experimental_outbound_policy: Any = None,
    inbound_cidr_allowlist: Sequence[str] | None = None,
    volumes: dict[Any, Any] = {},  # noqa: B006
    pty: bool = False,
    encrypted_ports: Sequence[int] = [],
    h2_ports: Sequence[int] = [],
    unencrypted_ports: Sequence[int] = [],
    custom_domain: str | None = None,
    proxy: Any = None,
    include_oidc_identity_token: bool = False,
    readiness_probe: Any = None,
    verbose: bool = False,
    experimental_options: dict[str, Any] | None = None,
    _experimental_enable_snapshot: bool = False,
    _experimental_persistent: bool = False,
    client: Any = None,
    environment_name: str | None = None,
    pty_info: Any = None,
    cidr_allowlist: Sequence[str] | None = None,
) -> FakeModalSandbox:
    snapshot = image.object_id if isinstance(image, FakeImage) else None
    try:
        machine = await cls.cloud.start_machine(prefix="sb-", image=snapshot, network=not block_network)
    except KeyError:
        raise modal.exception.NotFoundError(f"Image {snapshot} not found") from None
    sandbox = cls(machine, {k: v for k, v in (env or {}).items() if v is not None})
    sandbox.created_with = {"image": image, "block_network": block_network, "timeout": timeout, "cpu": cpu,
                            "memory": memory, "app": app, "workdir": workdir}  # fmt: skip
    if args:  # the entrypoint: the sandbox ends when it does
        process = await machine.start_process(
            " ".join(_shell_quote(a) for a in args), env={"PATH": _PATH}, cwd="/", uid=0,
            on_stdout=lambda _: None, on_stderr=lambda _: None,
        )  # fmt: skip

        async def end_with_entrypoint() -> None:
            with contextlib.suppress(MachineGone):
                status = await process.wait()
                machine.kill(exit_code=int(status["code"]))

        cls.cloud.background.add(asyncio.ensure_future(end_with_entrypoint()))
    return sandbox


async def _modal_from_id(cls: type[FakeModalSandbox], sandbox_id: str, client: Any = None) -> FakeModalSandbox:
    machine = cls.cloud.machines.get(sandbox_id)
    if machine is None:
        raise modal.exception.NotFoundError(f"Sandbox {sandbox_id} not found")
    return cls(machine, {})


class FakeModal:
    """Stands in for the ``modal`` module: ``Sandbox``, ``App`` and ``Image`` bound to one `FakeCloud`."""

    def __init__(self, cloud: FakeCloud) -> None:
        self.cloud = cloud
        self.App = FakeApp
        self.Image = FakeImage
        self.Sandbox: type[FakeModalSandbox] = type("BoundFakeModalSandbox", (FakeModalSandbox,), {"cloud": cloud})


def bind_modal(cloud: FakeCloud) -> FakeModal:
    return FakeModal(cloud)
