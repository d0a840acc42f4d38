"""The Cloudflare provider: sandboxes are Cloudflare Sandbox containers, reached through the bridge Worker.

Cloudflare's sandbox SDK (``@cloudflare/sandbox``) only runs inside a Worker, so this repository ships one
(clients/cloudflare-bridge/, deployed by the user with ``wrangler deploy``) that speaks a small authenticated HTTP
protocol (documented in its README.md; `ROUTES` below names its routes, and tests/test_cloudflare.py checks them
against the Worker's own table). This module is that protocol's client (`BridgeClient`, on ``httpx``) and the
provider on top of it. Registered through the ``tardigrade.providers`` entry point (pyproject.toml).

Configuration, from the worker's environment: ``CLOUDFLARE_SANDBOX_URL`` (the deployed bridge, e.g.
``https://tardigrade-cloudflare-bridge.<account>.workers.dev``) and ``CLOUDFLARE_SANDBOX_TOKEN`` (the bearer token
set with ``wrangler secret put BRIDGE_TOKEN``). ``sandbox.options``: ``native_snapshot: true`` (Cloudflare's own
directory backups, squashfs archives in the bridge's R2 bucket) and ``backup_ttl`` (seconds they are kept).

Commands run as root in the container; step commands drop to uid 1000 with ``setpriv`` (as on Modal and Daytona).
The environment travels in the request body (never on a command line) and the bridge hands it to the SDK's
``execStream``; output streams back as NDJSON lines of text (decoded by the SDK, like E2B's). Files move byte-exact.

Loss: a Cloudflare container that sleeps (idle past the bridge's ``SLEEP_AFTER``), crashes or is moved comes back
with an empty disk. The bridge writes a root-only boot marker when it creates a sandbox and answers
``404 sandbox_not_found`` for one whose container lacks it, or that it never created: that is `SandboxLost`, and the
run rehydrates from its last snapshot. Network is off unless the pipeline allows it (the Durable Object's
``enableInternet``); host allowlists map to Cloudflare's ``allowedHosts`` (names and single IP addresses).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from tardigrade.sandboxes.errors import ProviderUnavailable, SandboxError, SandboxLost
from tardigrade.sandboxes.layout import HOME, WORKSPACE
from tardigrade.sandboxes.network.rules import NetworkRule
from tardigrade.sandboxes.provider import FaultInjector, SandboxSpec
from tardigrade.sandboxes.provider_options import CloudflareOptions
from tardigrade.sandboxes.remote import RemoteProcess, RemoteProvider, RemoteSandbox, as_sandbox_user

_SETUP = (
    "pip install 'tardigrade-temporal[cloudflare]', deploy the bridge Worker (clients/cloudflare-bridge/README.md)"
    " and set CLOUDFLARE_SANDBOX_URL and CLOUDFLARE_SANDBOX_TOKEN in the worker's environment, or use another provider"
)
MISSING_SDK = f"the cloudflare provider needs httpx, which is not installed on this worker: {_SETUP}"
NOT_CONFIGURED = (
    "the cloudflare provider is not configured on this worker (CLOUDFLARE_SANDBOX_URL or CLOUDFLARE_SANDBOX_TOKEN"
    f" is not set): {_SETUP}"
)

#: The bridge's protocol: (method, path pattern) per operation. The Worker's ROUTES table
#: (clients/cloudflare-bridge/src/index.ts) and the fake (tests/fake_cloudflare_bridge.py) name the same ones.
ROUTES: dict[str, tuple[str, str]] = {
    "create": ("POST", "/v1/sandboxes"),
    "describe": ("GET", "/v1/sandboxes/:id"),
    "destroy": ("DELETE", "/v1/sandboxes/:id"),
    "exec": ("POST", "/v1/sandboxes/:id/exec"),
    "read": ("GET", "/v1/sandboxes/:id/files"),
    "write": ("PUT", "/v1/sandboxes/:id/files"),
    "list": ("GET", "/v1/sandboxes/:id/list"),
    "tar_out": ("GET", "/v1/sandboxes/:id/tar"),
    "tar_in": ("PUT", "/v1/sandboxes/:id/tar"),
    "backup": ("POST", "/v1/sandboxes/:id/backups"),
    "restore": ("POST", "/v1/sandboxes/:id/restore"),
}
_CHUNK = 1 << 20


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise ProviderUnavailable(MISSING_SDK) from None
    return httpx


class BridgeError(Exception):
    """An error answer of the bridge: HTTP status, the protocol's error code and its message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message


def cloudflare_network(rule: NetworkRule) -> dict[str, Any]:
    """The pipeline's network rule as the bridge's create body (the Durable Object's enableInternet/allowedHosts)."""
    if rule.mode == "off":
        return {"internet": False, "allowedHosts": []}
    if rule.mode == "internet":
        return {"internet": True, "allowedHosts": []}
    # NetworkRule admits names, `*.` wildcards and single IP addresses: all of them are Cloudflare host entries.
    hosts = list(rule.allow)
    return {"internet": False, "allowedHosts": hosts}


class BridgeClient:
    """The bridge's HTTP protocol (clients/cloudflare-bridge/README.md), one method per route."""

    def __init__(self, url: str, token: str, *, transport: Any = None) -> None:
        httpx = _httpx()
        self.url = url.rstrip("/")
        # A bridge that stops answering for 5 minutes is an error (then a liveness probe); an exec stream has no read
        # timeout: a quiet command may run for hours (the caller's step timeout applies).
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(60.0, read=300.0),
            transport=transport,
        )
        self._exec_timeout = httpx.Timeout(60.0, read=None)

    @staticmethod
    def path(operation: str, sandbox_id: str = "") -> str:
        return ROUTES[operation][1].replace(":id", sandbox_id)

    @staticmethod
    async def _raise_for(response: Any) -> None:
        if response.status_code < 400:
            return
        await response.aread()
        try:
            body = response.json()
            code, message = str(body.get("error", "error")), str(body.get("message", ""))
        except ValueError:
            code, message = "error", response.text[:500]
        raise BridgeError(response.status_code, code, message)

    async def _call(self, operation: str, sandbox_id: str = "", **kwargs: Any) -> Any:
        method, _ = ROUTES[operation]
        response = await self._http.request(method, self.path(operation, sandbox_id), **kwargs)
        await self._raise_for(response)
        return response

    async def create(self, network: Mapping[str, Any]) -> str:
        response = await self._call("create", json={"network": dict(network)})
        return str(response.json()["id"])

    async def describe(self, sandbox_id: str) -> dict[str, Any]:
        return dict((await self._call("describe", sandbox_id)).json())

    async def destroy(self, sandbox_id: str) -> None:
        await self._call("destroy", sandbox_id)

    @contextlib.asynccontextmanager
    async def exec(
        self, sandbox_id: str, command: str, *, env: Mapping[str, str], cwd: str, timeout_ms: int | None = None
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """Run ``command`` as root; yields the NDJSON events as they arrive (the connection closes on exit)."""
        body = {"command": command, "env": dict(env), "cwd": cwd, "timeout_ms": timeout_ms}
        method, _ = ROUTES["exec"]
        path = self.path("exec", sandbox_id)
        async with self._http.stream(method, path, json=body, timeout=self._exec_timeout) as response:
            await self._raise_for(response)

            async def events() -> AsyncIterator[dict[str, Any]]:
                async for line in response.aiter_lines():
                    if line.strip():
                        yield json.loads(line)

            yield events()

    async def read_file(self, sandbox_id: str, path: str, local_path: Path) -> None:
        method, _ = ROUTES["read"]
        async with self._http.stream(method, self.path("read", sandbox_id), params={"path": path}) as response:
            await self._raise_for(response)
            with open(local_path, "wb") as out:
                async for chunk in response.aiter_bytes(_CHUNK):
                    out.write(chunk)

    async def write_file(self, sandbox_id: str, path: str, content: bytes | Path) -> None:
        await self._call("write", sandbox_id, params={"path": path}, content=_body(content))

    async def list_files(self, sandbox_id: str, path: str, *, recursive: bool = False) -> list[dict[str, Any]]:
        params = {"path": path, "recursive": "1" if recursive else "0"}
        return list((await self._call("list", sandbox_id, params=params)).json()["files"])

    async def tar_out(self, sandbox_id: str, path: str, local_path: Path) -> None:
        method, _ = ROUTES["tar_out"]
        async with self._http.stream(method, self.path("tar_out", sandbox_id), params={"path": path}) as response:
            await self._raise_for(response)
            with open(local_path, "wb") as out:
                async for chunk in response.aiter_bytes(_CHUNK):
                    out.write(chunk)

    async def tar_in(self, sandbox_id: str, path: str, archive: Path) -> None:
        await self._call("tar_in", sandbox_id, params={"path": path}, content=_body(archive))

    async def backup(self, sandbox_id: str, dirs: list[str], ttl: int) -> list[dict[str, str]]:
        response = await self._call("backup", sandbox_id, json={"dirs": dirs, "ttl": ttl})
        return [{"id": str(b["id"]), "dir": str(b["dir"])} for b in response.json()["backups"]]

    async def restore(self, sandbox_id: str, backups: list[dict[str, str]]) -> None:
        await self._call("restore", sandbox_id, json={"backups": backups})

    async def close(self) -> None:
        await self._http.aclose()


def _body(content: bytes | Path) -> Any:
    if isinstance(content, bytes):
        return content

    async def chunks() -> AsyncIterator[bytes]:
        with open(content, "rb") as f:
            while block := await asyncio.to_thread(f.read, _CHUNK):
                yield block

    return chunks()


class _BridgeProcess:
    """A command's exec stream, followed by a task; killing it closes the stream (the reaper does the rest)."""

    def __init__(self, task: asyncio.Task[int]) -> None:
        self._task = task

    async def wait(self) -> int:
        return await asyncio.shield(self._task)

    async def kill(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


class CloudflareSandbox(RemoteSandbox):
    provider = "cloudflare"

    def __init__(self, provider: CloudflareProvider, sandbox_id: str, spec: SandboxSpec) -> None:
        super().__init__(provider, sandbox_id, spec)
        self._bridge = provider.client()
        self._options = provider.options_for(spec)

    async def _spawn(
        self, command: str, *, env: Mapping[str, str], cwd: str, root: bool, on_output: Callable[[bytes], None]
    ) -> RemoteProcess:
        run = as_sandbox_user(command, root=root)
        script = f"cd {shlex.quote(cwd)} || exit 1; {run}"
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def follow() -> int:
            try:
                async with self._bridge.exec(self.id, f"/bin/sh -c {shlex.quote(script)}", env=env, cwd="/") as events:
                    started.set_result(None)
                    async for event in events:
                        if "data" in event:
                            on_output(str(event["data"]).encode("utf-8", "surrogateescape"))
                        elif "exit_code" in event:
                            return int(event["exit_code"])
                        elif "error" in event:
                            raise BridgeError(502, str(event["error"]), str(event.get("message", "")))
            except asyncio.CancelledError:
                started.cancel()
                raise
            except BaseException as e:
                if not started.done():
                    started.set_exception(e)
                raise
            raise BridgeError(502, "exec_stream_ended", "the exec stream ended without an exit code")

        task = asyncio.ensure_future(follow())
        try:
            await asyncio.shield(started)  # errors of the request itself (404, 401) surface here, from _spawn
        except BaseException:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task  # its error is the one raised here: retrieve it, so it is not reported twice
            raise
        return _BridgeProcess(task)

    async def _download(self, remote_path: str, local_path: Path) -> None:
        try:
            await self._bridge.read_file(self.id, remote_path, local_path)
        except BridgeError as e:
            if e.code == "file_not_found":
                raise FileNotFoundError(remote_path) from None
            raise

    async def _upload(self, local_path: Path, remote_path: str) -> None:
        await self._bridge.write_file(self.id, remote_path, local_path)

    async def _put_bytes(self, data: bytes, remote_path: str) -> None:
        await self._bridge.write_file(self.id, remote_path, data)

    async def _probe_alive(self) -> bool:
        try:
            await self._bridge.describe(self.id)
        except BridgeError as e:
            if e.code == "sandbox_not_found":
                return False
            raise
        return True

    async def _terminate(self) -> None:
        await self._bridge.destroy(self.id)

    def _is_gone_error(self, error: BaseException) -> bool:
        return isinstance(error, BridgeError) and error.code == "sandbox_not_found"

    async def _native_snapshot(self) -> str | None:
        """Cloudflare's directory backups of /workspace and /home/sandbox (squashfs in the bridge's R2 bucket)."""
        async with self._sdk("taking a Cloudflare backup"):
            backups = await self._bridge.backup(self.id, [WORKSPACE, HOME], self._options.backup_ttl)
        return json.dumps(backups, separators=(",", ":"))


class CloudflareProvider(RemoteProvider):
    name = "cloudflare"

    def __init__(self, state_root: Path, *, url: str, token: str, transport: Any = None) -> None:
        """``transport`` is an httpx transport (the tests pass none: they run a real HTTP fake on loopback)."""
        super().__init__(state_root)
        _httpx()
        self.url = url
        self._token = token
        self._transport = transport
        self._client: BridgeClient | None = None

    @classmethod
    def from_env(cls, state_root: Path) -> CloudflareProvider:
        _httpx()
        url = os.environ.get("CLOUDFLARE_SANDBOX_URL", "")
        token = os.environ.get("CLOUDFLARE_SANDBOX_TOKEN", "")
        if not (url and token):
            raise ProviderUnavailable(NOT_CONFIGURED)
        return cls(state_root, url=url, token=token)

    def client(self) -> BridgeClient:
        if self._client is None:
            self._client = BridgeClient(self.url, self._token, transport=self._transport)
        return self._client

    @staticmethod
    def options_for(spec: SandboxSpec) -> CloudflareOptions:
        mine = {k: v for k, v in spec.options.items() if k in CloudflareOptions.model_fields}  # a list's other keys
        return CloudflareOptions.model_validate(mine)

    async def create(self, spec: SandboxSpec) -> CloudflareSandbox:
        network = cloudflare_network(spec.network_rule)
        self.options_for(spec)  # a bad option fails before anything is created

        async def make() -> CloudflareSandbox:
            return CloudflareSandbox(self, await self.client().create(network), spec)

        sandbox = await self._prepared(make)
        assert isinstance(sandbox, CloudflareSandbox)
        return sandbox

    async def create_from(self, spec: SandboxSpec, native_snapshot: str | None) -> tuple[CloudflareSandbox, bool]:
        sandbox = await self.create(spec)
        if not native_snapshot:
            return sandbox, False
        try:
            backups = [{"id": str(b["id"]), "dir": str(b["dir"])} for b in json.loads(native_snapshot)]
        except (ValueError, TypeError, KeyError):
            return sandbox, False  # not one of ours: the portable snapshot is the fallback
        try:
            async with sandbox._sdk("restoring a Cloudflare backup"):
                await self.client().restore(sandbox.id, backups)
        except SandboxError as e:
            if isinstance(e.__cause__, BridgeError) and e.__cause__.code == "backup_not_found":
                return sandbox, False  # expired (past its ttl) or deleted: the portable snapshot restores it all
            raise
        return sandbox, True

    async def attach(self, sandbox_id: str) -> CloudflareSandbox:
        try:
            await self.client().describe(sandbox_id)
        except BridgeError as e:
            if e.code == "sandbox_not_found":
                raise SandboxLost(
                    sandbox_id, f"the Cloudflare bridge does not know it any more ({e.message})"
                ) from None
            raise
        return CloudflareSandbox(self, sandbox_id, SandboxSpec(network=False))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        await super().close()


def provider_factory(
    name: str, state_dir: Path, *, worker_id: str, fault_injector: FaultInjector | None = None
) -> CloudflareProvider:
    """The ``tardigrade.providers`` entry point (sandboxes/provider_kit.py): a provider from the environment."""
    return CloudflareProvider.from_env(state_dir / "remote" / name)


provider_factory.options = CloudflareOptions  # type: ignore[attr-defined]
