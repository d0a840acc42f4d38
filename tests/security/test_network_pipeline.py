"""Sandbox networking through the whole product: a pipeline file, the worker's policy, a real Temporal run."""

from __future__ import annotations

from pathlib import Path

from tardigrade.client import start_pipeline
from tardigrade.sandboxes.network.policy import NetworkPolicy
from tardigrade.sandboxes.policy import WorkerPolicy
from tests.conftest import pipeline_from
from tests.security.test_network import AllowedHost, http_host  # noqa: F401 - a fixture
from tests.security.test_policy import PolicyWorker, pipeline, policy_worker, refused_before_any_step  # noqa: F401


async def test_an_allowlisted_pipeline_reaches_its_host_and_nothing_else(
    policy_worker: PolicyWorker,  # noqa: F811
    http_host: int,  # noqa: F811
    tmp_path: Path,
    temporal_address: str,
) -> None:
    policy = WorkerPolicy(
        file_roots=[str(tmp_path / "store")], network=NetworkPolicy(reachable=[f"127.0.0.1:{http_host}"])
    )
    client = await policy_worker.start(policy)
    temporal_port = temporal_address.rpartition(":")[2]
    curl = "curl -sS -m 10 --noproxy ''"
    loaded = pipeline_from(
        pipeline(
            tmp_path,
            sandbox={"network": {"allow": ["localhost"]}},
            steps=[
                {"name": "fetch", "run": f"{curl} http://localhost:{http_host}/data > got.txt"},
                {"name": "check", "run": "grep -q 'hello from the test host' got.txt"},
                {"name": "temporal", "run": f"! {curl} -p http://localhost:{temporal_port}/ 2> refused.txt"},
                {"name": "why", "run": "grep -q 403 refused.txt"},
            ],
        ),
        tmp_path,
    )
    store = (tmp_path / "store").as_uri()
    handle = await start_pipeline(client, loaded, task_queue=policy_worker.task_queue, store_url=store)
    result = await handle.result()
    assert result.status == "completed", result
    assert AllowedHost.requests == ["/data"]


async def test_a_network_mode_the_policy_does_not_allow_fails_before_any_step(
    policy_worker: PolicyWorker,  # noqa: F811
    tmp_path: Path,
    local_store: str,
) -> None:
    client = await policy_worker.start(WorkerPolicy(network=NetworkPolicy(modes=["off", "allow"])))
    loaded = pipeline_from(pipeline(tmp_path, sandbox={"network": True}), tmp_path)
    handle = await start_pipeline(client, loaded, task_queue=policy_worker.task_queue, store_url=local_store)
    cause = await refused_before_any_step(client, handle)
    assert cause.message.startswith("sandbox.network: asks for network mode 'internet' (allowed: off, allow)")
    assert "(network.modes)" in cause.message and cause.message.count("\n") == 0
