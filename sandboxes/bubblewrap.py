"""The local provider: a sandbox is a folder on the worker plus commands run under bubblewrap.

Each command gets its own user, pid, ipc, uts and (unless the pipeline allows network) net namespace, a clean
environment (the Manifest's variables and resolved secrets only, never the worker's; handed to bubblewrap in a
memory file, never on its world-readable command line), the host read-only except the sandbox's own
``/workspace`` and ``/home/sandbox`` and a private ``/tmp``, a non-root uid, no capabilities, and
``--die-with-parent`` so a killed worker takes its commands with it. Without bubblewrap the provider refuses
(``isolation: required``) or runs plain subprocesses with a loud warning (``isolation: preferred``). The file
tools (read_file, write_file, make_dirs) work on the sandbox's folder through sandboxes/safe_folders.py.

The sandbox folder lives on one host, so the provider is host-bound: its activities must run on the worker that
created it. Layout on the worker::

    <root>/<sandbox id>/fs/workspace       -> /workspace
    <root>/<sandbox id>/fs/home/sandbox    -> /home/sandbox
    <root>/<sandbox id>/state/             stat cache, command logs (outside the sandbox)
    <root>/<sandbox id>/mounts/<N>/        data mount N, bound at its path (read-only for ``ro``): never in fs/,
                                           so never in a snapshot, and ro is enforced by the kernel
    <root>/<sandbox id>/sandbox.json       owner worker and spec; its absence means the sandbox is gone
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from tardigrade.sandboxes.errors import IsolationUnavailable, SandboxError, SandboxLost, UnsafePath
from tardigrade.sandboxes.layout import BASE_ENV, HOME, SANDBOX_UID, WORKSPACE
from tardigrade.sandboxes.manifest import Mount, sandbox_path
from tardigrade.sandboxes.mounts import MountStats, materialize
from tardigrade.sandboxes.provider import (
    ExecResult,
    FaultInjector,
    OutputCallback,
    Sandbox,
    SandboxProvider,
    SandboxSpec,
)
from tardigrade.sandboxes.safe_folders import SafeFolders
from tardigrade.sandboxes.snapshots import RestoreStats, Selection, SnapshotEngine, SnapshotInfo
from tardigrade.sandboxes.stores import ObjectStore

log = logging.getLogger(__name__)

# What of the host's /etc a sandbox sees: enough for programs to run, resolve users and verify TLS.
_ETC = [
    "alternatives", "ssl", "ca-certificates", "ca-certificates.conf", "resolv.conf", "hosts", "nsswitch.conf",
    "localtime", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "passwd", "group", "mime.types", "protocols",
    "services", "gai.conf", "host.conf", "python3", "python3.11", "debian_version", "os-release",
]  # fmt: skip


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


class LocalSandbox(Sandbox):
    provider = "local"

    def __init__(self, provider: LocalSandboxProvider, sandbox_id: str, spec: SandboxSpec) -> None:
        self.id = sandbox_id
        self._provider = provider
        self.spec = spec
        self.dir = provider.root / sandbox_id
        self.fs = self.dir / "fs"
        self.state = self.dir / "state"
        self._processes: set[asyncio.subprocess.Process] = set()
        self._mounts: dict[int, tuple[str, Path, bool]] = {}  # index -> (sandbox path, folder, read-only)

    # -- paths ------------------------------------------------------------------------------------------------

    def host_path(self, path: str) -> Path:
        """Where a sandbox path lives on the worker. Only the writable areas exist here."""
        return self.fs / sandbox_path(path).lstrip("/")

    @property
    def cache_path(self) -> Path:
        return self.state / "statcache"

    # -- liveness ---------------------------------------------------------------------------------------------

    async def alive(self) -> bool:
        return (self.dir / "sandbox.json").exists() and (self.fs / "workspace").is_dir()

    async def _require_alive(self, doing: str) -> None:
        if not await self.alive():
            raise SandboxLost(self.id, f"its folder on the worker is gone (noticed while {doing})")

    # -- commands ---------------------------------------------------------------------------------------------

    def _argv(self, command: str, cwd: str, env_fd: int) -> list[str]:
        bwrap = self._provider.bwrap
        assert bwrap is not None
        argv = [
            bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--bind", str(self.fs / "workspace"), WORKSPACE,
            "--bind", str(self.fs / HOME.lstrip("/")), HOME,
        ]  # fmt: skip
        for path, folder, read_only in sorted(self._mounts.values()):  # parents before children
            argv += ["--ro-bind" if read_only else "--bind", str(folder), path]
        argv += ["--chdir", cwd, "--clearenv"]
        if not self.spec.network:
            argv.append("--unshare-net")
        for name in _ETC:
            argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        for extra in self.spec.options.get("ro_binds", []):
            argv += ["--ro-bind", str(extra), str(extra)]
        # The environment - secrets included - is read from a memory file (see `_env_file`), never the command line.
        argv += ["--args", str(env_fd)]
        return [*argv, "/bin/sh", "-c", command]

    def _env(self, env: Mapping[str, str]) -> dict[str, str]:
        full = dict(BASE_ENV)
        if self._provider.bwrap is None:
            # Unisolated fallback: point the conventional variables at the real folders.
            full |= {"HOME": str(self.fs / HOME.lstrip("/")), "WORKSPACE": str(self.fs / "workspace")}
            full["TMPDIR"] = str(self.state / "tmp")
            (self.state / "tmp").mkdir(exist_ok=True)
        full.update(env)
        return full

    async def exec(
        self,
        command: str,
        *,
        env: Mapping[str, str],
        timeout: float | None,
        cwd: str = WORKSPACE,
        on_output: OutputCallback | None = None,
        labels: Mapping[str, str] | None = None,
        tail_bytes: int = 4096,
    ) -> ExecResult:
        await self._require_alive("starting a command")
        cwd = sandbox_path(cwd, field="cwd")
        full_env = self._env(env)
        isolated = self._provider.bwrap is not None
        env_fd = _env_file(full_env) if isolated else None
        host_cwd = self.dir if isolated else self.host_path(cwd)
        log_path = self.state / f"exec-{uuid.uuid4().hex[:12]}.log"
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *(self._argv(command, cwd, env_fd) if env_fd is not None else ["/bin/sh", "-c", command]),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={} if isolated else full_env,
                cwd=host_cwd,
                start_new_session=True,  # its own process group, so a kill reaches every process it started
                pass_fds=() if env_fd is None else (env_fd,),
            )
        finally:
            if env_fd is not None:
                os.close(env_fd)  # bwrap has its own copy (and closes it once read)
        self._processes.add(proc)
        tail = bytearray()
        total = 0

        async def pump() -> None:
            nonlocal total, tail
            assert proc.stdout is not None
            with open(log_path, "wb") as log_file:
                while chunk := await proc.stdout.read(65536):
                    total += len(chunk)
                    log_file.write(chunk)
                    tail += chunk
                    if len(tail) > tail_bytes:
                        del tail[: len(tail) - tail_bytes]
                    if on_output is not None:
                        on_output(chunk)

        exited = asyncio.ensure_future(proc.wait())
        fault = None
        if self._provider.fault_injector is not None:
            fault = asyncio.ensure_future(self._provider.fault_injector(self, labels or {}, exited))
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.gather(pump(), asyncio.shield(exited)), timeout)
        except TimeoutError:
            timed_out = True
            self._kill(proc)
            _close_pipes(proc)  # first: on Python 3.11, wait() returns only once the output pipe is closed
            await proc.wait()
        except BaseException:
            self._kill(proc)
            raise
        finally:
            self._processes.discard(proc)
            _close_pipes(proc)
            if fault is not None:
                await fault
        await self._require_alive("a command was running")
        return ExecResult(
            exit_code=proc.returncode if proc.returncode is not None else -1,
            timed_out=timed_out,
            duration=time.monotonic() - started,
            output_tail=bytes(tail),
            output_bytes=total,
            log_path=str(log_path),
        )

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        # bwrap dies with the group; its pid-namespace init dies with it (--die-with-parent), and the kernel
        # kills every process left in that namespace.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def kill_processes(self) -> None:
        for proc in list(self._processes):
            self._kill(proc)
        for proc in list(self._processes):
            with contextlib.suppress(Exception):
                await proc.wait()

    # -- files ------------------------------------------------------------------------------------------------

    # The sandbox's folder is the sandbox's to shape: every path goes through SafeFolders (no symlink is followed,
    # only regular files are opened, a FIFO never blocks), in a thread, so the event loop never waits on it.

    def _folders(self) -> SafeFolders:
        return SafeFolders(self.fs, unsafe=lambda rel, reason: UnsafePath(f"/{rel} {reason}"))

    async def read_file(self, path: str, *, limit: int | None = None) -> bytes:
        await self._require_alive("reading a file")
        rel = sandbox_path(path).lstrip("/")

        def read() -> bytes:
            with self._folders() as folders:
                return folders.read_file(rel, limit=limit)

        return await asyncio.to_thread(read)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        await self._require_alive("writing a file")
        rel = sandbox_path(path).lstrip("/")

        def write() -> None:
            with self._folders() as folders:
                folders.write_file(rel, data, mode=mode)

        await asyncio.to_thread(write)

    async def make_dirs(self, path: str) -> None:
        await self._require_alive("creating a folder")
        rel = sandbox_path(path).lstrip("/")

        def make() -> None:
            with self._folders() as folders:
                folders.make_dirs(rel)

        await asyncio.to_thread(make)

    # -- snapshots --------------------------------------------------------------------------------------------

    async def snapshot(
        self, engine: SnapshotEngine, *, selection: Selection, parent: str | None, labels: Mapping[str, str]
    ) -> SnapshotInfo:
        await self._require_alive("taking a snapshot")
        info = await asyncio.to_thread(
            engine.create, self.fs, selection=selection, parent=parent, cache_path=self.cache_path, labels=dict(labels)
        )
        # A sandbox that vanished mid-walk yields a partial tree: never hand that out as a checkpoint.
        await self._require_alive("taking a snapshot")
        return info

    async def restore(self, engine: SnapshotEngine, snapshot_id: str, *, selection: Selection) -> RestoreStats:
        await self._require_alive("restoring a snapshot")
        await self.kill_processes()
        stats = await asyncio.to_thread(
            engine.restore, snapshot_id, self.fs, selection=selection, cache_path=self.cache_path
        )
        await self._require_alive("restoring a snapshot")
        self._make_mount_points()  # a tree that lacks one must not leave bubblewrap without a bind source
        return stats

    def _make_mount_points(self) -> None:
        for folder in (self.fs / "workspace", self.fs / HOME.lstrip("/")):
            folder.mkdir(parents=True, exist_ok=True)

    # -- mounts -----------------------------------------------------------------------------------------------

    async def mount(self, index: int, mount: Mount, source: ObjectStore) -> MountStats:
        """Materialize the mount into ``mounts/<index>`` (outside fs/) and bind it at its path for every command:
        ``--ro-bind`` for ro, so even a chmod inside the sandbox cannot make it writable."""
        await self._require_alive("copying in a data mount")
        if self._provider.bwrap is None and mount.path != sandbox_path(mount.path, field="path"):
            raise SandboxError(
                f"mount path {mount.path} is outside /workspace and ~, which the unisolated fallback (no bubblewrap)"
                " cannot provide; install bubblewrap or mount under /workspace"
            )
        folder = self.dir / "mounts" / str(index)
        stats = await asyncio.to_thread(
            materialize, mount, index, source, folder, state_file=self.state / f"mount-{index}.json"
        )
        self._mounts[index] = (mount.path, folder, mount.read_only)
        if self._provider.bwrap is None:
            self._link_unisolated(mount.path, folder)
        return stats

    def _link_unisolated(self, path: str, folder: Path) -> None:
        """Without bubblewrap there are no bind mounts: the mount path becomes a symlink to the folder."""
        link = self.host_path(path)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        elif link.is_dir():
            link.rmdir()  # an empty mount point; anything else is the workspace's and makes this fail loudly
        link.symlink_to(folder)

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def destroy(self) -> None:
        _mark_gone(self.dir)
        await self.kill_processes()
        await asyncio.to_thread(_remove_sandbox_dir, self.dir)
        self._provider._forget(self.id)


def _close_pipes(proc: asyncio.subprocess.Process) -> None:
    """Release the command's output pipe even if nobody read it to the end. A timed-out or cancelled command is
    no longer read; once its unread output fills asyncio's buffer, asyncio stops reading the pipe and never sees
    it close, so the pipe would stay open for the worker's life (and, on Python 3.11, ``proc.wait()`` would never
    return). Closing the transport releases it (a no-op when the output was read to the end; asyncio keeps the
    transport private, hence getattr)."""
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


def _env_file(env: Mapping[str, str]) -> int:
    """A memory-only file of NUL-separated ``--setenv NAME VALUE`` arguments, for bubblewrap's ``--args FD``.

    A command line is world-readable (``ps``, /proc/PID/cmdline); this file is reachable only through the fds of
    the worker's own processes and is gone once closed. A NUL would end an argument early and let a value smuggle
    in bwrap options of its own (``--bind / /host``), so names and values holding one are refused."""
    data = bytearray()
    for name, value in env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise SandboxError(
                f"environment variable {name!r} has an empty name, or a '=' or NUL byte in its name or value;"
                " rename it or remove the NUL from its value"
            )
        data += b"--setenv\0" + os.fsencode(name) + b"\0" + os.fsencode(value) + b"\0"
    fd = os.memfd_create("tardigrade-env", os.MFD_CLOEXEC)
    try:
        view = memoryview(bytes(data))
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mark_gone(path: Path) -> None:
    """Removing sandbox.json makes the sandbox count as gone at once, before its processes die: a command that
    ends because its sandbox was destroyed is then reported as a loss, not as a failing step."""
    with contextlib.suppress(FileNotFoundError):
        (path / "sandbox.json").unlink()


def _remove_sandbox_dir(path: Path) -> None:
    _mark_gone(path)

    def make_writable(func: object, p: str, exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700, follow_symlinks=False)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(p)
        with contextlib.suppress(FileNotFoundError, OSError):
            shutil.rmtree(p)

    shutil.rmtree(path, onerror=make_writable)


class LocalSandboxProvider(SandboxProvider):
    """Sandboxes as folders under ``root`` on this worker, isolated by bubblewrap."""

    name = "local"
    host_bound = True

    def __init__(
        self,
        root: Path,
        *,
        worker_id: str | None = None,
        bwrap: str | bool | None = True,
        fault_injector: FaultInjector | None = None,
    ) -> None:
        """``bwrap=True`` finds bubblewrap on PATH; ``False`` forces the unisolated fallback (tests only)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # other host users must not reach into sandboxes
        self.worker_id = worker_id or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.bwrap: str | None = find_bwrap() if bwrap is True else (bwrap or None)
        self.fault_injector = fault_injector
        self._live: dict[str, LocalSandbox] = {}
        self._lock_file = self._claim_worker_lock()
        self.removed_orphans = self._remove_orphans()

    def _claim_worker_lock(self) -> IO[bytes]:
        locks = self.root / ".workers"
        locks.mkdir(exist_ok=True)
        f = open(locks / f"{self.worker_id}.lock", "wb")  # noqa: SIM115 - held for the provider's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            f.close()
            raise
        return f

    def _remove_orphans(self) -> int:
        """Delete sandboxes whose worker is dead (its lock is free): their commands died with it."""
        removed = 0
        for entry in self.root.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                owner = json.loads((entry / "sandbox.json").read_text())["worker_id"]
            except (OSError, ValueError, KeyError):
                owner = None
            if owner == self.worker_id:
                continue
            if owner is not None and _lock_held(self.root / ".workers" / f"{owner}.lock"):
                continue
            _remove_sandbox_dir(entry)
            with contextlib.suppress(FileNotFoundError):
                (self.root / ".workers" / f"{owner}.lock").unlink()
            removed += 1
        return removed

    async def create(self, spec: SandboxSpec) -> LocalSandbox:
        if self.bwrap is None:
            if spec.isolation == "required":
                raise IsolationUnavailable(
                    "bubblewrap (bwrap) is not installed on this worker, and the pipeline says `isolation: required`."
                    " Install it (apt-get install -y bubblewrap) or set `sandbox: {isolation: preferred}` to run"
                    " steps unisolated on this machine."
                )
            log.warning(
                "bubblewrap is not installed: sandbox commands run UNISOLATED as the worker's user, with its network"
                " and filesystem. Install bubblewrap (apt-get install -y bubblewrap) for real isolation."
            )
        sandbox_id = f"local-{uuid.uuid4().hex[:16]}"
        sandbox = LocalSandbox(self, sandbox_id, spec)
        sandbox.state.mkdir(parents=True)
        sandbox._make_mount_points()
        meta = {"worker_id": self.worker_id, "network": spec.network, "options": dict(spec.options)}
        (sandbox.dir / "sandbox.json").write_text(json.dumps(meta))
        self._live[sandbox_id] = sandbox
        return sandbox

    async def attach(self, sandbox_id: str) -> LocalSandbox:
        sandbox = self._live.get(sandbox_id)
        if sandbox is None or not await sandbox.alive():
            self._live.pop(sandbox_id, None)
            raise SandboxLost(sandbox_id, "it does not exist on this worker (destroyed, or the worker restarted)")
        return sandbox

    def _forget(self, sandbox_id: str) -> None:
        self._live.pop(sandbox_id, None)

    async def close(self) -> None:
        for sandbox in list(self._live.values()):
            await sandbox.destroy()
        self._lock_file.close()
        with contextlib.suppress(FileNotFoundError):
            (self.root / ".workers" / f"{self.worker_id}.lock").unlink()


def _lock_held(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
    except FileNotFoundError:
        return False


async def destroy_like_a_crash(sandbox: LocalSandbox) -> None:
    """Kill every process and delete the sandbox's disk, as a dead container loses both. The worker that owns
    it is not told; it finds out the way it would in production."""
    _mark_gone(sandbox.dir)
    await sandbox.kill_processes()
    await asyncio.to_thread(_remove_sandbox_dir, sandbox.dir)
