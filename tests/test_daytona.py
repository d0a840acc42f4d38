"""The Daytona provider and the provider kit it is registered through.

Daytona runs here against an in-process fake of its SDK client (tests/fake_daytona.py) whose sandboxes are real
bubblewrap machines, and live when ``DAYTONA_API_KEY`` is set (skipped with the reason otherwise). Both run the
importable contract suite (tardigrade/testing.py). `test_the_fake_matches_the_installed_sdk` keeps the fake honest:
every SDK method the provider calls has the same parameters as in the installed ``daytona`` package. The kit's
tests install a third-party provider as a real distribution (a dist-info with an entry point) on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tardigrade.pipeline import PipelineError, parse_pipeline
from tardigrade.sandboxes import provider_kit
from tardigrade.sandboxes.daytona import DaytonaProvider, DaytonaSandbox, daytona_network_options
from tardigrade.sandboxes.errors import ProviderUnavailable
from tardigrade.sandboxes.network.rules import NetworkRule
from tardigrade.sandboxes.policy import WorkerPolicy
from tardigrade.sandboxes.provider import Sandbox, SandboxSpec
from tardigrade.sandboxes.provider_choice import build_provider
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tardigrade.testing import (
    Harness,
    ProviderContract,
    native_snapshot_round_trip,
    sh,
    signature_drift,
)
from tests.fake_daytona import FakeAsyncDaytona, fake_daytona
from tests.provider_fakes import fakes_unavailable

# -- the contract, against the fake and live ----------------------------------------------------------------------


class TestDaytonaFake(ProviderContract):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        reason = fakes_unavailable()
        if reason:
            pytest.skip(reason)
        cloud, client = fake_daytona(tmp_path / "cloud")
        provider = DaytonaProvider(tmp_path / "daytona", client=client)

        async def lose(sandbox: Sandbox) -> None:
            cloud.lose(sandbox.id)

        try:
            yield Harness("daytona-fake", provider, lose)
        finally:
            cloud.close()


class TestDaytonaLive(ProviderContract):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        if not os.environ.get("DAYTONA_API_KEY"):
            pytest.skip("live Daytona tests need DAYTONA_API_KEY (and DAYTONA_API_URL, DAYTONA_TARGET if not default)")
        provider = DaytonaProvider.from_env(tmp_path / "daytona")

        async def lose(sandbox: Sandbox) -> None:  # end it through another handle, as an eviction would
            handle = await provider.attach(sandbox.id)
            await handle._terminate()

        yield Harness("daytona-live", provider, lose, local_network=False)

    @pytest.fixture
    async def other_harness(self) -> AsyncIterator[Harness | None]:
        yield None  # a file:// store is on this worker; the fake covers crossing providers


# -- Daytona specifics, against the fake ----------------------------------------------------------------------------


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[tuple[Any, FakeAsyncDaytona, DaytonaProvider]]:
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    cloud, client = fake_daytona(tmp_path / "cloud")
    try:
        yield cloud, client, DaytonaProvider(tmp_path / "daytona", client=client)
    finally:
        cloud.close()


async def test_a_stopped_sandbox_resumes_on_attach_with_its_disk(
    fake: tuple[Any, FakeAsyncDaytona, DaytonaProvider],
) -> None:
    """Daytona's stop keeps the disk (an auto-stopped sandbox): attach starts it again, the fast resume."""
    _, client, provider = fake
    sandbox = await provider.create(SandboxSpec())
    await sandbox.write_file("kept.txt", b"still here")
    await sandbox.hold_position("snapshot:" + "b" * 64)
    handle = await client.get(sandbox.id)
    await handle.stop()
    assert not await sandbox.alive()
    again = await provider.attach(sandbox.id)
    assert await again.alive()
    assert await again.read_file("kept.txt") == b"still here"
    assert await again.held_position() == "snapshot:" + "b" * 64
    assert (await sh(again, "id -u"))[1] == "1000\n"
    await again.destroy()
    with pytest.raises(Exception, match="does not know it any more"):
        await provider.attach(sandbox.id)


async def test_network_is_blocked_by_default_and_allowlists_map_to_daytonas(
    fake: tuple[Any, FakeAsyncDaytona, DaytonaProvider],
) -> None:
    _, client, provider = fake
    sandbox = await provider.create(SandboxSpec())
    params = client.created_with[sandbox.id]
    assert params.network_block_all is True and params.os_user == "root"
    rule = NetworkRule.parse({"allow": ["pypi.org", "*.github.com", "10.1.2.3"]}, "network")
    assert daytona_network_options(rule) == {
        "network_block_all": False,
        "network_allow_list": "10.1.2.3/32",
        "domain_allow_list": "pypi.org,*.github.com",
    }
    assert daytona_network_options(NetworkRule.parse(True, "network")) == {"network_block_all": False}


async def test_secrets_in_the_environment_never_reach_a_command_line(
    fake: tuple[Any, FakeAsyncDaytona, DaytonaProvider],
) -> None:
    """Daytona sessions take no environment: it goes through a file the command sources and deletes."""
    _, _, provider = fake
    sandbox = await provider.create(SandboxSpec())
    assert isinstance(sandbox, DaytonaSandbox)
    secret = "s3cr3t-value-do-not-leak"
    seen: list[str] = []
    process = sandbox._sb.process
    original = process.execute_session_command

    async def spy(session_id: str, req: Any, timeout: int | None = None) -> Any:
        seen.append(req.command)
        return await original(session_id, req, timeout)

    process.execute_session_command = spy
    _, out = await sh(sandbox, "echo $TOKEN; ls /tmp | grep -c tardigrade-env || true", env={"TOKEN": secret})
    assert out.split() == [secret, "0"], "the variable arrives, and its file is gone"
    assert seen and not any(secret in command for command in seen)


async def test_native_snapshot_resume_and_its_fallback(
    fake: tuple[Any, FakeAsyncDaytona, DaytonaProvider], tmp_path: Path
) -> None:
    cloud, _, provider = fake
    engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))
    second, _ = await native_snapshot_round_trip(
        provider, engine, spec=SandboxSpec(), lose=cloud.lose, unusable=lambda _: "tardigrade-deleted-snapshot"
    )
    assert isinstance(second, DaytonaSandbox)


# -- the fake against the installed SDK -----------------------------------------------------------------------------


def test_the_fake_matches_the_installed_sdk() -> None:
    import daytona
    from daytona._async.filesystem import AsyncFileSystem
    from daytona._async.process import AsyncProcess

    from tests import fake_daytona as f

    pairs: list[tuple[str, Any, Any]] = [
        ("AsyncDaytona.create", f.FakeAsyncDaytona.create, daytona.AsyncDaytona.create),
        ("AsyncDaytona.get", f.FakeAsyncDaytona.get, daytona.AsyncDaytona.get),
        ("AsyncDaytona.delete", f.FakeAsyncDaytona.delete, daytona.AsyncDaytona.delete),
        ("AsyncSandbox.refresh_data", f.FakeDaytonaSandbox.refresh_data, daytona.AsyncSandbox.refresh_data),
        ("AsyncSandbox.start", f.FakeDaytonaSandbox.start, daytona.AsyncSandbox.start),
        ("AsyncSandbox.stop", f.FakeDaytonaSandbox.stop, daytona.AsyncSandbox.stop),
        ("AsyncSandbox.delete", f.FakeDaytonaSandbox.delete, daytona.AsyncSandbox.delete),
        ("AsyncSandbox.create_snapshot", f.FakeDaytonaSandbox.create_snapshot, daytona.AsyncSandbox.create_snapshot),
        ("AsyncProcess.create_session", f.FakeDaytonaProcess.create_session, AsyncProcess.create_session),
        ("AsyncProcess.delete_session", f.FakeDaytonaProcess.delete_session, AsyncProcess.delete_session),
        ("AsyncProcess.execute_session_command", f.FakeDaytonaProcess.execute_session_command,
         AsyncProcess.execute_session_command),
        ("AsyncProcess.get_session_command", f.FakeDaytonaProcess.get_session_command,
         AsyncProcess.get_session_command),
        ("AsyncProcess.get_session_command_logs_async", f.FakeDaytonaProcess.get_session_command_logs_async,
         AsyncProcess.get_session_command_logs_async),
        ("AsyncFileSystem.upload_file", f.FakeDaytonaFileSystem.upload_file, AsyncFileSystem.upload_file),
        ("AsyncFileSystem.download_file", f.FakeDaytonaFileSystem.download_file, AsyncFileSystem.download_file),
    ]  # fmt: skip
    drift = signature_drift(pairs)
    assert not drift, "\n".join(drift)
    # The objects, models and errors the provider uses are where the fake says they are.
    assert {"process", "fs", "id", "state"} <= set(dir(daytona.AsyncSandbox)) | set(daytona.AsyncSandbox.model_fields)
    assert {"command", "run_async"} <= set(daytona.SessionExecuteRequest.model_fields)
    for params in (daytona.CreateSandboxFromSnapshotParams, daytona.CreateSandboxFromImageParams):
        assert {"os_user", "labels", "auto_stop_interval", "network_block_all", "network_allow_list",
                "domain_allow_list"} <= set(params.model_fields)  # fmt: skip
    assert "snapshot" in daytona.CreateSandboxFromSnapshotParams.model_fields
    assert {"image", "resources"} <= set(daytona.CreateSandboxFromImageParams.model_fields)
    errors = ("DaytonaNotFoundError", "DaytonaGoneError", "DaytonaSpotEvictedError", "DaytonaFileNotFoundError",
              "DaytonaBadRequestError", "DaytonaSessionEndedError", "DaytonaConnectionError")  # fmt: skip
    for cls in (getattr(daytona, name) for name in errors):
        assert issubclass(cls, daytona.DaytonaError)


# -- the provider kit -----------------------------------------------------------------------------------------------


def test_daytona_is_built_through_the_entry_point_and_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert "daytona" in provider_kit.installed(), "pip install -e . registers the tardigrade.providers entry point"
    monkeypatch.delenv("DAYTONA_API_KEY", raising=False)
    monkeypatch.delenv("DAYTONA_JWT_TOKEN", raising=False)
    with pytest.raises(ProviderUnavailable) as missing:
        build_provider("daytona", tmp_path, worker_id="w")
    message = str(missing.value)
    assert "\n" not in message
    assert "daytona" in message and "tardigrade-temporal[daytona]" in message and "DAYTONA_API_KEY" in message
    monkeypatch.setenv("DAYTONA_API_KEY", "dtn_not_a_real_key")  # nothing is called until a sandbox is made
    provider = build_provider("daytona", tmp_path, worker_id="w")
    assert isinstance(provider, DaytonaProvider) and provider.name == "daytona"


ACME = '''
"""A third-party provider: the local one under another name."""
from tardigrade.sandboxes.bubblewrap import LocalSandboxProvider
from tardigrade.sandboxes.errors import ProviderUnavailable
import os

class AcmeProvider(LocalSandboxProvider):
    name = "acme.vm"

def provider_factory(name, state_dir, *, worker_id, fault_injector=None):
    if os.environ.get("ACME_BROKEN"):
        raise ProviderUnavailable("the acme.vm provider needs ACME_TOKEN: pip install acme-vm and set ACME_TOKEN")
    return AcmeProvider(state_dir / "acme", worker_id=worker_id, fault_injector=fault_injector)
'''


@pytest.fixture
def acme_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real distribution on sys.path: a module and a dist-info whose entry_points.txt registers ``acme.vm``."""
    site = tmp_path / "site"
    (site / "acme_vm-1.0.dist-info").mkdir(parents=True)
    (site / "acme_vm.py").write_text(ACME)
    (site / "acme_vm-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-vm\nVersion: 1.0\n")
    (site / "acme_vm-1.0.dist-info" / "entry_points.txt").write_text(
        textwrap.dedent("""\
            [tardigrade.providers]
            acme.vm = acme_vm:provider_factory
        """)
    )
    monkeypatch.syspath_prepend(str(site))
    provider_kit._entry_points.cache_clear()
    yield site
    sys.modules.pop("acme_vm", None)
    provider_kit._entry_points.cache_clear()


async def test_a_third_party_provider_is_found_through_the_entry_point_group(
    acme_installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fakes_unavailable():
        pytest.skip(str(fakes_unavailable()))
    assert {"acme.vm", "daytona"} <= set(provider_kit.installed())
    provider = build_provider("acme.vm", tmp_path / "state", worker_id="w")
    assert provider.name == "acme.vm"
    sandbox = await provider.create(SandboxSpec())
    try:
        assert (await sh(sandbox, "id -u; pwd"))[1] == "1000\n/workspace\n"
    finally:
        await sandbox.destroy()
        await provider.close()
    monkeypatch.setenv("ACME_BROKEN", "1")
    with pytest.raises(ProviderUnavailable, match=r"acme\.vm provider needs ACME_TOKEN"):
        build_provider("acme.vm", tmp_path / "state", worker_id="w")


def test_a_provider_no_package_registers_is_named_with_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ProviderUnavailable) as missing:
        build_provider("other.vm", tmp_path, worker_id="w")
    assert "'other.vm'" in str(missing.value) and "tardigrade.providers" in str(missing.value)
    assert "registered: blaxel, cloudflare, daytona, runloop, vercel" in str(missing.value)
    with pytest.raises(ProviderUnavailable, match="unknown sandbox provider 'docker'"):
        build_provider("docker", tmp_path, worker_id="w")


def test_pipelines_and_policies_name_entry_point_providers() -> None:
    def pipeline(provider: Any, options: dict[str, Any] | None = None) -> Any:
        sandbox = {"provider": provider, "options": options or {}}
        return parse_pipeline({"name": "p", "steps": [{"name": "s", "run": "true"}], "sandbox": sandbox})

    assert pipeline(["local", "e2b", "daytona"]).sandbox.preferences == ["local", "e2b", "daytona"]
    assert pipeline("acme.vm", {"flavor": "big"}).sandbox.options == {"flavor": "big"}  # acme.vm checks its own
    assert pipeline("daytona", {"snapshot": "py312", "cpu": 2, "memory": 4096}).sandbox.options["cpu"] == 2
    for bad, error in (("docker", "Input should be"), ("e2d", "Input should be"), ("Acme.VM", "Input should be")):
        with pytest.raises(PipelineError, match=error):
            pipeline(bad)
    with pytest.raises(PipelineError, match="unknown key 'flavor' for provider daytona"):
        pipeline("daytona", {"flavor": "big"})
    with pytest.raises(PipelineError, match="auto_stop_interval"):
        pipeline("daytona", {"auto_stop_interval": -1})
    assert WorkerPolicy.model_validate({"providers": ["local", "daytona", "acme.vm"]}).providers
    with pytest.raises(ValueError, match="unknown provider 'docker'"):
        WorkerPolicy.model_validate({"providers": ["docker"]})


# -- failover through three providers -------------------------------------------------------------------------------

CHAIN_STEPS = [
    {"name": "venv", "run": "mkdir -p .venv/bin && ln -s /usr/bin/python3 .venv/bin/python && echo 1 >> log.txt"},
    # Sleeps long enough that the E2B loss (a poll and 0.3 s after the marker appears) lands mid-step on a loaded
    # machine too: a step that finished first would end the run on E2B.
    {"name": "lost twice", "run": "touch /tmp/lost-twice-running; sleep 3; echo 2 >> log.txt"},
    {"name": "finish", "run": ".venv/bin/python -c 'print(3)' >> log.txt; stat -c %u log.txt > owner.txt"},
]


async def lose_e2b_machines_running_step_2(cloud: Any, armed: list[bool]) -> None:
    """The fake E2B side of a crash: an E2B machine running step 2 (its /tmp marker) is lost, once."""
    while True:
        for machine_id, machine in list(cloud.machines.items()):
            if armed[0] and machine_id.startswith("e2b-") and (machine.rootfs / "tmp" / "lost-twice-running").exists():
                armed[0] = False
                await asyncio.sleep(0.3)
                cloud.lose(machine_id)
        await asyncio.sleep(0.05)


async def test_a_run_fails_over_local_then_e2b_then_daytona_with_the_same_digest(
    workers: Any, local_store: str, tmp_path: Path
) -> None:
    """local is lost in step 2, the run rehydrates on E2B (fake), loses that too in the same step, and finishes
    on Daytona (fake): the final workspace is the same as a run that never failed."""
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    from tardigrade.client import start_pipeline
    from tardigrade.sandboxes.bubblewrap import LocalSandboxProvider
    from tardigrade.sandboxes.e2b import E2BProvider
    from tardigrade.sandboxes.faults import DestroySandboxDuringStep
    from tests.conftest import fast_timeouts, pipeline_from
    from tests.provider_fakes import FakeCloud, bind_e2b

    spec = {"name": "chain", "timeouts": fast_timeouts(), "sandbox": {"provider": ["local", "e2b", "daytona"]},
            "steps": CHAIN_STEPS}  # fmt: skip
    reference = pipeline_from({**spec, "name": "chain-reference", "sandbox": {"provider": "local"}}, tmp_path)
    loaded = pipeline_from(spec, tmp_path)
    e2b_cloud = FakeCloud(tmp_path / "e2b-cloud")
    daytona_cloud, daytona_client = fake_daytona(tmp_path / "daytona-cloud")
    destroy = DestroySandboxDuringStep(2, after_seconds=0.3, times=0)  # armed after the reference run
    armed = [False]
    providers = {
        "local": LocalSandboxProvider(workers.home / "local", worker_id="chain", fault_injector=destroy),
        "e2b": E2BProvider(workers.home / "e2b", sdk=bind_e2b(e2b_cloud)),
        "daytona": DaytonaProvider(workers.home / "daytona", client=daytona_client),
    }
    watcher = asyncio.ensure_future(lose_e2b_machines_running_step_2(e2b_cloud, armed))
    try:
        client = await workers.start(providers=providers)
        ref = await (await start_pipeline(client, reference, task_queue=workers.task_queue,
                                          store_url=local_store)).result()  # fmt: skip
        destroy.remaining, armed[0] = 1, True
        handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
        result = await handle.result()
    finally:
        watcher.cancel()
        e2b_cloud.close()
        daytona_cloud.close()
    assert destroy.fired == 1 and not armed[0], "both losses happened"
    assert result.providers == ["local", "e2b", "daytona"], result.providers
    assert result.rehydrations == 2
    assert result.workspace_digest == ref.workspace_digest, "the same files as a run that never failed"
    workspace = tmp_path / "final"
    SnapshotEngine(open_store(result.store)).restore(result.final_snapshot or "", workspace)
    assert (workspace / "workspace" / "log.txt").read_text() == "1\n2\n3\n"
    assert (workspace / "workspace" / "owner.txt").read_text() == "1000\n"
