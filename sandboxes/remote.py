"""What every remote sandbox provider (E2B, Modal) shares: commands, the mirror, portable snapshots and mounts.

A remote sandbox runs on someone else's machine and is reached through an SDK, by id, from any worker: providers
are not host-bound. The SDK adapters (sandboxes/e2b.py, sandboxes/modal.py) supply a handful of primitives -
start a process and stream its output, kill it, move one file in or out, probe liveness, terminate - and this
module builds the provider-neutral `Sandbox` on top of them:

* Layout: the same ``/workspace`` and ``/home/sandbox`` as the local provider, owned by uid 1000, whom commands
  run as; so venvs and absolute paths move between providers. Helper files live in a root-only ``/tmp/.tardigrade``.
* Commands carry a marker variable (``TARDIGRADE_EXEC=<sandbox>:<exec>``); a timeout, a cancellation or
  `kill_processes` runs a *reaper* as root that kills every process whose environment carries the marker, so
  orphans that double-forked away from their command die too.
* Snapshots use the portable engine through a *mirror*: a folder on the worker per sandbox, kept equal to the
  sandbox's selected paths. `pull` lists the sandbox with ``find -printf`` (type, mode, size, mtime, ctime, inode
  and link target, NUL-separated), compares each file with a *sync index* - the remote stat and the mirror stat
  recorded when the two were last known equal - and transfers only files that differ, as one tar stream through
  the SDK; it applies deletions and sets modes and mtimes exactly (from the listing, in nanoseconds). Then
  `SnapshotEngine.create` runs on the mirror, whose stat cache makes it incremental. `restore` runs
  `SnapshotEngine.restore` into the mirror and `push`es the differences back (deletions first, then one tar).
* Mounts are materialized on the worker (sandboxes/mounts.py) and pushed the same way to the mount path, owned by
  root and read-only for ``ro`` mounts (commands run as uid 1000, so the kernel enforces it).

The mirror and the index are caches: a worker that has none (another worker attached) pulls or pushes in full,
never wrongly. Memory: file contents stream through temporary files; the listing and index of the selected paths
are held as dicts (about 200 bytes per file).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import json
import logging
import os
import shlex
import shutil
import stat
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from tardigrade.sandboxes.errors import SandboxError, SandboxLost, WorkspaceChanged
from tardigrade.sandboxes.manifest import HOME, WORKSPACE, Mount, sandbox_path
from tardigrade.sandboxes.mounts import MountStats, materialize
from tardigrade.sandboxes.provider import ExecResult, OutputCallback, Sandbox, SandboxProvider, SandboxSpec
from tardigrade.sandboxes.snapshots import RestoreStats, Selection, SnapshotEngine, SnapshotInfo
from tardigrade.sandboxes.stores import ObjectStore

log = logging.getLogger(__name__)

SANDBOX_UID = 1000
HELPER_DIR = "/tmp/.tardigrade"  # root-only; never in a snapshot's roots
MARKER = "TARDIGRADE_EXEC"
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": HOME,
    "USER": "sandbox",
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",
}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FIND_FORMAT = r"%y\0%m\0%s\0%T@\0%C@\0%i\0%n\0%p\0%l\0"
_FIELDS = 9


# -- SDK adapter interface ----------------------------------------------------------------------------------------


class RemoteProcess(Protocol):
    """A process started in the sandbox."""

    async def wait(self) -> int:
        """Its exit code once it ends (output callbacks have all run by then)."""
        ...

    async def kill(self) -> None: ...


# -- the listing ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    kind: str  # f, d, l (anything else is skipped)
    mode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    nlink: int
    link: str

    @property
    def sig(self) -> str:
        """What says a remote file was not touched: size, mtime, ctime, inode and mode."""
        return f"{self.size}:{self.mtime_ns}:{self.ctime_ns}:{self.ino}:{self.mode}"


def _ns(text: str) -> int:
    """find's ``%T@`` ("1700000000.1234567890") as integer nanoseconds, exactly."""
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


def parse_listing(stream: IO[bytes]) -> Iterator[tuple[str, RemoteEntry]]:
    """Records of ``find -printf _FIND_FORMAT``: nine NUL-terminated fields each, read in blocks."""
    pending = b""
    fields: list[bytes] = []
    while block := stream.read(1 << 20):
        parts = (pending + block).split(b"\0")
        pending = parts.pop()
        for part in parts:
            fields.append(part)
            if len(fields) == _FIELDS:
                kind, mode, size, mtime, ctime, ino, nlink, path, link = fields
                fields = []
                rel = os.fsdecode(path)
                rel = rel[2:] if rel.startswith("./") else ("" if rel == "." else rel)
                yield rel, RemoteEntry(
                    kind.decode(), int(mode, 8), int(size), _ns(mtime.decode()), _ns(ctime.decode()), int(ino),
                    int(nlink), os.fsdecode(link),
                )  # fmt: skip
    if pending or fields:
        raise SandboxError("the sandbox's file listing ended in the middle of a record (truncated?)")


def _mirror_sig(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{stat.S_IMODE(st.st_mode)}"


class SyncIndex:
    """path -> (remote signature, mirror signature) of files last known to hold the same content on both sides."""

    FORMAT = "tardigrade-syncindex/1"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, tuple[str, str]] = {}
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                if json.loads(f.readline() or "{}").get("format") == self.FORMAT:
                    for line in f:
                        rel, remote, mirror = json.loads(line)
                        self.entries[rel] = (remote, mirror)
        except (OSError, ValueError):
            self.entries = {}  # no index: nothing is trusted, everything is compared in full

    def save(self, entries: dict[str, tuple[str, str]]) -> None:
        tmp = self.path.with_name(self.path.name + ".new")
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(json.dumps({"format": self.FORMAT}) + "\n")
            for rel in sorted(entries):
                f.write(json.dumps([rel, *entries[rel]]) + "\n")
        os.replace(tmp, self.path)
        self.entries = entries

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)
        self.entries = {}


# -- safe local writes ----------------------------------------------------------------------------------------------


class _Folders:
    """Opens folders below a root one component at a time without following symlinks (creating them if asked), so
    paths chosen by the sandbox can never make the worker write outside the mirror."""

    def __init__(self, root: Path) -> None:
        self.root_fd = os.open(root, _DIR_FLAGS)

    def parent(self, rel: str, *, create: bool) -> tuple[int, str]:
        *folders, name = rel.split("/")
        fd = os.dup(self.root_fd)
        try:
            for component in folders:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(component, 0o755, dir_fd=fd)
                try:
                    child = os.open(component, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise SandboxError(f"{rel!r} lies beneath a symlink or a file; refusing to write it") from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    def close(self) -> None:
        os.close(self.root_fd)


def _remove_at(parent_fd: int, name: str) -> None:
    """Delete a file, link or whole folder by descriptor, never following symlinks."""
    try:
        os.unlink(name, dir_fd=parent_fd)
        return
    except FileNotFoundError:
        return
    except (IsADirectoryError, PermissionError):
        pass
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        os.fchmod(fd, 0o700)
        for child in os.listdir(fd):
            _remove_at(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def _walk_local(root: Path, selection: Selection) -> Iterator[tuple[str, os.stat_result]]:
    """Every covered path under ``root`` (ancestors of roots excluded), never following symlinks."""
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            names = os.listdir(root / rel if rel else root)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in sorted(names, reverse=True):
            path = f"{rel}/{name}" if rel else name
            if selection.covers(path):
                if selection.excluded(path):
                    continue
            elif not selection.is_ancestor(path):
                continue
            st = os.lstat(root / path)
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
            if selection.covers(path):
                yield path, st


# -- the sandbox ----------------------------------------------------------------------------------------------------


@dataclass
class SyncStats:
    listed: int = 0
    transferred: int = 0
    bytes: int = 0
    deleted: int = 0
    seconds: float = 0.0


class RemoteSandbox(Sandbox):
    """A sandbox reached through an SDK. Subclasses implement the primitives marked abstract below."""

    def __init__(self, provider: RemoteProvider, sandbox_id: str, spec: SandboxSpec) -> None:
        self.id = sandbox_id
        self.spec = spec
        self._remote_provider = provider
        self.state = provider.state_root / sandbox_id
        self.mirror = self.state / "mirror"
        self.mirror.mkdir(parents=True, exist_ok=True)
        self.last_pull: SyncStats | None = None
        self.last_push: SyncStats | None = None

    # -- primitives ---------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def _spawn(
        self, command: str, *, env: Mapping[str, str], cwd: str, root: bool, on_output: Callable[[bytes], None]
    ) -> RemoteProcess:
        """Start ``sh -c command`` (as root, or as uid 1000) with exactly ``env`` added to the image's."""

    @abc.abstractmethod
    async def _download(self, remote_path: str, local_path: Path) -> None:
        """Stream a file out of the sandbox (read as root)."""

    @abc.abstractmethod
    async def _upload(self, local_path: Path, remote_path: str) -> None:
        """Stream a local file into the sandbox (written as root)."""

    @abc.abstractmethod
    async def _probe_alive(self) -> bool: ...

    @abc.abstractmethod
    async def _terminate(self) -> None: ...

    @abc.abstractmethod
    def _is_gone_error(self, error: BaseException) -> bool:
        """The SDK's own word that the sandbox no longer exists."""

    # -- errors -------------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _sdk(self, doing: str) -> AsyncIterator[None]:
        """Translate SDK failures: a gone sandbox is `SandboxLost`; anything else is checked against liveness."""
        try:
            yield
        except (SandboxLost, SandboxError, asyncio.CancelledError, WorkspaceChanged, FileNotFoundError):
            raise
        except Exception as e:
            if self._is_gone_error(e):
                raise SandboxLost(self.id, f"{self.provider} says it is gone ({type(e).__name__}) while {doing}") from e
            alive = False
            with contextlib.suppress(Exception):
                alive = await self._probe_alive()
            if not alive:
                raise SandboxLost(self.id, f"it stopped answering while {doing} ({type(e).__name__})") from e
            raise SandboxError(f"{self.provider} sandbox {self.id}: {doing} failed: {type(e).__name__}: {e}") from e

    async def alive(self) -> bool:
        try:
            return await self._probe_alive()
        except Exception as e:
            if self._is_gone_error(e):
                return False
            raise

    # -- commands -----------------------------------------------------------------------------------------------

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
        cwd = sandbox_path(cwd, field="cwd")
        exec_id = uuid.uuid4().hex[:12]
        full_env = {**BASE_ENV, **env, MARKER: f"{self.id}:{exec_id}"}
        log_path = self.state / f"exec-{exec_id}.log"
        tail = bytearray()
        total = 0
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed below

        def collect(chunk: bytes) -> None:
            nonlocal total, tail
            total += len(chunk)
            log_file.write(chunk)
            tail += chunk
            if len(tail) > tail_bytes:
                del tail[: len(tail) - tail_bytes]
            if on_output is not None:
                on_output(chunk)

        started = time.monotonic()
        timed_out = False
        exit_code = -1
        try:
            async with self._sdk("running a command"):
                process = await self._spawn(command, env=full_env, cwd=cwd, root=False, on_output=collect)
                try:
                    exit_code = await asyncio.wait_for(process.wait(), timeout)
                except TimeoutError:
                    timed_out = True
                    await self._reap(f"{self.id}:{exec_id}", process)
                except BaseException:
                    with contextlib.suppress(Exception):  # cancelled: kill it, whatever it takes
                        await asyncio.shield(self._reap(f"{self.id}:{exec_id}", process))
                    raise
        finally:
            log_file.close()
        if not await self.alive():
            raise SandboxLost(self.id, "it was gone when the command ended")
        return ExecResult(
            exit_code=exit_code,
            timed_out=timed_out,
            duration=time.monotonic() - started,
            output_tail=bytes(tail),
            output_bytes=total,
            log_path=str(log_path),
        )

    async def _reap(self, marker_prefix: str, process: RemoteProcess | None = None) -> None:
        """Kill every process whose environment carries the marker (the reaper itself does not carry it)."""
        if process is not None:
            with contextlib.suppress(Exception):
                await process.kill()
        script = (
            f"for pass in 1 2 3; do found=0; for d in /proc/[0-9]*; do p=${{d#/proc/}};"
            f' [ "$p" = "$$" ] && continue;'
            f' if tr "\\0" "\\n" < "$d/environ" 2>/dev/null | grep -q "^{MARKER}={marker_prefix}";'
            f' then kill -9 "$p" 2>/dev/null && found=1; fi; done; [ $found = 0 ] && break; sleep 0.05; done; true'
        )
        await self._run_root(script, "killing the sandbox's processes")

    async def kill_processes(self) -> None:
        await self._reap(f"{self.id}:")

    async def _run_root(self, script: str, doing: str, *, timeout: float = 600) -> str:
        """A helper command as root; raises `SandboxError` with its output if it fails."""
        out = bytearray()

        def keep(chunk: bytes) -> None:
            if len(out) < 65536:
                out.extend(chunk)

        async with self._sdk(doing):
            process = await self._spawn(script, env=BASE_ENV, cwd="/", root=True, on_output=keep)
            code = await asyncio.wait_for(process.wait(), timeout)
        if code != 0:
            text = out.decode(errors="replace").strip()[-2000:]
            raise SandboxError(f"{self.provider} sandbox {self.id}: {doing} failed (exit code {code}): {text}")
        return out.decode(errors="replace")

    async def _prepare(self) -> None:
        """Give a new sandbox the portable layout (called once, right after creation)."""
        await self._run_root(
            f"mkdir -p {WORKSPACE} {HOME} {HELPER_DIR} && chown {SANDBOX_UID}:{SANDBOX_UID} {WORKSPACE} {HOME}"
            f" && chmod 755 {WORKSPACE} {HOME} && chmod 700 {HELPER_DIR}",
            "preparing /workspace and /home/sandbox",
        )

    # -- files --------------------------------------------------------------------------------------------------

    async def make_dirs(self, path: str) -> None:
        target = sandbox_path(path)
        await self._user_shell(f"mkdir -p -- {shlex.quote(target)}", f"creating {target}")

    async def _user_shell(self, command: str, doing: str) -> None:
        out = bytearray()
        async with self._sdk(doing):
            process = await self._spawn(command, env=BASE_ENV, cwd=WORKSPACE, root=False, on_output=out.extend)
            code = await process.wait()
        if code != 0:
            raise SandboxError(f"{doing} failed: {out.decode(errors='replace').strip()[-500:]}")

    # -- mirror sync --------------------------------------------------------------------------------------------

    async def _list(self, remote_root: str, selection: Selection, into: Path) -> dict[str, RemoteEntry]:
        """The sandbox's view of the selected paths below ``remote_root`` (relative paths, "" for the root)."""
        starts = [r for r in selection.roots] or [""]
        prunes = []
        for pattern in selection.excludes:
            plain = pattern.removesuffix("/**")
            if not any(c in plain for c in "*?[") and plain:
                prunes.append(plain)
        prune = "".join(f" -path {shlex.quote('./' + p)} -prune -o" for p in prunes)
        listing = f"{HELPER_DIR}/list-{uuid.uuid4().hex[:8]}"
        finds = " ".join(
            f"if [ -e {shlex.quote('./' + s if s else '.')} ]; then find {shlex.quote('./' + s if s else '.')}"
            f"{prune} -printf {shlex.quote(_FIND_FORMAT)} >> {listing}; fi;"
            for s in starts
        )
        await self._run_root(
            f"mkdir -p {shlex.quote(remote_root)} && cd {shlex.quote(remote_root)} && : > {listing} && {finds} true",
            f"listing {remote_root}",
        )
        try:
            async with self._sdk(f"reading the listing of {remote_root}"):
                await self._download(listing, into)
        finally:
            await self._run_root(f"rm -f {listing}", "removing a helper file")
        entries: dict[str, RemoteEntry] = {}
        with open(into, "rb") as f:
            for rel, entry in parse_listing(f):
                if rel and selection.covers(rel) and not _excluded(selection, rel):
                    entries[rel] = entry
        return entries

    async def _pull(self, local_root: Path, remote_root: str, selection: Selection, index: SyncIndex) -> SyncStats:
        """Make ``local_root`` equal the sandbox's selected paths below ``remote_root``; transfer only what changed."""
        started = time.monotonic()
        stats = SyncStats()
        scratch = Path(tempfile.mkdtemp(dir=self.state, prefix="pull-"))
        try:
            remote = await self._list(remote_root, selection, scratch / "listing")
            stats.listed = len(remote)
            local = dict(_walk_local(local_root, selection))
            folders = _Folders(local_root)
            try:
                # Deletions and type changes first (deepest first), so new entries have room.
                for rel in sorted(local, key=lambda p: p.count("/"), reverse=True):
                    want = remote.get(rel)
                    current = local[rel]
                    if want is None or _kind(current) != want.kind or (want.kind == "l" and _readlink(local_root, rel)
                                                                     != want.link):  # fmt: skip
                        fd, name = folders.parent(rel, create=False)
                        try:
                            _remove_at(fd, name)
                        finally:
                            os.close(fd)
                        local.pop(rel)
                        stats.deleted += 1
                fetch: list[str] = []
                inodes: dict[int, list[str]] = {}
                for rel in sorted(remote, key=lambda p: p.split("/")):
                    entry = remote[rel]
                    if entry.kind == "d":
                        have = local.get(rel)
                        if have is None or have.st_mode & 0o700 != 0o700:
                            fd, name = folders.parent(rel, create=True)
                            try:
                                if have is None:
                                    os.mkdir(name, 0o700, dir_fd=fd)
                                else:  # room to write into; the exact mode is set at the end
                                    os.chmod(name, stat.S_IMODE(have.st_mode) | 0o700, dir_fd=fd)
                            finally:
                                os.close(fd)
                    elif entry.kind == "l":
                        if rel not in local:
                            fd, name = folders.parent(rel, create=True)
                            try:
                                os.symlink(entry.link, name, dir_fd=fd)
                                os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=fd, follow_symlinks=False)
                            finally:
                                os.close(fd)
                    elif entry.kind == "f":
                        if entry.nlink > 1:
                            inodes.setdefault(entry.ino, []).append(rel)
                        known = index.entries.get(rel)
                        have = local.get(rel)
                        if not (known and have and known == (entry.sig, _mirror_sig(have))):
                            fetch.append(rel)
                # A hard-linked file is fetched with all its links, so the mirror keeps them linked.
                wanted = set(fetch)
                for group in inodes.values():
                    if wanted.intersection(group):
                        wanted.update(group)
                if wanted:
                    stats.transferred, stats.bytes = await self._fetch(
                        local_root, remote_root, sorted(wanted, key=lambda p: p.split("/")), remote, folders, scratch
                    )
                new_index: dict[str, tuple[str, str]] = {}
                for rel in sorted(remote, key=lambda p: p.count("/"), reverse=True):  # folders' mtimes last
                    entry = remote[rel]
                    if entry.kind not in ("f", "d"):
                        continue
                    fd, name = folders.parent(rel, create=False)
                    try:
                        st = os.lstat(name, dir_fd=fd)
                        # Only touch what differs: chmod and utime bump the ctime the stat cache keys on.
                        if stat.S_IMODE(st.st_mode) != entry.mode:
                            os.chmod(name, entry.mode, dir_fd=fd, follow_symlinks=False)
                        if st.st_mtime_ns != entry.mtime_ns:
                            os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=fd, follow_symlinks=False)
                        if entry.kind == "f":
                            new_index[rel] = (entry.sig, _mirror_sig(os.lstat(name, dir_fd=fd)))
                    finally:
                        os.close(fd)
            finally:
                folders.close()
            index.save(new_index)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        stats.seconds = round(time.monotonic() - started, 3)
        return stats

    async def _fetch(
        self,
        local_root: Path,
        remote_root: str,
        paths: list[str],
        remote: dict[str, RemoteEntry],
        folders: _Folders,
        scratch: Path,
    ) -> tuple[int, int]:
        """Bring ``paths`` (regular files) over as one tar stream and write them into the mirror."""
        names = scratch / "fetch.list"
        names.write_bytes(b"".join(os.fsencode("./" + p) + b"\0" for p in paths))
        token = uuid.uuid4().hex[:8]
        remote_list, remote_tar = f"{HELPER_DIR}/fetch-{token}.list", f"{HELPER_DIR}/fetch-{token}.tar"
        local_tar = scratch / "fetch.tar"
        async with self._sdk("sending the list of changed files"):
            await self._upload(names, remote_list)
        try:
            await self._run_root(
                f"cd {shlex.quote(remote_root)} && tar --null --no-recursion --format=posix -T {remote_list}"
                f" -cf {remote_tar}",
                "packing changed files",
            )
            async with self._sdk("downloading changed files"):
                await self._download(remote_tar, local_tar)
        finally:
            await self._run_root(f"rm -f {remote_list} {remote_tar}", "removing helper files")
        wanted = set(paths)
        written = size = 0
        with tarfile.open(local_tar, "r|") as archive:
            for member in archive:
                rel = member.name.removeprefix("./")
                if rel not in wanted:
                    raise SandboxError(f"the sandbox sent {rel!r}, which was not asked for; refusing it")
                entry = remote[rel]
                fd, name = folders.parent(rel, create=True)
                try:
                    with contextlib.suppress(FileNotFoundError):
                        _remove_at(fd, name)
                    if member.islnk():
                        target = member.linkname.removeprefix("./")
                        if target not in wanted:
                            raise SandboxError(f"{rel!r} is sent as a link to {target!r}, which was not asked for")
                        tfd, tname = folders.parent(target, create=False)
                        try:
                            os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=fd, follow_symlinks=False)
                        finally:
                            os.close(tfd)
                    elif member.isreg():
                        source = archive.extractfile(member)
                        assert source is not None
                        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                      0o600, dir_fd=fd)  # fmt: skip
                        with os.fdopen(out, "wb") as dst:
                            shutil.copyfileobj(source, dst, 1 << 20)
                        if member.size != entry.size:
                            raise WorkspaceChanged(
                                f"file {rel!r} changed while it was copied out of the sandbox; is a process still"
                                " writing it?"
                            )
                        size += member.size
                    else:
                        raise SandboxError(f"the sandbox sent {rel!r} as a {member.type!r} entry; expected a file")
                finally:
                    os.close(fd)
                written += 1
        if written != len(paths):
            raise WorkspaceChanged(f"{len(paths) - written} file(s) vanished while they were copied out of the sandbox")
        return written, size

    async def _push(
        self,
        local_root: Path,
        remote_root: str,
        selection: Selection,
        index: SyncIndex,
        *,
        owner: int,
        root_mode: int | None = None,
    ) -> SyncStats:
        """Make the sandbox's selected paths below ``remote_root`` equal ``local_root``: delete what is not in it,
        send what differs (by the sync index; everything when there is none) as one tar stream, owned by ``owner``."""
        started = time.monotonic()
        stats = SyncStats()
        scratch = Path(tempfile.mkdtemp(dir=self.state, prefix="push-"))
        try:
            remote = await self._list(remote_root, selection, scratch / "listing")
            local = dict(_walk_local(local_root, selection))
            stats.listed = len(local)
            delete: list[str] = []
            for rel in sorted(remote, key=lambda p: p.split("/")):
                have = remote[rel]
                want = local.get(rel)
                if want is None or _kind(want) != have.kind or (have.kind == "l" and _readlink(local_root, rel)
                                                                 != have.link):  # fmt: skip
                    if not any(rel.startswith(d + "/") for d in delete[-1:]):
                        delete.append(rel)
                    remote.pop(rel)
            send: list[str] = []
            for rel in sorted(local, key=lambda p: p.split("/")):
                st = local[rel]
                have_entry = remote.get(rel)
                kind = _kind(st)
                if kind == "f":
                    known = index.entries.get(rel)
                    if have_entry is None or not known or known != (have_entry.sig, _mirror_sig(st)):
                        send.append(rel)
                elif kind == "d":
                    if (
                        have_entry is None
                        or have_entry.mode != stat.S_IMODE(st.st_mode)
                        or (have_entry.mtime_ns != st.st_mtime_ns)
                    ):
                        send.append(rel)
                elif kind == "l" and have_entry is None:
                    send.append(rel)
            # Folders whose content changes get their mtime back from the archive (tar sets them last).
            touched = {p.rpartition("/")[0] for p in [*send, *delete]}
            send = sorted(set(send) | {p for p in touched if p in local}, key=lambda p: p.split("/"))
            if root_mode is not None:
                send = ["", *[p for p in send if p]]
            if delete:
                names = scratch / "delete.list"
                names.write_bytes(b"".join(os.fsencode("./" + p) + b"\0" for p in delete))
                remote_list = f"{HELPER_DIR}/delete-{uuid.uuid4().hex[:8]}.list"
                async with self._sdk("sending the list of files to delete"):
                    await self._upload(names, remote_list)
                await self._run_root(
                    f"cd {shlex.quote(remote_root)} && xargs -0 -r rm -rf -- < {remote_list}; rm -f {remote_list}",
                    "deleting files",
                )
                stats.deleted = len(delete)
            if send:
                archive_path = scratch / "push.tar"
                stats.transferred, stats.bytes = await asyncio.to_thread(
                    _build_tar, local_root, send, archive_path, owner, root_mode
                )
                remote_tar = f"{HELPER_DIR}/push-{uuid.uuid4().hex[:8]}.tar"
                async with self._sdk("uploading files"):
                    await self._upload(archive_path, remote_tar)
                await self._run_root(
                    f"mkdir -p {shlex.quote(remote_root)} && tar -xpf {remote_tar} --numeric-owner --same-owner"
                    f" -C {shlex.quote(remote_root)}; code=$?; rm -f {remote_tar}; exit $code",
                    "unpacking files",
                )
            # Record what is now known equal: the sandbox's stat after the push against the mirror's.
            after = await self._list(remote_root, selection, scratch / "after")
            new_index: dict[str, tuple[str, str]] = {}
            for rel, st in local.items():
                entry = after.get(rel)
                if entry is not None and entry.kind == "f" and stat.S_ISREG(st.st_mode) and entry.size == st.st_size:
                    new_index[rel] = (entry.sig, _mirror_sig(st))
            index.save(new_index)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        stats.seconds = round(time.monotonic() - started, 3)
        return stats

    # -- snapshots ----------------------------------------------------------------------------------------------

    def _mirror_index(self) -> SyncIndex:
        return SyncIndex(self.state / "mirror.index")

    async def snapshot(
        self, engine: SnapshotEngine, *, selection: Selection, parent: str | None, labels: Mapping[str, str]
    ) -> SnapshotInfo:
        self.last_pull = await self._pull(self.mirror, "/", selection, self._mirror_index())
        info = await asyncio.to_thread(
            engine.create,
            self.mirror,
            selection=selection,
            parent=parent,
            cache_path=self.state / "statcache",
            labels=dict(labels),
        )
        return info

    async def restore(self, engine: SnapshotEngine, snapshot_id: str, *, selection: Selection) -> RestoreStats:
        await self.kill_processes()
        stats = await asyncio.to_thread(
            engine.restore, snapshot_id, self.mirror, selection=selection, cache_path=self.state / "statcache"
        )
        self.last_push = await self._push(self.mirror, "/", selection, self._mirror_index(), owner=SANDBOX_UID)
        return stats

    async def native_snapshot(self) -> str | None:
        return await self._native_snapshot()

    async def _native_snapshot(self) -> str | None:
        """The provider's own snapshot of the whole sandbox, if it has one."""
        return None

    async def adopt_native(self, engine: SnapshotEngine, snapshot_id: str, *, selection: Selection) -> None:
        """This sandbox was created from the native snapshot taken with portable snapshot ``snapshot_id``: fill the
        mirror from the store (no transfer from the sandbox) and trust equal metadata, so the restore that follows
        only pushes what differs."""
        await asyncio.to_thread(
            engine.restore, snapshot_id, self.mirror, selection=selection, cache_path=self.state / "statcache"
        )
        scratch = Path(tempfile.mkdtemp(dir=self.state, prefix="adopt-"))
        try:
            remote = await self._list("/", selection, scratch / "listing")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        trusted: dict[str, tuple[str, str]] = {}
        for rel, st in _walk_local(self.mirror, selection):
            entry = remote.get(rel)
            if (
                entry is not None and entry.kind == "f" and stat.S_ISREG(st.st_mode) and entry.size == st.st_size
                and entry.mtime_ns // 1000 == st.st_mtime_ns // 1000 and entry.mode == stat.S_IMODE(st.st_mode)
            ):  # fmt: skip
                trusted[rel] = (entry.sig, _mirror_sig(st))
        self._mirror_index().save(trusted)

    # -- mounts -------------------------------------------------------------------------------------------------

    async def mount(self, index: int, mount: Mount, source: ObjectStore) -> MountStats:
        """Materialize on the worker, then push into the sandbox: root-owned and read-only for ``ro``."""
        staged = self.state / "mounts" / str(index)
        stats = await asyncio.to_thread(
            materialize, mount, index, source, staged, state_file=self.state / f"mount-{index}.json"
        )
        owner = 0 if mount.read_only else SANDBOX_UID
        await self._push(
            staged,
            mount.path,
            Selection.everything(),
            SyncIndex(self.state / f"mount-{index}.index"),
            owner=owner,
            root_mode=0o555 if mount.read_only else 0o755,
        )
        return stats

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def destroy(self) -> None:
        with contextlib.suppress(SandboxLost):
            async with self._sdk("destroying the sandbox"):
                await self._terminate()
        await asyncio.to_thread(shutil.rmtree, self.state, True)


def _excluded(selection: Selection, rel: str) -> bool:
    """Whether ``rel`` or a folder above it is excluded (the walk prunes excluded folders)."""
    parts = rel.split("/")
    return any(selection.excluded("/".join(parts[:i])) for i in range(1, len(parts) + 1))


def _kind(st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return "d"
    if stat.S_ISLNK(st.st_mode):
        return "l"
    if stat.S_ISREG(st.st_mode):
        return "f"
    return "?"


def _readlink(root: Path, rel: str) -> str:
    try:
        return os.readlink(root / rel)
    except OSError:
        return ""


def _build_tar(local_root: Path, paths: list[str], out: Path, owner: int, root_mode: int | None) -> tuple[int, int]:
    """A POSIX tar of ``paths`` with exact nanosecond mtimes, owned by ``owner``; never follows symlinks."""
    files = size = 0
    inodes: dict[tuple[int, int], str] = {}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
        for rel in paths:
            full = local_root / rel if rel else local_root
            st = os.lstat(full)
            info = tarfile.TarInfo("./" + rel if rel else ".")
            info.uid = info.gid = owner
            info.uname = info.gname = ""
            info.mode = stat.S_IMODE(st.st_mode) if not (rel == "" and root_mode is not None) else root_mode
            info.mtime = st.st_mtime_ns / 1e9
            seconds, nanos = divmod(st.st_mtime_ns, 1_000_000_000)
            info.pax_headers = {"mtime": f"{seconds}.{nanos:09d}"}
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(full)
                archive.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                first = inodes.setdefault((st.st_dev, st.st_ino), rel) if st.st_nlink > 1 else rel
                if first != rel:
                    info.type = tarfile.LNKTYPE
                    info.linkname = "./" + first
                    archive.addfile(info)
                else:
                    info.size = st.st_size
                    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with os.fdopen(fd, "rb") as f:
                        archive.addfile(info, f)
                    size += st.st_size
                files += 1
    return files, size


# -- the provider -----------------------------------------------------------------------------------------------


class RemoteProvider(SandboxProvider):
    """Shared plumbing of SDK-backed providers: not host-bound (any worker attaches by id), a folder on this
    worker for mirrors and logs, and the portable layout prepared on every new sandbox."""

    host_bound = False

    def __init__(self, state_root: Path) -> None:
        self.state_root = Path(state_root)
        self.state_root.mkdir(parents=True, exist_ok=True)

    async def _prepared(self, make: Callable[[], Awaitable[RemoteSandbox]]) -> RemoteSandbox:
        sandbox = await make()
        try:
            await sandbox._prepare()
        except BaseException:
            with contextlib.suppress(Exception):
                await sandbox.destroy()
            raise
        return sandbox

    async def close(self) -> None:
        """Sandboxes outlive this worker (another attaches by id); only the local mirrors go."""
        await asyncio.to_thread(shutil.rmtree, self.state_root, True)
