"""The provisioning recipe (sandboxes/provisioning.py) on its own, without Temporal: real bubblewrap sandboxes, a
real local snapshot store. The activity around it is covered by the pipeline tests; these pin the recipe's own
promises: a failure leaves no sandbox and no held slot behind, secrets never reach its message, and a rehydrated
sandbox holds the restored files and says which snapshot they equal."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tardigrade.activities.capacity import WorkerCapacity
from tardigrade.activities.secrets import Redactor
from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.manifest import Manifest
from tardigrade.sandboxes.policy import AppliedPolicy, resolve_policy
from tardigrade.sandboxes.provider import Sandbox, SandboxSpec
from tardigrade.sandboxes.provisioning import ProvisionRequest, RestorePoint, SetupFailed, provision
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store

SECRET = "hunter2-provisioning-secret"


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[LocalSandboxProvider]:
    p = LocalSandboxProvider(tmp_path / "sandboxes")
    assert p.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    yield p
    await p.close()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[SnapshotEngine]:
    e = SnapshotEngine(open_store((tmp_path / "store").as_uri()), scratch_dir=tmp_path / "scratch")
    yield e
    e.close()


def request_for(manifest: Manifest, restore: RestorePoint | None = None) -> ProvisionRequest:
    async def secret_env(sandbox: Sandbox) -> dict[str, str]:
        return {"TOKEN": SECRET}

    return ProvisionRequest(
        manifest=manifest,
        spec=SandboxSpec(),
        setup_timeout=30,
        seed_snapshot=None,
        restore=restore,
        mask=Redactor([SECRET]),
        secret_env=secret_env,
        output_tail_bytes=2048,
        ready_position=lambda sandbox_id: f"snapshot:{restore.snapshot_id}" if restore else f"setup:{sandbox_id}",
    )


def sandbox_dirs(provider: LocalSandboxProvider) -> list[str]:
    return sorted(p.name for p in provider.root.iterdir() if not p.name.startswith("."))


async def test_a_failed_setup_destroys_the_half_made_sandbox_frees_its_slot_and_hides_secrets(
    provider: LocalSandboxProvider, engine: SnapshotEngine, tmp_path: Path
) -> None:
    policy = AppliedPolicy.for_worker(resolve_policy(None), state_dirs=[tmp_path], own_stores=[])
    capacity = WorkerCapacity(max_live_sandboxes=1)  # a slot leaked by the failure would block the next provision
    phase: dict[str, object] = {}
    failing = Manifest(setup=["echo made > /workspace/half", "echo token=$TOKEN; exit 3"])
    with pytest.raises(SetupFailed) as failed:
        await provision(provider, request_for(failing), engine, policy=policy, capacity=capacity, phase=phase)
    message = str(failed.value)
    assert message.startswith("setup command 2 ('echo token=$TOKEN; exit 3') exited with code 3."), message
    assert "token=" in message and SECRET not in message
    assert phase["phase"] == "setup command 2/2"
    assert sandbox_dirs(provider) == [], "the half-made sandbox is destroyed"

    ok = Manifest(setup=["echo ready > /workspace/ready"])
    sandbox = await asyncio.wait_for(
        provision(provider, request_for(ok), engine, policy=policy, capacity=capacity, phase=phase), 60
    )
    assert isinstance(sandbox, LocalSandbox)
    assert (sandbox.fs / "workspace" / "ready").read_text() == "ready\n"
    assert await sandbox.held_position() == f"setup:{sandbox.id}"
    await sandbox.destroy()


async def test_a_rehydrated_sandbox_holds_the_restored_files_and_names_their_snapshot(
    provider: LocalSandboxProvider, engine: SnapshotEngine, tmp_path: Path
) -> None:
    policy = AppliedPolicy.for_worker(resolve_policy(None), state_dirs=[tmp_path], own_stores=[])
    capacity = WorkerCapacity()
    manifest = Manifest(setup=["echo setup >> /workspace/setup-log"])
    first = await provision(provider, request_for(manifest), engine, policy=policy, capacity=capacity, phase={})
    assert (await first.exec("echo step1 > /workspace/result", env={}, timeout=30)).exit_code == 0
    info = await first.snapshot(engine, selection=manifest.snapshot.selection(), parent=None, labels={})
    await first.destroy()

    phase: dict[str, object] = {}
    restore = RestorePoint(info.id, step=0)
    second = await provision(
        provider, request_for(manifest, restore), engine, policy=policy, capacity=capacity, phase=phase
    )
    assert isinstance(second, LocalSandbox)
    workspace = second.fs / "workspace"
    assert (workspace / "result").read_text() == "step1\n"
    assert (workspace / "setup-log").read_text() == "setup\n", "the snapshot's files win over a re-run setup"
    assert phase["phase"] == "restoring the snapshot of step 1"
    assert await second.held_position() == f"snapshot:{info.id}"
    await second.destroy()


def test_the_recipe_never_imports_temporal() -> None:
    code = "import sys, tardigrade.sandboxes.provisioning; print('temporalio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
