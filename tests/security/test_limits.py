"""Resource limits per sandbox (issue 9, row 11): a fork bomb, a disk filler or a memory hog ends its own step
with an error naming the limit, never the worker or another run. Real bubblewrap, real cgroups where this worker
may create them (cgroup v1 as root on these machines), and the rlimit + watcher path with cgroups switched off."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

from tardigrade.activities.contract import SandboxPlan
from tardigrade.activities.sandbox import sandbox_spec
from tardigrade.client import start_pipeline
from tardigrade.pipeline import PipelineError, parse_pipeline
from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.limit_enforcement import PRLIMIT, find_cgroup_base, rlimit_prefix
from tardigrade.sandboxes.limits import DEFAULTS, LimitExceeded, Limits, parse_size
from tardigrade.sandboxes.policy import AppliedPolicy, PolicyViolation, load_policy, parse_policy
from tardigrade.sandboxes.provider import ExecResult, SandboxSpec
from tardigrade.workflows.state import RunStatus
from tests.conftest import InProcessWorkers, fast_timeouts, pipeline_from

# The classic :(){ :|:& };: in words dash accepts. Its shell then waits: if it exited at once, its pid namespace
# (and the whole bomb) could end before the bomb reached the limit, and the step would rightly succeed.
FORK_BOMB = "bomb() { bomb | bomb & }; bomb; sleep 20"
# A linear forker, for the path where nothing but the watcher holds the line (a root worker without cgroups): it
# stops by itself at 600 processes, so a broken watcher cannot take the machine down with it.
FORKER = "for i in $(seq 600); do sleep 60 & done; wait"
HOG = 'python3 -c \'x = bytearray(512 << 20); x[::4096] = b"x" * len(x[::4096]); print("survived")\''

HAVE_CGROUPS = find_cgroup_base() is not None


@pytest.fixture(params=["cgroup", "rlimit"])
async def provider(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LocalSandboxProvider]:
    if request.param == "cgroup" and not HAVE_CGROUPS:
        pytest.skip("this worker may not create cgroups (no delegated cgroup v2 subtree, no writable v1)")
    p = LocalSandboxProvider(tmp_path / "sandboxes", cgroups=request.param == "cgroup")
    assert p.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    yield p
    await p.close()


async def run(sandbox: LocalSandbox, command: str, timeout: float = 60) -> ExecResult:
    return await sandbox.exec(command, env={}, timeout=timeout)


def limited(**limits: object) -> SandboxSpec:
    return SandboxSpec(limits=Limits.model_validate(limits))


# -- the model --------------------------------------------------------------------------------------------------


def test_sizes_and_cores_parse_and_bad_values_name_the_field() -> None:
    assert parse_size("512MiB") == 512 << 20 and parse_size("2Gi") == 2 << 30 and parse_size("1.5G") == 3 << 29
    assert parse_size("100MB") == 100_000_000 and parse_size(1 << 30) == 1 << 30
    base = {"name": "p", "steps": [{"name": "s", "run": "true"}]}
    cases = {
        "memory": ("lots", "sandbox.limits.memory: 'lots' is not a size; use e.g. 512MiB, 2GiB"),
        "disk": (2, "sandbox.limits.disk: 2B is too small; use at least 1MiB"),
        "pids": (3, "sandbox.limits.pids: Input should be greater than or equal to 8"),
        "cpu": ("90s", "sandbox.limits.cpu: '90s' is not a number of cores"),
        "tmp": (True, "sandbox.limits.tmp: expected a size such as 512MiB"),
        "swap": ("1GiB", "sandbox.limits.swap: unknown key 'swap'"),
    }
    for field, (value, message) in cases.items():
        with pytest.raises(PipelineError) as e:
            parse_pipeline({**base, "sandbox": {"limits": {field: value}}})
        assert message in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_defaults_apply_when_limits_are_absent() -> None:
    pipeline = parse_pipeline({"name": "p", "steps": [{"name": "s", "run": "true"}]})
    spec = sandbox_spec(SandboxPlan.of(pipeline))
    assert spec.limits == Limits(**DEFAULTS)
    assert (spec.limits.memory, spec.limits.pids, spec.limits.tmp) == (4 << 30, 512, 1 << 30)


def test_policy_ceilings_refuse_more_and_lower_defaults() -> None:
    policy = AppliedPolicy(parse_policy({"max_limits": {"memory": "1GiB", "cpu": 2}}, "policy.yaml"))
    pipeline = parse_pipeline({"name": "p", "steps": [{"name": "s", "run": "true"}]})
    spec = sandbox_spec(SandboxPlan.of(pipeline), policy)
    assert spec.limits.memory == 1 << 30 and spec.limits.cpu == 2  # defaults come down to the ceilings
    limits = Limits(memory=8 << 30)
    greedy = pipeline.model_copy(update={"sandbox": pipeline.sandbox.model_copy(update={"limits": limits})})
    with pytest.raises(PolicyViolation) as e:
        sandbox_spec(SandboxPlan.of(greedy), policy)
    assert str(e.value).startswith("sandbox.limits.memory: asks for 8GiB") and "max_limits.memory: 1GiB" in str(e.value)
    with pytest.raises(PolicyViolation):
        policy.check_run(store="file:///nowhere", limits=greedy.sandbox.limits)


def test_modal_gets_the_limits_as_hard_limits_its_own_sdk_accepts() -> None:
    from modal._resources import convert_fn_config_to_resources_config

    from tardigrade.sandboxes.modal import modal_resources

    resources = convert_fn_config_to_resources_config(
        gpu=None, **modal_resources(Limits(memory=1 << 30, cpu=2), {"memory": 4096, "cpu": 0.5})
    )
    assert (resources.memory_mb, resources.memory_mb_max) == (1024, 1024)  # a request never above the limit
    assert (resources.milli_cpu, resources.milli_cpu_max) == (500, 2000)
    default = convert_fn_config_to_resources_config(gpu=None, **modal_resources(Limits(), {}))
    assert default.memory_mb_max == 4096 and default.milli_cpu_max == 0


def test_cgroup_detection_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """cgroup v2 needs a delegated subtree with pids and memory; where v2 has none (these machines mount cgroup v1,
    and v2's unified hierarchy holds neither controller), v1 is used if the worker may write it, else rlimits."""
    monkeypatch.delenv("TARDIGRADE_CGROUP", raising=False)
    base = find_cgroup_base()
    unified = next(p for p in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")) if (p / "cgroup.procs").exists())
    if "pids" not in (unified / "cgroup.controllers").read_text().split():
        assert base is None or base.version == 1
    if base is not None:
        assert os.access(base.pids, os.W_OK) and os.access(base.memory, os.W_OK)
    monkeypatch.setenv("TARDIGRADE_CGROUP", str(unified))  # not delegated: refused, never half-used
    named = find_cgroup_base()
    assert named is None or named.version == 1


# -- attacks ----------------------------------------------------------------------------------------------------


async def test_a_fork_bomb_ends_its_own_step_and_the_worker_and_another_sandbox_carry_on(
    provider: LocalSandboxProvider,
) -> None:
    bomb_box = await provider.create(limited(pids=64))
    other = await provider.create(SandboxSpec())
    gaps: list[float] = []

    async def ticker() -> None:  # the worker's event loop: heartbeats run here
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    started = time.monotonic()
    command = FORK_BOMB if provider.cgroups is not None else FORKER
    bombed = asyncio.create_task(run(bomb_box, command, timeout=120))
    await asyncio.sleep(0.5)
    meanwhile = await run(other, "echo still here")
    result = await bombed
    tick.cancel()

    assert meanwhile.exit_code == 0 and meanwhile.output_tail == b"still here\n"
    assert result.limit is not None and result.limit.limit == "pids", (result, result.output_tail[-300:])
    assert "raise sandbox.limits.pids" in result.limit.message and "(64)" in result.limit.message
    assert not result.timed_out  # its shell may even exit 0: a refused fork still fails the step (StepOutcome.ok)
    assert time.monotonic() - started < 30, "stopped by its limit, not by its timeout"
    assert max(gaps) < 1.0, f"the worker's event loop stalled for {max(gaps):.2f}s"
    # Nothing of the bomb is left, and the sandbox runs the next command normally.
    after = await run(bomb_box, "ps -e --no-headers | wc -l")
    assert after.exit_code == 0 and int(after.output_tail) <= 4, after.output_tail


async def test_filling_tmp_stops_at_its_size(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(limited(tmp="16MiB"))
    result = await run(sandbox, "df -k /tmp | tail -1; dd if=/dev/zero of=/tmp/fill bs=1M count=100")
    assert result.output_tail.split(b"\n")[0].split()[1] == b"16384", result.output_tail
    assert result.exit_code != 0 and b"No space left on device" in result.output_tail
    assert result.limit is not None and result.limit.limit == "tmp" and "sandbox.limits.tmp" in result.limit.message


async def test_a_big_file_in_the_workspace_is_stopped_at_the_disk_limit(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(limited(disk="32MiB"))
    result = await run(sandbox, "dd if=/dev/zero of=/workspace/big bs=1M count=200")
    assert result.limit is not None and result.limit.limit == "disk", (result, result.output_tail)
    assert (sandbox.fs / "workspace" / "big").stat().st_size <= 32 << 20


async def test_many_files_filling_the_workspace_are_stopped_with_a_disk_error(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(limited(disk="64MiB"))
    filler = "i=0; while [ $i -lt 400 ]; do head -c 4194304 /dev/zero > f$i; i=$((i+1)); sleep 0.02; done"
    started = time.monotonic()
    result = await run(sandbox, filler, timeout=120)
    assert result.limit is not None and result.limit.limit == "disk", (result, result.output_tail)
    assert "raise sandbox.limits.disk" in result.limit.message and result.exit_code != 0
    written = sum(f.stat().st_size for f in (sandbox.fs / "workspace").iterdir())
    assert 64 << 20 < written < 400 * (4 << 20), "killed soon after the limit, long before the filler's end"
    assert time.monotonic() - started < 60


async def test_a_checkpoint_over_the_disk_limit_is_refused(provider: LocalSandboxProvider, tmp_path: Path) -> None:
    from tardigrade.sandboxes.snapshots import Selection, SnapshotEngine
    from tardigrade.sandboxes.stores import open_store

    sandbox = await provider.create(limited(disk="8MiB"))
    for i in range(3):  # written by the worker's file tools (an agent), not by a watched command
        await sandbox.write_file(f"/workspace/part{i}", b"x" * (4 << 20))
    engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()), scratch_dir=tmp_path / "scratch")
    try:
        with pytest.raises(LimitExceeded, match=r"hold 12MiB, over its disk limit of 8MiB.*sandbox.limits.disk"):
            await sandbox.snapshot(engine, selection=Selection(), parent=None, labels={})
    finally:
        engine.close()


async def test_a_memory_hog_is_stopped_with_a_memory_error(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(limited(memory="128MiB"))
    result = await run(sandbox, HOG)
    assert b"survived" not in result.output_tail and result.exit_code != 0
    assert result.limit is not None and result.limit.limit == "memory", (result, result.output_tail)
    assert "raise sandbox.limits.memory" in result.limit.message and "128MiB" in result.limit.message


async def test_many_small_processes_together_over_the_memory_limit_are_stopped(provider: LocalSandboxProvider) -> None:
    """Each stays under a per-process rlimit; together they are over the sandbox's memory."""
    sandbox = await provider.create(limited(memory="192MiB"))
    one = "python3 -c 'import time; x = bytearray(64 << 20); x[::4096] = b\"x\" * len(x[::4096]); time.sleep(30)'"
    result = await run(sandbox, f"for i in 1 2 3 4 5 6; do {one} & done; wait; echo survived", timeout=90)
    assert b"survived" not in result.output_tail
    assert result.limit is not None and result.limit.limit == "memory", (result, result.output_tail)


async def test_a_normal_command_is_untouched_by_the_defaults(provider: LocalSandboxProvider) -> None:
    sandbox = await provider.create(SandboxSpec())
    many = "for i in $(seq 50); do sleep 0.2 & done; wait"
    result = await run(sandbox, f"{many}; head -c 50000000 /dev/zero > f; echo ok")
    assert (result.exit_code, result.limit, result.output_tail) == (0, None, b"ok\n")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to start the sandbox as another, unprivileged user")
def test_rlimit_nproc_counts_only_the_sandboxs_own_processes() -> None:
    """The fact the rlimit path relies on, checked on this kernel: set inside the sandbox's user namespace,
    RLIMIT_NPROC counts the sandbox's processes only, not every process of the worker's (unprivileged) uid."""
    import shutil
    import subprocess
    import tempfile

    forker = "import os, time\nn = 0\ntry:\n    while n < 200:\n        if os.fork() == 0:\n"
    forker += "            time.sleep(5); os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)\n"
    folder = Path(tempfile.mkdtemp(prefix="nproc-"))  # pytest's tmp_path is 0700: the other user cannot enter it
    os.chmod(folder, 0o755)
    (folder / "f.py").write_text(forker)
    bwrap = [
        "bwrap", "--unshare-user", "--unshare-pid", "--die-with-parent", "--uid", "1000", "--gid", "1000",
        "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "--ro-bind", str(folder), "/t",
    ]  # fmt: skip
    as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    # 40 other processes of the same uid outside the sandbox must not eat into its 50.
    others = subprocess.Popen([*as_nobody, "sh", "-c", "for i in $(seq 40); do sleep 30 & done; wait"])
    try:
        time.sleep(0.5)
        limits = Limits(pids=50).resolved()
        out = subprocess.run(
            [*as_nobody, *bwrap, *rlimit_prefix(limits, cgroup=False), "python3", "/t/f.py"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        forked = int(out.stdout.strip())
        assert 40 <= forked < 50, (forked, out.stderr)  # the sandbox's own 50, minus init, nice/prlimit chain
        assert PRLIMIT in rlimit_prefix(limits, cgroup=False)
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(others.pid)], check=False)
        others.kill()
        others.wait()
        shutil.rmtree(folder)


# -- end to end: a breach is a step failure, never a lost sandbox --------------------------------------------------


async def test_a_limit_breach_fails_the_step_without_rehydrating(workers: InProcessWorkers, tmp_path: Path) -> None:
    client = await workers.start()
    loaded = pipeline_from(
        {
            "name": "fork-bomb",
            "sandbox": {"limits": {"pids": 32}},
            "timeouts": fast_timeouts(),
            "steps": [
                {"name": "fine", "run": "echo ok > a"},
                {"name": "bomb", "run": FORK_BOMB if HAVE_CGROUPS else FORKER, "retries": 1, "retry_backoff": "0.1s"},
            ],
        },
        tmp_path,
    )
    handle = await start_pipeline(
        client, loaded, task_queue=workers.task_queue, store_url=(tmp_path / "store").as_uri()
    )
    with pytest.raises(WorkflowFailureError) as e:
        await asyncio.wait_for(handle.result(), 180)
    cause = e.value.cause
    message = str(cause)
    assert "step 2/2" in message and "hit the sandbox's pids limit (32)" in message, message
    assert "raise sandbox.limits.pids" in message and "after 2 attempt(s)" in message
    status = await handle.query("status", result_type=RunStatus)
    assert status.rehydrations == 0 and status.steps_completed == 1


async def test_a_pipeline_above_the_workers_ceiling_fails_before_any_step(
    workers: InProcessWorkers, tmp_path: Path, test_policy: Path
) -> None:
    policy = load_policy(test_policy).model_copy(update={"max_limits": Limits(pids=64)})
    with_policy = await workers.start(policy=policy)
    loaded = pipeline_from(
        {"name": "greedy", "sandbox": {"limits": {"pids": 4096}}, "steps": [{"name": "s", "run": "touch ran"}]},
        tmp_path,
    )
    store = (tmp_path / "store").as_uri()
    # A client holding the policy refuses before anything reaches history...
    with pytest.raises(PolicyViolation, match=r"sandbox.limits.pids: asks for 4096.*max_limits.pids: 64"):
        await start_pipeline(with_policy, loaded, task_queue=workers.task_queue, store_url=store)
    # ...and the worker's check is the authoritative one, for a client that holds no ceilings.
    plain = await workers.client()
    handle = await start_pipeline(plain, loaded, task_queue=workers.task_queue, store_url=store)
    with pytest.raises(WorkflowFailureError) as e:
        await asyncio.wait_for(handle.result(), 120)
    causes: list[str] = []
    error: BaseException | None = e.value.cause
    while error is not None:
        causes.append(f"{type(error).__name__}: {error}")
        error = error.__cause__
    message = " <- ".join(causes)
    assert "sandbox.limits.pids: asks for 4096" in message and "max_limits.pids: 64" in message, message
    status = await handle.query("status", result_type=RunStatus)
    assert status.steps_completed == 0 and status.sandbox is None
