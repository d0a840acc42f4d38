"""The Blaxel provider, against an in-process fake of its SDK (tests/fake_blaxel.py) and live.

The fake's sandboxes are real bubblewrap machines; only the SDK's RPC layer is replaced. Both run the importable
contract suite (tardigrade/testing.py); the live one runs when ``BL_API_KEY`` and ``BL_WORKSPACE`` are set
(``BLAXEL_IMAGE``: a Debian/Ubuntu-based image with python3) and is skipped with the reason otherwise.
`test_the_fake_matches_the_installed_sdk` keeps the fake honest: every SDK method the provider calls has the same
parameters as in the installed ``blaxel`` package, and the models it builds have the fields it sets.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tardigrade.pipeline import PipelineError, parse_pipeline
from tardigrade.sandboxes import provider_kit
from tardigrade.sandboxes.blaxel import NO_EGRESS, BlaxelProvider, BlaxelSandbox, blaxel_network
from tardigrade.sandboxes.errors import ProviderUnavailable, SandboxError, SandboxLost
from tardigrade.sandboxes.network.rules import NetworkRule
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
from tests.fake_blaxel import FakeBlaxel, FakeBlaxelWorld, fake_blaxel
from tests.provider_fakes import fakes_unavailable

# -- the contract, against the fake and live ----------------------------------------------------------------------


class TestBlaxelFake(ProviderContract):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        reason = fakes_unavailable()
        if reason:
            pytest.skip(reason)
        world, sdk = fake_blaxel(tmp_path / "cloud")
        provider = BlaxelProvider(tmp_path / "blaxel", sdk=sdk)

        async def lose(sandbox: Sandbox) -> None:
            world.cloud.lose(sandbox.id)

        try:
            yield Harness("blaxel-fake", provider, lose)
        finally:
            world.close()


class TestBlaxelLive(ProviderContract):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        if not (os.environ.get("BL_API_KEY") and os.environ.get("BL_WORKSPACE")):
            pytest.skip("live Blaxel tests need BL_API_KEY and BL_WORKSPACE (and BLAXEL_IMAGE: a Debian-based image)")
        provider = BlaxelProvider.from_env(tmp_path / "blaxel")

        async def lose(sandbox: Sandbox) -> None:  # delete it through another handle, as a reclaim would
            handle = await provider.attach(sandbox.id)
            await handle._terminate()

        yield Harness("blaxel-live", provider, lose, local_network=False)

    @pytest.fixture
    async def other_harness(self) -> AsyncIterator[Harness | None]:
        yield None  # a file:// store is on this worker; the fake covers crossing providers


# -- Blaxel specifics, against the fake -----------------------------------------------------------------------------


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[tuple[FakeBlaxelWorld, FakeBlaxel, BlaxelProvider]]:
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    world, sdk = fake_blaxel(tmp_path / "cloud")
    try:
        yield world, sdk, BlaxelProvider(tmp_path / "blaxel", sdk=sdk)
    finally:
        world.close()


async def test_a_sandbox_in_standby_resumes_on_attach_with_its_processes(
    fake: tuple[FakeBlaxelWorld, FakeBlaxel, BlaxelProvider],
) -> None:
    """Blaxel freezes an idle sandbox, memory and processes, and resumes it on the next request: the fast path."""
    world, _, provider = fake
    sandbox = await provider.create(SandboxSpec())
    code, out = await sh(sandbox, "echo kept > kept.txt; (sleep 300 >/dev/null 2>&1 &) ; pgrep -u 1000 -x sleep")
    assert code == 0 and out.strip().isdigit(), out
    pid = out.strip()
    await sandbox.hold_position("snapshot:" + "b" * 64)
    world.standby(sandbox.id)
    assert world.records[sandbox.id].state == "STANDBY"
    assert await sandbox.alive(), "standby is not a loss"
    again = await provider.attach(sandbox.id)
    assert await again.read_file("kept.txt") == b"kept\n"
    assert world.records[sandbox.id].state == "RUNNING", "the request resumed it"
    assert (await sh(again, f"kill -0 {pid} && echo running"))[1] == "running\n", "its processes survived standby"
    assert await again.held_position() == "snapshot:" + "b" * 64


async def test_an_archived_sandbox_is_unarchived_on_attach_and_a_deleted_one_is_lost(
    fake: tuple[FakeBlaxelWorld, FakeBlaxel, BlaxelProvider],
) -> None:
    world, sdk, provider = fake
    sandbox = await provider.create(SandboxSpec())
    await sandbox.write_file("kept.txt", b"on disk")
    await sandbox.hold_position("snapshot:" + "c" * 64)
    world.archive(sandbox.id)
    assert not await sandbox.alive(), "archived: nothing runs until it is unarchived"
    again = await provider.attach(sandbox.id)
    assert await again.alive() and await again.read_file("kept.txt") == b"on disk"
    assert await again.held_position() == "snapshot:" + "c" * 64
    assert (await sh(again, "id -u"))[1] == "1000\n"
    await again.destroy()
    assert (await sdk.SandboxInstance.get(sandbox.id)).status == "TERMINATED", "Blaxel keeps the record a while"
    with pytest.raises(SandboxLost, match="Blaxel reports it TERMINATED"):
        await provider.attach(sandbox.id)
    with pytest.raises(SandboxLost, match="does not know it any more"):
        await provider.attach("sandbox-never-made")
    lost = await provider.create(SandboxSpec())
    world.cloud.lose(lost.id)
    with pytest.raises(SandboxLost, match="Blaxel reports it FAILED"):
        await provider.attach(lost.id)


async def test_an_image_without_a_gnu_userland_is_refused_and_its_sandbox_deleted(
    fake: tuple[FakeBlaxelWorld, FakeBlaxel, BlaxelProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blaxel's default image is Alpine (busybox): no setpriv, no GNU find or tar. The fake's machines have them,
    so the check is pointed at a tool no image has."""
    world, _, provider = fake
    monkeypatch.setattr("tardigrade.sandboxes.blaxel._TOOLS_CHECK", "command -v tardigrade-no-such-tool")
    with pytest.raises(SandboxError, match=r"lacks setpriv, GNU find or GNU tar.*sandbox\.options\.image"):
        await provider.create(SandboxSpec())
    assert [r.status for r in world.records.values()] == ["TERMINATED"], "the refused sandbox is not left running"


async def test_network_is_closed_by_default_and_allowlists_map_to_blaxels_proxy(
    fake: tuple[FakeBlaxelWorld, FakeBlaxel, BlaxelProvider],
) -> None:
    world, _, provider = fake
    sandbox = await provider.create(SandboxSpec())
    record = world.records[sandbox.id]
    assert not record.network
    configuration: Any = record.configuration
    assert configuration.network.to_dict() == {
        "firewall": {"rulesets": ["proxy"]},
        "proxy": {"allowedDomains": [NO_EGRESS], "routing": []},
    }
    assert configuration.lifecycle.to_dict() == {
        "expirationPolicies": [{"action": "delete", "type": "ttl-idle", "value": "24h"}]
    }
    assert record.configuration.labels == {"created-by": "tardigrade"}
    allow = blaxel_network(NetworkRule.parse({"allow": ["pypi.org", "*.github.com"]}, "network"))
    assert allow.to_dict()["proxy"]["allowedDomains"] == ["pypi.org", "*.github.com"]
    assert blaxel_network(NetworkRule.parse(True, "network")) is None
    with pytest.raises(SandboxError, match=r"allows IP addresses \(10\.1\.2\.3/32\).*by domain name only"):
        blaxel_network(NetworkRule.parse({"allow": ["pypi.org", "10.1.2.3"]}, "network"))
    opened = await provider.create(SandboxSpec(network=True, options={"memory": 2048, "idle_ttl": None}))
    assert world.records[opened.id].network and world.records[opened.id].configuration.memory == 2048
    assert world.records[opened.id].configuration.lifecycle is None


async def test_secrets_travel_in_the_request_body_and_output_keeps_its_lines(
    fake: tuple[FakeBlaxelWorld, FakeBlaxel, BlaxelProvider],
) -> None:
    _, _, provider = fake
    sandbox = await provider.create(SandboxSpec())
    assert isinstance(sandbox, BlaxelSandbox)
    secret = "s3cr3t-value-do-not-leak"
    seen: list[dict[str, Any]] = []
    process = sandbox._sb.process
    original = process.exec

    async def spy(request: Any) -> Any:
        seen.append(dict(request))
        return await original(request)

    process.exec = spy
    result = await sandbox.exec("echo $TOKEN; printf 'a\\n\\nb'; printf 'err' >&2", env={"TOKEN": secret}, timeout=30)
    assert sorted(result.output_tail.split(b"\n")) == sorted([secret.encode(), b"a", b"", b"b", b"err", b""])
    assert seen and all(secret not in r["command"] for r in seen)
    assert any(r["env"].get("TOKEN") == secret for r in seen), "the variable is in the request body"
    assert all(r["keep_alive"] is True and r["timeout"] == 0 for r in seen), "no scale-to-zero, no Blaxel timeout"


async def test_native_snapshot_forks_and_falls_back_when_it_is_gone(
    fake: tuple[FakeBlaxelWorld, FakeBlaxel, BlaxelProvider], tmp_path: Path
) -> None:
    world, _, provider = fake
    engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))
    second, native = await native_snapshot_round_trip(
        provider, engine, spec=SandboxSpec(), lose=world.cloud.lose, unusable=lambda _: "snap_deleted"
    )
    assert native in world.snapshots and isinstance(second, BlaxelSandbox)
    assert world.network_updates and world.network_updates[-1][0] == second.id, "the fork's network is re-applied"


# -- the fake against the installed SDK -----------------------------------------------------------------------------


def test_the_fake_matches_the_installed_sdk() -> None:
    import blaxel.core as real
    from blaxel.core.client.models import FirewallConfig, Metadata, ProxyConfig, SandboxNetwork
    from blaxel.core.client.models import Sandbox as SandboxModel
    from blaxel.core.client.models import SandboxSpec as BlaxelSandboxSpec
    from blaxel.core.sandbox.client.models.process_request import ProcessRequest
    from blaxel.core.sandbox.default.filesystem import SandboxFileSystem
    from blaxel.core.sandbox.default.process import SandboxProcess
    from blaxel.core.sandbox.default.sandbox import SandboxAPIError
    from blaxel.core.sandbox.default.snapshot import SandboxSnapshots
    from blaxel.core.sandbox.types import ResponseError, SandboxCreateConfiguration
    from blaxel.core.snapshot import SnapshotAPIError

    from tests import fake_blaxel as f

    pairs: list[tuple[str, Any, Any]] = [
        ("SandboxInstance.create", f.FakeSandboxInstance.create, real.SandboxInstance.create),
        ("SandboxInstance.get", f.FakeSandboxInstance.get, real.SandboxInstance.get),
        ("SandboxInstance.delete", f.FakeSandboxInstance.delete, real.SandboxInstance.delete),
        ("SandboxInstance.unarchive", f.FakeSandboxInstance.unarchive, real.SandboxInstance.unarchive),
        ("SandboxInstance.update_network", f.FakeSandboxInstance.update_network,
         real.SandboxInstance.update_network),
        ("SandboxProcess.exec", f.FakeSandboxProcess.exec, SandboxProcess.exec),
        ("SandboxProcess.kill", f.FakeSandboxProcess.kill, SandboxProcess.kill),
        ("SandboxFileSystem.read_binary", f.FakeSandboxFileSystem.read_binary, SandboxFileSystem.read_binary),
        ("SandboxFileSystem.write_binary", f.FakeSandboxFileSystem.write_binary, SandboxFileSystem.write_binary),
        ("SandboxSnapshots.create", f.FakeSandboxSnapshots.create, SandboxSnapshots.create),
        ("Snapshot.get", f.FakeSnapshot.get, real.Snapshot.get),
        ("Snapshot.fork", f.FakeSnapshot.fork, real.Snapshot.fork),
    ]  # fmt: skip
    drift = signature_drift(pairs)
    assert not drift, "\n".join(drift)
    # What the provider reads and builds is where the fake says it is (constructing these makes no request).
    instance = real.SandboxInstance(SandboxModel(metadata=Metadata(name="x"), spec=BlaxelSandboxSpec()))
    assert instance.metadata.name == "x" and hasattr(instance, "status")
    assert isinstance(instance.process, SandboxProcess) and isinstance(instance.fs, SandboxFileSystem)
    assert isinstance(instance.snapshots, SandboxSnapshots)
    request = ProcessRequest.from_dict({"command": "true", "name": "n", "working_dir": "/", "env": {"A": "b"},
                                        "wait_for_completion": True, "keep_alive": True, "timeout": 0})  # fmt: skip
    env: Any = request.env if request is not None else None
    assert request is not None and env is not None and env.to_dict() == {"A": "b"}
    assert request.keep_alive is True and request.timeout == 0 and request.wait_for_completion is True
    configuration = set(inspect.signature(SandboxCreateConfiguration.__init__).parameters)
    assert {"image", "memory", "region", "labels", "lifecycle", "network"} <= configuration
    assert {"firewall", "proxy"} <= set(inspect.signature(SandboxNetwork.__init__).parameters)
    assert "rulesets" in inspect.signature(FirewallConfig.__init__).parameters
    assert {"allowed_domains", "routing"} <= set(inspect.signature(ProxyConfig.__init__).parameters)
    for cls in (SandboxAPIError, ResponseError, SnapshotAPIError):
        assert issubclass(cls, real.BlaxelError)


# -- configuration --------------------------------------------------------------------------------------------------


def test_blaxel_is_built_through_the_entry_point_and_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert "blaxel" in provider_kit.installed(), "pip install -e . registers the tardigrade.providers entry point"
    for name in ("BL_API_KEY", "BL_WORKSPACE", "BL_CLIENT_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ProviderUnavailable) as missing:
        build_provider("blaxel", tmp_path, worker_id="w")
    message = str(missing.value)
    assert "\n" not in message
    assert "blaxel" in message and "tardigrade-temporal[blaxel]" in message
    assert "BL_API_KEY" in message and "BL_WORKSPACE" in message
    monkeypatch.setenv("BL_API_KEY", "bl_not_a_real_key")  # nothing is called until a sandbox is made
    monkeypatch.setenv("BL_WORKSPACE", "acme")
    monkeypatch.setenv("BLAXEL_IMAGE", "example/debian-python:1")
    provider = build_provider("blaxel", tmp_path, worker_id="w")
    assert isinstance(provider, BlaxelProvider) and provider.name == "blaxel"
    assert provider.image == "example/debian-python:1"
    monkeypatch.setitem(sys.modules, "blaxel.core", None)  # the extra is not installed
    with pytest.raises(ProviderUnavailable, match=r"needs the blaxel SDK.*tardigrade-temporal\[blaxel\]"):
        build_provider("blaxel", tmp_path, worker_id="w")


def test_pipelines_check_blaxel_options() -> None:
    def pipeline(options: dict[str, Any]) -> Any:
        sandbox = {"provider": "blaxel", "options": options}
        return parse_pipeline({"name": "p", "steps": [{"name": "s", "run": "true"}], "sandbox": sandbox})

    chosen = {"image": "acme/py:3.12", "memory": 8192, "region": "eu-lon-1", "idle_ttl": "7d", "native_snapshot": True}
    assert pipeline(chosen).sandbox.options == chosen
    with pytest.raises(PipelineError, match="idle_ttl"):
        pipeline({"idle_ttl": "a week"})
    with pytest.raises(PipelineError, match="unknown key 'template' for provider blaxel"):
        pipeline({"template": "base"})


# -- a pipeline that fails over from local to Blaxel ----------------------------------------------------------------

STEPS = [
    {"name": "venv", "run": "mkdir -p .venv/bin && ln -s /usr/bin/python3 .venv/bin/python && echo 1 >> log.txt"},
    {"name": "lost", "run": "sleep 1.5; echo 2 >> log.txt"},
    {"name": "finish", "run": ".venv/bin/python -c 'print(3)' >> log.txt; stat -c %u log.txt > owner.txt"},
]


async def test_a_run_fails_over_from_local_to_blaxel_with_the_same_digest(
    workers: Any, local_store: str, tmp_path: Path
) -> None:
    """The local sandbox is lost in step 2; the run rehydrates on Blaxel (fake) and ends with the files of a run
    that never failed."""
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    from tardigrade.client import start_pipeline
    from tardigrade.sandboxes.bubblewrap import LocalSandboxProvider
    from tardigrade.sandboxes.faults import DestroySandboxDuringStep
    from tests.conftest import fast_timeouts, pipeline_from

    spec = {"name": "to-blaxel", "timeouts": fast_timeouts(), "sandbox": {"provider": ["local", "blaxel"]},
            "steps": STEPS}  # fmt: skip
    reference = pipeline_from({**spec, "name": "to-blaxel-reference", "sandbox": {"provider": "local"}}, tmp_path)
    loaded = pipeline_from(spec, tmp_path)
    world, sdk = fake_blaxel(tmp_path / "blaxel-cloud")
    destroy = DestroySandboxDuringStep(2, after_seconds=0.3, times=0)  # armed after the reference run
    providers = {
        "local": LocalSandboxProvider(workers.home / "local", worker_id="to-blaxel", fault_injector=destroy),
        "blaxel": BlaxelProvider(workers.home / "blaxel", sdk=sdk),
    }
    try:
        client = await workers.start(providers=providers)
        ref = await (await start_pipeline(client, reference, task_queue=workers.task_queue,
                                          store_url=local_store)).result()  # fmt: skip
        destroy.remaining = 1
        handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
        result = await handle.result()
    finally:
        world.close()
    assert destroy.fired == 1
    assert result.providers == ["local", "blaxel"], result.providers
    assert result.rehydrations == 1
    assert result.workspace_digest == ref.workspace_digest, "the same files as a run that never failed"
    workspace = tmp_path / "final"
    SnapshotEngine(open_store(result.store)).restore(result.final_snapshot or "", workspace)
    assert (workspace / "workspace" / "log.txt").read_text() == "1\n2\n3\n"
    assert (workspace / "workspace" / "owner.txt").read_text() == "1000\n"
