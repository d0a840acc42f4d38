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
* Snapshots use the portable engine through a *mirror* (sandboxes/mirror.py): a folder on the worker per
  sandbox, kept equal to the sandbox's selected paths. `pull` lists the sandbox with ``find -printf`` (type, mode,
  size, mtime, ctime, inode and link target, NUL-separated), compares each file with a *sync index* - the remote
  stat and the mirror stat recorded when the two were last known equal - and transfers only files that differ, as
  one tar stream through the SDK; it applies deletions and sets modes and mtimes exactly (from the listing, in
  nanoseconds). Then `SnapshotEngine.create` runs on the mirror, whose stat cache makes it incremental. `restore`
  runs `SnapshotEngine.restore` into the mirror and `push`es the differences back (deletions first, then one tar).
  A changed file of 1 MiB or more that both sides hold a version of moves as its differing 1 MiB blocks instead
  (sandboxes/block_delta.py: hashed on both sides, patched into a new file, checked, renamed; whole on any doubt).
  The listing and the tar come out of a hostile sandbox: sandboxes/mirror.py checks every name and writes only
  through sandboxes/safe_folders.py, and its blocking file work runs in threads, off the event loop.
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
import logging
import os
import shlex
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol

from tardigrade.sandboxes import block_delta, mirror
from tardigrade.sandboxes.errors import SandboxError, SandboxLost, UnsafePath, WorkspaceChanged
from tardigrade.sandboxes.exec_log import ExecLog, OutputMask
from tardigrade.sandboxes.layout import BASE_ENV, HOME, SANDBOX_UID, WORKSPACE
from tardigrade.sandboxes.manifest import Mount, sandbox_path
from tardigrade.sandboxes.mirror import FIND_FORMAT, RemoteEntry, SyncIndex, SyncStats
from tardigrade.sandboxes.mounts import MountStats, materialize
from tardigrade.sandboxes.provider import ExecResult, OutputCallback, Sandbox, SandboxProvider, SandboxSpec
from tardigrade.sandboxes.snapshots import RestoreStats, Selection, SnapshotEngine, SnapshotInfo
from tardigrade.sandboxes.stores import ObjectStore

log = logging.getLogger(__name__)

HELPER_DIR = "/tmp/.tardigrade"  # root-only; never in a snapshot's roots
IO_DIR = "/tmp/.tardigrade-io"  # root-owned, 0711: files handed to uid 1000 by unguessable name
MAX_LISTING_BYTES = 1 << 30  # a listing of millions of files is ~150 bytes each; more is not a listing
MARKER = "TARDIGRADE_EXEC"


# -- SDK adapter interface ----------------------------------------------------------------------------------------


class RemoteProcess(Protocol):
    """A process started in the sandbox."""

    async def wait(self) -> int:
        """Its exit code once it ends (output callbacks have all run by then)."""
        ...

    async def kill(self) -> None: ...


# -- the sandbox ----------------------------------------------------------------------------------------------------


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
        mask: OutputMask | None = None,
    ) -> ExecResult:
        cwd = sandbox_path(cwd, field="cwd")
        exec_id = uuid.uuid4().hex[:12]
        full_env = {**BASE_ENV, **env, MARKER: f"{self.id}:{exec_id}"}
        log_path = self.state / f"exec-{exec_id}.log"
        tail = bytearray()
        total = 0
        log_file = ExecLog(log_path, mask)  # 0600, masked before it touches the disk, bounded; closed below

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

    async def _bounded_download(self, remote_path: str, local_path: Path, limit: int, what: str) -> None:
        """Download a helper file the sandbox produced, refusing one larger than ``limit`` before a byte of it
        reaches the worker's disk (and checking again after: the file could grow in between)."""
        out = await self._run_root(f"stat -c %s -- {shlex.quote(remote_path)}", f"sizing {what}")
        size = int(out.strip()) if out.strip().isdigit() else -1
        if not 0 <= size <= limit:
            raise SandboxError(
                f"{self.provider} sandbox {self.id}: {what} is {size:,} bytes, more than the {limit:,} it can need;"
                " refusing to download it (something in the sandbox is rewriting the worker's helper files)"
            )
        async with self._sdk(f"downloading {what}"):
            await self._download(remote_path, local_path)
        if local_path.stat().st_size > limit:
            local_path.unlink(missing_ok=True)
            raise SandboxError(f"{self.provider} sandbox {self.id}: {what} grew past {limit:,} bytes while sent")

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

    # -- which state the files are in (see Sandbox.hold_position) ----------------------------------------------

    tracks_position = True

    async def held_position(self) -> str | None:
        # In the sandbox, root-only: any worker may attach to this sandbox next, and must see the same answer.
        out = await self._run_root(f"cat {HELPER_DIR}/position 2>/dev/null; true", "reading the held checkpoint")
        return out.strip() or None

    async def hold_position(self, position: str) -> None:
        quoted = shlex.quote(position)
        await self._run_root(
            f"printf %s {quoted} > {HELPER_DIR}/position.new && mv -f {HELPER_DIR}/position.new {HELPER_DIR}/position",
            "recording the held checkpoint",
        )

    # -- files --------------------------------------------------------------------------------------------------

    async def make_dirs(self, path: str) -> None:
        target = sandbox_path(path)
        await self._user_shell(f"mkdir -p -- {shlex.quote(target)}", f"creating {target}")

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Hand the bytes over through a root-owned drop folder, then let uid 1000 write the file itself, so the
        sandbox's permissions apply (a symlink cannot make root write into a read-only mount)."""
        target = sandbox_path(path)
        drop = f"{IO_DIR}/{uuid.uuid4().hex}"
        await self._run_root(f"mkdir -p {IO_DIR} && chmod 711 {IO_DIR}", "preparing a file transfer")
        async with self._sdk(f"writing {target}"):
            await self._put_bytes(bytes(data), drop)
        try:
            await self._run_root(f"chmod 644 {drop}", "preparing a file transfer")
            quoted = shlex.quote(target)
            await self._user_shell(
                f'mkdir -p -- "$(dirname -- {quoted})" && cat {drop} > {quoted} && chmod {mode:o} -- {quoted}',
                f"writing {target}",
            )
        finally:
            await self._run_root(f"rm -f {drop}", "removing a transferred file")

    async def read_file(self, path: str, *, limit: int | None = None) -> bytes:
        """``cat`` as uid 1000 (so the sandbox's permissions apply) into a root-only file, fetched byte-exact (command
        output arrives as text on some SDKs). E2B and Modal read through their own file APIs instead."""
        target = sandbox_path(path)
        head = f"head -c {limit}" if limit is not None else "cat"
        drop = f"{HELPER_DIR}/read-{uuid.uuid4().hex[:12]}"
        errors = bytearray()
        script = (
            f"{self._refuse_special(target)}; mkdir -p {HELPER_DIR} && chmod 700 {HELPER_DIR} &&"
            f" setpriv --reuid={SANDBOX_UID} --regid={SANDBOX_UID} --clear-groups -- {head} -- {shlex.quote(target)}"
            f" > {drop}"
        )
        async with self._sdk(f"reading {target}"):
            process = await self._spawn(script, env={}, cwd=WORKSPACE, root=True, on_output=errors.extend)
            code = await process.wait()
        try:
            if code != 0:
                message = errors.decode(errors="replace").strip()
                if "No such file" in message:
                    raise FileNotFoundError(target)
                if code == 3 and "refusing to read it" in message:
                    raise UnsafePath(message[-500:])
                raise SandboxError(f"reading {target} failed: {message[-500:]}")
            async with self._sdk(f"reading {target}"):
                return await self._get_bytes(drop)
        finally:
            await self._run_root(f"rm -f {drop}", "removing a helper file")

    async def _get_bytes(self, remote_path: str) -> bytes:
        """The bytes of ``remote_path``, read as root; SDKs that return bytes directly override this."""
        local = self.state / f"read-{uuid.uuid4().hex[:12]}"
        try:
            await self._download(remote_path, local)
            return await asyncio.to_thread(local.read_bytes)
        finally:
            local.unlink(missing_ok=True)

    async def _put_bytes(self, data: bytes, remote_path: str) -> None:
        """Write ``data`` to ``remote_path`` as root; SDKs that take bytes directly override this."""
        local = self.state / f"put-{uuid.uuid4().hex[:12]}"
        local.write_bytes(data)
        try:
            await self._upload(local, remote_path)
        finally:
            local.unlink(missing_ok=True)

    @staticmethod
    def _refuse_special(target: str) -> str:
        """Shell text that fails (exit 3, a clear message) unless ``target`` is a regular file or missing: reading a
        FIFO the sandbox made would hang the tool call, a device would never end."""
        f = shlex.quote(target)  # the only way the path enters shell text
        return (
            f"if [ -p {f} ] || [ -S {f} ] || [ -c {f} ] || [ -b {f} ]; then printf '%s is a FIFO, socket or device,"
            f" not a regular file; refusing to read it\\n' {f} >&2; exit 3; fi"
        )

    async def _user_shell(self, command: str, doing: str) -> None:
        out = bytearray()
        async with self._sdk(doing):
            process = await self._spawn(command, env=BASE_ENV, cwd=WORKSPACE, root=False, on_output=out.extend)
            code = await process.wait()
        if code != 0:
            raise SandboxError(f"{doing} failed: {out.decode(errors='replace').strip()[-500:]}")

    # -- mirror sync --------------------------------------------------------------------------------------------

    block_deltas = True  # move only the differing blocks of large changed files (False: whole files, as a baseline)

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
            f"{prune} -printf {shlex.quote(FIND_FORMAT)} >> {listing}; fi;"
            for s in starts
        )
        await self._run_root(
            f"mkdir -p {shlex.quote(remote_root)} && cd {shlex.quote(remote_root)} && : > {listing} && {finds} true",
            f"listing {remote_root}",
        )
        try:
            await self._bounded_download(listing, into, MAX_LISTING_BYTES, f"the listing of {remote_root}")
        finally:
            await self._run_root(f"rm -f {listing}", "removing a helper file")
        return await asyncio.to_thread(mirror.read_listing, into, selection)

    async def _pull(self, local_root: Path, remote_root: str, selection: Selection, index: SyncIndex) -> SyncStats:
        """Make ``local_root`` equal the sandbox's selected paths below ``remote_root``; transfer only what changed."""
        started = time.monotonic()
        stats = SyncStats()
        scratch = Path(tempfile.mkdtemp(dir=self.state, prefix="pull-"))
        try:
            remote = await self._list(remote_root, selection, scratch / "listing")
            stats.listed = len(remote)
            fetch = await asyncio.to_thread(mirror.apply_listing, local_root, remote, selection, index, stats)
            if fetch:  # large files the mirror has an older copy of: only the blocks that differ
                fetch = await self._fetch_deltas(local_root, remote_root, fetch, remote, scratch, stats)
            if fetch:
                whole, size = await self._fetch(local_root, remote_root, fetch, remote, scratch)
                stats.transferred += whole
                stats.bytes += size
            new_index = await asyncio.to_thread(mirror.settle, local_root, remote)
            index.save(new_index)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        stats.seconds = round(time.monotonic() - started, 3)
        return stats

    async def _fetch(
        self, local_root: Path, remote_root: str, paths: list[str], remote: dict[str, RemoteEntry], scratch: Path
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
            limit = mirror.tar_limit(paths, remote)
            await self._bounded_download(remote_tar, local_tar, limit, "the archive of changed files")
        finally:
            await self._run_root(f"rm -f {remote_list} {remote_tar}", "removing helper files")
        return await asyncio.to_thread(mirror.unpack, local_root, local_tar, paths, remote)

    async def _delta_script(self, body: str, arguments: list[str], remote_root: str, scratch: Path, doing: str) -> str:
        """Run a block-delta script (sandboxes/block_delta.py) as root in ``remote_root``; its output goes to a
        root-only file whose path is returned (the caller downloads it, bounded, and removes it)."""
        token = uuid.uuid4().hex[:8]
        local = scratch / f"delta-{token}.sh"
        local.write_bytes(block_delta.script(body, arguments))
        remote_script, remote_out = f"{HELPER_DIR}/delta-{token}.sh", f"{HELPER_DIR}/delta-{token}.out"
        async with self._sdk(f"sending the script for {doing}"):
            await self._upload(local, remote_script)
        try:
            await self._run_root(
                f"cd {shlex.quote(remote_root)} && sh {remote_script} > {remote_out}; code=$?; rm -f {remote_script};"
                " exit $code",
                doing,
            )
        except SandboxError:
            await self._run_root(f"rm -f {remote_out}", "removing helper files")
            raise
        return remote_out

    async def _fetch_deltas(
        self,
        local_root: Path,
        remote_root: str,
        paths: list[str],
        remote: dict[str, RemoteEntry],
        scratch: Path,
        stats: SyncStats,
    ) -> list[str]:
        """Bring changed large files the mirror holds an older copy of as the blocks that differ, patching a new
        copy beside the old one; return the paths still to fetch whole (every one of them if anything about the
        sandbox's answer is off)."""
        if not self.block_deltas:
            return paths
        listed = [p for p in paths if remote[p].nlink == 1 and block_delta.worth_it(remote[p].size)]
        candidates = (await asyncio.to_thread(block_delta.regular_candidates, local_root, listed))[
            : block_delta.MAX_FILES
        ]
        if not candidates:
            return paths
        patched: set[str] = set()
        outputs: list[str] = []
        # The mirror's copies are hashed while the sandbox hashes its files.
        ours = asyncio.ensure_future(asyncio.to_thread(block_delta.all_local_blocks, local_root, candidates))
        try:
            sizes = [remote[p].size for p in candidates]
            outputs.append(
                await self._delta_script(
                    block_delta.HASH_SCRIPT, ["./" + p for p in candidates], remote_root, scratch, "hashing blocks"
                )
            )
            await self._bounded_download(
                outputs[-1], scratch / "blocks", block_delta.manifest_limit(sizes), "the block list"
            )
            claimed = block_delta.parse_manifest((scratch / "blocks").read_bytes(), sizes)
            plan: list[tuple[str, list[str], list[int], list[str]]] = []  # path, claimed, blocks to fetch, ours
            for rel, hashes, have in zip(candidates, claimed, await ours, strict=True):
                if hashes is None or have is None:
                    continue
                wanted = block_delta.differing(hashes, have.hashes)
                if len(wanted) <= block_delta.MAX_SHARE * len(hashes):
                    plan.append((rel, hashes, wanted, have.hashes))
            offsets: list[dict[int, int]] = []
            total = 0
            for rel, _, wanted, _ in plan:
                placed = {}
                for i in wanted:
                    placed[i] = total
                    total += block_delta.block_length(remote[rel].size, i)
                offsets.append(placed)
            blob = scratch / "blocks.bin"
            blob.write_bytes(b"")
            if total:
                arguments = [
                    a for rel, _, wanted, _ in plan if wanted for a in ("./" + rel, " ".join(map(str, wanted)))
                ]
                outputs.append(
                    await self._delta_script(
                        block_delta.EXTRACT_SCRIPT, arguments, remote_root, scratch, "extracting changed blocks"
                    )
                )
                await self._bounded_download(outputs[-1], blob, total, "the changed blocks")
            for (rel, hashes, _, have_hashes), placed in zip(plan, offsets, strict=True):
                if await asyncio.to_thread(
                    block_delta.patch, local_root, rel, remote[rel].size, hashes, placed, blob, have_hashes
                ):
                    patched.add(rel)
            stats.patched = len(patched)
            stats.transferred += len(patched)
            stats.bytes += total
        except (SandboxError, block_delta.ManifestInvalid) as e:
            log.warning("%s sandbox %s: block deltas failed, fetching whole files: %s", self.provider, self.id, e)
        finally:
            with contextlib.suppress(Exception):
                await ours  # a thread cannot be cancelled: let it end before the scratch folder goes
            if outputs:
                await self._run_root("rm -f " + " ".join(outputs), "removing helper files")
        return [p for p in paths if p not in patched]

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
            plan = await asyncio.to_thread(
                mirror.plan_push, local_root, remote, selection, index, with_root=root_mode is not None
            )
            stats.listed = len(plan.local)
            if plan.delete:
                names = scratch / "delete.list"
                names.write_bytes(b"".join(os.fsencode("./" + p) + b"\0" for p in plan.delete))
                remote_list = f"{HELPER_DIR}/delete-{uuid.uuid4().hex[:8]}.list"
                async with self._sdk("sending the list of files to delete"):
                    await self._upload(names, remote_list)
                await self._run_root(
                    f"cd {shlex.quote(remote_root)} && xargs -0 -r rm -rf -- < {remote_list}; rm -f {remote_list}",
                    "deleting files",
                )
                stats.deleted = len(plan.delete)
            if plan.send:  # large files the sandbox holds another version of: only the blocks that differ
                plan.send = await self._push_deltas(local_root, remote_root, plan, remote, owner, scratch, stats)
            if plan.send:
                archive_path = scratch / "push.tar"
                whole, size = await asyncio.to_thread(
                    mirror.build_tar, local_root, plan.send, archive_path, owner, root_mode
                )
                stats.transferred += whole
                stats.bytes += size
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
            index.save(mirror.pushed_index(plan.local, after))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        stats.seconds = round(time.monotonic() - started, 3)
        return stats

    async def _push_deltas(
        self,
        local_root: Path,
        remote_root: str,
        plan: mirror.PushPlan,
        remote: dict[str, RemoteEntry],
        owner: int,
        scratch: Path,
        stats: SyncStats,
    ) -> list[str]:
        """Send large files the sandbox holds another version of (a rollback's or a rehydration's usual case) as the
        blocks that differ; the sandbox builds each new file beside the old one and renames it over only if its
        hash is the worker's. Returns what is still to send whole."""
        if not self.block_deltas:
            return plan.send
        listed = []
        for rel in plan.send:
            if not rel:  # the root itself (a mount's), never a file
                continue
            st, have = plan.local[rel], remote.get(rel)
            if (
                stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and block_delta.worth_it(st.st_size)
                and have is not None and have.kind == "f" and have.nlink == 1 and block_delta.worth_it(have.size)
            ):  # fmt: skip
                listed.append(rel)
        candidates = listed[: block_delta.MAX_FILES]
        if not candidates:
            return plan.send
        patched: set[str] = set()
        outputs: list[str] = []
        remote_blob = f"{HELPER_DIR}/delta-{uuid.uuid4().hex[:8]}.blob"
        ours_all = asyncio.ensure_future(asyncio.to_thread(block_delta.all_local_blocks, local_root, candidates))
        try:
            sizes = [remote[p].size for p in candidates]
            outputs.append(
                await self._delta_script(
                    block_delta.HASH_SCRIPT, ["./" + p for p in candidates], remote_root, scratch, "hashing blocks"
                )
            )
            await self._bounded_download(
                outputs[-1], scratch / "blocks", block_delta.manifest_limit(sizes), "the block list"
            )
            claimed = block_delta.parse_manifest((scratch / "blocks").read_bytes(), sizes)
            blob = scratch / "blocks.bin"
            blob.write_bytes(b"")
            arguments: list[str] = [remote_blob]
            chosen: list[str] = []
            total = 0
            for rel, theirs, ours in zip(candidates, claimed, await ours_all, strict=True):
                if theirs is None or ours is None:
                    continue
                wanted = block_delta.differing(ours.hashes, theirs)
                if len(wanted) > block_delta.MAX_SHARE * len(ours.hashes):
                    continue
                offset = total
                total += await asyncio.to_thread(block_delta.append_blocks, local_root, rel, ours.size, wanted, blob)
                st = plan.local[rel]
                seconds, nanos = divmod(st.st_mtime_ns, 1_000_000_000)
                arguments += [
                    str(len(chosen)), "./" + rel, str(ours.size), str(offset), " ".join(map(str, wanted)),
                    ours.sha256, str(owner), f"{stat.S_IMODE(st.st_mode):o}", f"{seconds}.{nanos:09d}",
                ]  # fmt: skip
                chosen.append(rel)
            if chosen:
                async with self._sdk("uploading changed blocks"):
                    await self._upload(blob, remote_blob)
                stats.bytes += total
                outputs.append(
                    await self._delta_script(
                        block_delta.PATCH_SCRIPT, arguments, remote_root, scratch, "patching changed blocks in"
                    )
                )
                await self._bounded_download(outputs[-1], scratch / "patched", 16 * len(chosen), "the patch report")
                done = block_delta.patched_indexes((scratch / "patched").read_bytes(), len(chosen))
                patched = {chosen[i] for i in done}
                stats.patched = len(patched)
                stats.transferred += len(patched)
        except (SandboxError, block_delta.ManifestInvalid) as e:
            log.warning("%s sandbox %s: block deltas failed, sending whole files: %s", self.provider, self.id, e)
        finally:
            with contextlib.suppress(Exception):
                await ours_all
            await self._run_root(f"rm -f {remote_blob} " + " ".join(outputs), "removing helper files")
        return [p for p in plan.send if p not in patched]

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
        self._mirror_index().save(await asyncio.to_thread(mirror.adopted_index, self.mirror, selection, remote))

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


# -- the provider -----------------------------------------------------------------------------------------------


def as_sandbox_user(command: str, *, root: bool) -> str:
    """Shell text that runs ``command`` as uid 1000 (``setpriv``, in every Debian image) unless ``root``: providers
    whose SDK runs everything as root drop to the sandbox user this way."""
    if root:
        return command
    return (
        f"exec setpriv --reuid={SANDBOX_UID} --regid={SANDBOX_UID} --clear-groups -- /bin/sh -c {shlex.quote(command)}"
    )


class RemoteProvider(SandboxProvider):
    """Shared plumbing of SDK-backed providers: not host-bound (any worker attaches by id), a folder on this
    worker for mirrors and logs, and the portable layout prepared on every new sandbox."""

    host_bound = False

    def __init__(self, state_root: Path) -> None:
        self.state_root = Path(state_root)
        self.state_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_root, 0o700)  # mirrors and raw command logs: other host users must not reach into them

    async def _prepared(self, make: Callable[[], Awaitable[RemoteSandbox]]) -> RemoteSandbox:
        sandbox = await make()
        try:
            await sandbox._prepare()
        except BaseException:
            with contextlib.suppress(Exception):
                await sandbox.destroy()
            raise
        return sandbox

    async def forget(self, sandbox_id: str) -> None:
        """A lost sandbox's mirror and logs would otherwise stay on this worker until it stops."""
        if sandbox_id in ("", ".", "..") or "/" in sandbox_id:
            return  # ids come from the SDK, but never let one name a folder outside ours
        await asyncio.to_thread(shutil.rmtree, self.state_root / sandbox_id, True)

    async def close(self) -> None:
        """Sandboxes outlive this worker (another attaches by id); only the local mirrors go."""
        await asyncio.to_thread(shutil.rmtree, self.state_root, True)
