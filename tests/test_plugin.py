"""TardigradePlugin behaves like Temporal's own plugins.

- The public API comes from `tardigrade`, and a pipeline built in Python gets the same validation as a file.
- Data converter: compose, don't clobber. Beside `OpenAIAgentsPlugin` on one client, in either order, a pipeline run
  and an OpenAI-agents workflow (the real `openai` client against the loopback fake model) both complete.
- The workflow sandbox: a single-file worker whose own workflow imports `tardigrade` validates and runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, Runner
from agents.models.openai_provider import OpenAIProvider
from openai import AsyncOpenAI
from pydantic import ValidationError
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import PydanticPayloadConverter, pydantic_data_converter
from temporalio.converter import DataConverter, PayloadCodec
from temporalio.openai_agents import ModelActivityParameters, OpenAIAgentsPlugin, OpenAIPayloadConverter
from temporalio.openai_agents import workflow as agents_workflow
from temporalio.plugin import SimplePlugin
from temporalio.worker import Replayer, Worker

import tardigrade
from tardigrade import (
    Pipeline,
    PipelineError,
    PipelineWorkflow,
    RunInput,
    RunResult,
    RunStatus,
    Step,
    TardigradePlugin,
    start_pipeline,
)
from tardigrade.pipeline import parse_pipeline
from tardigrade.plugin import compose_data_converter, handles_pydantic
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tests.fake_openai import FakeOpenAI, Turn, call, fake_openai_server  # noqa: F401 - the fixture

AGENT_MODEL = "plugin-test-model"


# -- an OpenAI-agents workflow: the agent calls a Temporal activity as a tool, then answers ------------------------


@activity.defn
async def count_letters(word: str) -> int:
    return sum(c.isalpha() for c in word)


@workflow.defn
class LetterCountAgent:
    @workflow.run
    async def run(self, question: str) -> str:
        agent = Agent[None](
            name="Counter",
            instructions="Count letters with the tool, then answer in one sentence.",
            model=AGENT_MODEL,
            tools=[agents_workflow.activity_as_tool(count_letters, start_to_close_timeout=timedelta(seconds=30))],
        )
        result = await Runner.run(agent, question)
        return str(result.final_output)


def openai_plugin(fake: FakeOpenAI) -> OpenAIAgentsPlugin:
    """OpenAIAgentsPlugin with its model activity talking to the loopback fake through the real openai client."""
    client = AsyncOpenAI(base_url=fake.base_url, api_key="test-key", max_retries=0)
    return OpenAIAgentsPlugin(
        model_params=ModelActivityParameters(start_to_close_timeout=timedelta(seconds=30)),
        model_provider=OpenAIProvider(openai_client=client, use_responses=True),
    )


@pytest.fixture
def agent_model(fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")  # no trace export to api.openai.com
    fake_openai.script(
        AGENT_MODEL, [call("count_letters", word="tardigrade"), Turn(text="'tardigrade' has 10 letters.")]
    )
    return fake_openai


def in_order(order: str, tardigrade_plugin: Any, openai: Any) -> list[Any]:
    return [tardigrade_plugin, openai] if order == "tardigrade-first" else [openai, tardigrade_plugin]


ORDERS = ["tardigrade-first", "openai-first"]


# -- public API and pipelines built in Python ---------------------------------------------------------------------


def test_public_api() -> None:
    names = {"TardigradePlugin", "Pipeline", "Step", "load_pipeline", "start_pipeline", "PipelineWorkflow",
             "RunInput", "RunResult", "RunStatus"}  # fmt: skip
    assert names <= set(tardigrade.__all__)
    for name in tardigrade.__all__:
        assert getattr(tardigrade, name) is not None
    assert workflow._Definition.must_from_class(PipelineWorkflow).name == "TardigradePipeline"
    assert {RunInput.__name__, RunResult.__name__, RunStatus.__name__} == {"RunInput", "RunResult", "RunStatus"}


def test_pipeline_in_python_is_validated_like_a_file() -> None:
    data = {"name": "p", "steps": [{"name": "load", "run": "true", "timeout": "5m"}]}
    assert Pipeline(name="p", steps=[Step(name="load", run="true", timeout="5m")]) == parse_pipeline(data)

    mistakes: list[tuple[dict[str, Any], str]] = [
        ({"name": "s", "run": "true", "timeout": "soon"}, "'soon' is not a duration"),
        ({"name": "s"}, "a step needs `run:`"),
        ({"name": "s", "run": "true", "tools": ["read_file"]}, "only apply to agent steps"),
        ({"name": "s", "run": "true", "retries": -1}, "greater than or equal to 0"),
    ]
    for step, message in mistakes:
        with pytest.raises(PipelineError, match=message):
            parse_pipeline({"name": "p", "steps": [step]}, "p.yaml")
        with pytest.raises(ValidationError, match=message):
            Step(**step)
        with pytest.raises(ValueError, match=message):  # either way, a ValueError
            Pipeline(name="p", steps=[step])
    with pytest.raises(ValidationError, match="no step is named 'nope'"):  # rules across fields apply too
        Pipeline(name="p", steps=[Step(name="a", run="true")], outputs=[{"path": "out", "to": "file:///tmp/x/",
                                                                         "after": "nope"}])  # fmt: skip


async def test_python_pipeline_missing_source_says_where_it_looked(temporal_address: str, tmp_path: Path) -> None:
    client = await Client.connect(temporal_address, plugins=[TardigradePlugin(state_dir=tmp_path / "state")])
    pipeline = Pipeline(
        name="sources", manifest={"files": [{"path": "job.py", "source": "scripts/job.py"}]},
        steps=[Step(name="run", run="python3 job.py")],
    )  # fmt: skip
    with pytest.raises(PipelineError) as e:
        await start_pipeline(client, pipeline, task_queue="nowhere", base_dir=tmp_path)
    assert str(e.value) == (
        f"pipeline 'sources': manifest.files[0].source: file 'scripts/job.py' not found (looked for"
        f" {tmp_path / 'scripts' / 'job.py'}); paths are relative to base_dir ({tmp_path}); pass"
        " start_pipeline(..., base_dir=...) to read them from elsewhere"
    )


# -- the data converter ------------------------------------------------------------------------------------------


class Rot13Codec(PayloadCodec):
    """A user's codec: it must survive both plugins."""

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [Payload(metadata={**p.metadata, "rot": b"1"}, data=bytes(reversed(p.data))) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [Payload(metadata={k: v for k, v in p.metadata.items() if k != "rot"}, data=bytes(reversed(p.data)))
                for p in payloads]  # fmt: skip


@pytest.mark.parametrize("order", ORDERS)
async def test_converters_compose_in_either_order(order: str, fake_openai: FakeOpenAI) -> None:
    codec = Rot13Codec()
    plugins = in_order(order, TardigradePlugin(), openai_plugin(fake_openai))
    client = await Client.connect("127.0.0.1:1", lazy=True, data_converter=DataConverter(payload_codec=codec),
                                  plugins=plugins)  # fmt: skip
    converter = client.data_converter
    # OpenAIAgentsPlugin's converter is pydantic's JSON (plus its leniency): it carries Tardigrade's models too.
    assert converter.payload_converter_class is OpenAIPayloadConverter
    assert converter.payload_codec is codec
    await assert_round_trips(converter)


async def assert_round_trips(converter: DataConverter) -> None:
    """Both kinds of payload: Tardigrade's workflow input, and an OpenAI Responses item (an openai pydantic model)."""
    from openai.types.responses import ResponseOutputMessage, ResponseOutputText

    run_input = RunInput(
        pipeline=Pipeline(name="p", steps=[Step(name="s", run="true", timeout="5m", env={"A": "1"})]),
        store="file:///tmp/store", seed_snapshot="abc",
    )  # fmt: skip
    message = ResponseOutputMessage(
        id="msg_1", role="assistant", status="completed", type="message",
        content=[ResponseOutputText(type="output_text", text="hi", annotations=[])],
    )  # fmt: skip
    payloads = await converter.encode([run_input, message])
    assert await converter.decode(payloads, [RunInput, ResponseOutputMessage]) == [run_input, message]


def test_compose_data_converter_rules() -> None:
    # Nothing else on the client: pydantic's payload converter, keeping the user's codec.
    codec = Rot13Codec()
    composed = compose_data_converter(DataConverter(payload_codec=codec))
    assert composed.payload_converter_class is PydanticPayloadConverter and composed.payload_codec is codec
    # A converter that already handles pydantic is kept as it is.
    assert compose_data_converter(pydantic_data_converter) is pydantic_data_converter
    openai_converter = DataConverter(payload_converter_class=OpenAIPayloadConverter)
    assert handles_pydantic(openai_converter)
    assert compose_data_converter(openai_converter) is openai_converter
    # A converter that cannot carry pydantic models is an error saying what to do, never silently replaced.
    from temporalio.converter import CompositePayloadConverter, JSONPlainPayloadConverter

    class PlainJSON(CompositePayloadConverter):
        def __init__(self) -> None:
            super().__init__(JSONPlainPayloadConverter())

    with pytest.raises(ValueError, match=r"PlainJSON\) does not\. Build it on"):
        compose_data_converter(DataConverter(payload_converter_class=PlainJSON))
    # A later plugin that would replace ours with a converter that cannot carry pydantic models is named.
    clobber = SimplePlugin("clobber", data_converter=DataConverter(payload_converter_class=PlainJSON))
    with pytest.raises(ValueError, match=r"clobber \(after TardigradePlugin"):
        compose_data_converter(None, [clobber])


# -- both plugins on one client and worker, both kinds of workflow ------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
async def test_pipeline_and_openai_agent_on_one_worker(
    order: str,
    temporal_address: str,
    tardigrade_home: Path,
    local_store: str,
    agent_model: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A pipeline built in Python; its relative `source:` is read from the current directory.
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "greeting.txt").write_text("hello from python\n")
    monkeypatch.chdir(project)
    pipeline = Pipeline(
        name="built-in-python",
        manifest={"files": [{"path": "greeting.txt", "source": "data/greeting.txt"}]},
        steps=[
            Step(name="shout", run="tr a-z A-Z < greeting.txt > shout.txt"),
            Step(name="count", run="wc -c < shout.txt > count.txt", timeout="1m"),
        ],
    )

    plugins = in_order(order, TardigradePlugin(state_dir=tardigrade_home / "w"), openai_plugin(agent_model))
    client = await Client.connect(temporal_address, plugins=plugins)
    assert client.data_converter.payload_converter_class is OpenAIPayloadConverter
    queue = f"plugins-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[LetterCountAgent], activities=[count_letters]):
        run = await start_pipeline(client, pipeline, task_queue=queue, store_url=local_store)
        agent = await client.start_workflow(
            LetterCountAgent.run, "How many letters has 'tardigrade'?", id=f"agent-{uuid.uuid4().hex[:8]}",
            task_queue=queue, execution_timeout=timedelta(seconds=60),
        )  # fmt: skip
        answer = await agent.result()
        result: RunResult = await run.result()
        status: RunStatus = await run.query(PipelineWorkflow.status)
        histories = [await agent.fetch_history(), await run.fetch_history()]

    assert answer == "'tardigrade' has 10 letters."
    tool_results = [r.tool_outputs() for r in agent_model.requests_for(AGENT_MODEL) if r.tool_outputs()]
    assert tool_results and tool_results[-1] == ["10"]  # the activity ran in Temporal; its result reached the model
    assert activity_types(histories[0]) >= {"invoke_model_activity", "count_letters"}

    assert isinstance(result, RunResult) and result.status == "completed"
    assert (result.steps_completed, result.rehydrations) == (2, 0)
    assert isinstance(status, RunStatus) and status.steps_completed == 2
    restored = tmp_path / "restored"
    engine = SnapshotEngine(open_store(local_store))
    assert result.final_snapshot is not None
    engine.restore(result.final_snapshot, restored)
    engine.store.close()
    workspace = next(restored.rglob("shout.txt")).parent
    assert (workspace / "shout.txt").read_text() == "HELLO FROM PYTHON\n"
    assert (workspace / "count.txt").read_text().strip() == "18"

    # Both histories replay, deterministically, with both plugins. A Replayer does not tell plugins about each
    # other, so OpenAIAgentsPlugin goes first there (see TardigradePlugin.configure_replayer).
    replayer = Replayer(
        workflows=[LetterCountAgent],
        plugins=[openai_plugin(agent_model), TardigradePlugin(state_dir=tardigrade_home / "replay")],
    )
    for history in histories:
        replayed = await replayer.replay_workflow(history)
        assert replayed.replay_failure is None, history.workflow_id


def activity_types(history: WorkflowHistory) -> set[str]:
    return {
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    }


# -- a single-file worker: its own workflow imports tardigrade --------------------------------------------------

SINGLE_FILE_APP = '''
"""One file: a workflow of the app's own that uses Tardigrade's models, a worker, and a pipeline run."""

import asyncio
import json
import os
import sys
import uuid

from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

import tardigrade.plugin
from tardigrade import Pipeline, Step, TardigradePlugin, start_pipeline


@workflow.defn
class PlanPipeline:
    """Plans a pipeline inside the workflow sandbox, with Tardigrade's own models."""

    @workflow.run
    async def run(self, name: str) -> dict:
        plan = Pipeline(name=name, steps=[Step(name="hello", run="echo hello > hello.txt", timeout="2m")])
        return {"name": plan.name, "timeout": plan.steps[0].timeout}


async def main(address: str, queue: str, store: str) -> None:
    if os.environ.get("NO_PASSTHROUGH"):  # the test's control: what happens without the plugin's passthrough
        tardigrade.plugin._passthrough_modules = lambda: ()
    # The strictest import policy Temporal has: every module a workflow file imports must be passed through on
    # purpose (the standard library and temporalio are; tardigrade is, by the plugin) or it fails validation.
    strict = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_import_notification_policy(
            workflow.SandboxImportNotificationPolicy.RAISE_ON_UNINTENTIONAL_PASSTHROUGH
        )
    )
    client = await Client.connect(address, plugins=[TardigradePlugin()])
    async with Worker(client, task_queue=queue, workflows=[PlanPipeline], workflow_runner=strict):
        plan = await client.execute_workflow(PlanPipeline.run, "planned", id=str(uuid.uuid4()), task_queue=queue)
        handle = await start_pipeline(client, Pipeline(**{"name": plan["name"], "steps": [
            {"name": "hello", "run": "echo hello > hello.txt", "timeout": plan["timeout"]}]}),
            task_queue=queue, store_url=store)
        result = await handle.result()
    print(json.dumps({"plan": plan, "status": result.status, "steps": result.steps_completed}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
'''


def run_app(app: Path, address: str, store: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, str(app), address, f"app-{uuid.uuid4().hex[:8]}", store],
        capture_output=True, text=True, timeout=180, cwd=app.parent,
        env={**os.environ, "TARDIGRADE_HOME": str(home), **env},
    )  # fmt: skip


def test_single_file_worker_validates_and_runs(
    temporal_address: str, tardigrade_home: Path, local_store: str, tmp_path: Path
) -> None:
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(SINGLE_FILE_APP))

    done = run_app(app, temporal_address, local_store, tardigrade_home)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "plan": {"name": "planned", "timeout": 120.0}, "status": "completed", "steps": 1,
    }  # fmt: skip

    # The control: without the plugin's passthrough, the same file fails validation at `import tardigrade`.
    done = run_app(app, temporal_address, local_store, tardigrade_home, NO_PASSTHROUGH="1")
    assert done.returncode != 0
    assert "Failed validating workflow PlanPipeline" in done.stderr
    assert re.search(r"Module tardigrade[.\w]* was not intentionally passed through", done.stderr), done.stderr[-3000:]
