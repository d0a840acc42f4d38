"""A local fake of the Cloudflare bridge Worker (clients/cloudflare-bridge/): its HTTP protocol, over real HTTP.

Cloudflare cannot be reached from the test machines, and the bridge's SDK only runs inside a Worker, so the tests
run this stand-in: a real HTTP/1.1 server on loopback (asyncio streams, stdlib only) that checks the bearer token
in constant time and answers every route of the bridge's protocol (README.md there; `ROUTES` below, compared with
the Worker's table and the client's by tests/test_cloudflare.py) with the same bodies and error codes. Behind it,
each sandbox is a real bubblewrap machine from a `FakeCloud` (tests/provider_fakes.py): commands really run as root
(as in a Cloudflare container) and stream their output as NDJSON text lines, files really move, processes outlive
a closed exec stream (as with the SDK; the client's reaper kills them), and `FakeCloud.lose` wipes a machine's disk,
after which the fake answers ``404 sandbox_not_found`` exactly as the bridge does for a container without its boot
marker. Native backups are copies of the folder (owners, modes and links kept) on the host, with their TTL.

Not modelled: Cloudflare's host allowlists (a sandbox is online only with ``internet: true``), container sleep
timers, instance types.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import json
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.provider_fakes import FakeCloud, FakeMachine, MachineGone

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_DIR = "/var/lib/tardigrade-bridge"
BOOT_MARKER = f"{BOOT_DIR}/boot-id"
_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            500: "Internal Server Error", 502: "Bad Gateway"}  # fmt: skip


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HttpError(400, "bad_request", "the body is not JSON") from None


class Response:
    """A status, headers, and a body: bytes, or an async iterator of chunks (streamed, close-delimited)."""

    def __init__(self, status: int, body: bytes | AsyncIterator[bytes] = b"", content_type: str = "") -> None:
        self.status, self.body, self.content_type = status, body, content_type


def _json(body: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(body).encode(), "application/json")


@dataclass
class _Backup:
    dir: str
    copy: Path
    expires: float


class FakeCloudflareBridge:
    """The bridge on ``http://127.0.0.1:<port>``; `url` once started."""

    def __init__(self, cloud: FakeCloud, token: str) -> None:
        self.cloud = cloud
        self._token = token
        self.created: dict[str, dict[str, Any]] = {}  # sandbox id -> its network policy (Durable Object storage)
        self.backups: dict[str, _Backup] = {}
        self.requests: list[tuple[str, str, dict[str, Any]]] = []  # (method, path, JSON body) as received
        self._server: asyncio.AbstractServer | None = None
        self.url = ""
        self.routes: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
            ("POST", "/v1/sandboxes", self.create_sandbox),
            ("GET", "/v1/sandboxes/:id", self.describe_sandbox),
            ("DELETE", "/v1/sandboxes/:id", self.destroy_sandbox),
            ("POST", "/v1/sandboxes/:id/exec", self.exec_command),
            ("GET", "/v1/sandboxes/:id/files", self.read_file),
            ("PUT", "/v1/sandboxes/:id/files", self.write_file),
            ("GET", "/v1/sandboxes/:id/list", self.list_files),
            ("GET", "/v1/sandboxes/:id/tar", self.tar_out),
            ("PUT", "/v1/sandboxes/:id/tar", self.tar_in),
            ("POST", "/v1/sandboxes/:id/backups", self.create_backups),
            ("POST", "/v1/sandboxes/:id/restore", self.restore_backups),
        ]

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 20)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # -- HTTP ---------------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            response = await self._answer(reader)
            reason = _REASONS.get(response.status, "Status")
            head = f"HTTP/1.1 {response.status} {reason}\r\nConnection: close\r\n"
            if response.content_type:
                head += f"Content-Type: {response.content_type}\r\n"
            if isinstance(response.body, bytes):
                writer.write(f"{head}Content-Length: {len(response.body)}\r\n\r\n".encode() + response.body)
                await writer.drain()
            else:  # streamed: the body ends when the connection closes
                writer.write(f"{head}\r\n".encode())
                async for chunk in response.body:
                    writer.write(chunk)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away (a killed exec): stop following, the process keeps running
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> Response:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                body += await reader.readexactly(size)
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
        else:
            body = bytearray(await reader.readexactly(int(headers.get("content-length", "0"))))
        url = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        request = Request(method, url.path, query, headers, bytes(body))
        presented = headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(presented.encode(), self._token.encode()):
            return _json({"error": "unauthorized", "message": "a valid bearer token is required"}, 401)
        for route_method, pattern, handler in self.routes:
            params = _match(pattern, url.path)
            if params is None or route_method != method:
                continue
            request.params = params
            with contextlib.suppress(ValueError):
                self.requests.append((method, url.path, json.loads(body) if body[:1] == b"{" else {}))
            try:
                return await handler(request)
            except HttpError as e:
                return _json({"error": e.code, "message": e.message}, e.status)
            except MachineGone as e:
                return _json({"error": "sandbox_error", "message": f"the container stopped answering: {e}"}, 502)
        return _json({"error": "no_route", "message": f"no route {method} {url.path}"}, 404)

    # -- sandboxes ----------------------------------------------------------------------------------------------

    def _machine(self, sandbox_id: str) -> FakeMachine:
        machine = self.cloud.machines.get(sandbox_id)
        if sandbox_id not in self.created or machine is None:
            raise HttpError(404, "sandbox_not_found", f"no sandbox {sandbox_id}")
        return machine

    async def _existing(self, sandbox_id: str) -> FakeMachine:
        """As the bridge: created by it, and its container still has the disk it was created with."""
        machine = self._machine(sandbox_id)
        if not machine.running:
            raise HttpError(404, "sandbox_not_found", f"sandbox {sandbox_id}: its container is stopped")
        _, out = await self._run(machine, f"cat {BOOT_MARKER} 2>/dev/null")
        if out.decode().strip() != sandbox_id:
            self.created.pop(sandbox_id, None)
            machine.kill()
            raise HttpError(404, "sandbox_not_found", f"sandbox {sandbox_id}: its container was replaced")
        return machine

    @staticmethod
    async def _run(machine: FakeMachine, command: str) -> tuple[int, bytes]:
        out = bytearray()
        process = await machine.start_process(
            command, env={"PATH": _PATH, "HOME": "/root"}, cwd="/", uid=0, on_stdout=out.extend, on_stderr=out.extend
        )
        return int((await process.wait())["code"]), bytes(out)

    async def _run_ok(self, machine: FakeMachine, command: str, doing: str) -> bytes:
        code, out = await self._run(machine, command)
        if code != 0:
            raise HttpError(500, "command_failed", f"{doing} failed (exit {code}): {out.decode(errors='replace')}")
        return out

    async def create_sandbox(self, request: Request) -> Response:
        network = request.json().get("network") or {}
        policy: dict[str, Any] = {
            "internet": network.get("internet") is True,
            "allowedHosts": list(network.get("allowedHosts", [])),
        }
        machine = await self.cloud.start_machine(prefix="cf-", image=None, network=policy["internet"])
        self.created[machine.id] = policy
        await self._run_ok(
            machine, f"mkdir -p {BOOT_DIR} && chmod 700 {BOOT_DIR} && printf %s {machine.id} > {BOOT_MARKER}", "marking"
        )
        return _json({"id": machine.id}, 201)

    async def describe_sandbox(self, request: Request) -> Response:
        await self._existing(request.params["id"])
        return _json({"id": request.params["id"], "alive": True})

    async def destroy_sandbox(self, request: Request) -> Response:
        machine = self._machine(request.params["id"])
        del self.created[request.params["id"]]
        machine.kill()
        return _json({"id": request.params["id"], "destroyed": True})

    async def exec_command(self, request: Request) -> Response:
        body = request.json()
        if not isinstance(body.get("command"), str):
            raise HttpError(400, "bad_request", "command must be a string")
        env = {k: v for k, v in (body.get("env") or {}).items() if isinstance(v, str)}
        machine = await self._existing(request.params["id"])
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

        def feed(stream: str) -> Callable[[bytes], None]:
            return lambda data: queue.put_nowait((stream, data))

        process = await machine.start_process(
            body["command"], env={"PATH": _PATH, "HOME": "/root", **env}, cwd=body.get("cwd") or "/", uid=0,
            on_stdout=feed("stdout"), on_stderr=feed("stderr"),
        )  # fmt: skip

        async def lines() -> AsyncIterator[bytes]:
            decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in ("stdout", "stderr")}
            waiter = asyncio.ensure_future(process.wait())
            try:
                while True:
                    getter = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        stream, data = getter.result()
                        text = decoders[stream].decode(data)
                        if text:
                            yield (json.dumps({"stream": stream, "data": text}) + "\n").encode()
                        continue
                    getter.cancel()
                    while not queue.empty():  # the pump has forwarded everything before the exit status
                        stream, data = queue.get_nowait()
                        text = decoders[stream].decode(data)
                        if text:
                            yield (json.dumps({"stream": stream, "data": text}) + "\n").encode()
                    try:
                        status = waiter.result()
                    except MachineGone as e:
                        yield (json.dumps({"error": "exec_failed", "message": f"container gone: {e}"}) + "\n").encode()
                        return
                    yield (json.dumps({"exit_code": int(status["code"])}) + "\n").encode()
                    return
            finally:
                waiter.cancel()

        return Response(200, lines(), "application/x-ndjson")

    # -- files --------------------------------------------------------------------------------------------------

    @staticmethod
    def _path(request: Request) -> str:
        path = request.query.get("path", "")
        if not path.startswith("/") or "\0" in path:
            raise HttpError(400, "bad_request", "path must be an absolute path")
        return path

    @staticmethod
    async def _read(machine: FakeMachine, path: str) -> bytes:
        data = bytearray()
        try:
            async for chunk in machine.read_file(path, 0):
                data += chunk
        except FileNotFoundError:
            raise HttpError(404, "file_not_found", f"{path}: no such file") from None
        return bytes(data)

    @staticmethod
    async def _write(machine: FakeMachine, path: str, data: bytes) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield data

        await machine.write_file(path, 0, chunks())

    async def read_file(self, request: Request) -> Response:
        machine = await self._existing(request.params["id"])
        return Response(200, await self._read(machine, self._path(request)), "application/octet-stream")

    async def write_file(self, request: Request) -> Response:
        machine = await self._existing(request.params["id"])
        await self._write(machine, self._path(request), request.body)
        return Response(204)

    async def list_files(self, request: Request) -> Response:
        path = self._path(request)
        machine = await self._existing(request.params["id"])
        depth = "" if request.query.get("recursive") == "1" else " -maxdepth 1"
        code, out = await self._run(machine, f"find {shlex.quote(path)} -mindepth 1{depth} -printf '%y %m %s %p\\0'")
        if code != 0:
            raise HttpError(404, "file_not_found", f"{path}: no such directory")
        kinds = {"f": "file", "d": "directory", "l": "symlink"}
        files = []
        for entry in out.split(b"\0"):
            if entry:
                kind, mode, size, name = entry.decode(errors="surrogateescape").split(" ", 3)
                files.append({"path": name, "type": kinds.get(kind, "other"), "size": int(size), "mode": mode})
        return _json({"path": path, "files": files})

    async def tar_out(self, request: Request) -> Response:
        path = self._path(request)
        machine = await self._existing(request.params["id"])
        archive = f"{BOOT_DIR}/out-{uuid.uuid4().hex}.tar"
        await self._run_ok(machine, f"tar --numeric-owner --format=posix -C {shlex.quote(path)} -cf {archive} .",
                           f"packing {path}")  # fmt: skip
        try:
            return Response(200, await self._read(machine, archive), "application/x-tar")
        finally:
            await self._run(machine, f"rm -f {archive}")

    async def tar_in(self, request: Request) -> Response:
        path = self._path(request)
        machine = await self._existing(request.params["id"])
        archive = f"{BOOT_DIR}/in-{uuid.uuid4().hex}.tar"
        await self._write(machine, archive, request.body)
        await self._run_ok(
            machine,
            f"mkdir -p {shlex.quote(path)} && tar -xpf {archive} --numeric-owner --same-owner -C {shlex.quote(path)};"
            f" code=$?; rm -f {archive}; exit $code",
            f"unpacking into {path}",
        )
        return Response(204)

    # -- native backups -----------------------------------------------------------------------------------------

    async def create_backups(self, request: Request) -> Response:
        body = request.json()
        dirs, ttl = body.get("dirs"), body.get("ttl")
        if not isinstance(dirs, list) or not dirs:
            raise HttpError(400, "bad_request", "dirs: a list")
        machine = await self._existing(request.params["id"])
        made = []
        for folder in dirs:
            if not str(folder).startswith(("/workspace", "/home", "/tmp", "/var/tmp", "/app")):
                raise HttpError(400, "invalid_backup_config", f"{folder}: not a folder Cloudflare backs up")
            backup_id = uuid.uuid4().hex
            copy = self.cloud.root / "backups" / backup_id
            copy.parent.mkdir(parents=True, exist_ok=True)
            source = machine.rootfs / str(folder).lstrip("/")
            await asyncio.to_thread(subprocess.run, ["cp", "-a", str(source), str(copy)], check=True)
            self.backups[backup_id] = _Backup(str(folder), copy, time.time() + float(ttl or 259200))
            made.append({"id": backup_id, "dir": folder})
        return _json({"backups": made}, 201)

    async def restore_backups(self, request: Request) -> Response:
        body = request.json()
        machine = await self._existing(request.params["id"])
        for item in body.get("backups") or []:
            backup = self.backups.get(str(item.get("id")))
            if backup is None or backup.expires < time.time():
                raise HttpError(404, "backup_not_found", f"backup {item.get('id')}: not found or expired")
            target = machine.rootfs / str(item["dir"]).lstrip("/")
            await asyncio.to_thread(shutil.rmtree, target, True)
            await asyncio.to_thread(subprocess.run, ["cp", "-a", str(backup.copy), str(target)], check=True)
        return _json({"restored": len(body.get("backups") or [])})


def _match(pattern: str, path: str) -> dict[str, str] | None:
    want, got = pattern.split("/"), path.split("/")
    if len(want) != len(got):
        return None
    params = {}
    for w, g in zip(want, got, strict=True):
        if w.startswith(":"):
            params[w[1:]] = g
        elif w != g:
            return None
    return params
