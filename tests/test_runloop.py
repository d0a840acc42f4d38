"""The Runloop provider, against a fake of Runloop's REST API behind the real SDK, and live when keyed.

The fake (tests/fake_runloop.py) is an httpx transport: the real ``runloop-api-client`` builds every request,
parses every answer and raises its own errors; behind the transport devboxes are real bubblewrap machines. Both
the fake and live runs go through the importable contract suite (tardigrade/testing.py); live runs need
``RUNLOOP_API_KEY`` and are skipped with that reason otherwise. `test_the_provider_and_the_fake_match_the_installed
_sdk` keeps both honest: every SDK method the provider calls takes the arguments it passes, and every route the fake
serves is the path the installed SDK's method requests.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tardigrade.pipeline import PipelineError, parse_pipeline
from tardigrade.sandboxes import provider_kit
from tardigrade.sandboxes.errors import ProviderUnavailable, SandboxError, SandboxLost
from tardigrade.sandboxes.network.rules import NetworkRule
from tardigrade.sandboxes.provider import Sandbox, SandboxSpec
from tardigrade.sandboxes.provider_choice import build_provider
from tardigrade.sandboxes.runloop import RunloopProvider, RunloopSandbox, runloop_network_policy
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tardigrade.testing import (
    Harness,
    ProviderContract,
    native_snapshot_round_trip,
    sh,
)
from tests.fake_runloop import FakeRunloopTransport, fake_runloop
from tests.provider_fakes import FakeCloud, fakes_unavailable

# -- the contract, against the fake and live ----------------------------------------------------------------------


class TestRunloopFake(ProviderContract):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        reason = fakes_unavailable()
        if reason:
            pytest.skip(reason)
        cloud, transport, client = fake_runloop(tmp_path / "cloud")
        provider = RunloopProvider(tmp_path / "runloop", client=client)

        async def lose(sandbox: Sandbox) -> None:
            cloud.lose(sandbox.id)

        try:
            yield Harness("runloop-fake", provider, lose)
        finally:
            transport.close()
            cloud.close()


class TestRunloopLive(ProviderContract):
    @pytest.fixture
    async def harness(self, tmp_path: Path) -> AsyncIterator[Harness]:
        if not os.environ.get("RUNLOOP_API_KEY"):
            pytest.skip("live Runloop tests need RUNLOOP_API_KEY (and RUNLOOP_BASE_URL if not Runloop's default)")
        provider = RunloopProvider.from_env(tmp_path / "runloop")

        async def lose(sandbox: Sandbox) -> None:  # shut it down behind the provider's back, as a reclaim would
            await provider.client().devboxes.shutdown(sandbox.id, force="true")

        yield Harness("runloop-live", provider, lose, local_network=False)

    @pytest.fixture
    async def other_harness(self) -> AsyncIterator[Harness | None]:
        yield None  # a file:// store is on this worker; the fake covers crossing providers


# -- Runloop specifics, against the fake ----------------------------------------------------------------------------

Fake = tuple[FakeCloud, FakeRunloopTransport, RunloopProvider]


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[Fake]:
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    cloud, transport, client = fake_runloop(tmp_path / "cloud")
    try:
        yield cloud, transport, RunloopProvider(tmp_path / "runloop", client=client)
    finally:
        transport.close()
        cloud.close()


async def test_a_suspended_devbox_resumes_on_attach_with_its_disk(fake: Fake) -> None:
    """Runloop's suspend keeps the disk (an idle-suspended devbox): attach resumes it, the fast resume."""
    _, transport, provider = fake
    sandbox = await provider.create(SandboxSpec(options={"idle_suspend": 600}))
    assert transport.devboxes[sandbox.id].params["launch_parameters"]["after_idle"] == {
        "idle_time_seconds": 600, "on_idle": "suspend"}  # fmt: skip
    await sandbox.write_file("kept.txt", b"still here")
    await sandbox.hold_position("snapshot:" + "b" * 64)
    await provider.client().devboxes.suspend(sandbox.id)
    assert not await sandbox.alive()
    again = await provider.attach(sandbox.id)
    assert await again.alive()
    assert await again.read_file("kept.txt") == b"still here"
    assert await again.held_position() == "snapshot:" + "b" * 64
    assert (await sh(again, "id -u"))[1] == "1000\n"
    await again.destroy()
    with pytest.raises(SandboxLost, match="shutdown"):
        await provider.attach(sandbox.id)
    with pytest.raises(SandboxLost, match="does not know it"):
        await provider.attach("dbx_never_made")


async def test_network_is_denied_by_a_policy_and_allowlists_map_to_runloops(fake: Fake) -> None:
    _, transport, provider = fake
    first = await provider.create(SandboxSpec())
    second = await provider.create(SandboxSpec())
    policy_ids = {transport.devboxes[s.id].params["launch_parameters"]["network_policy_id"] for s in (first, second)}
    assert len(policy_ids) == 1 and len(transport.policies) == 1, "one deny-all policy, made once and reused"
    assert transport.policies[policy_ids.pop()] == {"allow_all": False, "allowed_hostnames": [], "allowed_cidrs": []}
    assert transport.devboxes[first.id].params["launch_parameters"]["user_parameters"] == {"uid": 0, "username": "root"}
    rule = NetworkRule.parse({"allow": ["pypi.org", "*.github.com", "10.1.2.3"]}, "network")
    assert runloop_network_policy(rule) == {
        "allow_all": False,
        "allowed_hostnames": ["pypi.org", "*.github.com"],
        "allowed_cidrs": [{"cidr": "10.1.2.3/32"}],
    }
    assert runloop_network_policy(NetworkRule.parse(True, "network")) == {"allow_all": True}
    with pytest.raises(SandboxError, match="IPv4 networks only"):
        runloop_network_policy(NetworkRule.parse({"allow": ["2001:db8::1"]}, "network"))
    opened = await provider.create(SandboxSpec(network=True))
    code, out = await sh(opened, "cat /proc/net/dev | grep -c : ")
    assert code == 0 and int(out) > 1, "an open devbox has more than loopback"


async def test_secrets_in_the_environment_never_reach_a_command_line(fake: Fake) -> None:
    """Runloop executions take no environment: it goes through a root-only file the command sources and deletes."""
    _, transport, provider = fake
    sandbox = await provider.create(SandboxSpec())
    secret = "s3cr3t-value-do-not-leak"
    seen: list[tuple[str, bytes]] = []
    original = transport.handle_async_request

    async def spy(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, await request.aread()))
        return await original(request)

    transport.handle_async_request = spy  # type: ignore[method-assign]
    code, out = await sh(sandbox, "echo $TOKEN; ls /tmp/.tardigrade", env={"TOKEN": secret})
    assert code != 0 and out.startswith(f"{secret}\n") and "Permission denied" in out, "uid 1000 cannot look in"
    assert "env-" not in await sandbox._run_root("ls -A /tmp/.tardigrade", "listing"), "the file is gone"
    carrying = [path for path, body in seen if secret.encode() in body]
    assert carrying and all(path.endswith("/upload_file") for path in carrying), carrying
    assert not any(b"execute_async" in path.encode() for path in carrying)


async def test_native_snapshot_resume_and_its_fallback(fake: Fake, tmp_path: Path) -> None:
    cloud, transport, provider = fake
    engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()))
    second, native = await native_snapshot_round_trip(
        provider, engine, spec=SandboxSpec(), lose=cloud.lose, unusable=lambda _: "snp_deleted"
    )
    assert native in transport.snapshots and isinstance(second, RunloopSandbox)
    assert transport.devboxes[second.id].params["snapshot_id"] == native


# -- the provider and the fake against the installed SDK ------------------------------------------------------------


def _calls(source: str) -> set[str]:
    """The SDK methods a module calls, as ``resource.method`` (``devboxes.x``, ``executions.x``, ...)."""
    found = set(re.findall(r"\b(devboxes|executions|network_policies)\.([a-z_]+)\b", source))
    return {f"{resource}.{method}" for resource, method in found}


def test_the_provider_and_the_fake_match_the_installed_sdk() -> None:
    import runloop_api_client as runloop
    from runloop_api_client.resources.devboxes.devboxes import AsyncDevboxesResource
    from runloop_api_client.resources.devboxes.executions import AsyncExecutionsResource
    from runloop_api_client.resources.network_policies import AsyncNetworkPoliciesResource
    from runloop_api_client.types import DevboxAsyncExecutionDetailView, DevboxSnapshotView, DevboxView
    from runloop_api_client.types.devboxes import ExecutionUpdateChunk
    from runloop_api_client.types.network_policy_create_params import NetworkPolicyCreateParams
    from runloop_api_client.types.shared_params import LaunchParameters

    from tardigrade.sandboxes import runloop as module

    resources = {"devboxes": AsyncDevboxesResource, "executions": AsyncExecutionsResource,
                 "network_policies": AsyncNetworkPoliciesResource}  # fmt: skip
    # Every call the provider makes, with the keywords it passes: async, and accepted by the installed SDK.
    used = {
        "devboxes.create": {"launch_parameters", "metadata", "snapshot_id", "blueprint_name"},
        "devboxes.retrieve": set(), "devboxes.await_running": set(), "devboxes.await_suspended": set(),
        "devboxes.resume": set(), "devboxes.suspend": set(), "devboxes.shutdown": {"force"},
        "devboxes.execute_async": {"command"}, "devboxes.upload_file": {"path", "file"},
        "devboxes.download_file": {"path"}, "devboxes.snapshot_disk": {"name", "metadata"},
        "devboxes.wait_for_command": {"devbox_id", "statuses", "timeout_seconds"},
        "executions.kill": {"devbox_id", "kill_process_group"}, "executions.stream_stdout_updates": {"devbox_id"},
        "executions.stream_stderr_updates": {"devbox_id"},
        "network_policies.create": {"name", "description", "allow_all", "allowed_hostnames", "allowed_cidrs"},
    }  # fmt: skip
    called = _calls(inspect.getsource(module)) - {"devboxes.executions"}
    assert called <= set(used), f"the provider calls SDK methods this test does not check: {called - set(used)}"
    problems = []
    for name, keywords in used.items():
        resource, method = name.split(".")
        function = getattr(resources[resource], method, None)
        if function is None or not inspect.iscoroutinefunction(function):
            problems.append(f"{name}: missing or not async in the installed SDK")
            continue
        signature = inspect.signature(function)
        first = list(signature.parameters.values())[1]
        positional = ("an-id",) if first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD else ()
        try:
            signature.bind("self", *positional, **dict.fromkeys(keywords))
        except TypeError as e:
            problems.append(f"{name}({', '.join(sorted(keywords))}): {e}")
    assert not problems, "\n".join(problems)
    # Every route the fake serves is the path the SDK requests (an SDK that moves an endpoint fails here).
    # The modules' text, not inspect.getsource(cls): finding a class's lines parses the file with ast, and
    # CPython 3.11's ast conversion keeps its recursion depth in shared state (a SystemError once in CI).
    sources = "".join(Path(inspect.getfile(cls)).read_text() for cls in resources.values())
    for _, pattern, _ in FakeRunloopTransport(FakeCloud.__new__(FakeCloud))._routes:
        template = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: "{" + {"eid": "execution_id", "s": "x"}.get(
            m.group(1), m.group(1)) + "}", pattern.pattern)  # fmt: skip
        template = template.replace("stream_{x}_updates", "stream_stdout_updates")
        if template.startswith("/v1/devboxes/{id}/executions/"):
            template = template.replace("{id}", "{devbox_id}")
        assert template in sources or template.replace("{id}", "{devbox_id}") in sources, template
    # The models, params and errors the provider reads are where it reads them.
    assert {"id", "status", "shutdown_reason", "failure_reason"} <= set(DevboxView.model_fields)
    assert {"execution_id", "status", "exit_status"} <= set(DevboxAsyncExecutionDetailView.model_fields)
    assert "output" in ExecutionUpdateChunk.model_fields and "id" in DevboxSnapshotView.model_fields
    assert {"user_parameters", "network_policy_id", "keep_alive_time_seconds", "after_idle",
            "resource_size_request"} <= set(LaunchParameters.__annotations__)  # fmt: skip
    assert {"allow_all", "allowed_hostnames", "allowed_cidrs"} <= set(NetworkPolicyCreateParams.__annotations__)
    for error in ("NotFoundError", "BadRequestError", "APIStatusError"):
        assert issubclass(getattr(runloop, error), runloop.RunloopError)
    assert "write_to_file" in dir(runloop.AsyncAPIResponse) or hasattr(
        sys.modules["runloop_api_client._response"].AsyncBinaryAPIResponse, "write_to_file"
    )


# -- options, entry point, missing pieces ----------------------------------------------------------------------------


def test_runloop_is_built_through_the_entry_point_and_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert "runloop" in provider_kit.installed(), "pip install -e . registers the tardigrade.providers entry point"
    monkeypatch.delenv("RUNLOOP_API_KEY", raising=False)
    with pytest.raises(ProviderUnavailable) as missing:
        build_provider("runloop", tmp_path, worker_id="w")
    message = str(missing.value)
    assert "\n" not in message
    assert "runloop" in message and "tardigrade-temporal[runloop]" in message and "RUNLOOP_API_KEY" in message
    monkeypatch.setenv("RUNLOOP_API_KEY", "rl_not_a_real_key")  # nothing is called until a devbox is made
    provider = build_provider("runloop", tmp_path, worker_id="w")
    assert isinstance(provider, RunloopProvider) and provider.name == "runloop"
    monkeypatch.setitem(sys.modules, "runloop_api_client", None)  # the extra is not installed
    with pytest.raises(ProviderUnavailable) as no_sdk:
        build_provider("runloop", tmp_path, worker_id="w")
    assert "\n" not in str(no_sdk.value) and "tardigrade-temporal[runloop]" in str(no_sdk.value)
    assert "RUNLOOP_API_KEY" in str(no_sdk.value)


def test_pipelines_take_runloop_options_and_refuse_others() -> None:
    def pipeline(options: dict[str, Any]) -> Any:
        sandbox = {"provider": "runloop", "options": options}
        return parse_pipeline({"name": "p", "steps": [{"name": "s", "run": "true"}], "sandbox": sandbox})

    options = {"blueprint": "py312", "resource_size": "MEDIUM", "keep_alive": 7200, "idle_suspend": 300,
               "native_snapshot": True}  # fmt: skip
    assert pipeline(options).sandbox.options == options
    with pytest.raises(PipelineError, match="unknown key 'image' for provider runloop"):
        pipeline({"image": "debian"})
    with pytest.raises(PipelineError, match="keep_alive"):
        pipeline({"keep_alive": 200000})
    with pytest.raises(PipelineError, match="resource_size"):
        pipeline({"resource_size": "HUGE"})


# -- a pipeline on the dev server fails over from local to Runloop ---------------------------------------------------

STEPS = [
    {"name": "venv", "run": "mkdir -p .venv/bin && ln -s /usr/bin/python3 .venv/bin/python && echo 1 >> log.txt"},
    {"name": "lost", "run": "sleep 1.5; echo 2 >> log.txt"},
    {"name": "finish", "run": ".venv/bin/python -c 'print(3)' >> log.txt; stat -c %u log.txt > owner.txt"},
]


async def test_a_run_fails_over_from_local_to_runloop_with_the_same_digest(
    workers: Any, local_store: str, tmp_path: Path
) -> None:
    """The local sandbox is lost in step 2; the run rehydrates on Runloop (fake) and ends with the same files as
    a run that never failed."""
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    from tardigrade.client import start_pipeline
    from tardigrade.sandboxes.bubblewrap import LocalSandboxProvider
    from tardigrade.sandboxes.faults import DestroySandboxDuringStep
    from tests.conftest import fast_timeouts, pipeline_from

    spec = {"name": "to-runloop", "timeouts": fast_timeouts(), "sandbox": {"provider": ["local", "runloop"]},
            "steps": STEPS}  # fmt: skip
    reference = pipeline_from({**spec, "name": "to-runloop-reference", "sandbox": {"provider": "local"}}, tmp_path)
    loaded = pipeline_from(spec, tmp_path)
    cloud, transport, client = fake_runloop(tmp_path / "runloop-cloud")
    destroy = DestroySandboxDuringStep(2, after_seconds=0.3, times=0)  # armed after the reference run
    providers = {
        "local": LocalSandboxProvider(workers.home / "local", worker_id="rl", fault_injector=destroy),
        "runloop": RunloopProvider(workers.home / "runloop", client=client),
    }
    try:
        temporal = await workers.start(providers=providers)
        ref = await (await start_pipeline(temporal, reference, task_queue=workers.task_queue,
                                          store_url=local_store)).result()  # fmt: skip
        destroy.remaining = 1
        handle = await start_pipeline(temporal, loaded, task_queue=workers.task_queue, store_url=local_store)
        result = await asyncio.wait_for(handle.result(), 120)
    finally:
        transport.close()
        cloud.close()
    assert destroy.fired == 1
    assert result.providers == ["local", "runloop"], result.providers
    assert result.rehydrations == 1
    assert result.workspace_digest == ref.workspace_digest, "the same files as a run that never failed"
    assert any(path.endswith("/execute_async") for _, path in transport.requests), "steps ran on the devbox"
    workspace = tmp_path / "final"
    SnapshotEngine(open_store(result.store)).restore(result.final_snapshot or "", workspace)
    assert (workspace / "workspace" / "log.txt").read_text() == "1\n2\n3\n"
    assert (workspace / "workspace" / "owner.txt").read_text() == "1000\n"
