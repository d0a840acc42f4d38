"""Agent steps end to end: a real Temporal dev server, real bubblewrap sandboxes, the real `openai` client talking
to a loopback OpenAI-compatible server (tests/fake_openai.py), and crashes of the sandbox and of the worker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import zstandard
from temporalio.client import Client, WorkflowFailureError

from tardigrade.activities.contract import TokenUsage
from tardigrade.activities.model_calls import NUDGE
from tardigrade.activities.patch import PatchError, apply_hunks, parse_patch
from tardigrade.client import connect, start_pipeline
from tardigrade.pipeline import LoadedPipeline, PipelineError, parse_pipeline
from tardigrade.sandboxes.faults import DestroySandboxDuringStep
from tardigrade.sandboxes.stores import open_store
from tardigrade.workflows.pipeline import PipelineWorkflow
from tardigrade.workflows.state import RunResult, RunStatus
from tests.conftest import InProcessWorkers, WorkerProcess, fast_timeouts, final_workspace, pipeline_from, wait_for
from tests.fake_openai import FakeOpenAI, Turn, call, calls, fake_openai_server, openai_env_for_workers  # noqa: F401 - fixtures
from tests.history import activity_runs, history_json

TASK = "Count the data rows of data/input.csv and write the number to out/result.txt."


def model_name(kind: str) -> str:
    return f"fake-{kind}-{uuid.uuid4().hex[:8]}"


def agent_pipeline(
    tmp_path: Path, name: str, agent: dict[str, Any], *, manifest: dict[str, Any] | None = None,
    before: list[dict[str, Any]] | None = None,
) -> LoadedPipeline:  # fmt: skip
    steps = [*(before or []), {"name": "agent work", "agent": TASK, **agent}]
    return pipeline_from(
        {"name": name, "timeouts": fast_timeouts(), "manifest": manifest or {}, "steps": steps}, tmp_path
    )


async def run_to_end(
    workers: InProcessWorkers, loaded: LoadedPipeline, store: str, **start: Any
) -> tuple[Client, str, RunResult]:
    client = await workers.start(**start)
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=store)
    return client, handle.id, await asyncio.wait_for(handle.result(), 90)


def names(runs: list[Any], name: str, turn: int | None = None) -> list[Any]:
    return [r for r in runs if r.name == name and (turn is None or r.input.get("turn") == turn)]


# -- the pipeline file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"agent": "do it"}, "steps[0]: an agent step needs `model:`"),
        ({"agent": "do it", "model": {"api": "responses"}}, "steps[0].model: name is required for provider openai"),
        ({"agent": "do it", "model": {"name": "m", "temprature": 0}}, "steps[0].model.temprature: unknown key"),
        ({"agent": "do it", "model": {"name": "m"}, "tools": ["exec", "a b"]}, "tools[1]: 'a b' is neither"),
        ({"agent": "do it", "model": {"name": "m"}, "tools": ["exec", "exec"]}, "tools: exec listed more than once"),
        ({"agent": "do it", "run": "true", "model": {"name": "m"}}, "either `run:` (a shell command) or `agent:`"),
        ({"run": "true", "tools": ["exec"]}, "steps[0]: tools only apply to agent steps"),
        ({"run": "true", "checkpoint": "every_tool_call"}, "every_tool_call only applies to agent steps"),
        ({"agent": "x", "model": {"provider": "scripted"}}, "provider scripted needs a `script:`"),
        (
            {"agent": "x", "model": {"provider": "scripted", "script": [{"apply_patch": {"patch": "p"}}]}},
            "steps[0]: model.script[0].apply_patch: not one of this step's tools",
        ),
        (
            {"agent": "x", "model": {"provider": "scripted", "script": [{"exec": {"cmd": "ls"}}]}},
            "model.script[0].exec: command: Field required",
        ),
        (
            {
                "agent": "x",
                "done": "no_tool_calls",
                "model": {"provider": "scripted", "script": [{"finish": {"summary": "s"}}]},
            },
            "done: no_tool_calls offers no finish tool",
        ),
        (
            {"agent": "x", "model": {"provider": "scripted", "script": ["ls"]}},
            "steps[0].model.script[0]: 'ls' is not a turn",
        ),
        ({"agent": "x", "model": {"name": "m", "base_url": "http://user:pw@host/v1"}}, "must not contain credentials"),
    ],
)
def test_a_bad_agent_block_is_one_clear_error_naming_the_field(step: dict[str, Any], message: str) -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline({"name": "p", "steps": [{"name": "s", **step}]}, "p.yaml")
    assert message in str(info.value)


def test_apply_patch_format() -> None:
    patch = "*** Begin Patch\n*** Update File: a.py\n@@ def f():\n-    return 1\n+    return 2\n*** End Patch"
    [change] = parse_patch(patch)
    assert apply_hunks("a.py", "x = 0\ndef f():\n    return 1\n", change.hunks) == "x = 0\ndef f():\n    return 2\n"
    with pytest.raises(PatchError, match="hunk 1 does not match"):
        apply_hunks("a.py", "def f():\n    return 3\n", change.hunks)
    with pytest.raises(PatchError, match="starts with the line"):
        parse_patch("--- a/x\n+++ b/x")


# -- talking to a model ---------------------------------------------------------------------------------------


async def test_agent_step_over_the_responses_api(
    workers: InProcessWorkers, fake_openai: FakeOpenAI, openai_env: str, local_store: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    model = model_name("responses")
    secret = f"sk-live-{uuid.uuid4().hex}"
    marker = f"FILE-CONTENT-{uuid.uuid4().hex}"
    monkeypatch.setenv("DEMO_TOKEN", secret)
    fake_openai.script(model, [
        calls(("read_file", {"path": "data/input.csv"}), ("list_files", {"path": "data"})),  # read-only: parallel
        call("exec", command="echo broken input; exit 3"),  # a failing command goes back to the model
        call("read_file", path="missing.txt"),  # so does a missing file
        call("exec", command="sleep 5", timeout_seconds=0.5),  # and a command that times out
        call("exec", command='echo "token=$DEMO_TOKEN"; echo ran >> log.txt'),
        call("write_file", path="out/result.txt", content="3\n"),
        Turn(text="The file is written."),  # no tool call and no finish: the next turn carries a reminder
        Turn(calls=[("finish", {"summary": "wrote out/result.txt"})], text="Done."),
    ])  # fmt: skip
    loaded = agent_pipeline(
        tmp_path, "responses", {"model": {"name": model}},
        manifest={"files": [{"path": "data/input.csv", "content": f"id,name\n1,{marker}\n2,b\n3,c\n"}],
                  "secrets": ["DEMO_TOKEN"]},
        before=[{"name": "prepare", "run": "echo ready > ready.txt"}],
    )  # fmt: skip
    client, workflow_id, result = await run_to_end(workers, loaded, local_store)

    assert result.status == "completed" and result.steps_completed == 2
    requests = fake_openai.requests_for(model)
    assert [r.path for r in requests] == ["/v1/responses"] * 8
    for request in requests:
        assert request.user_messages()[0] == TASK, "the step's instructions are the task"
        assert "/workspace" in request.instructions() and "`finish`" in request.instructions()
        assert {t["name"] for t in request.body["tools"]} == {"exec", "read_file", "write_file", "list_files", "finish"}
        assert request.headers["authorization"] == f"Bearer {openai_env}", "the worker's key, in the header only"
        assert openai_env not in request.raw and secret not in request.raw, "no secret in what the model sees"
    results = requests[-1].tool_outputs()
    assert len(results) == 7
    assert marker in results[0], "read_file returned the file"
    assert results[1] == "/workspace/data:\ninput.csv  (64 bytes)", "list_files listed the folder"
    assert results[2] == "exit code 3\nbroken input\n", "a failing command is a result, not a failure"
    assert results[3] == "error: no such file: missing.txt"
    assert results[4] == "timed out after 0.5 s and was killed"
    assert results[5] == "exit code 0\ntoken=***\n", "secrets are masked before the model sees output"
    assert results[6] == "wrote 2 bytes to /workspace/out/result.txt"
    assert requests[-2].user_messages() == [TASK]
    assert requests[-1].user_messages() == [TASK, NUDGE], "a reply without a tool call gets a reminder"

    assert result.usage == TokenUsage(input_tokens=800, output_tokens=80, model_calls=8)
    [report] = result.agents
    assert (report.step, report.turns, report.tool_calls, report.finished) == (1, 8, 7, True)
    assert report.summary == "wrote out/result.txt" and report.usage == result.usage
    workspace = final_workspace(result, tmp_path / "final")
    assert (workspace / "out" / "result.txt").read_text() == "3\n"
    assert (workspace / "log.txt").read_text() == "ran\n" and (workspace / "ready.txt").exists()

    history = await history_json(client, workflow_id)
    assert secret not in history and openai_env not in history
    assert marker not in history, "file contents travel through the store, not history"
    runs = await activity_runs(client, workflow_id)
    summaries = [r.summary for r in runs if r.name in ("tardigrade.model_call", "tardigrade.agent_tool")]
    assert summaries[:4] == [
        "step 2/2 · agent work · model turn 1",
        "step 2/2 · agent work · tool read_file: data/input.csv",
        "step 2/2 · agent work · tool list_files: data",
        "step 2/2 · agent work · model turn 2",
    ]
    assert "step 2/2 · agent work · tool exec: echo broken input; exit 3" in summaries
    # The two read-only calls of turn 1 were scheduled together, before either finished: in parallel.
    scheduled = await scheduled_tool_batches(client, workflow_id)
    assert scheduled[0] == 2 and all(n == 1 for n in scheduled[1:])


async def scheduled_tool_batches(client: Client, workflow_id: str) -> list[int]:
    """How many tool activities each workflow task scheduled, in order."""
    batches: dict[int, int] = {}
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.HasField("activity_task_scheduled_event_attributes"):
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name == "tardigrade.agent_tool":
                task = attrs.workflow_task_completed_event_id
                batches[task] = batches.get(task, 0) + 1
    return [batches[k] for k in sorted(batches)]


async def test_agent_step_over_chat_completions_ending_without_tool_calls(
    workers: InProcessWorkers, fake_openai: FakeOpenAI, openai_env: str, local_store: str, tmp_path: Path
) -> None:
    model = model_name("chat")
    fake_openai.script(model, [
        call("exec", command="printf 'a\\nb\\n' > notes.txt && wc -l < notes.txt"),
        calls(("read_file", {"path": "notes.txt"}), ("browse", {"url": "https://example.com"})),
        Turn(text="Wrote notes.txt with two lines."),
    ])  # fmt: skip
    loaded = agent_pipeline(
        tmp_path, "chat", {"model": {"name": model, "api": "chat_completions"}, "done": "no_tool_calls",
                           "tools": ["exec", "read_file"]},
    )  # fmt: skip
    _, _, result = await run_to_end(workers, loaded, local_store)

    requests = fake_openai.requests_for(model)
    assert [r.path for r in requests] == ["/v1/chat/completions"] * 3
    last = requests[-1].body["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool", "assistant", "tool", "tool"]
    assert "reply with a short summary" in last[0]["content"]
    assert last[2]["tool_calls"][0]["function"]["name"] == "exec"
    assert last[3] == {"role": "tool", "tool_call_id": "call_1_1", "content": "exit code 0\n2\n"}
    assert last[5]["content"] == "a\nb\n"
    assert last[6]["content"] == "error: there is no tool 'browse' in this step; the tools are: exec, read_file"
    assert {t["function"]["name"] for t in requests[0].body["tools"]} == {"exec", "read_file"}, "no finish tool"
    assert result.agents[0].summary == "Wrote notes.txt with two lines." and result.agents[0].finished
    assert (final_workspace(result, tmp_path / "final") / "notes.txt").read_text() == "a\nb\n"


async def test_five_megabytes_of_tool_output_are_cut_for_the_model_and_kept_whole_in_the_store(
    workers: InProcessWorkers, fake_openai: FakeOpenAI, openai_env: str, local_store: str, tmp_path: Path
) -> None:
    model = model_name("big")
    fake_openai.script(model, [call("exec", command="seq 1 800000"), call("finish", summary="looked at it")])
    loaded = agent_pipeline(tmp_path, "big-output", {"model": {"name": model}})
    client, workflow_id, result = await run_to_end(workers, loaded, local_store)

    assert result.status == "completed"
    expected = "".join(f"{i}\n" for i in range(1, 800001)).encode()
    assert len(expected) > 5_000_000
    [request] = fake_openai.requests_for(model)[1:]
    [seen] = request.tool_outputs()
    assert len(seen) < 20_000, "the model sees a bounded excerpt"
    assert seen.startswith("exit code 0\n1\n2\n3\n") and seen.endswith("799999\n800000\n")
    log_key = seen.split("kept in the snapshot store as ")[1].split(".zst")[0] + ".zst"
    stored = open_store(local_store).get(log_key)
    assert zstandard.ZstdDecompressor().decompress(stored, max_output_size=1 << 24) == expected
    history = await history_json(client, workflow_id)
    assert len(history) < 150_000 and "\n400000\n" not in history


async def test_429_retry_after_is_honoured(
    workers: InProcessWorkers, fake_openai: FakeOpenAI, openai_env: str, local_store: str, tmp_path: Path
) -> None:
    model = model_name("limited")
    fake_openai.script(model, [call("finish", summary="ok")])
    fake_openai.fail(model, 429, message="Rate limit reached; try again in 2.5s", headers={"retry-after": "2.5"})
    loaded = agent_pipeline(tmp_path, "rate-limited", {"model": {"name": model}})
    client, workflow_id, result = await run_to_end(workers, loaded, local_store)

    assert result.status == "completed"
    first, second = fake_openai.requests_for(model)
    delay = second.at - first.at
    print(f"429 retry-after 2.5 s: the retry came {delay:.2f} s later")
    assert 2.5 <= delay < 4.5, "waited as long as the server asked (the default backoff would be 1 s)"
    attempts = names(await activity_runs(client, workflow_id), "tardigrade.model_call")
    assert len(attempts) == 1, "one activity, retried by Temporal (not by the openai client)"


async def test_400_fails_the_step_with_the_endpoints_message(
    workers: InProcessWorkers, fake_openai: FakeOpenAI, openai_env: str, local_store: str, tmp_path: Path
) -> None:
    model = model_name("rejected")
    fake_openai.script(model, [call("finish", summary="never")])
    fake_openai.fail(model, 400, message="Invalid schema for function 'exec'", times=5)
    loaded = agent_pipeline(tmp_path, "rejected", {"model": {"name": model}})
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), 60)
    message = str(info.value.cause)
    assert "step 1/1 · agent work: the model call of turn 1 failed" in message
    assert "HTTP 400" in message and "Invalid schema for function 'exec'" in message
    assert len(fake_openai.requests_for(model)) == 1, "a 400 is not retried"


async def test_a_missing_api_key_on_the_worker_names_the_variable(
    workers: InProcessWorkers, local_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    loaded = agent_pipeline(tmp_path, "no-key", {"model": {"name": "gpt-4.1-mini"}})
    client = await workers.start()
    handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), 60)
    assert "OPENAI_API_KEY is not set on this worker" in str(info.value.cause)


# -- the scripted model ---------------------------------------------------------------------------------------


async def test_scripted_model_runs_offline_and_max_turns_fails_the_step(
    workers: InProcessWorkers, local_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    patch = "*** Begin Patch\n*** Update File: app.txt\n-colour = red\n+colour = blue\n*** End Patch"
    script = [
        {"write_file": {"path": "app.txt", "content": "name = demo\ncolour = red\n"}},
        {"apply_patch": {"patch": patch}},
        [{"read_file": {"path": "app.txt"}}, {"list_files": {}}],
        {"finish": {"summary": "recoloured"}},
    ]
    model = {"provider": "scripted", "script": script}
    tools = ["exec", "read_file", "write_file", "list_files", "apply_patch"]
    loaded = agent_pipeline(tmp_path, "scripted", {"model": model, "tools": tools})
    client, _, result = await run_to_end(workers, loaded, local_store)
    assert (final_workspace(result, tmp_path / "final") / "app.txt").read_text() == "name = demo\ncolour = blue\n"
    assert result.usage == TokenUsage(model_calls=4) and result.agents[0].summary == "recoloured"

    short = agent_pipeline(tmp_path, "too-few-turns", {"model": model, "tools": tools, "max_turns": 2})
    handle = await start_pipeline(client, short, task_queue=workers.task_queue, store_url=local_store)
    with pytest.raises(WorkflowFailureError) as info:
        await asyncio.wait_for(handle.result(), 60)
    assert "the agent used all 2 turns (max_turns) without finishing" in str(info.value.cause)


# -- crashes --------------------------------------------------------------------------------------------------

APPEND_SCRIPT = [
    call("exec", command="echo a >> log.txt"),
    call("exec", command="echo b >> log.txt; sleep 1"),  # the sandbox is destroyed during this one
    call("finish", summary="appended a and b"),
]


def destroy_during_turn(turn: int) -> Callable[..., Any]:
    destroy = DestroySandboxDuringStep(1, after_seconds=0.3)

    async def injector(sandbox: Any, labels: Any, exited: Any) -> None:
        if labels.get("turn") == str(turn):
            await destroy(sandbox, labels, exited)

    injector.fired = lambda: destroy.fired  # type: ignore[attr-defined]
    return injector


async def test_sandbox_destroyed_mid_agent_step_restarts_it_on_the_pre_step_snapshot(
    workers: InProcessWorkers, fake_openai: FakeOpenAI, openai_env: str, local_store: str, tmp_path: Path
) -> None:
    model = model_name("restart")
    fake_openai.script(model, APPEND_SCRIPT)
    loaded = agent_pipeline(tmp_path, "restart", {"model": {"name": model}})
    injector = destroy_during_turn(2)
    client, workflow_id, result = await run_to_end(workers, loaded, local_store, fault_injector=injector)

    assert injector.fired() == 1 and result.rehydrations == 1  # type: ignore[attr-defined]
    assert (final_workspace(result, tmp_path / "final") / "log.txt").read_text() == "a\nb\n", "each append once"
    runs = await activity_runs(client, workflow_id)
    provisions = names(runs, "tardigrade.provision")
    assert provisions[1].input["restore"]["step"] == -1, "the step starts over on the snapshot taken before it"
    assert len(names(runs, "tardigrade.model_call", turn=1)) == 2, "the abandoned attempt stays in history"
    assert len(names(runs, "tardigrade.agent_tool", turn=1)) == 2, "turn 1's command ran again, on the old files"
    # Same files, same tool results, same conversation: the model's earlier replies are reused, not re-bought.
    assert len(fake_openai.requests_for(model)) == 3
    assert result.usage.model_calls == 3


async def test_sandbox_destroyed_mid_agent_step_resumes_at_its_turn_with_every_tool_call_checkpoints(
    workers: InProcessWorkers, fake_openai: FakeOpenAI, openai_env: str, local_store: str, tmp_path: Path
) -> None:
    model = model_name("resume")
    fake_openai.script(model, APPEND_SCRIPT)
    loaded = agent_pipeline(tmp_path, "resume", {"model": {"name": model}, "checkpoint": "every_tool_call"})
    injector = destroy_during_turn(2)
    client, workflow_id, result = await run_to_end(workers, loaded, local_store, fault_injector=injector)

    assert result.rehydrations == 1
    assert (final_workspace(result, tmp_path / "final") / "log.txt").read_text() == "a\nb\n"
    runs = await activity_runs(client, workflow_id)
    provisions = names(runs, "tardigrade.provision")
    assert provisions[1].summary == "rehydrate: new sandbox from the last snapshot in step 1, agent resumes at turn 2"
    assert provisions[1].input["restore"]["step"] == 0, "a snapshot taken inside step 1"
    assert len(names(runs, "tardigrade.agent_tool", turn=1)) == 1, "turn 1 is not done again"
    assert len(names(runs, "tardigrade.agent_tool", turn=2)) == 2, "the interrupted call is"
    assert [len(names(runs, "tardigrade.model_call", turn=t)) for t in (1, 2, 3)] == [1, 1, 1]
    assert len(fake_openai.requests_for(model)) == 3
    assert [(c.step, c.turn) for c in result.checkpoints] == [(-1, None), (0, 1), (0, 2), (0, None)]


# A sleep length no other process uses, to see that the command is running. Long enough that on a loaded machine
# the kill (after a process scan and a query) still lands while it runs: if it ended first, the run would finish
# on the first worker.
SLEEP_MARK = "6.77"


async def test_worker_killed_mid_agent_step_repeats_no_completed_model_call(
    temporal_address: str, worker_processes: Callable[..., WorkerProcess], fake_openai: FakeOpenAI,
    local_store: str, tmp_path: Path,
) -> None:  # fmt: skip
    model = model_name("killed")
    fake_openai.script(model, [
        call("exec", command="echo a >> log.txt"),
        call("exec", command=f"echo b >> log.txt; sleep {SLEEP_MARK}"),  # the worker is killed during this
        call("finish", summary="appended a and b"),
    ])  # fmt: skip
    env = {"OPENAI_BASE_URL": fake_openai.base_url, "OPENAI_API_KEY": f"sk-test-{uuid.uuid4().hex}"}
    task_queue = f"agent-crash-{uuid.uuid4().hex[:8]}"
    first = worker_processes(task_queue, "first", env)
    first.host_queue()
    client = await connect(temporal_address)
    loaded = agent_pipeline(tmp_path, "killed", {"model": {"name": model}})
    handle = await start_pipeline(client, loaded, task_queue=task_queue, store_url=local_store)

    def sleeping() -> bool:
        return any(p.info["cmdline"] == ["sleep", SLEEP_MARK] for p in psutil.process_iter(["cmdline"]))

    await wait_for(sleeping, timeout=60)
    requests_before_kill = len(fake_openai.requests_for(model))
    status: RunStatus = await handle.query(PipelineWorkflow.status)
    assert status.agent is not None and (status.agent.step, status.agent.turn) == (0, 2)
    assert status.usage.model_calls == 2
    first.kill()
    second = worker_processes(task_queue, "second", env)
    second.host_queue()
    result: RunResult = await asyncio.wait_for(handle.result(), 90)

    assert requests_before_kill == 2 and result.rehydrations >= 1
    assert (final_workspace(result, tmp_path / "final") / "log.txt").read_text() == "a\nb\n"
    requests = fake_openai.requests_for(model)
    assert len(requests) == 3, "turns 1 and 2 were answered before the crash and are not asked again"
    assert len({r.raw for r in requests}) == 3
    runs = await activity_runs(client, handle.id)
    assert len(names(runs, "tardigrade.model_call", turn=1)) == 2, "the step started over, visibly"


# -- history stays linear -------------------------------------------------------------------------------------


async def test_history_grows_linearly_with_turns(
    workers: InProcessWorkers, fake_openai: FakeOpenAI, openai_env: str, local_store: str, tmp_path: Path
) -> None:
    """Every turn reads a 12 KB file. Inline, the conversation would add 12 KB x turns to every turn."""
    marker = f"FILE-CONTENT-{uuid.uuid4().hex}"
    sizes = {}
    client = await workers.start()
    for turns in (10, 50):
        model = model_name(f"long{turns}")
        fake_openai.script(model, [*(call("read_file", path="big.txt") for _ in range(turns - 1)),
                                   call("finish", summary=f"{turns} turns")])  # fmt: skip
        (tmp_path / str(turns)).mkdir()
        loaded = agent_pipeline(
            tmp_path / str(turns),
            f"long-{turns}",
            {"model": {"name": model}, "max_turns": 60},
            manifest={"files": [{"path": "big.txt", "content": (marker + "\n") * 270}]},
        )
        started = time.monotonic()
        handle = await start_pipeline(client, loaded, task_queue=workers.task_queue, store_url=local_store)
        result = await asyncio.wait_for(handle.result(), 90)
        assert result.agents[0].turns == turns
        history = await history_json(client, handle.id)
        assert marker not in history
        sizes[turns] = len(history)
        last = fake_openai.requests_for(model)[-1]
        assert len(last.tool_outputs()) == turns - 1 and len(last.raw) > 12_000 * (turns - 1)
        print(f"{turns} turns: {len(history):,} bytes of history in {time.monotonic() - started:.1f} s")
    per_turn = (sizes[50] - sizes[10]) / 40
    print(f"history per turn: {per_turn:,.0f} bytes (payloads counted twice: encoded and decoded)")
    # A turn is two activities (model call, tool call) and two workflow tasks: about 6 KB of history JSON, plus
    # its payloads decoded again. Carrying the conversation would add 12 KB per earlier turn to every turn.
    assert per_turn < 14_000, "a bound per turn: refs and short previews, not the conversation"
    assert sizes[50] < 5 * sizes[10], "50 turns cost about 5 times 10 turns, not 25 times"
