"""The Cloudflare provider (sandboxes/cloudflare.py) and its bridge Worker (clients/cloudflare-bridge/).

The provider runs here against a local fake of the bridge's HTTP protocol (tests/fake_cloudflare_bridge.py: a real
HTTP server on loopback whose sandboxes are real bubblewrap machines), and live when ``CLOUDFLARE_SANDBOX_URL`` is
set (skipped with the reason otherwise). Both run the importable contract suite (tardigrade/testing.py). What keeps
the three sides of the protocol together: `test_the_worker_the_client_and_the_fake_name_the_same_routes` reads the
Worker's ROUTES table from its TypeScript source, and `test_the_bridge_type_checks` runs ``tsc --noEmit`` on the
Worker against the installed ``@cloudflare/sandbox`` types (when clients/cloudflare-bridge/node_modules exists).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tardigrade.sandboxes.cloudflare import (
    ROUTES,
    BridgeError,
    CloudflareProvider,
    CloudflareSandbox,
    cloudflare_network,
)
from tardigrade.sandboxes.errors import ProviderUnavailable, SandboxLost
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
)
from tests.fake_cloudflare_bridge import FakeCloudflareBridge
from tests.provider_fakes import FakeCloud, fakes_unavailable

BRIDGE = Path(__file__).resolve().parent.parent / "clients" / "cloudflare-bridge"
TOKEN = "test-bridge-token-0123456789"

# -- the contract, against the fake and live ----------------------------------------------------------------------


class TestCloudflareFake(ProviderContract):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        reason = fakes_unavailable()
        if reason:
            pytest.skip(reason)
        cloud = FakeCloud(tmp_path / "cloud")
        bridge = FakeCloudflareBridge(cloud, TOKEN)
        provider = CloudflareProvider(tmp_path / "cloudflare", url=await bridge.start(), token=TOKEN)

        async def lose(sandbox: Sandbox) -> None:
            cloud.lose(sandbox.id)

        try:
            yield Harness("cloudflare-fake", provider, lose)
        finally:
            await provider.close()
            await bridge.close()
            cloud.close()


class TestCloudflareLive(ProviderContract):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        if not (os.environ.get("CLOUDFLARE_SANDBOX_URL") and os.environ.get("CLOUDFLARE_SANDBOX_TOKEN")):
            pytest.skip(
                "live Cloudflare tests need a deployed bridge: CLOUDFLARE_SANDBOX_URL, CLOUDFLARE_SANDBOX_TOKEN"
            )
        provider = CloudflareProvider.from_env(tmp_path / "cloudflare")

        async def lose(sandbox: Sandbox) -> None:  # destroy it through the bridge, as an eviction would end it
            await provider.client().destroy(sandbox.id)

        yield Harness("cloudflare-live", provider, lose, local_network=False)
        await provider.close()

    @pytest.fixture
    async def other_harness(self) -> AsyncIterator[Harness | None]:
        yield None  # the fake covers crossing providers


# -- Cloudflare specifics, against the fake -------------------------------------------------------------------------


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[tuple[FakeCloud, FakeCloudflareBridge, CloudflareProvider]]:
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    cloud = FakeCloud(tmp_path / "cloud")
    bridge = FakeCloudflareBridge(cloud, TOKEN)
    provider = CloudflareProvider(tmp_path / "cloudflare", url=await bridge.start(), token=TOKEN)
    try:
        yield cloud, bridge, provider
    finally:
        await provider.close()
        await bridge.close()
        cloud.close()


def test_the_worker_the_client_and_the_fake_name_the_same_routes() -> None:
    source = (BRIDGE / "src" / "index.ts").read_text()
    worker = set(re.findall(r'route\("([A-Z]+)", "([^"]+)"', source))
    client = set(ROUTES.values())
    fake = {(method, pattern) for method, pattern, _ in FakeCloudflareBridge(FakeCloud.__new__(FakeCloud), "").routes}
    assert len(worker) == len(ROUTES) == 11, sorted(worker)
    assert worker == client == fake
    readme = (BRIDGE / "README.md").read_text()
    undocumented = [f"{m} {p}" for m, p in sorted(worker) if f"{m} {p}" not in readme]
    assert not undocumented, f"routes missing from the bridge's README: {undocumented}"


def test_the_bridge_type_checks() -> None:
    """``tsc --noEmit`` on the Worker against the installed SDK's types (scripts/check-cloudflare-bridge.sh installs
    them; CI runs that script)."""
    tsc = BRIDGE / "node_modules" / ".bin" / "tsc"
    if not tsc.exists() or shutil.which("node") is None:
        pytest.skip("clients/cloudflare-bridge/node_modules is not installed: run scripts/check-cloudflare-bridge.sh")
    done = subprocess.run([str(tsc), "--noEmit", "-p", str(BRIDGE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_a_wrong_or_missing_token_is_refused(
    fake: tuple[FakeCloud, FakeCloudflareBridge, CloudflareProvider], tmp_path: Path
) -> None:
    cloud, bridge, _ = fake
    wrong = CloudflareProvider(tmp_path / "wrong", url=bridge.url, token=TOKEN[:-1] + "x")
    with pytest.raises(BridgeError) as refused:
        await wrong.create(SandboxSpec())
    assert refused.value.status == 401 and refused.value.code == "unauthorized"
    async with httpx.AsyncClient(base_url=bridge.url) as anonymous:
        for method, path in ROUTES.values():
            answer = await anonymous.request(method, path.replace(":id", "cf-0123"), params={"path": "/etc/passwd"})
            assert answer.status_code == 401, (method, path)
    assert not cloud.machines, "nothing was created or read without the token"
    await wrong.close()


async def test_a_lost_or_unknown_sandbox_is_a_404_and_sandbox_lost(
    fake: tuple[FakeCloud, FakeCloudflareBridge, CloudflareProvider],
) -> None:
    cloud, _, provider = fake
    with pytest.raises(SandboxLost, match="does not know it"):
        await provider.attach("cf-doesnotexist")
    sandbox = await provider.create(SandboxSpec())
    await sandbox.write_file("a.txt", b"x")
    # A container that came back without its disk (slept, crashed): the boot marker is gone with it.
    machine = cloud.machines[sandbox.id]
    (machine.rootfs / "var" / "lib" / "tardigrade-bridge" / "boot-id").unlink()
    assert not await sandbox.alive()
    with pytest.raises(SandboxLost):
        await sandbox.read_file("a.txt")
    with pytest.raises(SandboxLost):
        await provider.attach(sandbox.id)


async def test_network_is_off_by_default_and_allowlists_map_to_allowed_hosts(
    fake: tuple[FakeCloud, FakeCloudflareBridge, CloudflareProvider],
) -> None:
    _, bridge, provider = fake
    await provider.create(SandboxSpec())
    await provider.create(SandboxSpec(network=True))
    creates = [body for method, path, body in bridge.requests if (method, path) == ROUTES["create"]]
    assert [c["network"] for c in creates] == [
        {"internet": False, "allowedHosts": []},
        {"internet": True, "allowedHosts": []},
    ]
    rule = NetworkRule.parse({"allow": ["pypi.org", "*.github.com", "10.1.2.3"]}, "network")
    assert cloudflare_network(rule) == {"internet": False, "allowedHosts": ["pypi.org", "*.github.com", "10.1.2.3"]}
    closed = await provider.create(SandboxSpec())
    code, out = await sh(closed, "python3 -c \"import socket; print(socket.socket().connect_ex(('1.1.1.1', 53)))\"")
    assert code == 0 and out.strip() != "0", "no route out of a sandbox created without network"


async def test_the_environment_travels_in_the_body_never_on_the_command_line(
    fake: tuple[FakeCloud, FakeCloudflareBridge, CloudflareProvider],
) -> None:
    _, bridge, provider = fake
    sandbox = await provider.create(SandboxSpec())
    secret = "s3cr3t-value-do-not-leak"
    code, out = await sh(sandbox, "echo $TOKEN; id -u", env={"TOKEN": secret})
    assert (code, out.split()) == (0, [secret, "1000"])
    execs = [body for method, path, body in bridge.requests if method == "POST" and path.endswith("/exec")]
    assert any(body["env"].get("TOKEN") == secret for body in execs)
    assert not any(secret in body["command"] for body in execs)


async def test_list_and_tar_routes_move_a_folder_exactly(
    fake: tuple[FakeCloud, FakeCloudflareBridge, CloudflareProvider], tmp_path: Path
) -> None:
    _, _, provider = fake
    source = await provider.create(SandboxSpec())
    target = await provider.create(SandboxSpec())
    assert (await sh(source, "mkdir -p d && printf 'x' > d/f && chmod 751 d/f && ln -s d/f link"))[0] == 0
    client = provider.client()
    listed = {f["path"]: f for f in await client.list_files(source.id, "/workspace", recursive=True)}
    assert listed["/workspace/d/f"]["type"] == "file" and listed["/workspace/link"]["type"] == "symlink"
    await client.tar_out(source.id, "/workspace", tmp_path / "w.tar")
    await client.tar_in(target.id, "/workspace", tmp_path / "w.tar")
    code, out = await sh(target, "stat -c '%a %u' d/f; readlink link; cat d/f")
    assert code == 0 and out.split() == ["751", "1000", "d/f", "x"], out
    with pytest.raises(BridgeError) as missing:
        await client.list_files(source.id, "/nope")
    assert missing.value.code == "file_not_found"


async def test_native_backups_resume_and_their_fallback(
    fake: tuple[FakeCloud, FakeCloudflareBridge, CloudflareProvider], tmp_path: Path
) -> None:
    cloud, bridge, provider = fake
    engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))

    def expire(native: str) -> str:
        for backup in bridge.backups.values():
            backup.expires = 0  # past its ttl
        return native

    spec = SandboxSpec(options={"native_snapshot": True, "backup_ttl": 600})
    second, native = await native_snapshot_round_trip(provider, engine, spec=spec, lose=cloud.lose, unusable=expire)
    assert isinstance(second, CloudflareSandbox)
    assert [b["dir"] for b in json.loads(native)] == ["/workspace", "/home/sandbox"]
    assert {b["ttl"] for m, p, b in bridge.requests if p.endswith("/backups")} == {600}


def test_cloudflare_is_built_through_the_entry_point_and_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CLOUDFLARE_SANDBOX_URL", raising=False)
    monkeypatch.delenv("CLOUDFLARE_SANDBOX_TOKEN", raising=False)
    with pytest.raises(ProviderUnavailable) as missing:
        build_provider("cloudflare", tmp_path, worker_id="w")
    message = str(missing.value)
    assert "\n" not in message
    for word in ("cloudflare", "tardigrade-temporal[cloudflare]", "CLOUDFLARE_SANDBOX_URL", "CLOUDFLARE_SANDBOX_TOKEN"):
        assert word in message
    monkeypatch.setenv("CLOUDFLARE_SANDBOX_URL", "https://bridge.example.invalid")
    monkeypatch.setenv("CLOUDFLARE_SANDBOX_TOKEN", "not-a-real-token")  # nothing is called until a sandbox is made
    provider = build_provider("cloudflare", tmp_path, worker_id="w")
    assert isinstance(provider, CloudflareProvider) and provider.name == "cloudflare"


# -- a pipeline that fails over from local to Cloudflare ------------------------------------------------------------

STEPS = [
    {"name": "venv", "run": "mkdir -p .venv/bin && ln -s /usr/bin/python3 .venv/bin/python && echo 1 >> log.txt"},
    {"name": "lost", "run": "sleep 1.5; echo 2 >> log.txt"},
    {"name": "finish", "run": ".venv/bin/python -c 'print(3)' >> log.txt; stat -c %u log.txt > owner.txt"},
]


async def test_a_run_fails_over_from_local_to_cloudflare_with_the_same_digest(
    workers: Any, local_store: str, tmp_path: Path
) -> None:
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    from tardigrade.client import start_pipeline
    from tardigrade.sandboxes.bubblewrap import LocalSandboxProvider
    from tardigrade.sandboxes.faults import DestroySandboxDuringStep
    from tests.conftest import fast_timeouts, pipeline_from

    spec = {"name": "cf-chain", "timeouts": fast_timeouts(), "sandbox": {"provider": ["local", "cloudflare"]},
            "steps": STEPS}  # fmt: skip
    reference = pipeline_from({**spec, "name": "cf-reference", "sandbox": {"provider": "local"}}, tmp_path)
    loaded = pipeline_from(spec, tmp_path)
    cloud = FakeCloud(tmp_path / "cf-cloud")
    bridge = FakeCloudflareBridge(cloud, TOKEN)
    destroy = DestroySandboxDuringStep(2, after_seconds=0.3, times=0)  # armed after the reference run
    providers = {
        "local": LocalSandboxProvider(workers.home / "local", worker_id="cf", fault_injector=destroy),
        "cloudflare": CloudflareProvider(workers.home / "cloudflare", url=await bridge.start(), token=TOKEN),
    }
    try:
        client = await workers.start(providers=providers)
        ref = await (await start_pipeline(client, reference, task_queue=workers.task_queue,
                                          store_url=local_store)).result()  # fmt: skip
        destroy.remaining = 1
        handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
        result = await asyncio.wait_for(handle.result(), 240)
    finally:
        await bridge.close()
        cloud.close()
    assert destroy.fired == 1
    assert result.providers == ["local", "cloudflare"], result.providers
    assert result.rehydrations == 1
    assert result.workspace_digest == ref.workspace_digest, "the same files as a run that never failed"
    workspace = tmp_path / "final"
    SnapshotEngine(open_store(result.store)).restore(result.final_snapshot or "", workspace)
    assert (workspace / "workspace" / "log.txt").read_text() == "1\n2\n3\n"
    assert (workspace / "workspace" / "owner.txt").read_text() == "1000\n"
