"""The JSON Schema of pipeline files (`tardigrade schema`), generated from the pydantic models.

It is what editors and the TypeScript client check files against, so: it is valid draft-07, the copy the
TypeScript package ships is current, every example pipeline fits it, and it agrees with the models on a corpus of
good and bad pipelines - with the few rules only the models can check listed, and refused by the workflow at once
(not by a workflow task retried forever) when a client in another language sends them anyway.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from tardigrade.client import stage_pipeline
from tardigrade.pipeline import PipelineError, load_pipeline, parse_pipeline
from tardigrade.schema import pipeline_schema, schema_json
from tardigrade.workflows.state import CheckpointRecord, RunResult, RunStatus
from tests.conftest import EXAMPLE, REPO, InProcessWorkers

CHECKED_IN = REPO / "clients" / "typescript" / "schema" / "pipeline.schema.json"


def validator(definition: str | None = None) -> jsonschema.Draft7Validator:
    """A validator for the whole schema (a pipeline file) or one of its ``$defs`` (whose ``#`` is the schema)."""
    schema = pipeline_schema()
    if definition is None:
        return jsonschema.Draft7Validator(schema)
    registry: Registry[Any] = Registry().with_resource("urn:tardigrade", Resource.from_contents(schema, DRAFT7))
    return jsonschema.Draft7Validator({"$ref": f"urn:tardigrade#/$defs/{definition}"}, registry=registry)


def schema_accepts(data: Any) -> bool:
    return validator().is_valid(data)


def models_accept(data: Any) -> bool:
    try:
        parse_pipeline(data)
    except PipelineError:
        return False
    return True


def test_the_schema_is_draft_07_with_descriptions_and_the_typescript_copy_is_current() -> None:
    schema = pipeline_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["title"] == "Pipeline" and schema["description"].startswith("A Tardigrade pipeline")
    assert "Shown in status" in schema["$defs"]["Step"]["properties"]["name"]["description"]
    assert {"RunInput", "RunStatus", "RunResult"} <= set(schema["$defs"])
    assert not re.search(r'"(prefixItems|unevaluatedProperties|dependentRequired|\$dynamicRef)"', schema_json())
    assert CHECKED_IN.read_text() == schema_json(), (
        f"{CHECKED_IN} is stale: run `npm run generate` in clients/typescript (it also regenerates the TypeScript"
        " types) and commit the result"
    )


def _readme_pipelines() -> list[Any]:
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [data for data in map(yaml.safe_load, blocks) if isinstance(data, dict) and {"name", "steps"} <= set(data)]


def test_every_example_pipeline_validates_against_the_schema() -> None:
    examples = sorted((REPO / "examples").glob("*.yaml")) + sorted((REPO / "clients/typescript/test").rglob("*.yaml"))
    assert EXAMPLE in examples
    for path in examples:
        data = yaml.safe_load(path.read_text())
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator().iter_errors(data)]
        assert not errors, f"{path}: {errors}"
        load_pipeline(path)
    readme = _readme_pipelines()
    assert readme, "the README's pipeline reference is a YAML block with name and steps"
    for data in readme:
        assert schema_accepts(data), list(validator().iter_errors(data))


def step(**fields: Any) -> dict[str, Any]:
    return {"name": "p", "steps": [{"name": "s", **fields}]}


def pipeline(**fields: Any) -> dict[str, Any]:
    return {"name": "p", "steps": [{"name": "s", "run": "true"}], **fields}


SCRIPTED = {"provider": "scripted", "script": [{"exec": {"command": "ls"}}, {"finish": {"summary": "done"}}]}

BOTH_ACCEPT = [
    step(run="true", timeout="1h30m", retry_backoff=2),
    step(run="true", timeout=90, cwd="~/work", checkpoint=False, env={"MODE": "full"}),
    pipeline(checkpoint="end_only"),
    pipeline(checkpoint="every_step"),
    pipeline(checkpoint={"every": 5}),
    pipeline(sandbox={"provider": ["local", "e2b"], "network": True, "isolation": "preferred"}),
    pipeline(timeouts={"heartbeat": "2s", "host_pickup": 4}),
    pipeline(manifest={"files": [{"path": "bin/a.py", "source": "a.py", "executable": True}], "directories": ["~/x"]}),
    pipeline(manifest={"env": {"LC_ALL": "C"}, "secrets": ["API_TOKEN"], "setup": ["true"]}),
    pipeline(manifest={"mounts": [{"source": "s3://bucket/prefix", "path": "data", "include": ["*.csv"]}]}),
    pipeline(outputs=[{"path": "out", "to": "s3://bucket/{run}/{step}", "after": "each_step"}]),
    step(agent="do it", model={"name": "gpt-4.1-mini", "base_url": "http://127.0.0.1:8000/v1"}),
    step(agent="do it", model=SCRIPTED, checkpoint="every_tool_call", tools=["exec", "read_file"]),
    step(agent="do it", model={**SCRIPTED, "script": [[{"read_file": {"path": "a"}}, {"say": "hm"}], {"say": "ok"}]}),
    step(agent="do it", model=SCRIPTED, done="finish", max_turns=5, max_output_tokens=100),
]

BOTH_REFUSE = [
    step(run="true", timeout="soon"),
    step(run="true", timeout=0),
    step(run="true", tiemout="5m"),
    step(),
    step(agent="do it"),
    step(run="true", agent="do it", model={"name": "m"}),
    step(run="true", tools=["exec"]),
    step(run="true", max_turns=3),
    step(run="true", checkpoint="every_tool_call"),
    step(run="true", cwd="/etc"),
    step(agent="do it", model={"provider": "openai"}),
    step(agent="do it", model={"provider": "scripted"}),
    step(agent="do it", model={"name": "m", "base_url": "ftp://x"}),
    step(agent="do it", model={**SCRIPTED, "script": [{"exec": {}}]}),
    step(agent="do it", model={**SCRIPTED, "script": [{"bogus": {}}]}),
    step(agent="do it", model={**SCRIPTED, "script": [{"exec": {"command": "ls"}, "say": "two keys"}]}),
    step(agent="do it", model={"name": "m"}, tools=["exec", "exec"]),
    {"steps": [{"name": "s", "run": "true"}]},
    {"name": "p", "steps": []},
    pipeline(sandbox={"provider": "docker"}),
    pipeline(sandbox={"provider": ["local", "local"]}),
    pipeline(checkpoint="sometimes"),
    pipeline(checkpoint={"every": 0}),
    pipeline(manifest={"env": {"HOME": "/x"}}),
    pipeline(manifest={"env": {"1A": "x"}}),
    pipeline(manifest={"secrets": ["not-a-name"]}),
    pipeline(manifest={"files": [{"path": "/etc/x", "content": "y"}]}),
    pipeline(manifest={"files": [{"path": "a"}]}),
    pipeline(manifest={"files": [{"path": "a", "content": "x", "source": "a.py"}]}),
    pipeline(manifest={"directories": ["/usr/x"]}),
    pipeline(manifest={"snapshot": {"include": []}}),
    pipeline(manifest={"mounts": [{"source": "http://host/x", "path": "data"}]}),
    pipeline(manifest={"mounts": [{"source": "s3://key:secret@bucket/x", "path": "data"}]}),
    pipeline(outputs=[{"path": "out", "to": "ftp://host/x"}]),
    pipeline(outputs=[{"path": "/etc", "to": "s3://bucket/x"}]),
]

# What only the models check (cross-references, normalized paths): the TypeScript client lets these through, and
# the workflow refuses them at once, naming the field (test_input_the_models_refuse_fails_the_run_at_once).
ONLY_THE_MODELS_REFUSE = [
    pipeline(outputs=[{"path": "out", "to": "s3://bucket/x", "after": "no such step"}]),
    pipeline(manifest={"env": {"TOKEN": "x"}, "secrets": ["TOKEN"]}),
    pipeline(manifest={"files": [{"path": "a", "content": "x"}, {"path": "a", "content": "y"}]}),
    pipeline(manifest={"files": [{"path": "/workspace/../etc/x", "content": "y"}]}),
    pipeline(manifest={"mounts": [{"source": "s3://bucket/x", "path": "/etc/data"}]}),
    step(agent="do it", model={**SCRIPTED, "script": [{"apply_patch": {"patch": "x"}}]}),  # not one of its tools
    step(run="true", timeout="0s"),
]


@pytest.mark.parametrize("data", BOTH_ACCEPT, ids=lambda d: json.dumps(d)[:80])
def test_schema_and_models_accept_the_same_good_pipelines(data: dict[str, Any]) -> None:
    assert models_accept(data)
    assert schema_accepts(data), [e.message for e in validator().iter_errors(data)]


@pytest.mark.parametrize("data", BOTH_REFUSE, ids=lambda d: json.dumps(d)[:80])
def test_schema_and_models_refuse_the_same_mistakes(data: dict[str, Any]) -> None:
    assert not models_accept(data)
    assert not schema_accepts(data)


@pytest.mark.parametrize("data", ONLY_THE_MODELS_REFUSE, ids=lambda d: json.dumps(d)[:80])
def test_what_only_the_models_check(data: dict[str, Any]) -> None:
    assert not models_accept(data)
    assert schema_accepts(data), "the schema checks this now: move it to BOTH_REFUSE"


def test_the_messages_fit_their_definitions(tmp_path: Path) -> None:
    result = RunResult(workflow_id="w", pipeline="p", status="completed", steps_total=1, steps_completed=1,
                       step_runs=1, rehydrations=0, final_snapshot="s", workspace_digest="d", seed_snapshot=None,
                       store="file:///s", checkpoints=[CheckpointRecord(step=0, snapshot_id="s")])  # fmt: skip
    status = RunStatus(workflow_id="w", pipeline="p", phase="running", current_step=1, current_step_name="s",
                       steps_total=1, steps_completed=0, rehydrations=0, sandbox=None, last_snapshot=None,
                       checkpoints=[])  # fmt: skip
    assert validator("RunResult").is_valid(result.model_dump(mode="json"))
    assert validator("RunStatus").is_valid(status.model_dump(mode="json"))
    # Every field is required for readers, who fill in what a converter left out at its default.
    lean = result.model_dump(mode="json", exclude_defaults=True)
    assert not validator("RunResult").is_valid(lean)
    properties = pipeline_schema()["$defs"]["RunResult"]["properties"]
    defaults = {name: p["default"] for name, p in properties.items() if "default" in p}
    assert RunResult.model_validate({**defaults, **lean}) == result
    staged = stage_pipeline(load_pipeline(EXAMPLE), (tmp_path / "store").as_uri())
    assert staged.seed_snapshot is not None
    assert validator("RunInput").is_valid(staged.model_dump(mode="json"))


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tardigrade.cli", *args], input=stdin, capture_output=True, text=True)


def test_tardigrade_schema_and_stage(tmp_path: Path) -> None:
    printed = cli("schema")
    assert printed.returncode == 0 and printed.stdout == schema_json()
    store = (tmp_path / "store").as_uri()

    from_file = cli("stage", str(EXAMPLE), "--store", store)
    assert from_file.returncode == 0, from_file.stderr
    run_input = json.loads(from_file.stdout)
    assert run_input["seed_snapshot"] and run_input["store"] == store
    assert run_input["pipeline"]["manifest"]["files"] == []  # staged: the workflow input carries no file contents

    text = json.dumps(yaml.safe_load(EXAMPLE.read_text()))
    from_stdin = cli("stage", "-", "--store", store, "--base-dir", str(EXAMPLE.parent), stdin=text)
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert json.loads(from_stdin.stdout)["pipeline"] == run_input["pipeline"]

    bad = cli("stage", "-", "--store", store, "--name", "mine.yaml", stdin="name: p\nsteps: [{name: s}]")
    assert bad.returncode == 2
    assert "mine.yaml: steps[0]: a step needs `run:`" in bad.stderr


async def test_input_the_models_refuse_fails_the_run_at_once(workers: InProcessWorkers) -> None:
    """A client in another language sends what its schema check let through; the run fails at once, naming the
    field, instead of its first workflow task failing (and being retried) forever."""
    client = await workers.start()
    data = {"pipeline": ONLY_THE_MODELS_REFUSE[0], "store": "file:///nowhere", "seed_snapshot": None}
    handle = await client.start_workflow(
        "TardigradePipeline", data, id=f"bad-input-{uuid.uuid4().hex[:8]}", task_queue=workers.task_queue
    )
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "InvalidRunInput" and cause.non_retryable
    assert "workflow input: pipeline: outputs[0].after: no step is named 'no such step'" in cause.message
