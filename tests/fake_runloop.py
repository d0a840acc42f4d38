"""A fake of Runloop's REST API behind the real ``runloop-api-client``, backed by real machines.

Runloop cannot be reached from the test machines. Its SDK is a plain HTTP client (httpx), so the fake replaces
exactly the wire: `FakeRunloopTransport` is an httpx transport that answers the devbox endpoints the provider
uses, and `fake_runloop` hands out a real ``AsyncRunloop`` whose ``http_client`` sends its requests there. So the
SDK's own code runs end to end - request building, multipart uploads, binary downloads, the SSE log streams, the
long-poll helpers, and its exceptions (``NotFoundError``, ``BadRequestError``... raised by the SDK from the status
codes served here). Behind the transport every devbox is a real bubblewrap machine from a `FakeCloud`
(tests/provider_fakes.py): commands really run (as the uid in ``launch_parameters.user_parameters``), files really
move, executions' process groups really die on ``kill``.

Modelled: devbox status (running, suspended, shutdown, failure - a lost machine reports ``failure``), suspend and
resume on the same disk, disk snapshots and create-from-snapshot, network policies (deny-all keeps the machine
off the network; anything else gives it the host's network: host allowlists are not enforced here). Not
modelled: blueprints and resource sizes (every devbox is "an empty Debian-like machine with the host's /usr"),
idle and keep-alive timers. Unknown routes answer 404 with the route in the message, so an SDK upgrade that
moves an endpoint fails loudly here.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import email.parser
import email.policy
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import runloop_api_client

from tests.provider_fakes import USER_UID, FakeCloud, FakeMachine, MachineGone, MachineProcess

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class _Reply(Exception):
    """An error answer: raised anywhere in a handler, served as the status code with Runloop's JSON error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Execution:
    id: str
    process: MachineProcess
    output: dict[str, bytearray] = field(default_factory=lambda: {"out": bytearray(), "err": bytearray()})
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    exit_status: int | None = None
    lost: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self) -> None:
        try:
            status = await self.process.wait()
            self.exit_status = int(status["code"])
        except MachineGone:
            self.lost = True
        finally:
            self.finished.set()
            self.changed.set()


@dataclass
class _Devbox:
    id: str
    uid: int
    network: bool
    params: dict[str, Any]
    status: str = "running"
    shutdown_reason: str | None = None
    executions: dict[str, _Execution] = field(default_factory=dict)


class FakeRunloopTransport(httpx.AsyncBaseTransport):
    """Runloop's devbox API (the endpoints `sandboxes/runloop.py` uses), served from a `FakeCloud`."""

    def __init__(self, cloud: FakeCloud) -> None:
        self.cloud = cloud
        self.devboxes: dict[str, _Devbox] = {}
        self.snapshots: dict[str, str] = {}  # Runloop snapshot id -> the cloud's disk image
        self.policies: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, route pattern) of every request served
        self._tasks: set[asyncio.Future[None]] = set()
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Awaitable[httpx.Response]]]] = [
            ("POST", re.compile(r"/v1/devboxes"), self._create),
            ("GET", re.compile(r"/v1/devboxes/(?P<id>[^/]+)"), self._retrieve),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/wait_for_status"), self._wait_for_status),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/execute_async"), self._execute_async),
            ("GET", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/executions/(?P<eid>[^/]+)/stream_(?P<s>stdout|stderr)"
                               r"_updates"), self._stream),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/executions/(?P<eid>[^/]+)/wait_for_status"),
             self._wait_for_command),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/executions/(?P<eid>[^/]+)/kill"), self._kill),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/upload_file"), self._upload),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/download_file"), self._download),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/shutdown"), self._shutdown),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/suspend"), self._suspend),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/resume"), self._resume),
            ("POST", re.compile(r"/v1/devboxes/(?P<id>[^/]+)/snapshot_disk"), self._snapshot_disk),
            ("POST", re.compile(r"/v1/network-policies"), self._create_policy),
        ]  # fmt: skip

    # -- plumbing -----------------------------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match and request.method == method:
                self.requests.append((method, pattern.pattern))
                try:
                    return await handler(request, **match.groupdict())
                except _Reply as reply:
                    return _json({"error": str(reply), "status": reply.status}, reply.status)
        return _json({"error": f"no route {request.method} {path} in the fake Runloop"}, 404)

    def _devbox(self, devbox_id: str) -> _Devbox:
        devbox = self.devboxes.get(devbox_id)
        if devbox is None:
            raise _Reply(404, f"devbox {devbox_id} not found")
        machine = self.cloud.machines.get(devbox_id)
        if devbox.status == "running" and (machine is None or not machine.running):
            devbox.status = "failure"  # the VM died under it
        return devbox

    def _running(self, devbox_id: str) -> FakeMachine:
        devbox = self._devbox(devbox_id)
        if devbox.status != "running":
            raise _Reply(400, f"devbox {devbox_id} is {devbox.status}, not running")
        return self.cloud.machines[devbox_id]

    def _execution(self, devbox_id: str, execution_id: str) -> _Execution:
        execution = self._devbox(devbox_id).executions.get(execution_id)
        if execution is None:
            raise _Reply(404, f"execution {execution_id} not found")
        return execution

    def _view(self, devbox: _Devbox) -> dict[str, Any]:
        return {
            "id": devbox.id, "capabilities": [], "create_time_ms": int(time.time() * 1000),
            "launch_parameters": devbox.params.get("launch_parameters") or {}, "metadata": devbox.params.get("metadata")
            or {}, "state_transitions": [], "status": devbox.status, "shutdown_reason": devbox.shutdown_reason,
            "snapshot_id": devbox.params.get("snapshot_id"),
        }  # fmt: skip

    @staticmethod
    def _execution_view(devbox_id: str, execution: _Execution) -> dict[str, Any]:
        done = execution.finished.is_set() and not execution.lost
        return {
            "devbox_id": devbox_id, "execution_id": execution.id, "status": "completed" if done else "running",
            "exit_status": execution.exit_status if done else None,
        }  # fmt: skip

    # -- devboxes -----------------------------------------------------------------------------------------------

    async def _create(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        launch = body.get("launch_parameters") or {}
        image = None
        if body.get("snapshot_id"):
            image = self.snapshots.get(body["snapshot_id"])
            if image is None:
                raise _Reply(404, f"snapshot {body['snapshot_id']} not found")
        network = True  # Runloop's default: open
        if launch.get("network_policy_id"):
            policy = self.policies.get(launch["network_policy_id"])
            if policy is None:
                raise _Reply(400, f"network policy {launch['network_policy_id']} not found")
            network = bool(policy["allow_all"] or policy["allowed_hostnames"] or policy["allowed_cidrs"])
        machine = await self.cloud.start_machine(prefix="dbx_", image=image, network=network)
        user = launch.get("user_parameters") or {}
        devbox = _Devbox(machine.id, 0 if user.get("uid") == 0 else USER_UID, network, body)
        self.devboxes[machine.id] = devbox
        return _json(self._view(devbox))

    async def _retrieve(self, request: httpx.Request, id: str) -> httpx.Response:
        return _json(self._view(self._devbox(id)))

    async def _wait_for_status(self, request: httpx.Request, id: str) -> httpx.Response:
        return _json(self._view(self._devbox(id)))  # states change at once here: nothing to wait for

    async def _shutdown(self, request: httpx.Request, id: str) -> httpx.Response:
        devbox = self._devbox(id)
        if devbox.status != "shutdown":
            self.cloud.machines[id].kill()
            devbox.status, devbox.shutdown_reason = "shutdown", "api_shutdown"
        return _json(self._view(devbox))

    async def _suspend(self, request: httpx.Request, id: str) -> httpx.Response:
        self._running(id).kill()  # the disk stays
        devbox = self._devbox(id)
        devbox.status = "suspended"
        devbox.executions.clear()
        return _json(self._view(devbox))

    async def _resume(self, request: httpx.Request, id: str) -> httpx.Response:
        devbox = self._devbox(id)
        if devbox.status != "suspended":
            raise _Reply(400, f"devbox {id} is {devbox.status}, not suspended")
        old = self.cloud.machines[id]
        machine = FakeMachine(self.cloud, id, old.rootfs, old.network)
        await machine.start()
        self.cloud.machines[id] = machine
        devbox.status = "running"
        return _json(self._view(devbox))

    async def _snapshot_disk(self, request: httpx.Request, id: str) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        try:
            image = await self.cloud.snapshot(self._running(id))
        except MachineGone:
            raise _Reply(400, f"devbox {id} is not running") from None
        snapshot_id = f"snp_{uuid.uuid4().hex[:16]}"
        self.snapshots[snapshot_id] = image
        return _json({"id": snapshot_id, "create_time_ms": int(time.time() * 1000), "source_devbox_id": id,
                      "metadata": body.get("metadata") or {}, "name": body.get("name")})  # fmt: skip

    async def _create_policy(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        policy_id = f"np_{uuid.uuid4().hex[:16]}"
        egress = {"allow_all": bool(body.get("allow_all")), "allowed_hostnames": body.get("allowed_hostnames") or [],
                  "allowed_cidrs": body.get("allowed_cidrs") or []}  # fmt: skip
        self.policies[policy_id] = egress
        now = int(time.time() * 1000)
        egress_view = {**egress, "allow_agent_gateway": False, "allow_devbox_to_devbox": False,
                       "allow_mcp_gateway": False, "allow_runloop_mirrors": False}  # fmt: skip
        return _json({"id": policy_id, "name": body["name"], "create_time_ms": now, "update_time_ms": now,
                      "egress": egress_view, "description": body.get("description")})  # fmt: skip

    # -- executions ---------------------------------------------------------------------------------------------

    async def _execute_async(self, request: httpx.Request, id: str) -> httpx.Response:
        body = json.loads(request.content)
        machine = self._running(id)
        devbox = self._devbox(id)
        holder: list[_Execution] = []

        def feed(stream: str) -> Callable[[bytes], None]:
            def on(data: bytes) -> None:
                holder[0].output[stream] += data
                holder[0].changed.set()

            return on

        home = "/root" if devbox.uid == 0 else "/home/user"
        try:  # Runloop runs the command in a login shell from the user's home directory
            process = await machine.start_process(
                f"cd {home} 2>/dev/null; {body['command']}", env={"PATH": _PATH, "HOME": home}, cwd="/",
                uid=devbox.uid, on_stdout=feed("out"), on_stderr=feed("err"),
            )  # fmt: skip
        except MachineGone:
            raise _Reply(400, f"devbox {id} is not running") from None
        execution = _Execution(f"exe_{uuid.uuid4().hex[:16]}", process)
        holder.append(execution)
        devbox.executions[execution.id] = execution
        task = asyncio.ensure_future(execution.follow())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _json(self._execution_view(id, execution))

    async def _stream(self, request: httpx.Request, id: str, eid: str, s: str) -> httpx.Response:
        """Server-sent events, one per chunk of output as it arrives; the stream ends with the execution, and
        breaks off (a dropped connection) if the devbox dies under it."""
        execution = self._execution(id, eid)
        buffer = execution.output["out" if s == "stdout" else "err"]
        start = int(request.url.params.get("offset") or 0)

        async def events() -> AsyncIterator[bytes]:
            sent = start
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            while True:
                execution.changed.clear()
                if sent < len(buffer):
                    text = decoder.decode(bytes(buffer[sent:]))
                    sent = len(buffer)
                    if text:
                        yield f"data: {json.dumps({'output': text, 'offset': sent})}\n\n".encode()
                    continue
                if execution.finished.is_set():
                    if execution.lost:
                        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
                    return
                await execution.changed.wait()

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Stream(events()))

    async def _wait_for_command(self, request: httpx.Request, id: str, eid: str) -> httpx.Response:
        body = json.loads(request.content)
        execution = self._execution(id, eid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(execution.finished.wait()), float(body.get("timeout_seconds") or 25))
        if execution.lost:
            self._running(id)  # the devbox's own error: it is not running any more
        if not execution.finished.is_set():
            raise _Reply(408, "timed out waiting for the execution's status")
        return _json(self._execution_view(id, execution))

    async def _kill(self, request: httpx.Request, id: str, eid: str) -> httpx.Response:
        execution = self._execution(id, eid)
        machine = self._running(id)
        if not execution.finished.is_set():
            with contextlib.suppress(MachineGone):
                await machine.call("kill", pid=execution.process.pid)  # the agent kills the process group
        return _json(self._execution_view(id, execution))

    # -- files --------------------------------------------------------------------------------------------------

    async def _upload(self, request: httpx.Request, id: str) -> httpx.Response:
        machine = self._running(id)
        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + await request.aread())
        parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        path = bytes(parts["path"].get_payload(decode=True)).decode()
        data = bytes(parts["file"].get_payload(decode=True))

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        try:
            await machine.write_file(path, self._devbox(id).uid, chunks())
        except PermissionError as e:
            raise _Reply(403, f"could not write {path}: {e}") from None
        except MachineGone:
            raise _Reply(400, f"devbox {id} is not running") from None
        return _json({})

    async def _download(self, request: httpx.Request, id: str) -> httpx.Response:
        machine = self._running(id)
        path = json.loads(request.content)["path"]
        data = bytearray()
        try:
            async for chunk in machine.read_file(path, self._devbox(id).uid):
                data += chunk
        except FileNotFoundError:
            raise _Reply(404, f"file {path} not found") from None
        except MachineGone:
            raise _Reply(400, f"devbox {id} is not running") from None
        return httpx.Response(200, headers={"content-type": "application/octet-stream"}, content=bytes(data))

    # -- the test's side ----------------------------------------------------------------------------------------

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


class _Stream(httpx.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._chunks.aclose()  # type: ignore[attr-defined]


def _json(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def fake_runloop(root: Path) -> tuple[FakeCloud, FakeRunloopTransport, runloop_api_client.AsyncRunloop]:
    """A cloud, the fake API in front of it, and a real SDK client that talks to it."""
    cloud = FakeCloud(root)
    transport = FakeRunloopTransport(cloud)
    client = runloop_api_client.AsyncRunloop(
        bearer_token="fake-runloop-key",
        base_url="https://api.runloop.invalid",
        http_client=httpx.AsyncClient(transport=transport, base_url="https://api.runloop.invalid"),
        max_retries=0,  # a retry would hide what the fake answered
    )
    return cloud, transport, client
