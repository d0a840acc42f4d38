"""The Daytona provider: sandboxes are Daytona sandboxes, driven through the ``daytona`` SDK's `AsyncDaytona`.

It is registered through the ``tardigrade.providers`` entry point (pyproject.toml), exactly as a third-party
provider would be (sandboxes/provider_kit.py): it is the example that the provider kit works.

Configuration comes from the worker's environment as the SDK reads it: ``DAYTONA_API_KEY`` (required),
``DAYTONA_API_URL`` and ``DAYTONA_TARGET`` (optional). The pipeline's ``sandbox.options`` may name a Daytona
``snapshot`` or a registry ``image`` to boot from, ``cpu``/``memory``/``disk`` (cores, MiB as for Modal, GiB;
with ``image`` only: Daytona sizes snapshot-based sandboxes by the snapshot), ``auto_stop_interval`` (minutes
of inactivity before Daytona stops the sandbox, default 60; 0 disables it) and ``native_snapshot: true``.
``sandbox.limits`` are not applied (like E2B: the sandbox's size is its resources).

Commands: the sandbox is created with ``os_user: root``; step commands drop to uid 1000 with ``setpriv`` (as on
Modal). Each command runs in a session of its own (``execute_session_command(run_async=True)``, output streamed
by ``get_session_command_logs_async``), because the commands of one session run one after another and the reaper
must run beside a hung command. Daytona's sessions take no environment, so the command's environment is uploaded
as a root-only file that the command sources and deletes: secrets never appear on a command line. Output arrives
decoded as text (like E2B); files are byte-exact (they move through the files API).

A stopped sandbox keeps its disk: ``attach`` starts a stopped (auto-stopped) sandbox again, the fast same-provider
resume. "Gone" is ``DaytonaNotFoundError`` (not a missing file), ``DaytonaGoneError`` or a spot eviction, or a
sandbox whose state is destroyed, error or build_failed. Network is off unless the pipeline allows it
(``network_block_all``); host allowlists map to Daytona's ``network_allow_list`` (CIDRs) and ``domain_allow_list``.
"""

from __future__ import annotations

import asyncio
import math
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
from tardigrade.sandboxes.provider_options import DEFAULT_DAYTONA_AUTO_STOP as DEFAULT_AUTO_STOP
from tardigrade.sandboxes.provider_options import DaytonaOptions
from tardigrade.sandboxes.remote import RemoteProcess, RemoteProvider, RemoteSandbox, as_sandbox_user

_GONE_STATES = {"destroyed", "destroying", "error", "build_failed"}
_RESUMABLE_STATES = {"stopped", "stopping", "archived"}
_SETUP = (
    "pip install 'tardigrade-temporal[daytona]' and set DAYTONA_API_KEY (and DAYTONA_API_URL, DAYTONA_TARGET if"
    " not Daytona's defaults) in the worker's environment, or use another provider"
)
MISSING_SDK = f"the daytona provider needs the daytona SDK, which is not installed on this worker: {_SETUP}"
NOT_CONFIGURED = f"the daytona provider is not configured on this worker (DAYTONA_API_KEY is not set): {_SETUP}"


def _sdk() -> Any:
    try:
        import daytona
    except ImportError:
        raise ProviderUnavailable(MISSING_SDK) from None
    return daytona


def _state(sdk_sandbox: Any) -> str:
    state = getattr(sdk_sandbox, "state", None)
    return str(getattr(state, "value", state) or "unknown")


def daytona_network_options(rule: NetworkRule) -> dict[str, Any]:
    """The pipeline's network rule as Daytona's create parameters."""
    if rule.mode == "off":
        return {"network_block_all": True}
    if rule.mode == "internet":
        return {"network_block_all": False}
    names, cidrs = _split(rule.allow)
    options: dict[str, Any] = {"network_block_all": False}
    if cidrs:
        options["network_allow_list"] = ",".join(cidrs)
    if names:
        options["domain_allow_list"] = ",".join(names)
    return options


class _DaytonaProcess:
    """A command in a session of its own; its output streams until it ends, then its exit code is read."""

    def __init__(self, sandbox: DaytonaSandbox, session: str, command_id: str, logs: asyncio.Future[None]) -> None:
        self._sandbox = sandbox
        self._session = session
        self._command_id = command_id
        self._logs = logs

    async def wait(self) -> int:
        process = self._sandbox._sb.process
        await asyncio.shield(self._logs)
        try:
            for _ in range(100):  # the exit code is recorded a moment after the log stream ends
                command = await process.get_session_command(self._session, self._command_id)
                if command.exit_code is not None:
                    return int(command.exit_code)
                await asyncio.sleep(0.05)
            raise SandboxError(f"daytona sandbox {self._sandbox.id}: a finished command reported no exit code")
        finally:
            await self._sandbox._end_session(self._session)

    async def kill(self) -> None:
        """Deleting the session ends its processes; the reaper catches whatever escaped it."""
        self._logs.cancel()
        await self._sandbox._end_session(self._session)


class DaytonaSandbox(RemoteSandbox):
    provider = "daytona"

    def __init__(self, provider: DaytonaProvider, sdk_sandbox: Any, spec: SandboxSpec) -> None:
        super().__init__(provider, str(sdk_sandbox.id), spec)
        self._sb = sdk_sandbox

    async def _end_session(self, session: str) -> None:
        try:
            await self._sb.process.delete_session(session)
        except Exception as e:  # already gone with its sandbox, or never fully made: nothing left to end
            if not (
                self._is_gone_error(e) or isinstance(e, _sdk().DaytonaNotFoundError | _sdk().DaytonaBadRequestError)
            ):
                raise

    async def _spawn(
        self, command: str, *, env: Mapping[str, str], cwd: str, root: bool, on_output: Callable[[bytes], None]
    ) -> RemoteProcess:
        daytona = _sdk()
        token = uuid.uuid4().hex
        env_file = f"/tmp/.tardigrade-env-{token}"
        lines = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
        await self._sb.fs.upload_file(lines.encode(), env_file)
        run = as_sandbox_user(command, root=root)
        script = f". {env_file}; rm -f {env_file}; cd {shlex.quote(cwd)} || exit 1; {run}"
        session = f"tardigrade-{token[:16]}"
        await self._sb.process.create_session(session)
        try:
            response = await self._sb.process.execute_session_command(
                session, daytona.SessionExecuteRequest(command=f"/bin/sh -c {shlex.quote(script)}", run_async=True)
            )
        except BaseException:
            await self._end_session(session)
            raise

        def forward(text: str) -> None:
            on_output(text.encode("utf-8", "surrogateescape"))

        logs = asyncio.ensure_future(
            self._sb.process.get_session_command_logs_async(session, str(response.cmd_id), forward, forward)
        )
        return _DaytonaProcess(self, session, str(response.cmd_id), logs)

    async def _download(self, remote_path: str, local_path: Path) -> None:
        await self._sb.fs.download_file(remote_path, str(local_path))

    async def _upload(self, local_path: Path, remote_path: str) -> None:
        await self._sb.fs.upload_file(str(local_path), remote_path)

    async def _probe_alive(self) -> bool:
        try:
            await self._sb.refresh_data()
        except _sdk().DaytonaNotFoundError:  # deleted, or reclaimed with its disk
            return False
        return _state(self._sb) == "started"

    async def _terminate(self) -> None:
        await self._sb.delete()

    def _is_gone_error(self, error: BaseException) -> bool:
        """Only the SDK's unambiguous words; a 404 may be a session or a file, so it is settled by a liveness
        probe (`RemoteSandbox._sdk`), which asks Daytona for the sandbox itself."""
        daytona = _sdk()
        if isinstance(error, daytona.DaytonaSessionEndedError):
            return False
        return isinstance(error, daytona.DaytonaGoneError | daytona.DaytonaSpotEvictedError)

    async def _put_bytes(self, data: bytes, remote_path: str) -> None:
        await self._sb.fs.upload_file(data, remote_path)

    async def _native_snapshot(self) -> str | None:
        name = f"tardigrade-{uuid.uuid4().hex[:16]}"
        async with self._sdk("taking a Daytona snapshot"):
            await self._sb.create_snapshot(name)
        return name


class DaytonaProvider(RemoteProvider):
    name = "daytona"

    def __init__(self, state_root: Path, *, client: Any = None, auto_stop_interval: int = DEFAULT_AUTO_STOP) -> None:
        """``client`` is an `AsyncDaytona` (made from the environment on first use; the tests pass a fake)."""
        super().__init__(state_root)
        if client is None:
            _sdk()  # fail now, naming the extra, rather than at the first sandbox
        self._client = client
        self.auto_stop_interval = auto_stop_interval

    @classmethod
    def from_env(cls, state_root: Path) -> DaytonaProvider:
        _sdk()
        if not (os.environ.get("DAYTONA_API_KEY") or os.environ.get("DAYTONA_JWT_TOKEN")):
            raise ProviderUnavailable(NOT_CONFIGURED)
        return cls(state_root)

    def client(self) -> Any:
        if self._client is None:
            self._client = _sdk().AsyncDaytona()  # reads DAYTONA_API_KEY, DAYTONA_API_URL, DAYTONA_TARGET
        return self._client

    def _params(self, spec: SandboxSpec, snapshot: str | None) -> Any:
        daytona = _sdk()
        mine = {k: v for k, v in spec.options.items() if k in DaytonaOptions.model_fields}  # a list's other keys
        if isinstance(mine.get("cpu"), int) and not isinstance(mine.get("cpu"), bool):
            mine["cpu"] = float(mine["cpu"])
        options = DaytonaOptions.model_validate(mine)
        common: dict[str, Any] = {
            "os_user": "root",  # helpers run as root; step commands drop to uid 1000 (setpriv)
            "labels": {"created-by": "tardigrade"},
            "auto_stop_interval": options.auto_stop_interval,
            **daytona_network_options(spec.network_rule),
        }
        if snapshot is None and options.image:
            resources = daytona.Resources(
                cpu=math.ceil(options.cpu) if options.cpu else None,
                memory=-(-options.memory // 1024) if options.memory else None,  # MiB, as for Modal; Daytona: GiB
                disk=options.disk,
            )
            return daytona.CreateSandboxFromImageParams(image=options.image, resources=resources, **common)
        return daytona.CreateSandboxFromSnapshotParams(snapshot=snapshot or options.snapshot, **common)

    async def _create(self, spec: SandboxSpec, snapshot: str | None) -> DaytonaSandbox:
        params = self._params(spec, snapshot)

        async def make() -> DaytonaSandbox:
            return DaytonaSandbox(self, await self.client().create(params), spec)

        sandbox = await self._prepared(make)
        assert isinstance(sandbox, DaytonaSandbox)
        return sandbox

    async def create(self, spec: SandboxSpec) -> DaytonaSandbox:
        return await self._create(spec, None)

    async def create_from(self, spec: SandboxSpec, native_snapshot: str | None) -> tuple[DaytonaSandbox, bool]:
        if native_snapshot:
            daytona = _sdk()
            try:
                return await self._create(spec, native_snapshot), True
            except (daytona.DaytonaNotFoundError, daytona.DaytonaBadRequestError):
                pass  # expired or deleted: the portable snapshot is the fallback
        return await self.create(spec), False

    async def attach(self, sandbox_id: str) -> DaytonaSandbox:
        daytona = _sdk()
        try:
            sb = await self.client().get(sandbox_id)
        except daytona.DaytonaNotFoundError:
            raise SandboxLost(sandbox_id, "Daytona does not know it any more") from None
        state = _state(sb)
        if state in _GONE_STATES:
            raise SandboxLost(sandbox_id, f"Daytona reports it {state}")
        if state in _RESUMABLE_STATES:  # stopped keeps the disk: start it again, the fast resume
            try:
                await sb.start()
            except (daytona.DaytonaNotFoundError, daytona.DaytonaGoneError) as e:
                raise SandboxLost(sandbox_id, f"it could not be started again ({type(e).__name__})") from None
        return DaytonaSandbox(self, sb, SandboxSpec(network=False))


def provider_factory(
    name: str, state_dir: Path, *, worker_id: str, fault_injector: FaultInjector | None = None
) -> DaytonaProvider:
    """The ``tardigrade.providers`` entry point (sandboxes/provider_kit.py): a provider from the environment."""
    return DaytonaProvider.from_env(state_dir / "remote" / name)


provider_factory.options = DaytonaOptions  # type: ignore[attr-defined]
