"""A loopback OpenAI-compatible server for the tests: real HTTP on 127.0.0.1, spoken to by the real `openai` client.

It answers ``POST /v1/responses`` and ``POST /v1/chat/completions`` with scripted tool calls, and records every
request it receives (headers, body, arrival time) so tests can assert what a model would have been sent.

Each test scripts its own model name. Which turn of the script answers a request is worked out from the request
itself - the number of assistant replies already in the conversation - so the server behaves like a
deterministic model: the same conversation always gets the same reply, however often it is sent.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Turn:
    """One scripted reply: tool calls (name, arguments), text, or both."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    text: str = ""


def call(name: str, **arguments: Any) -> Turn:
    return Turn(calls=[(name, arguments)])


def calls(*pairs: tuple[str, dict[str, Any]]) -> Turn:
    return Turn(calls=list(pairs))


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    raw: str
    at: float  # time.monotonic() on arrival

    @property
    def model(self) -> str:
        return str(self.body.get("model"))

    def tool_outputs(self) -> list[str]:
        """The tool results the request carries, in order (either API)."""
        if self.path.endswith("/responses"):
            return [i["output"] for i in self.body.get("input", []) if i.get("type") == "function_call_output"]
        return [m["content"] for m in self.body.get("messages", []) if m.get("role") == "tool"]

    def instructions(self) -> str:
        if self.path.endswith("/responses"):
            return str(self.body.get("instructions", ""))
        return "\n".join(m["content"] for m in self.body.get("messages", []) if m.get("role") == "system")

    def user_messages(self) -> list[str]:
        items = self.body.get("input") if self.path.endswith("/responses") else self.body.get("messages")
        return [str(i["content"]) for i in items or [] if i.get("role") == "user"]


@dataclass
class _Failure:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    remaining: int


class FakeOpenAI:
    USAGE_IN, USAGE_OUT = 100, 10  # tokens reported per call, so tests can check the sums

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._scripts: dict[str, list[Turn]] = {}
        self._failures: dict[str, list[_Failure]] = {}
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                fake._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- scripting ------------------------------------------------------------------------------------------

    def script(self, model: str, turns: list[Turn]) -> None:
        self._scripts[model] = turns

    def fail(self, model: str, status: int, *, message: str, headers: dict[str, str] | None = None,
             times: int = 1) -> None:  # fmt: skip
        """The next ``times`` requests for ``model`` get this HTTP error instead of an answer."""
        body = {"error": {"message": message, "type": "invalid_request_error", "code": None, "param": None}}
        self._failures.setdefault(model, []).append(_Failure(status, body, headers or {}, times))

    def requests_for(self, model: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.model == model]

    # -- serving --------------------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        raw = handler.rfile.read(int(handler.headers.get("content-length", 0))).decode()
        body = json.loads(raw or "{}")
        recorded = Recorded(handler.path, {k.lower(): v for k, v in handler.headers.items()}, body, raw,
                            time.monotonic())  # fmt: skip
        with self._lock:
            self.requests.append(recorded)
            failure = next((f for f in self._failures.get(recorded.model, []) if f.remaining > 0), None)
            if failure is not None:
                failure.remaining -= 1
        if failure is not None:
            self._send(handler, failure.status, failure.body, failure.headers)
            return
        turns = self._scripts.get(recorded.model)
        if turns is None:
            self._send(handler, 404, {"error": {"message": f"model {recorded.model!r} does not exist"}})
            return
        if handler.path == "/v1/responses":
            done = _replies_so_far_responses(body.get("input", []))
        elif handler.path == "/v1/chat/completions":
            done = sum(1 for m in body.get("messages", []) if m.get("role") == "assistant")
        else:
            self._send(handler, 404, {"error": {"message": f"no such endpoint {handler.path}"}})
            return
        if done >= len(turns):
            self._send(handler, 400, {"error": {"message": f"the script of {recorded.model} has no turn {done + 1}"}})
            return
        turn = turns[done]
        ids = [f"call_{done + 1}_{i + 1}" for i in range(len(turn.calls))]
        if handler.path == "/v1/responses":
            self._send(handler, 200, _responses_body(recorded.model, turn, ids))
        else:
            self._send(handler, 200, _chat_body(recorded.model, turn, ids))

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:  # fmt: skip
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)


def _replies_so_far_responses(items: list[dict[str, Any]]) -> int:
    """Runs of assistant items (messages and function calls) in a Responses input: one per earlier reply."""
    replies, inside = 0, False
    for item in items:
        assistant = item.get("type") == "function_call" or item.get("role") == "assistant"
        if assistant and not inside:
            replies += 1
        inside = assistant
    return replies


def _usage_responses() -> dict[str, Any]:
    return {
        "input_tokens": FakeOpenAI.USAGE_IN,
        "output_tokens": FakeOpenAI.USAGE_OUT,
        "total_tokens": FakeOpenAI.USAGE_IN + FakeOpenAI.USAGE_OUT,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _responses_body(model: str, turn: Turn, ids: list[str]) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    if turn.text:
        output.append({"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": turn.text, "annotations": []}]})  # fmt: skip
    for call_id, (name, arguments) in zip(ids, turn.calls, strict=True):
        output.append({"type": "function_call", "id": f"fc_{call_id}", "call_id": call_id, "name": name,
                       "arguments": json.dumps(arguments), "status": "completed"})  # fmt: skip
    return {
        "id": "resp_fake", "object": "response", "created_at": 0, "model": model, "status": "completed",
        "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "usage": _usage_responses(),
    }  # fmt: skip


def _chat_body(model: str, turn: Turn, ids: list[str]) -> dict[str, Any]:
    tool_calls = [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        for call_id, (name, arguments) in zip(ids, turn.calls, strict=True)
    ]
    message: dict[str, Any] = {"role": "assistant", "content": turn.text or None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "tool_calls" if tool_calls else "stop", "message": message}],
        "usage": {"prompt_tokens": FakeOpenAI.USAGE_IN, "completion_tokens": FakeOpenAI.USAGE_OUT,
                  "total_tokens": FakeOpenAI.USAGE_IN + FakeOpenAI.USAGE_OUT},
    }  # fmt: skip


@pytest.fixture(scope="session", name="fake_openai")
def fake_openai_server() -> Iterator[FakeOpenAI]:
    """The server, for the whole session; import this into a test module to use the `fake_openai` fixture."""
    server = FakeOpenAI()
    yield server
    server.close()


@pytest.fixture(name="openai_env")
def openai_env_for_workers(fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the in-process workers at the fake server, with a key of this test's own (returned)."""
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    return key
