"""The Vercel provider: the contract suite against a fake of its SDK (real bubblewrap machines) and live.

Vercel runs here against an in-process fake of the SDK's async sandbox client (tests/fake_vercel.py), and live when
Vercel credentials are set (skipped with the reason otherwise). `test_the_fake_matches_the_installed_sdk` keeps the
fake honest. The Vercel-specific promise tested here is the lifetime: a session that reaches its maximum lifetime
is a lost sandbox, and a pipeline run carries on past it on a new sandbox with the same workspace digest.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tardigrade.sandboxes.errors import ProviderUnavailable, SandboxError, SandboxLost
from tardigrade.sandboxes.network.rules import NetworkRule
from tardigrade.sandboxes.provider import Sandbox, SandboxSpec
from tardigrade.sandboxes.provider_choice import build_provider
from tardigrade.sandboxes.remote import HELPER_DIR
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tardigrade.sandboxes.vercel import VercelProvider, VercelSandbox, has_credentials, vercel_network_policy
from tardigrade.testing import (
    Harness,
    ProviderContract,
    native_snapshot_round_trip,
    sh,
    signature_drift,
)
from tests.fake_vercel import FakeSandboxClient, fake_vercel
from tests.provider_fakes import fakes_unavailable

# -- the contract, against the fake and live ----------------------------------------------------------------------


class TestVercelFake(ProviderContract):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        reason = fakes_unavailable()
        if reason:
            pytest.skip(reason)
        cloud, client = fake_vercel(tmp_path / "cloud")
        provider = VercelProvider(tmp_path / "vercel", client=client)

        async def lose(sandbox: Sandbox) -> None:
            client.lose(sandbox.id)

        try:
            yield Harness("vercel-fake", provider, lose)
        finally:
            cloud.close()


class TestVercelLive(ProviderContract):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        if not has_credentials(os.environ):
            pytest.skip(
                "live Vercel tests need VERCEL_OIDC_TOKEN, or VERCEL_TOKEN + VERCEL_TEAM_ID + VERCEL_PROJECT_ID"
            )
        provider = VercelProvider.from_env(tmp_path / "vercel")

        async def lose(sandbox: Sandbox) -> None:  # end its session through another handle, as a lifetime would
            handle = await provider.client().get_sandbox(name=sandbox.id)
            await handle.stop()

        yield Harness("vercel-live", provider, lose, local_network=False)
        await provider.close()

    @pytest.fixture
    async def other_harness(self) -> AsyncIterator[Harness | None]:
        yield None  # a file:// store is on this worker; the fake covers crossing providers


# -- Vercel specifics, against the fake -----------------------------------------------------------------------------


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[tuple[Any, FakeSandboxClient, VercelProvider]]:
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    cloud, client = fake_vercel(tmp_path / "cloud")
    try:
        yield cloud, client, VercelProvider(tmp_path / "vercel", client=client)
    finally:
        cloud.close()


async def test_a_session_that_reaches_its_lifetime_is_lost_not_silently_resumed(
    fake: tuple[Any, FakeSandboxClient, VercelProvider],
) -> None:
    """The SDK's `Sandbox` would resume an expired sandbox on a clean disk; the pinned session says it is lost."""
    _, client, provider = fake
    client.lifetimes = [2.0]
    sandbox = await provider.create(SandboxSpec())
    await sandbox.write_file("kept.txt", b"x")
    with pytest.raises(SandboxLost):
        await sandbox.exec("sleep 30", env={}, timeout=60)
    assert client.expired == [sandbox.id]
    with pytest.raises(SandboxLost, match="reached its lifetime"):
        await provider.attach(sandbox.id)
    params = client.sandboxes[sandbox.id].params
    assert params["execution_time_limit"] == 2700 and client.sandboxes[sandbox.id].persistent is False


async def test_network_is_denied_by_default_and_allowlists_map_to_vercels_policy(
    fake: tuple[Any, FakeSandboxClient, VercelProvider],
) -> None:
    _, client, provider = fake
    sandbox = await provider.create(SandboxSpec())
    assert client.sandboxes[sandbox.id].params["network_policy"].mode == "deny-all"
    policy = vercel_network_policy(NetworkRule.parse({"allow": ["pypi.org", "*.github.com", "10.1.2.3"]}, "network"))
    assert policy.mode == "custom" and set(policy.allow) == {"pypi.org", "*.github.com"}
    assert policy.subnets is not None and policy.subnets.allow == ("10.1.2.3/32",)
    assert vercel_network_policy(NetworkRule.parse(True, "network")).mode == "allow-all"


async def test_secrets_never_reach_a_command_line_and_home_survives_sudo(
    fake: tuple[Any, FakeSandboxClient, VercelProvider],
) -> None:
    _, _, provider = fake
    sandbox = await provider.create(SandboxSpec())
    assert isinstance(sandbox, VercelSandbox)
    secret = "s3cr3t-value-do-not-leak"
    seen: list[str] = []
    session = sandbox._session
    original = session.create_process

    async def spy(command: str, args: Any = None, **kw: Any) -> Any:
        seen.append(" ".join([command, *(args or ())]))
        return await original(command, args, **kw)

    session.create_process = spy
    code, out = await sh(sandbox, "echo $TOKEN; echo $HOME; id -u", env={"TOKEN": secret})
    assert (code, out.split()) == (0, [secret, "/home/sandbox", "1000"])
    assert seen and not any(secret in command for command in seen)


async def test_an_upload_swapped_by_the_sandbox_before_root_places_it_is_refused(
    fake: tuple[Any, FakeSandboxClient, VercelProvider],
) -> None:
    """Vercel's files API writes as the image's user, who may be uid 1000: the sandbox can rewrite a staged upload
    before root moves it into place. The hash check catches it, so no forged helper file is ever trusted."""
    _, _, provider = fake
    sandbox = await provider.create(SandboxSpec())
    assert isinstance(sandbox, VercelSandbox)
    session = sandbox._session
    original = session.fs.open

    class Tampering:
        """The real writer; once it is closed, uid 1000 appends to the staged file."""

        def __init__(self, handle: Any, path: str) -> None:
            self.handle, self.path = handle, path

        async def __aenter__(self) -> Any:
            return await self.handle.__aenter__()

        async def __aexit__(self, *exc: Any) -> None:
            await self.handle.__aexit__(*exc)
            process = await session.create_process(
                "/bin/sh", ["-c", f"echo forged >> {self.path}"], stdout=-1, stderr=subprocess.STDOUT
            )
            assert await process.wait() == 0

    def tampering_open(path: str, mode: str = "r", **kw: Any) -> Any:
        handle = original(path, mode, **kw)
        return Tampering(handle, path) if mode == "wb" else handle

    await sandbox.write_file("honest.txt", b"before")
    session.fs.open = tampering_open
    with pytest.raises(SandboxError, match="changed before it was moved into place"):
        await sandbox.write_file("forged.txt", b"data")
    with pytest.raises(SandboxError, match="changed before it was moved into place"):
        await sandbox._put_bytes(b"a helper file", f"{HELPER_DIR}/fetch.list")
    session.fs.open = original
    assert await sandbox.read_file("honest.txt") == b"before"
    with pytest.raises(FileNotFoundError):
        await sandbox.read_file("forged.txt")


async def test_native_snapshot_continues_on_a_new_session_and_restores_with_fallback(
    fake: tuple[Any, FakeSandboxClient, VercelProvider], tmp_path: Path
) -> None:
    _, client, provider = fake
    engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))

    async def goes_on(first: Sandbox, native: str) -> None:
        assert native in client.snapshots
        assert (await sh(first, "cat src/a.txt"))[1] == "shared\n", "the same sandbox goes on, on its saved disk"

    second, _ = await native_snapshot_round_trip(
        provider,
        engine,
        spec=SandboxSpec(options={"native_snapshot": True}),
        lose=client.lose,
        unusable=lambda _: "snap_deleted",
        after_native=goes_on,
    )
    assert isinstance(second, VercelSandbox)


# -- the fake against the installed SDK -----------------------------------------------------------------------------


def test_the_fake_matches_the_installed_sdk() -> None:
    import vercel.sandbox as sdk
    from vercel.sandbox import SandboxFilesystem

    from tests import fake_vercel as f

    pairs: list[tuple[str, Any, Any]] = [
        ("SandboxClient.create_sandbox", f.FakeSandboxClient.create_sandbox, sdk.SandboxClient.create_sandbox),
        ("SandboxClient.get_sandbox", f.FakeSandboxClient.get_sandbox, sdk.SandboxClient.get_sandbox),
        ("SandboxClient.aclose", f.FakeSandboxClient.aclose, sdk.SandboxClient.aclose),
        ("Sandbox.update", f.FakeVercelSandbox.update, sdk.Sandbox.update),
        ("Sandbox.session", f.FakeVercelSandbox.session, sdk.Sandbox.session),
        ("Sandbox.stop", f.FakeVercelSandbox.stop, sdk.Sandbox.stop),
        ("Sandbox.destroy", f.FakeVercelSandbox.destroy, sdk.Sandbox.destroy),
        ("SandboxRuntimeSession.create_process", f.FakeRuntimeSession.create_process,
         sdk.SandboxRuntimeSession.create_process),
        ("SandboxRuntimeSession.refresh", f.FakeRuntimeSession.refresh, sdk.SandboxRuntimeSession.refresh),
        ("SandboxRuntimeSession.snapshot", f.FakeRuntimeSession.snapshot, sdk.SandboxRuntimeSession.snapshot),
        ("SandboxRuntimeSession.stop", f.FakeRuntimeSession.stop, sdk.SandboxRuntimeSession.stop),
        ("Process.wait", f.FakeProcess.wait, sdk.Process.wait),
        ("Process.kill", f.FakeProcess.kill, sdk.Process.kill),
        ("SandboxFilesystem.open", f.FakeFilesystem.open, SandboxFilesystem.open),
        ("SandboxBinaryReader.read", f.FakeBinaryReader.read, sdk.SandboxBinaryReader.read),
        ("SandboxBinaryReader.__aenter__", f.FakeBinaryReader.__aenter__, sdk.SandboxBinaryReader.__aenter__),
        ("SandboxBinaryWriter.write", f.FakeBinaryWriter.write, sdk.SandboxBinaryWriter.write),
        ("SandboxBinaryWriter.__aenter__", f.FakeBinaryWriter.__aenter__, sdk.SandboxBinaryWriter.__aenter__),
    ]  # fmt: skip
    drift = signature_drift(pairs)
    assert not drift, "\n".join(drift)
    # The attributes, models and errors the provider uses are where the fake says they are.
    assert {"name", "status", "current_session", "fs"} <= set(dir(sdk.Sandbox))
    assert {"id", "status", "fs"} <= set(dir(sdk.SandboxRuntimeSession))
    assert {"stdout", "id"} <= set(dir(sdk.Process)) and "id" in dir(sdk.Snapshot)
    assert "snapshot_id" in sdk.SnapshotSource.model_fields
    assert {"vcpus", "memory"} <= set(sdk.SandboxResources.model_fields)
    assert sdk.NetworkPolicy.deny_all().mode == "deny-all" and sdk.SandboxStatus("running").value == "running"
    for cls in (sdk.SandboxApiError, sdk.SandboxStreamError, sdk.SandboxPathNotFoundError):
        assert issubclass(cls, sdk.SandboxError)
    assert callable(sdk.SandboxClient.create)


# -- the provider kit: what is missing, in one line -------------------------------------------------------------


def test_vercel_is_built_through_the_entry_point_and_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("VERCEL_OIDC_TOKEN", "VERCEL_OIDC_TOKEN_FILE", "VERCEL_TOKEN", "VERCEL_TEAM_ID", "VERCEL_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VERCEL_TOKEN", "only-the-token")  # not enough: team and project are needed too
    with pytest.raises(ProviderUnavailable) as missing:
        build_provider("vercel", tmp_path, worker_id="w")
    message = str(missing.value)
    assert "\n" not in message
    assert all(word in message for word in ("vercel", "tardigrade-temporal[vercel]", "VERCEL_OIDC_TOKEN",
                                            "VERCEL_TOKEN", "VERCEL_TEAM_ID", "VERCEL_PROJECT_ID"))  # fmt: skip
    monkeypatch.setenv("VERCEL_TEAM_ID", "team_x")
    monkeypatch.setenv("VERCEL_PROJECT_ID", "prj_x")  # nothing is called until a sandbox is made
    provider = build_provider("vercel", tmp_path, worker_id="w")
    assert isinstance(provider, VercelProvider) and provider.name == "vercel"


# -- a pipeline carried past a sandbox's lifetime ---------------------------------------------------------------

LIFETIME_STEPS = [
    {"name": "venv", "run": "mkdir -p .venv/bin && ln -s /usr/bin/python3 .venv/bin/python && echo 1 >> log.txt"},
    {"name": "outlives its sandbox", "run": "sleep 4; echo 2 >> log.txt"},
    {"name": "finish", "run": ".venv/bin/python -c 'print(3)' >> log.txt; stat -c %u log.txt > owner.txt"},
]


async def test_a_run_carries_on_past_a_sandboxs_lifetime_with_the_same_digest(
    workers: Any, local_store: str, tmp_path: Path
) -> None:
    """The first Vercel sandbox reaches its lifetime in step 2: the run rehydrates on a new one and finishes with
    the files of a run that never lost anything."""
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    from tardigrade.client import start_pipeline
    from tests.conftest import fast_timeouts, pipeline_from

    spec = {"name": "lifetime", "timeouts": fast_timeouts(), "sandbox": {"provider": "vercel"}, "steps": LIFETIME_STEPS}
    reference = pipeline_from({**spec, "name": "lifetime-reference", "sandbox": {"provider": "local"}}, tmp_path)
    loaded = pipeline_from(spec, tmp_path)
    cloud, client = fake_vercel(tmp_path / "vercel-cloud")
    client.lifetimes = [3.5]  # the first sandbox's session ends inside step 2; the next ones keep 2700 s
    try:
        from tardigrade.sandboxes.bubblewrap import LocalSandboxProvider

        providers = {
            "local": LocalSandboxProvider(workers.home / "local", worker_id="lifetime"),
            "vercel": VercelProvider(workers.home / "vercel", client=client),
        }
        temporal = await workers.start(providers=providers)
        ref = await (await start_pipeline(temporal, reference, task_queue=workers.task_queue,
                                          store_url=local_store)).result()  # fmt: skip
        handle = await start_pipeline(temporal, loaded, task_queue=workers.task_queue, store_url=local_store)
        result = await asyncio.wait_for(handle.result(), 120)
    finally:
        cloud.close()
    assert len(client.expired) == 1, "the first sandbox reached its lifetime"
    assert len(client.sandboxes) == 2 and result.rehydrations == 1
    assert result.workspace_digest == ref.workspace_digest, "the same files as a run that never failed"
    workspace = tmp_path / "final"
    SnapshotEngine(open_store(result.store)).restore(result.final_snapshot or "", workspace)
    assert (workspace / "workspace" / "log.txt").read_text() == "1\n2\n3\n"
    assert (workspace / "workspace" / "owner.txt").read_text() == "1000\n"
