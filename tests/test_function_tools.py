"""Function tools: Python functions registered with the plugin that agent steps call, run on the worker.

Driven by the loopback OpenAI server (tests/fake_openai.py) through the real `openai` client and a real dev server.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, Field

from tardigrade import function_tool
from tardigrade.client import start_pipeline
from tardigrade.function_tools import FunctionToolError, function_tools
from tardigrade.pipeline import PipelineError
from tests.conftest import InProcessWorkers, final_workspace, pipeline_from
from tests.fake_openai import FakeOpenAI, call, fake_openai_server, openai_env_for_workers  # noqa: F401 - fixtures
from tests.history import activity_runs, history_json
from tests.test_agent_steps import agent_pipeline, model_name, run_to_end


class Address(BaseModel):
    city: str
    postcode: str | None = None


CALLS: list[dict[str, Any]] = []


async def lookup_customer(
    customer_id: Annotated[str, Field(description="the CRM id, e.g. C-1042")], include_orders: bool = False
) -> dict[str, Any]:
    """The customer's name and tier, from the CRM."""
    token = os.environ["CRM_TOKEN"]  # the worker's credential: the sandbox never has it
    CALLS.append({"customer_id": customer_id, "pid": os.getpid(), "token": token})
    return {"id": customer_id, "name": "Ada", "tier": "gold", "orders": 3 if include_orders else None}


def geocode(address: Address) -> str:
    """Where an address is (a blocking function: it runs in a thread)."""
    return f"{address.city}: 52.37N 4.90E"


FLAKY: dict[str, int] = {}


def flaky_rates(currency: str) -> str:
    """Exchange rates; fails twice before it answers."""
    FLAKY[currency] = FLAKY.get(currency, 0) + 1
    if FLAKY[currency] < 3:
        raise ConnectionError(f"rates service down (try {FLAKY[currency]})")
    return f"1 {currency} = 1.08 USD"


def always_down(secret_hint: str) -> str:
    """Always fails, with the step's secret in its message."""
    raise RuntimeError(f"backend refused password {os.environ['DB_PASSWORD']}")


# -- registration -------------------------------------------------------------------------------------------------


def test_the_schema_comes_from_the_type_hints_and_the_docstring() -> None:
    schema = function_tool(lookup_customer).schema()
    assert schema["name"] == "lookup_customer"
    assert schema["description"] == "The customer's name and tier, from the CRM."
    params = schema["parameters"]
    assert params["required"] == ["customer_id"]
    assert params["properties"]["customer_id"] == {"type": "string", "description": "the CRM id, e.g. C-1042"}
    assert params["properties"]["include_orders"] == {"type": "boolean", "default": False}
    nested = function_tool(geocode).schema()["parameters"]
    assert nested["properties"]["address"] == {"$ref": "#/$defs/Address"}
    assert set(nested["$defs"]["Address"]["properties"]) == {"city", "postcode"}

    def titled(title: str) -> str:
        return title

    assert "title" in function_tool(titled).schema()["parameters"]["properties"], "a parameter named title stays"


def untyped(x):  # type: ignore[no-untyped-def]
    return x


def star(*values: int) -> int:
    return sum(values)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: function_tool(untyped), "parameter 'x' needs a type hint"),
        (lambda: function_tool(star), "must be an ordinary named parameter"),
        (lambda: function_tool(geocode, name="exec"), "'exec' is a built-in tool's name"),
        (lambda: function_tool(geocode, name="has space"), "a tool name is 1-64 letters"),
        (lambda: function_tool(geocode, timeout=0), "timeout must be > 0"),
        (lambda: function_tools([geocode, function_tool(lookup_customer, name="geocode")]), "two function tools"),
    ],
)
def test_a_bad_registration_is_one_clear_error(make: Any, message: str) -> None:
    with pytest.raises(FunctionToolError, match=message):
        make()


def test_a_pipeline_names_function_tools_and_scripts_them(tmp_path: Path) -> None:
    steps = [{"name": "a", "agent": "go", "tools": ["read_file", "lookup_customer"],
              "model": {"provider": "scripted", "script": [{"lookup_customer": {"customer_id": "C-1"}},
                                                           {"finish": {"summary": "ok"}}]}}]  # fmt: skip
    loaded = pipeline_from({"name": "fn", "steps": steps}, tmp_path)
    assert loaded.pipeline.steps[0].tools == ("read_file", "lookup_customer")
    with pytest.raises(PipelineError, match="tools"):
        pipeline_from({"name": "fn", "steps": [{**steps[0], "tools": ["no spaces allowed"]}]}, tmp_path)


# -- on the worker, from an agent step ------------------------------------------------------------------------------


async def test_an_agent_step_calls_function_tools_on_the_worker_with_retries_and_errors_as_results(
    workers: InProcessWorkers, fake_openai: FakeOpenAI, openai_env: str, local_store: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    token = f"crm-{uuid.uuid4().hex}"
    monkeypatch.setenv("CRM_TOKEN", token)  # the worker's own credential, which only the function uses
    password = f"pw-{uuid.uuid4().hex}"
    monkeypatch.setenv("DB_PASSWORD", password)  # a secret of the step
    currency = f"EUR{uuid.uuid4().hex[:4]}"
    model = model_name("functions")
    fake_openai.script(model, [
        call("lookup_customer", customer_id="C-1042", include_orders=True),
        call("geocode", address={"city": "Amsterdam"}),
        call("flaky_rates", currency=currency),
        call("always_down", secret_hint="x"),
        call("lookup_customer", customer_id=42),  # wrong type: an error result at once, no retry
        call("exec", command='echo "token=[$CRM_TOKEN]" > seen.txt'),
        call("finish", summary="looked the customer up"),
    ])  # fmt: skip
    tools = ["exec", "lookup_customer", "geocode", "flaky_rates", "always_down"]
    loaded = agent_pipeline(
        tmp_path, "functions", {"model": {"name": model}, "tools": tools}, manifest={"secrets": ["DB_PASSWORD"]}
    )
    client, workflow_id, result = await run_to_end(
        workers, loaded, local_store,
        tools=[lookup_customer, geocode, function_tool(flaky_rates, max_attempts=3),
               function_tool(always_down, max_attempts=2)],
    )  # fmt: skip

    assert result.status == "completed", result
    requests = fake_openai.requests_for(model)
    offered = {t["name"]: t for t in requests[0].body["tools"]}
    assert set(offered) == {*tools, "finish"}
    assert offered["lookup_customer"]["parameters"]["properties"]["customer_id"]["description"].startswith("the CRM")
    outputs = requests[-1].tool_outputs()
    assert outputs[0] == '{"id":"C-1042","name":"Ada","tier":"gold","orders":3}'
    assert outputs[1] == "Amsterdam: 52.37N 4.90E"
    assert outputs[2] == f"1 {currency} = 1.08 USD", "retried by its own policy until it answered"
    assert FLAKY[currency] == 3
    assert outputs[3] == "error: RuntimeError: backend refused password *** (after 2 attempts)"
    assert outputs[4].startswith("error: invalid arguments for lookup_customer: customer_id:")
    assert len(CALLS) == 1 and CALLS[0]["pid"] == os.getpid(), "it ran on the worker, not in the sandbox"
    assert CALLS[0]["token"] == token

    workspace = final_workspace(result, tmp_path / "final")
    assert (workspace / "seen.txt").read_text() == "token=[]\n", "the worker's credential never reached the sandbox"
    history = await history_json(client, workflow_id)
    assert token not in history and password not in history, "the failure messages in history are redacted"
    for request in requests:
        assert token not in request.raw and password not in request.raw
    runs = [r for r in await activity_runs(client, workflow_id) if r.name == "tardigrade.function_tool"]
    summaries = [r.summary for r in runs]
    assert "step 1/1 · agent work · function lookup_customer(customer_id=C-1042, include_orders=True)" in summaries
    attempts = {r.summary.split("function ")[1].split("(")[0]: r.attempts for r in runs}
    assert attempts["flaky_rates"] == 3 and attempts["always_down"] == 2 and attempts["geocode"] == 1


async def test_a_tool_no_worker_registered_stops_the_step_naming_it(
    workers: InProcessWorkers, fake_openai: FakeOpenAI, openai_env: str, local_store: str, tmp_path: Path
) -> None:
    model = model_name("unregistered")
    fake_openai.script(model, [call("finish", summary="never")])
    loaded = agent_pipeline(tmp_path, "unregistered", {"model": {"name": model}, "tools": ["lookup_custmer"]})
    client = await workers.start(tools=[lookup_customer])
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    with pytest.raises(Exception) as failure:
        await handle.result()
    text = str(failure.value.__cause__ or failure.value)
    assert "'lookup_custmer'" in text and "did you mean 'lookup_customer'?" in text, text
    assert fake_openai.requests_for(model) == [], "no model call before the tools are known"
