"""The Runloop provider: sandboxes are Runloop devboxes, driven through ``runloop-api-client``'s `AsyncRunloop`.

Registered through the ``tardigrade.providers`` entry point (pyproject.toml), as Daytona is. Configuration comes
from the worker's environment as the SDK reads it: ``RUNLOOP_API_KEY`` (required), ``RUNLOOP_BASE_URL``
(optional). The pipeline's ``sandbox.options`` (`RunloopOptions`) may name a ``blueprint`` to boot from, a
``resource_size``, ``keep_alive`` (seconds before Runloop shuts the devbox down), ``idle_suspend`` (seconds idle
before Runloop suspends it; suspended devboxes keep their disk) and ``native_snapshot: true``. ``sandbox.limits``
are not applied (the devbox's size is its resources).

Commands: the devbox is launched with ``user_parameters`` uid 0 (root); step commands drop to uid 1000 with
``setpriv`` (as on Modal and Daytona). Each command is an asynchronous execution (``execute_async``); its output is
tailed through the two SSE streams (``stream_stdout_updates`` / ``stream_stderr_updates``, decoded text, as the
API sends it) and its exit code read with ``wait_for_command``. Runloop executions take no environment, so the
command's environment is uploaded into the root-only helper folder as a file the command sources and deletes:
secrets never appear on a command line. Files are byte-exact (``upload_file`` / ``download_file``).

Native snapshot: ``snapshot_disk`` (a disk snapshot of the whole devbox, kept until deleted) and
``create(snapshot_id=...)``, with the portable snapshot as the fallback. A suspended devbox keeps its disk:
``attach`` resumes it, the fast same-provider resume. "Gone" is a devbox Runloop does not know (404 on
``retrieve``) or whose status is ``shutdown`` or ``failure``; every other SDK error is settled by a liveness probe.
Network: off unless the pipeline allows it, through a Runloop network policy (deny-all, allow-all, or an
allowlist of host names and IPv4 CIDRs), created once per rule by this worker and reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tardigrade.sandboxes.errors import ProviderUnavailable, SandboxError, SandboxLost
from tardigrade.sandboxes.network.providers import _split
from tardigrade.sandboxes.network.rules import NetworkRule
from tardigrade.sandboxes.provider import FaultInjector, SandboxSpec
from tardigrade.sandboxes.provider_options import RunloopOptions
from tardigrade.sandboxes.remote import HELPER_DIR, RemoteProcess, RemoteProvider, RemoteSandbox, as_sandbox_user

_GONE_STATES = {"shutdown", "failure"}
_RESUMABLE_STATES = {"suspended", "suspending"}
_BOOTING_STATES = {"scheduled", "queued", "provisioning", "initializing", "resuming"}
_SETUP = (
    "pip install 'tardigrade-temporal[runloop]' and set RUNLOOP_API_KEY (and RUNLOOP_BASE_URL if not Runloop's"
    " default) in the worker's environment, or use another provider"
)
MISSING_SDK = f"the runloop provider needs the runloop-api-client SDK, which is not installed on this worker: {_SETUP}"
NOT_CONFIGURED = f"the runloop provider is not configured on this worker (RUNLOOP_API_KEY is not set): {_SETUP}"
_LONG_POLL = 25  # seconds: the most wait_for_command holds a request
_STREAM_GRACE = 10  # seconds the output streams may trail a finished execution


def _sdk() -> Any:
    try:
        import runloop_api_client
    except ImportError:
        raise ProviderUnavailable(MISSING_SDK) from None
    return runloop_api_client


def runloop_network_policy(rule: NetworkRule) -> dict[str, Any]:
    """The pipeline's network rule as the parameters of a Runloop network policy (``network_policies.create``)."""
    if rule.mode == "off":
        return {"allow_all": False, "allowed_hostnames": [], "allowed_cidrs": []}
    if rule.mode == "internet":
        return {"allow_all": True}
    names, cidrs = _split(rule.allow)
    v6 = [c for c in cidrs if ":" in c]
    if v6:
        raise SandboxError(
            f"sandbox.network allows {v6[0]}, but Runloop network policies take IPv4 networks only;"
            " allow its host name instead, or use another provider"
        )
    return {"allow_all": False, "allowed_hostnames": names, "allowed_cidrs": [{"cidr": c} for c in cidrs]}


class _RunloopProcess:
    """An asynchronous execution: its output streams until it ends, then its exit code is read."""

    def __init__(self, sandbox: RunloopSandbox, execution_id: str, streams: asyncio.Future[Any]) -> None:
        self._sandbox = sandbox
        self._execution_id = execution_id
        self._streams = streams

    async def wait(self) -> int:
        """Long-poll for the exit code, then let the output streams flush (they end with the execution; should one
        not, it is cut off after a grace period rather than hang the step)."""
        devboxes = self._sandbox._client.devboxes
        while True:
            try:
                view = await devboxes.wait_for_command(
                    self._execution_id, devbox_id=self._sandbox.id, statuses=["completed"], timeout_seconds=_LONG_POLL
                )
            except _sdk().APIStatusError as e:
                if e.status_code == 408:  # the long poll ran out: ask again
                    continue
                raise
            if view.status == "completed":
                break
        try:
            await asyncio.wait_for(asyncio.shield(self._streams), _STREAM_GRACE)
        except TimeoutError:
            self._streams.cancel()
        if view.exit_status is None:
            raise SandboxError(f"runloop devbox {self._sandbox.id}: a finished command reported no exit code")
        return int(view.exit_status)

    async def kill(self) -> None:
        """Kill the execution's process group; the reaper catches whatever escaped it."""
        self._streams.cancel()
        await self._sandbox._client.devboxes.executions.kill(
            self._execution_id, devbox_id=self._sandbox.id, kill_process_group=True
        )


class RunloopSandbox(RemoteSandbox):
    provider = "runloop"

    def __init__(self, provider: RunloopProvider, devbox_id: str, spec: SandboxSpec) -> None:
        super().__init__(provider, devbox_id, spec)
        self._client = provider.client()
        self._helper_ready = False

    async def _ensure_helper_dir(self) -> None:
        """The root-only folder the environment files go to; made once per handle, before the first of them."""
        if self._helper_ready:
            return
        started = await self._client.devboxes.execute_async(
            self.id, command=f"mkdir -p {HELPER_DIR} && chmod 700 {HELPER_DIR}"
        )
        code = await _RunloopProcess(self, started.execution_id, _done()).wait()
        if code != 0:
            raise SandboxError(f"runloop devbox {self.id}: preparing {HELPER_DIR} failed (exit code {code})")
        self._helper_ready = True

    async def _spawn(
        self, command: str, *, env: Mapping[str, str], cwd: str, root: bool, on_output: Callable[[bytes], None]
    ) -> RemoteProcess:
        await self._ensure_helper_dir()
        env_file = f"{HELPER_DIR}/env-{uuid.uuid4().hex}"
        lines = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
        await self._client.devboxes.upload_file(self.id, path=env_file, file=lines.encode())
        run = as_sandbox_user(command, root=root)
        script = f". {env_file}; rm -f {env_file}; cd {shlex.quote(cwd)} || exit 1; {run}"
        started = await self._client.devboxes.execute_async(self.id, command=f"/bin/sh -c {shlex.quote(script)}")
        return _RunloopProcess(self, started.execution_id, self._follow(started.execution_id, on_output))

    def _follow(self, execution_id: str, on_output: Callable[[bytes], None]) -> asyncio.Future[Any]:
        executions = self._client.devboxes.executions

        async def tail(open_stream: Callable[..., Any]) -> None:
            stream = await open_stream(execution_id, devbox_id=self.id)
            try:
                async for chunk in stream:
                    if chunk.output:
                        on_output(chunk.output.encode("utf-8", "surrogateescape"))
            finally:
                with contextlib.suppress(Exception):
                    await stream.close()

        streams = asyncio.gather(tail(executions.stream_stdout_updates), tail(executions.stream_stderr_updates))
        streams.add_done_callback(lambda f: f.cancelled() or f.exception())  # a killed command's: nobody awaits it
        return streams

    async def _download(self, remote_path: str, local_path: Path) -> None:
        response = await self._client.devboxes.download_file(self.id, path=remote_path)
        await response.write_to_file(local_path)

    async def _upload(self, local_path: Path, remote_path: str) -> None:
        await self._client.devboxes.upload_file(self.id, path=remote_path, file=local_path)

    async def _put_bytes(self, data: bytes, remote_path: str) -> None:
        await self._client.devboxes.upload_file(self.id, path=remote_path, file=data)

    async def _probe_alive(self) -> bool:
        try:
            view = await self._client.devboxes.retrieve(self.id)
        except _sdk().NotFoundError:
            return False
        return str(view.status) == "running"

    async def _terminate(self) -> None:
        with contextlib.suppress(_sdk().NotFoundError):
            await self._client.devboxes.shutdown(self.id, force="true")

    def _is_gone_error(self, error: BaseException) -> bool:
        """Runloop has no error that says only "this devbox is gone" (a 404 may be a file or an execution): every
        failure is settled by a liveness probe (`RemoteSandbox._sdk`), which asks Runloop for the devbox itself."""
        return False

    async def _native_snapshot(self) -> str | None:
        async with self._sdk("taking a Runloop disk snapshot"):
            view = await self._client.devboxes.snapshot_disk(
                self.id, name=f"tardigrade-{uuid.uuid4().hex[:16]}", metadata={"created-by": "tardigrade"}
            )
        return str(view.id)


def _done() -> asyncio.Future[Any]:
    """A finished future: an execution whose output nobody follows."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


class RunloopProvider(RemoteProvider):
    name = "runloop"

    def __init__(self, state_root: Path, *, client: Any = None) -> None:
        """``client`` is an `AsyncRunloop` (made from the environment on first use; the tests pass one whose HTTP
        transport is the fake Runloop)."""
        super().__init__(state_root)
        if client is None:
            _sdk()  # fail now, naming the extra, rather than at the first devbox
        self._client = client
        self._policies: dict[tuple[str, tuple[str, ...]], str] = {}  # network rule -> policy id made for it
        self._policy_lock = asyncio.Lock()

    @classmethod
    def from_env(cls, state_root: Path) -> RunloopProvider:
        _sdk()
        if not os.environ.get("RUNLOOP_API_KEY"):
            raise ProviderUnavailable(NOT_CONFIGURED)
        return cls(state_root)

    def client(self) -> Any:
        if self._client is None:
            self._client = _sdk().AsyncRunloop()  # reads RUNLOOP_API_KEY and RUNLOOP_BASE_URL
        return self._client

    async def _network_policy(self, rule: NetworkRule) -> str:
        """The id of a network policy enforcing ``rule``, made on first use and reused for the same rule."""
        key = (rule.mode, tuple(rule.allow))
        async with self._policy_lock:
            if key not in self._policies:
                policy = await self.client().network_policies.create(
                    name=f"tardigrade-{rule.mode}", description="made by tardigrade", **runloop_network_policy(rule)
                )
                self._policies[key] = str(policy.id)
            return self._policies[key]

    async def _launch(self, spec: SandboxSpec, snapshot_id: str | None) -> dict[str, Any]:
        mine = {k: v for k, v in spec.options.items() if k in RunloopOptions.model_fields}  # a list's other keys
        options = RunloopOptions.model_validate(mine)
        launch: dict[str, Any] = {
            "user_parameters": {"uid": 0, "username": "root"},  # helpers run as root; steps drop to uid 1000
            "keep_alive_time_seconds": options.keep_alive,
            "network_policy_id": await self._network_policy(spec.network_rule),
        }
        if options.resource_size:
            launch["resource_size_request"] = options.resource_size
        if options.idle_suspend:
            launch["after_idle"] = {"idle_time_seconds": options.idle_suspend, "on_idle": "suspend"}
        params: dict[str, Any] = {"launch_parameters": launch, "metadata": {"created-by": "tardigrade"}}
        if snapshot_id:
            params["snapshot_id"] = snapshot_id
        elif options.blueprint:
            params["blueprint_name"] = options.blueprint
        return params

    async def _create(self, spec: SandboxSpec, snapshot_id: str | None) -> RunloopSandbox:
        params = await self._launch(spec, snapshot_id)
        devboxes = self.client().devboxes

        async def make() -> RunloopSandbox:
            view = await devboxes.create(**params)
            try:
                await devboxes.await_running(view.id)
            except BaseException:
                with contextlib.suppress(Exception):
                    await devboxes.shutdown(view.id, force="true")
                raise
            return RunloopSandbox(self, str(view.id), spec)

        sandbox = await self._prepared(make)
        assert isinstance(sandbox, RunloopSandbox)
        return sandbox

    async def create(self, spec: SandboxSpec) -> RunloopSandbox:
        return await self._create(spec, None)

    async def create_from(self, spec: SandboxSpec, native_snapshot: str | None) -> tuple[RunloopSandbox, bool]:
        if native_snapshot:
            runloop = _sdk()
            try:
                return await self._create(spec, native_snapshot), True
            except (runloop.NotFoundError, runloop.BadRequestError):
                pass  # deleted: the portable snapshot is the fallback
        return await self.create(spec), False

    async def attach(self, sandbox_id: str) -> RunloopSandbox:
        runloop = _sdk()
        devboxes = self.client().devboxes
        try:
            view = await devboxes.retrieve(sandbox_id)
        except runloop.NotFoundError:
            raise SandboxLost(sandbox_id, "Runloop does not know it any more") from None
        status = str(view.status)
        if status in _GONE_STATES:
            raise SandboxLost(
                sandbox_id, f"Runloop reports it {status} ({view.shutdown_reason or view.failure_reason})"
            )
        try:
            if status in _RESUMABLE_STATES:  # suspended keeps the disk: resume it, the fast same-provider resume
                if status == "suspending":
                    await devboxes.await_suspended(sandbox_id)
                await devboxes.resume(sandbox_id)
                await devboxes.await_running(sandbox_id)
            elif status in _BOOTING_STATES:
                await devboxes.await_running(sandbox_id)
        except (runloop.NotFoundError, runloop.BadRequestError) as e:
            raise SandboxLost(sandbox_id, f"it could not be resumed ({type(e).__name__})") from None
        except runloop.RunloopError as e:
            if "terminal state" in str(e):  # await_running: it went to shutdown or failure instead
                raise SandboxLost(sandbox_id, str(e)) from None
            raise
        return RunloopSandbox(self, sandbox_id, SandboxSpec(network=False))


def provider_factory(
    name: str, state_dir: Path, *, worker_id: str, fault_injector: FaultInjector | None = None
) -> RunloopProvider:
    """The ``tardigrade.providers`` entry point (sandboxes/provider_kit.py): a provider from the environment."""
    return RunloopProvider.from_env(state_dir / "remote" / name)


provider_factory.options = RunloopOptions  # type: ignore[attr-defined]
