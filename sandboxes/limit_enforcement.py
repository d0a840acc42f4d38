"""How the local (bubblewrap) provider enforces a sandbox's `Limits` (sandboxes/limits.py), per command
(`CommandCgroup`, `rlimit_prefix`, `watch`):

* With a writable cgroup (cgroup v2 with a delegated subtree, found from ``/proc/self/cgroup`` or named by
  ``TARDIGRADE_CGROUP``; or cgroup v1 hierarchies the worker may write, as root in a container): each command runs
  in a cgroup of its own with ``pids.max``, ``memory.max`` and ``cpu.max``. The kernel holds the line; the watcher
  reads the cgroup's event counters and stops the command at the first refused fork or out-of-memory kill. (The
  development machines have cgroup v1 only: the v1 path is tested there, the v2 path is written to the kernel's
  documented interface but untested.)
* Otherwise rlimits, set inside the sandbox's user namespace (``prlimit`` runs as the first process there, after
  bubblewrap, so nothing it sets can be raised again): ``RLIMIT_NPROC`` (counted per user namespace on this
  kernel, so only the sandbox's own processes count, not the worker's) and ``RLIMIT_DATA`` per process. A worker
  running as root gets no ``RLIMIT_NPROC`` from the kernel (its sandbox uid maps to root, which the check skips),
  so the watcher also counts the tasks in the sandbox's pid namespace and their memory, and kills the step past
  either limit. ``cpu`` cannot be enforced without a cgroup; the sandbox then runs at a lower priority (nice) so
  the worker's heartbeats always get the processor.
* Always: ``/tmp`` is a tmpfs of ``--size tmp``; ``RLIMIT_FSIZE`` stops any single file larger than ``disk``; the
  watcher measures ``/workspace`` and ``~`` while the command runs and kills it past ``disk``; and a checkpoint of a
  sandbox over ``disk`` is refused.

No Temporal here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tardigrade.sandboxes.limits import LimitBreach, Limits, breach, format_size

log = logging.getLogger(__name__)


# -- enforcement: rlimits ---------------------------------------------------------------------------------------

PRLIMIT = "/usr/bin/prlimit"
NICE = "/usr/bin/nice"
#: bubblewrap's own processes inside the sandbox's count: the outer bwrap and the pid namespace's init.
BWRAP_PROCESSES = 2


def rlimit_prefix(limits: Limits, *, cgroup: bool) -> list[str]:
    """The argv that starts the sandbox's command under its rlimits: soft and hard limits alike, set inside the
    user namespace, where nothing (no CAP_SYS_RESOURCE in the initial namespace) can raise them again."""
    if not os.path.exists(PRLIMIT):
        raise FileNotFoundError(f"{PRLIMIT} (util-linux) is missing: it sets the sandbox's resource limits")
    assert limits.disk is not None and limits.pids is not None and limits.memory is not None
    argv = [PRLIMIT, f"--fsize={limits.disk}"]
    if not cgroup:
        argv += [f"--nproc={limits.pids}", f"--data={limits.memory}"]
        if os.path.exists(NICE):
            argv = [NICE, "-n", "10", *argv]  # no cpu cap without a cgroup: at least yield to the worker
    return [*argv, "--"]


# -- enforcement: cgroups ---------------------------------------------------------------------------------------

CGROUP_ENV = "TARDIGRADE_CGROUP"
_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CgroupBase:
    """Where a worker may create cgroups: one v2 folder (with pids, memory, cpu delegated), or v1 hierarchies."""

    version: int
    pids: Path
    memory: Path
    cpu: Path | None


def find_cgroup_base(root: Path = _ROOT) -> CgroupBase | None:
    """The cgroup subtree this worker may create sandbox cgroups in, or None (then rlimits apply).

    v2: ``$TARDIGRADE_CGROUP``, else the parent of the worker's own cgroup, when it is writable and delegates pids
    and memory (systemd's ``Delegate=yes`` with ``DelegateSubgroup=``; a cgroup with processes of its own cannot
    enable controllers for children, hence the parent). v1: the worker's own pids and memory cgroups, if writable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    own = dict(line.split(":", 2)[1:] for line in lines if line.count(":") >= 2)
    named = os.environ.get(CGROUP_ENV)
    if named or "" in own:
        candidates = [Path(named)] if named else []
        if own.get("", "/") != "/" and (root / "cgroup.controllers").exists():
            candidates.append((root / own[""].lstrip("/")).parent)
        for base in candidates:
            if _v2_usable(base):
                cpu = base if "cpu" in _words(base / "cgroup.subtree_control") else None
                return CgroupBase(2, base, base, cpu)
        if named:
            log.warning("%s=%s is not a writable cgroup v2 folder delegating pids and memory", CGROUP_ENV, named)
    v1 = {}
    for controller in ("pids", "memory", "cpu"):
        path = next((own[k] for k in own if controller in k.split(",")), None)
        folder = root / controller / path.lstrip("/") if path is not None else None
        v1[controller] = folder if folder is not None and os.access(folder, os.W_OK) else None
    if v1["pids"] is not None and v1["memory"] is not None:
        return CgroupBase(1, v1["pids"], v1["memory"], v1["cpu"])
    return None


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _v2_usable(base: Path) -> bool:
    return {"pids", "memory"} <= _words(base / "cgroup.subtree_control") and os.access(base, os.W_OK)


def _kernel_waits(total: float) -> Iterator[float]:
    """Pauses between looks at something the kernel finishes on its own, about ``total`` seconds in all: 1 ms,
    doubling up to 20 ms. After bubblewrap exits, its pid-namespace init is still tearing the namespaces down for a
    few ms; a fixed 20 ms pause made every command pay all of it (bench/step_overhead.py)."""
    delay, waited = 0.001, 0.0
    while waited < total:
        yield delay
        waited += delay
        delay = min(delay * 2, 0.02)


class CommandCgroup:
    """The cgroup(s) of one command: created with the limits, joined by the command's first process (bubblewrap)
    before it forks, read for breaches, killed and removed at the end."""

    def __init__(self, base: CgroupBase, name: str, limits: Limits) -> None:
        self.base = base
        self.limits = limits
        self.folders = list(dict.fromkeys(p / name for p in (base.pids, base.memory, base.cpu) if p is not None))
        self.pids = base.pids / name
        self.memory = base.memory / name
        self.cpu = base.cpu / name if base.cpu is not None and limits.cpu is not None else None

    def create(self) -> None:
        assert self.limits.pids is not None and self.limits.memory is not None
        for folder in self.folders:
            folder.mkdir()
        pids = str(self.limits.pids + BWRAP_PROCESSES)
        memory = str(self.limits.memory)
        if self.base.version == 2:
            (self.pids / "pids.max").write_text(pids)
            (self.memory / "memory.max").write_text(memory)
            with contextlib.suppress(OSError):  # no swap to spill into, where swap is delegated
                (self.memory / "memory.swap.max").write_text("0")
            if self.cpu is not None:
                (self.cpu / "cpu.max").write_text(f"{round(self.limits.cpu * 100_000)} 100000")  # type: ignore[operator]
        else:
            (self.pids / "pids.max").write_text(pids)
            (self.memory / "memory.limit_in_bytes").write_text(memory)
            with contextlib.suppress(OSError):
                (self.memory / "memory.memsw.limit_in_bytes").write_text(memory)
            if self.cpu is not None:
                (self.cpu / "cpu.cfs_period_us").write_text("100000")
                (self.cpu / "cpu.cfs_quota_us").write_text(str(round(self.limits.cpu * 100_000)))  # type: ignore[operator]

    def join_prefix(self) -> list[str]:
        """An argv prefix that moves its own process into the cgroups, then execs the rest: bubblewrap starts
        inside them, so every process of the sandbox is counted from its first fork."""
        procs = [str(folder / "cgroup.procs") for folder in self.folders]
        script = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", str(len(procs)), *procs]

    def breach(self) -> LimitBreach | None:
        if _counter(self.pids / "pids.events", "max") > 0:
            return breach("pids", self.limits.pids, "a fork was refused")
        events = self.memory / ("memory.events" if self.base.version == 2 else "memory.oom_control")
        if _counter(events, "oom_kill") > 0:
            return breach("memory", self.limits.memory, "a process was killed for using too much memory")
        return None

    def kill(self) -> None:
        """Kill whatever is still in the cgroup (orphans that left bubblewrap's process group included)."""
        if self.base.version == 2:
            with contextlib.suppress(OSError):
                (self.pids / "cgroup.kill").write_text("1")
                return
        for delay in _kernel_waits(1.0):
            pids = _words(self.pids / "cgroup.procs")
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(delay)

    def remove(self) -> None:
        self.kill()
        for folder in self.folders:
            for delay in _kernel_waits(2.0):  # the kernel frees a killed cgroup a moment after its last process exits
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(delay)
            else:
                log.warning("could not remove cgroup %s", folder)


CGROUP_PREFIX = "tardigrade-"


def sweep_cgroups(base: CgroupBase, *, older_than: float = 60.0) -> int:
    """Remove empty command cgroups left by a worker that was killed before it could (its sandboxes died with it).
    Only ones older than a minute: a live worker's new cgroup is empty for the moment before its command joins."""
    removed = 0
    for parent in {base.pids, base.memory, *([base.cpu] if base.cpu else [])}:
        with contextlib.suppress(OSError):
            for entry in os.scandir(parent):
                if not entry.name.startswith(CGROUP_PREFIX) or not entry.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat().st_mtime > older_than and not _words(
                        Path(entry.path, "cgroup.procs")
                    ):
                        os.rmdir(entry.path)
                        removed += 1
    return removed


def _counter(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


# -- enforcement: the watcher ------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def pid_namespace_of_child(parent: int) -> str | None:
    """The pid namespace of ``parent``'s first child in a pid namespace of its own (bubblewrap's init), or None
    while it has none yet. A child in ``parent``'s own namespace is a helper that runs first (the overlay's mount,
    sandboxes/overlay.py), never the sandbox: counting that namespace would count the worker's host."""
    with contextlib.suppress(OSError):
        own = os.readlink(f"/proc/{parent}/ns/pid")
        for task in os.listdir(f"/proc/{parent}/task"):
            for child in Path(f"/proc/{parent}/task/{task}/children").read_text().split():
                with contextlib.suppress(OSError):
                    namespace = os.readlink(f"/proc/{child}/ns/pid")
                    if namespace != own:
                        return namespace
    return None


def namespace_usage(namespace: str) -> tuple[int, int]:
    """Tasks (processes and threads) and resident bytes of every process in a pid namespace."""
    tasks = rss = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/ns/pid") != namespace:
                continue
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        tasks += int(fields[17])  # num_threads (field 20; fields[0] is field 3, the state)
        rss += int(fields[21]) * _PAGE  # rss in pages (field 24)
    return tasks, rss


def disk_usage(*roots: Path) -> int:
    """Bytes of every regular file under the roots (apparent sizes, so a sparse file counts as what a snapshot
    would store; hard links once), not following symlinks."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [str(r) for r in roots]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    if st.st_nlink > 1:
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
            except OSError:
                continue
    return total


_OUT_OF_MEMORY = re.compile(rb"MemoryError|Cannot allocate memory|std::bad_alloc|out of memory", re.IGNORECASE)
_NO_SPACE = b"No space left on device"


def breach_from_exit(limits: Limits, exit_code: int, output_tail: bytes, *, rlimits: bool) -> LimitBreach | None:
    """What a failed command's end says about its limits, where no counter does: a file-size signal, a full /tmp,
    or (``rlimits``: where an allocation fails rather than a process being killed) an out-of-memory message."""
    if exit_code == 128 + signal.SIGXFSZ or exit_code == -signal.SIGXFSZ:
        return breach("disk", limits.disk, "a file grew past the disk limit")
    if exit_code == 0:
        return None
    if _NO_SPACE in output_tail:
        return breach("tmp", limits.tmp, "a write failed with 'No space left on device' (/tmp is full)")
    if rlimits and _OUT_OF_MEMORY.search(output_tail):
        return breach("memory", limits.memory, "an allocation failed")
    return None


#: How often the watcher looks at a running command's processes and cgroup counters.
WATCH_INTERVAL = 0.2


async def watch(
    pid: int, limits: Limits, *, cgroup: CommandCgroup | None, disk_roots: list[Path], count_tasks: bool
) -> LimitBreach:
    """Watch a running command (``pid`` is bubblewrap's) until it breaches a limit, and return that breach; the
    caller kills the command then, and cancels the watch when the command ends first. Counters of the cgroup
    where there is one; else the tasks and resident memory of the sandbox's pid namespace (``count_tasks``). The
    disk is measured in a thread, less often the longer a walk takes, so a big workspace costs little."""
    assert limits.pids is not None and limits.memory is not None and limits.disk is not None
    namespace: str | None = None
    next_disk = 0.0
    while True:
        if cgroup is not None and (found := await asyncio.to_thread(cgroup.breach)):
            return found
        if count_tasks:
            namespace = namespace or await asyncio.to_thread(pid_namespace_of_child, pid)
            if namespace is not None:
                tasks, rss = await asyncio.to_thread(namespace_usage, namespace)
                if tasks >= limits.pids:
                    return breach("pids", limits.pids, f"{tasks} processes and threads were running")
                if rss > limits.memory:
                    return breach("memory", limits.memory, f"its processes held {format_size(rss)} of memory")
        if disk_roots and time.monotonic() >= next_disk:
            started = time.monotonic()
            used = await asyncio.to_thread(disk_usage, *disk_roots)
            if used > limits.disk:
                return breach("disk", limits.disk, f"/workspace and ~ held {format_size(used)}")
            next_disk = time.monotonic() + max(1.0, 5 * (time.monotonic() - started))
        await asyncio.sleep(WATCH_INTERVAL)
