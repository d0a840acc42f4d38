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
    <root>/<sandbox id>/overlay/           the step's overlay upper layers (sandboxes/overlay.py), when in use,
                                           and the attempt's kept originals (overlay/undo/, never bound)
    <root>/<sandbox id>/mounts/<N>/        data mount N, bound at its path (read-only for ``ro``): never in fs/,
                                           so never in a snapshot, and ro is enforced by the kernel
    <root>/<sandbox id>/sandbox.json       owner worker and spec; its absence means the sandbox is gone

With overlays (the default where the kernel allows unprivileged overlayfs), a command sees ``fs/`` as the lower
layer of an overlay whose upper layer collects the step's changes: a checkpoint merges the upper layer into fs/ by
renames and hands the snapshot engine the changed paths instead of a walk; what a merge replaces or deletes is kept
aside in the attempt's undo log (sandboxes/overlay_undo.py), so a rollback renames the originals back (reading
nothing from the store) and a checkpoint throws them away. Host-side file access (the file tools, snapshots,
restores) merges first, so it sees and writes what the commands see. Commands with a network namespace, the
unisolated fallback, and any overlay failure use fs/ directly (the walk does the rest).
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
import stat
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from tardigrade.sandboxes.errors import IsolationUnavailable, SandboxError, SandboxLost, UnsafePath
from tardigrade.sandboxes.exec_log import ExecLog, OutputMask
from tardigrade.sandboxes.layout import BASE_ENV, HOME, SANDBOX_UID, WORKSPACE
from tardigrade.sandboxes.limit_enforcement import (
    CGROUP_PREFIX,
    PRLIMIT,
    CommandCgroup,
    breach_from_exit,
    disk_usage,
    find_cgroup_base,
    rlimit_prefix,
    sweep_cgroups,
    watch,
)
from tardigrade.sandboxes.limits import LimitBreach, LimitExceeded, format_size
from tardigrade.sandboxes.manifest import Mount, sandbox_path
from tardigrade.sandboxes.mounts import MountStats, materialize
from tardigrade.sandboxes.network.broker import HostSecret, SandboxBrokering
from tardigrade.sandboxes.network.namespace import CommandNetwork, require_tools
from tardigrade.sandboxes.network.proxy import BrokerHook, EgressProxy
from tardigrade.sandboxes.network.rules import NetworkRule
from tardigrade.sandboxes.overlay import OverlayError, OverlayLayers, paths_usable, probe
from tardigrade.sandboxes.overlay_undo import rollback_roots
from tardigrade.sandboxes.provider import (
    ExecResult,
    FaultInjector,
    OutputCallback,
    Sandbox,
    SandboxProvider,
    SandboxSpec,
)
from tardigrade.sandboxes.remove_tree import remove_folder
from tardigrade.sandboxes.safe_folders import SafeFolders
from tardigrade.sandboxes.snapshots import RestoreStats, Selection, SnapshotEngine, SnapshotInfo
from tardigrade.sandboxes.snapshots.changes import ChangeSet
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
        self.limits = spec.limits.resolved()  # sandboxes/limits.py: what each command may use
        # Credential brokering (sandboxes/network/broker.py): when set, every command gets the egress proxy, and
        # the proxy hands CONNECTs to the broker's hosts to it.
        self.broker: BrokerHook | None = None
        self._brokering = SandboxBrokering(
            self.state / "broker", open_upstream=self.open_egress, upstream_ca_file=provider.broker_upstream_ca
        )
        # Overlay upper layers (sandboxes/overlay.py), and what fs/ holds relative to a snapshot: the snapshot id
        # and selection it was checkpointed or restored as (`_base`), and the paths merged or written since
        # (`_pending`; None: unknown, so the next checkpoint walks).
        use_overlay = provider.overlay and paths_usable(self.dir, self.fs)
        self.overlay: OverlayLayers | None = OverlayLayers(self.dir, self.fs) if use_overlay else None
        self._base: tuple[str, Selection] | None = None
        self._pending: set[str] | None = None
        self._merging = threading.Lock()  # a merge, a drop and the bookkeeping above, one at a time
        self._on_overlay = 0  # commands running on the overlay now: its upper layer is live, never merged then
        # What may change fs/ while a checkpoint or restore runs, so that it is taken as the snapshot only if nothing
        # did: merges and file-tool writes (counted under `_merging`), commands on fs/ itself (started or ended, and
        # running now; counted on the event loop).
        self._fs_changes = 0
        self._fs_commands = 0
        self._on_fs = 0

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

    def _argv(
        self,
        command: str,
        cwd: str,
        env_fd: int,
        *,
        cgroup: bool = False,
        network: CommandNetwork | None = None,
        overlay: OverlayLayers | None = None,
    ) -> list[str]:
        bwrap = self._provider.bwrap
        assert bwrap is not None
        workspace, home = self.fs / "workspace", self.fs / HOME.lstrip("/")
        if overlay is not None:  # the overlays' mount points, in the command's own mount namespace
            workspace, home = overlay.view_of(workspace), overlay.view_of(home)
        argv = [
            bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--proc", "/proc", "--dev", "/dev", "--size", str(self.limits.tmp), "--tmpfs", "/tmp",
            "--bind", str(workspace), WORKSPACE,
            "--bind", str(home), HOME,
        ]  # fmt: skip
        for path, folder, read_only in sorted(self._mounts.values()):  # parents before children
            argv += ["--ro-bind" if read_only else "--bind", str(folder), path]
        argv += ["--chdir", cwd, "--clearenv"]
        if network is None:
            argv.append("--unshare-net")  # loopback only
        for name in _ETC:
            argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        if self.broker is not None:  # the sandbox CA's bundle: readable, not writable, in no snapshot
            argv += self._brokering.bwrap_binds()
        if network is not None:  # a namespace of its own, set up by sandboxes/network/namespace.py; never the worker's
            argv += network.bwrap_args()
        # The environment - secrets included - is read from a memory file (see `_env_file`), never the command line.
        argv += ["--args", str(env_fd)]
        argv = [*argv, *rlimit_prefix(self.limits, cgroup=cgroup), "/bin/sh", "-c", command]
        return overlay.wrap(argv) if overlay is not None else argv

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
        mask: OutputMask | None = None,
    ) -> ExecResult:
        await self._require_alive("starting a command")
        cwd = sandbox_path(cwd, field="cwd")
        full_env = self._env(env)
        isolated = self._provider.bwrap is not None
        network = self._command_network()
        if network is not None:
            full_env.update(network.env())
        # A command with a network namespace of its own stays on fs/ (its set-up expects bubblewrap's own user
        # namespace); it must then see the step's earlier changes there.
        # One command at a time on the upper layer: one that starts while another runs stays on fs/ too.
        if self.overlay is not None and not (isolated and network is None and not self._on_overlay):
            await asyncio.to_thread(self._settle)
        overlay: OverlayLayers | None = None
        env_fd = _env_file(full_env) if isolated else None
        host_cwd = self.dir if isolated else self.host_path(cwd)
        log_path = self.state / f"exec-{uuid.uuid4().hex[:12]}.log"
        started = time.monotonic()
        cgroup = await self._command_cgroup() if isolated else None
        on_fs = False
        try:
            if env_fd is not None:
                overlay = self._claim_overlay(network)  # no await between the check and the count
                on_fs = overlay is None and self.overlay is not None
                if on_fs:
                    self._on_fs, self._fs_commands = self._on_fs + 1, self._fs_commands + 1
                argv = self._argv(command, cwd, env_fd, cgroup=cgroup is not None, network=network, overlay=overlay)
                argv = [*cgroup.join_prefix(), *argv] if cgroup is not None else argv
            else:  # unisolated: no user namespace, so no RLIMIT_NPROC (it would count the worker's own threads)
                argv = [PRLIMIT, f"--fsize={self.limits.disk}", f"--data={self.limits.memory}", "--"]
                argv += ["/bin/sh", "-c", command]
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={} if isolated else full_env,
                cwd=host_cwd,
                start_new_session=True,  # its own process group, so a kill reaches every process it started
                pass_fds=(() if env_fd is None else (env_fd,)) + (network.pass_fds if network is not None else ()),
            )
        except BaseException:
            if overlay is not None:
                self._on_overlay -= 1
            if on_fs:
                self._on_fs, self._fs_commands = self._on_fs - 1, self._fs_commands + 1
            if cgroup is not None:
                await asyncio.to_thread(cgroup.remove)
            if network is not None:
                await network.close()
            raise
        finally:
            if env_fd is not None:
                os.close(env_fd)  # bwrap has its own copy (and closes it once read)
            if network is not None:
                network.after_spawn()
        self._processes.add(proc)
        watcher = self._watch(proc, cgroup)
        tail = bytearray()
        total = 0

        async def pump() -> None:
            nonlocal total, tail
            assert proc.stdout is not None
            log_file = ExecLog(log_path, mask)  # 0600, masked before it touches the disk, bounded
            try:
                while chunk := await proc.stdout.read(65536):
                    total += len(chunk)
                    log_file.write(chunk)
                    tail += chunk
                    if len(tail) > tail_bytes:
                        del tail[: len(tail) - tail_bytes]
                    if on_output is not None:
                        on_output(chunk)
            finally:
                log_file.close()

        exited = asyncio.ensure_future(proc.wait())
        fault = None
        if self._provider.fault_injector is not None:
            fault = asyncio.ensure_future(self._provider.fault_injector(self, labels or {}, exited))
        timed_out = False
        try:
            if network is not None:
                await network.start()  # the command starts only once its network is set up
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
            limit = await self._end_watch(watcher, cgroup)
            if network is not None:
                await network.close()  # the proxy and slirp4netns end with the command
            if on_fs:
                self._on_fs, self._fs_commands = self._on_fs - 1, self._fs_commands + 1
            if overlay is not None:  # fs/ holds what the commands see whenever none runs (file tools, providers' fakes)
                self._on_overlay -= 1
                await asyncio.to_thread(self._settle)
            if fault is not None:
                await fault
        await self._require_alive("a command was running")
        exit_code = proc.returncode if proc.returncode is not None else -1
        if limit is None and not timed_out:
            limit = breach_from_exit(self.limits, exit_code, bytes(tail), rlimits=cgroup is None)
        return ExecResult(
            exit_code=exit_code,
            timed_out=timed_out,
            duration=time.monotonic() - started,
            output_tail=bytes(tail),
            output_bytes=total,
            log_path=str(log_path),
            limit=limit,
        )

    def _command_network(self) -> CommandNetwork | None:
        """The command's network beyond loopback (sandboxes/network/namespace.py), or None for ``network: false``.
        Never the worker's namespace: without bubblewrap there is no namespace to give, so the rule is refused."""
        rule = self.spec.network_rule
        if self.broker is not None and rule.mode != "internet":
            # A brokered secret's hosts are reachable (through the proxy, which hands them to the broker).
            rule = NetworkRule("allow", tuple(dict.fromkeys((*rule.allow, *self._brokering.hosts))))
        if rule.mode == "off" and self.broker is None:
            return None
        if self._provider.bwrap is None:
            raise IsolationUnavailable(
                f"sandbox.network is {rule.to_json()!r}, which needs bubblewrap on this worker (apt-get install -y"
                " bubblewrap); without it a command would share the worker's own network"
            )
        return CommandNetwork(
            rule, self.spec.network_policy, self.state, broker=self.broker, on_refusal=self._log_refusal
        )

    async def broker_secrets(self, secrets: Sequence[HostSecret]) -> dict[str, str]:
        if self._provider.bwrap is None:
            raise IsolationUnavailable(
                f"secrets {', '.join(s.name for s in secrets)} are brokered, which needs bubblewrap on this worker"
                " (apt-get install -y bubblewrap) for the sandbox's own network namespace and egress proxy"
            )
        env = await asyncio.to_thread(self._brokering.update, secrets)  # may make the CA: a few ms of CPU
        self.broker = self._brokering.broker
        return env

    def _log_refusal(self, reason: str) -> None:
        """Every egress refusal, also on the worker's disk beside the command logs (never inside the sandbox)."""
        with open(self.state / "egress-refusals.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {reason}\n")

    async def open_egress(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A worker-side connection to ``host:port`` under this sandbox's network rule and the worker's address
        checks (what the egress proxy itself uses): for the credential broker's upstream connections."""
        return await EgressProxy(self.spec.network_rule, self.spec.network_policy).open_upstream(host, port)

    async def _command_cgroup(self) -> CommandCgroup | None:
        """A cgroup of the command's own with the sandbox's limits, where the worker may create one."""
        base = self._provider.cgroups
        if base is None:
            return None
        cgroup = CommandCgroup(base, f"{CGROUP_PREFIX}{self.id}-{uuid.uuid4().hex[:8]}", self.limits)
        await asyncio.to_thread(cgroup.create)
        return cgroup

    def _watch(self, proc: asyncio.subprocess.Process, cgroup: CommandCgroup | None) -> asyncio.Future[LimitBreach]:
        """Watch the running command's limits (sandboxes/limits.py `watch`); a breach kills the command at once."""
        roots = [self.fs] + [folder for _, folder, read_only in self._mounts.values() if not read_only]
        if self.overlay is not None:  # what the step wrote (a modified file counts twice: an upper bound)
            roots += self.overlay.uppers()
        isolated = self._provider.bwrap is not None
        watcher = asyncio.ensure_future(
            watch(proc.pid, self.limits, cgroup=cgroup, disk_roots=roots, count_tasks=isolated and cgroup is None)
        )

        def stop(task: asyncio.Future[LimitBreach]) -> None:
            if not task.cancelled() and task.exception() is None:
                self._kill(proc)

        watcher.add_done_callback(stop)
        return watcher

    async def _end_watch(
        self, watcher: asyncio.Future[LimitBreach], cgroup: CommandCgroup | None
    ) -> LimitBreach | None:
        """Stop watching; the breach the command ran into, if it did - even if its shell then exited 0: a refused
        fork or a killed process means its work is not all done. Removes the command's cgroup, killing what is
        left in it."""
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([watcher])
        limit = None
        if watcher.done() and not watcher.cancelled():
            if watcher.exception() is not None:
                log.error("watching the limits of sandbox %s failed", self.id, exc_info=watcher.exception())
            else:
                limit = watcher.result()
        if cgroup is not None:
            limit = limit or await asyncio.to_thread(cgroup.breach)
            await asyncio.to_thread(cgroup.remove)
        return limit

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
            self._settle()  # what the commands wrote is in the upper layer until merged
            with self._folders() as folders:
                return folders.read_file(rel, limit=limit)

        return await asyncio.to_thread(read)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        await self._require_alive("writing a file")
        rel = sandbox_path(path).lstrip("/")

        def write() -> None:
            self._settle()
            self._note_written(rel)
            with self._folders() as folders:
                with contextlib.suppress(OSError):  # (a missing file is created; SafeFolders refuses the rest)
                    st = folders.lstat(rel)
                    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:  # written in place: its other names too
                        self._pending = None  # change, untracked: the next checkpoint walks, a rollback restores
                folders.write_file(rel, data, mode=mode)

        await asyncio.to_thread(write)

    async def make_dirs(self, path: str) -> None:
        await self._require_alive("creating a folder")
        rel = sandbox_path(path).lstrip("/")

        def make() -> None:
            self._settle()
            self._note_written(rel)
            with self._folders() as folders:
                folders.make_dirs(rel)

        await asyncio.to_thread(make)

    # -- the overlay (sandboxes/overlay.py) ---------------------------------------------------------------------

    def _claim_overlay(self, network: CommandNetwork | None) -> OverlayLayers | None:
        """The overlay for the command about to start, counted as running on it; None if it runs on fs/ (then
        its writes are not tracked, and the next checkpoint walks)."""
        if self.overlay is None:
            return None
        if network is not None or self._on_overlay:
            self._pending = None
            return None
        self._on_overlay += 1
        return self.overlay

    def _settle(self) -> None:
        """Merge the upper layers into fs/, so the worker's own file access sees what the commands see; the
        changed paths join `_pending`. A merge that fails is loud: fs/ alone no longer holds the sandbox's files."""
        if self.overlay is None:
            return
        if self._on_overlay:  # another command is still running on the upper layer: it merges when it ends
            self._pending = None  # and what the worker writes meanwhile goes to fs/ beneath a live overlay
            return
        try:
            with self._merging:
                try:
                    changed = self.overlay.merge()
                except BaseException:
                    self._fs_changes += 1  # some of it may have moved
                    raise
                self._fs_changes += bool(changed)
        except OverlayError as e:
            self._pending = None
            if not (self.dir / "sandbox.json").exists():
                return  # the sandbox is gone (destroyed, or lost mid-command): `_require_alive` says so
            raise SandboxError(
                f"sandbox {self.id}: {e}; the step's changes could not be moved out of its overlay layer."
                " Report this with the step's commands; LocalSandboxProvider(overlay=False) avoids overlays"
            ) from None
        if self._pending is not None:
            self._pending |= changed

    def _note_written(self, rel: str) -> None:
        """A path the worker writes into fs/ itself (the file tools): the next checkpoint examines it too, and a
        rollback restores it from the store (a write changes a file in place: the undo log has no original)."""
        paths = [rel]
        parent = rel.rpartition("/")[0]
        while parent and parent not in ("workspace", "home", "home/sandbox"):
            paths.append(parent)  # folders make_dirs/write_file may have created on the way
            parent = parent.rpartition("/")[0]
        if self.overlay is not None:
            with self._merging:
                self.overlay.undo.note_written(paths)
                self._fs_changes += 1
        if self._pending is not None:
            self._pending.update(paths)

    def _changes_since(self, parent: str | None, selection: Selection) -> ChangeSet | None:
        """What changed since ``parent``, when fs/ is known to hold ``parent`` plus `_pending`."""
        if self.overlay is None or parent is None or self._pending is None or self._base != (parent, selection):
            return None
        return ChangeSet(frozenset(self._pending))

    def _rollback(
        self, snapshot_id: str, selection: Selection
    ) -> tuple[tuple[RestoreStats, list[str]] | None, tuple[int, int]]:
        """Roll fs/ back to ``snapshot_id`` without a full restore, if fs/ is known to hold it plus this attempt:
        drop the unmerged upper layer (what a killed command left), undo the attempt's merges (sandboxes/
        overlay_undo.py), and return what that did with the paths still to restore from the store (those the file
        tools wrote; or, when the undo log declines, every path the attempt changed). None: a full restore. Sets
        the state itself, so a caller cancelled meanwhile leaves it right. Also returns `_fs_seen` as of the drop:
        a killed command's merge before it is undone here, one after it merges nothing."""
        assert self.overlay is not None
        with self._merging:
            self.overlay.drop()
            return self._undo(snapshot_id, selection), self._fs_seen()

    def _undo(self, snapshot_id: str, selection: Selection) -> tuple[RestoreStats, list[str]] | None:
        """`_rollback` under `_merging`, once the upper layer is dropped."""
        assert self.overlay is not None
        undo = self.overlay.undo
        pending, known = self._pending, self._base == (snapshot_id, selection)
        self._base, self._pending = None, None  # until fs/ is known to hold the snapshot again
        if not known or pending is None:
            undo.reset(keep=False)
            return None
        try:
            undone = undo.rollback(selection)
        except Exception as e:  # UndoFailed, or anything unforeseen: fs/ is not known, so restore it all
            log.warning("sandbox %s: %s; restoring the snapshot in full", self.id, e)
            undo.reset(keep=False)
            return None
        if undone is None:  # the log declined (see UndoLog.rollback): the changed paths, from the store
            undo.reset(keep=False)
            return RestoreStats(), rollback_roots(pending, selection)
        if not undone.written:
            self._base, self._pending = (snapshot_id, selection), set()
        return RestoreStats(files_written=undone.put_back, deleted=undone.removed), undone.written

    def _unchanged_since(self, snapshot_id: str, selection: Selection) -> bool:
        """Whether fs/ holds ``snapshot_id`` and nothing of an attempt is to undo: a rollback then does nothing."""
        assert self.overlay is not None
        if self._base != (snapshot_id, selection) or self._pending != set() or self._on_overlay:
            return False
        if not self._merging.acquire(blocking=False):
            return False
        try:
            return self.overlay.clean()
        finally:
            self._merging.release()

    def _fs_seen(self) -> tuple[int, int]:
        return self._fs_changes, self._fs_commands

    def _commit(self, snapshot_id: str, selection: Selection, seen: tuple[int, int], *, commands: bool) -> None:
        """fs/ was just made or checkpointed as ``snapshot_id``: the attempt's originals are not needed any more.
        fs/ is known to hold exactly the snapshot only if nothing changed it since `_fs_seen` gave ``seen`` (a
        command that ended and merged, or ran on fs/ itself, or a file tool, while the walk or restore ran);
        else the next checkpoint walks and a rollback restores in full. ``commands=False``: every command was
        killed before (a restore), so one on fs/ whose end is counted meanwhile changed nothing since."""
        if self.overlay is not None:
            with self._merging:
                changes, started = self._fs_seen()
                untouched = changes == seen[0] and (not commands or (started == seen[1] and not self._on_fs))
                self._base, self._pending = (snapshot_id, selection), (set() if untouched else None)
                self.overlay.undo.reset(keep=True)

    # -- snapshots --------------------------------------------------------------------------------------------

    async def snapshot(
        self, engine: SnapshotEngine, *, selection: Selection, parent: str | None, labels: Mapping[str, str]
    ) -> SnapshotInfo:
        await self._require_alive("taking a snapshot")
        await asyncio.to_thread(self._settle)
        seen = self._fs_seen()
        changes = self._changes_since(parent, selection)
        used, disk = await asyncio.to_thread(disk_usage, self.fs), self.limits.disk
        assert disk is not None  # resolved
        if used > disk:  # files a command left behind, or an agent's tools wrote: never stored
            raise LimitExceeded(
                f"sandbox {self.id}: /workspace and ~ hold {format_size(used)}, over its disk limit of"
                f" {format_size(disk)}; not checkpointing. Raise sandbox.limits.disk in the pipeline,"
                " or have the step delete what it does not need"
            )
        info = await asyncio.to_thread(
            engine.create,
            self.fs,
            selection=selection,
            parent=parent,
            cache_path=self.cache_path,
            labels=dict(labels),
            changes=changes,
        )
        # A sandbox that vanished mid-walk yields a partial tree: never hand that out as a checkpoint.
        await self._require_alive("taking a snapshot")
        self._commit(info.id, selection, seen, commands=True)
        return info

    async def restore(self, engine: SnapshotEngine, snapshot_id: str, *, selection: Selection) -> RestoreStats:
        await self._require_alive("restoring a snapshot")
        await self.kill_processes()
        seen = self._fs_seen()
        if self.overlay is not None:
            started = time.monotonic()
            if self._unchanged_since(snapshot_id, selection):  # the attempt changed nothing: O(1), no thread
                return RestoreStats(seconds=time.monotonic() - started)
            rollback, seen = await asyncio.to_thread(self._rollback, snapshot_id, selection)
            if rollback is not None:  # back to the last checkpoint: only what the attempt changed is touched
                stats, paths = rollback
                if paths:  # looked up in the tree one by one, however many (each costs what a walk's entry does)
                    more = await asyncio.to_thread(
                        engine.restore,
                        snapshot_id,
                        self.fs,
                        selection=selection,
                        cache_path=self.cache_path,  # untouched by a ChangeSet restore; rewritten by its fallback
                        changes=ChangeSet(frozenset(paths)),
                    )
                    stats.files_written += more.files_written
                    stats.bytes_written += more.bytes_written
                    stats.files_kept += more.files_kept
                    stats.deleted += more.deleted
                    stats.links_made += more.links_made
                    stats.paths_hinted += more.paths_hinted
                await self._require_alive("restoring a snapshot")
                self._commit(snapshot_id, selection, seen, commands=False)
                self._make_mount_points()
                stats.seconds = time.monotonic() - started
                return stats
        stats = await asyncio.to_thread(
            engine.restore, snapshot_id, self.fs, selection=selection, cache_path=self.cache_path
        )
        await self._require_alive("restoring a snapshot")
        self._commit(snapshot_id, selection, seen, commands=False)
        self._make_mount_points()  # a tree that lacks one must not leave bubblewrap without a bind source
        return stats

    def _make_mount_points(self) -> None:
        for folder in (self.fs / "workspace", self.fs / HOME.lstrip("/")):
            folder.mkdir(parents=True, exist_ok=True)
        if self.overlay is not None:
            self.overlay.prepare()

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

    # -- which state the files are in (see Sandbox.hold_position) ----------------------------------------------

    tracks_position = True

    async def held_position(self) -> str | None:
        try:  # on the worker, outside what the sandbox binds: its processes cannot forge it
            return (self.state / "position").read_text()
        except FileNotFoundError:
            return None

    async def hold_position(self, position: str) -> None:
        staged = self.state / "position.new"
        staged.write_text(position)
        os.replace(staged, self.state / "position")

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
    """Delete the sandbox's folder, however deep the sandbox nested its own (sandboxes/remove_tree.py)."""
    _mark_gone(path)
    remove_folder(path, "the sandbox folder")


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
        cgroups: bool = True,
        broker_upstream_ca: str | Path | None = None,
        overlay: bool = True,
    ) -> None:
        """``bwrap=True`` finds bubblewrap on PATH; ``False`` forces the unisolated fallback (tests only).
        ``cgroups=False`` enforces limits with rlimits and the watcher even where the worker may create cgroups.
        ``broker_upstream_ca``: a CA file the credential broker trusts for real hosts, beside the system's roots
        (an internal CA; also taken from the worker's SSL_CERT_FILE). ``overlay``: run commands on an overlay upper
        layer per step where this machine allows it (sandboxes/overlay.py); ``False`` walks at every checkpoint."""
        self.broker_upstream_ca = broker_upstream_ca
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # other host users must not reach into sandboxes
        self.worker_id = worker_id or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.bwrap: str | None = find_bwrap() if bwrap is True else (bwrap or None)
        self.fault_injector = fault_injector
        self.overlay = False
        if overlay and self.bwrap is not None:
            why_not = probe(self.bwrap)
            if why_not is not None:
                log.warning("overlay upper layers are unavailable, checkpoints walk the sandbox: %s", why_not)
            self.overlay = why_not is None
        self.cgroups = find_cgroup_base() if cgroups and self.bwrap is not None else None
        if self.cgroups is not None:
            sweep_cgroups(self.cgroups)  # cgroups of commands whose worker was killed
        log.info("sandbox limits enforced with %s", f"cgroup v{self.cgroups.version}" if self.cgroups else "rlimits")
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
        rule = spec.network_rule
        if rule.mode != "off":  # refused now, with what to install, rather than at the first command
            if self.bwrap is None:
                raise IsolationUnavailable(
                    f"sandbox.network is {rule.to_json()!r}, which needs bubblewrap on this worker (apt-get install -y"
                    " bubblewrap); a sandbox never shares the worker's own network"
                )
            require_tools(rule)
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
        meta = {"worker_id": self.worker_id, "network": spec.network_rule.to_json(), "options": dict(spec.options)}
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
