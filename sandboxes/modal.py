"""The Modal provider: sandboxes are Modal Sandboxes, driven through the ``modal`` SDK's async (``.aio``) interface.

Configuration comes from the worker's environment as the SDK reads it (``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET``
or ``~/.modal.toml``); the pipeline's ``sandbox.options`` may name an ``image`` (a registry tag, default Debian
slim), ``cpu``, ``memory`` (MiB), ``app`` (default ``tardigrade``), a ``lifetime`` in seconds (default 24 h, Modal's
maximum) and ``native_snapshot: true``. ``sandbox.limits`` map onto Modal's hard limits: ``memory`` and ``cpu``
become the limit halves of Modal's ``(request, limit)`` pairs (``options.cpu``/``memory`` stay the requests);
``pids``, ``disk`` and ``tmp`` are Modal's own (its SDK has no setting for them: a step that exhausts its container
fails there, or loses the sandbox, which the run survives by rehydrating at most ``max_rehydrations`` times).
Network is off unless the pipeline allows it (``block_network``; host
allowlists map to Modal's outbound allowlists: sandboxes/network/providers.py).

Modal runs ``exec`` as root; step commands drop to uid 1000 with ``setpriv`` (util-linux, in every Debian image),
so read-only mounts and root-owned helper files stay out of their reach. ``exec`` has no kill: the reaper (see
sandboxes/remote.py) ends a timed-out or cancelled command by its marker. Files move with the SDK's filesystem
API (``copy_to_local``/``copy_from_local``, streamed). "Gone" is ``NotFoundError`` (unknown id),
``SandboxTerminatedError``, ``SandboxTimeoutError`` or ``ClientClosed``; a sandbox whose ``poll()`` returns an exit
code has finished and is gone too.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tardigrade.sandboxes.errors import ProviderUnavailable, SandboxError, SandboxLost, UnsafePath
from tardigrade.sandboxes.layout import BASE_ENV, SANDBOX_UID, WORKSPACE
from tardigrade.sandboxes.limits import Limits
from tardigrade.sandboxes.manifest import sandbox_path
from tardigrade.sandboxes.network.providers import modal_create_options
from tardigrade.sandboxes.provider import SandboxSpec
from tardigrade.sandboxes.remote import RemoteProcess, RemoteProvider, RemoteSandbox, as_sandbox_user

DEFAULT_APP = "tardigrade"
DEFAULT_LIFETIME = 24 * 3600


def modal_resources(limits: Limits, options: Mapping[str, Any]) -> dict[str, Any]:
    """``cpu=`` and ``memory=`` for ``Sandbox.create``: the pipeline's limits as Modal's hard limits, the options'
    values (or Modal's smallest defaults) as the requests, never above the limits."""
    limits = limits.resolved()
    assert limits.memory is not None
    memory_mib = max(1, limits.memory >> 20)
    requested_memory = options.get("memory")
    resources: dict[str, Any] = {"memory": (min(requested_memory or 128, memory_mib), memory_mib)}
    requested_cpu = options.get("cpu")
    if limits.cpu is not None:
        resources["cpu"] = (min(requested_cpu or limits.cpu, limits.cpu), limits.cpu)
    else:
        resources["cpu"] = requested_cpu
    return resources


def _exceptions() -> Any:
    import modal.exception

    return modal.exception


class _ModalProcess:
    def __init__(self, process: Any, pumps: Sequence[asyncio.Future[None]]) -> None:
        self._process = process
        self._pumps = pumps

    async def wait(self) -> int:
        code = await self._process.wait.aio()
        await asyncio.gather(*self._pumps)
        return int(code)

    async def kill(self) -> None:
        """Modal's exec has no kill; the reaper ends the process by its marker."""


async def _drain(stream: Any, on_output: Callable[[bytes], None]) -> None:
    async for chunk in stream:
        on_output(chunk if isinstance(chunk, bytes) else str(chunk).encode())


class ModalSandbox(RemoteSandbox):
    provider = "modal"

    def __init__(self, provider: ModalProvider, sdk_sandbox: Any, spec: SandboxSpec) -> None:
        super().__init__(provider, str(sdk_sandbox.object_id), spec)
        self._sb = sdk_sandbox

    async def _spawn(
        self, command: str, *, env: Mapping[str, str], cwd: str, root: bool, on_output: Callable[[bytes], None]
    ) -> RemoteProcess:
        script = as_sandbox_user(command, root=root)
        process = await self._sb.exec.aio("/bin/sh", "-c", script, workdir=cwd, env=dict(env), text=False)
        pumps = [
            asyncio.ensure_future(_drain(process.stdout, on_output)),
            asyncio.ensure_future(_drain(process.stderr, on_output)),
        ]
        return _ModalProcess(process, pumps)

    async def _download(self, remote_path: str, local_path: Path) -> None:
        await self._sb.filesystem.copy_to_local.aio(remote_path, str(local_path))

    async def _upload(self, local_path: Path, remote_path: str) -> None:
        await self._sb.filesystem.copy_from_local.aio(str(local_path), remote_path)

    async def _probe_alive(self) -> bool:
        return await self._sb.poll.aio() is None

    async def _terminate(self) -> None:
        await self._sb.terminate.aio()

    def _is_gone_error(self, error: BaseException) -> bool:
        exc = _exceptions()
        return isinstance(
            error, exc.NotFoundError | exc.SandboxTerminatedError | exc.SandboxTimeoutError | exc.ClientClosed
        )

    async def read_file(self, path: str, *, limit: int | None = None) -> bytes:
        target = sandbox_path(path)
        head = f"head -c {limit}" if limit is not None else "cat"
        data = bytearray()
        errors = bytearray()
        async with self._sdk(f"reading {target}"):
            process = await self._spawn_split(target, head, data, errors)
            code = await process.wait()
        if code != 0:
            message = errors.decode(errors="replace").strip()
            if "No such file" in message:
                raise FileNotFoundError(target)
            if code == 3 and "refusing to read it" in message:
                raise UnsafePath(message[-500:])
            raise SandboxError(f"reading {target} failed: {message[-500:]}")
        return bytes(data)

    async def _spawn_split(self, target: str, head: str, data: bytearray, errors: bytearray) -> RemoteProcess:
        """``cat`` as uid 1000 with stdout (the bytes) and stderr (the error) kept apart."""
        command = (
            f"{self._refuse_special(target)}; exec setpriv --reuid={SANDBOX_UID} --regid={SANDBOX_UID} --clear-groups"
            f" -- {head} -- {shlex.quote(target)}"
        )
        process = await self._sb.exec.aio("/bin/sh", "-c", command, workdir=WORKSPACE, env=dict(BASE_ENV), text=False)
        pumps = [
            asyncio.ensure_future(_drain(process.stdout, data.extend)),
            asyncio.ensure_future(_drain(process.stderr, errors.extend)),
        ]
        return _ModalProcess(process, pumps)

    async def _put_bytes(self, data: bytes, remote_path: str) -> None:
        await self._sb.filesystem.write_bytes.aio(data, remote_path)

    async def _native_snapshot(self) -> str | None:
        async with self._sdk("taking a Modal filesystem snapshot"):
            image = await self._sb.snapshot_filesystem.aio()
        return str(image.object_id)


class ModalProvider(RemoteProvider):
    name = "modal"

    def __init__(
        self, state_root: Path, *, sdk: Any = None, app: str = DEFAULT_APP, lifetime: int = DEFAULT_LIFETIME
    ) -> None:
        """``sdk`` is the ``modal`` module (the tests pass a fake with the same ``Sandbox``, ``App``, ``Image``)."""
        super().__init__(state_root)
        if sdk is None:
            try:
                import modal
            except ImportError:
                raise ProviderUnavailable(
                    "the modal provider needs the modal SDK: pip install 'tardigrade-temporal[modal]'"
                ) from None
            sdk = modal
        self._sdk = sdk
        self.app_name = app
        self.lifetime = lifetime

    @classmethod
    def from_env(cls, state_root: Path) -> ModalProvider:
        has_tokens = os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET")
        config = Path(os.environ.get("MODAL_CONFIG_PATH", Path.home() / ".modal.toml"))
        if not has_tokens and not config.is_file():
            raise ProviderUnavailable(
                "the modal provider is not configured on this worker: set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET in"
                " the worker's environment (or run `modal token new`), or use another provider"
            )
        return cls(state_root)

    async def create(self, spec: SandboxSpec) -> ModalSandbox:
        image_tag = spec.options.get("image")
        image = self._sdk.Image.from_registry(str(image_tag)) if image_tag else self._sdk.Image.debian_slim()
        return await self._create(spec, image)

    async def _create(self, spec: SandboxSpec, image: Any) -> ModalSandbox:
        options = spec.options

        async def make() -> ModalSandbox:
            app = await self._sdk.App.lookup.aio(str(options.get("app") or self.app_name), create_if_missing=True)
            sb = await self._sdk.Sandbox.create.aio(
                "sleep",
                "infinity",
                app=app,
                image=image,
                **modal_create_options(spec.network_rule, self._sdk.Sandbox.create),  # sandboxes/network/providers.py
                timeout=int(options.get("lifetime", self.lifetime)),
                **modal_resources(spec.limits, options),  # sandbox.limits as hard limits (sandboxes/limits.py)
                workdir="/",
            )
            return ModalSandbox(self, sb, spec)

        sandbox = await self._prepared(make)
        assert isinstance(sandbox, ModalSandbox)
        return sandbox

    async def create_from(self, spec: SandboxSpec, native_snapshot: str | None) -> tuple[ModalSandbox, bool]:
        if native_snapshot:
            exc = _exceptions()
            try:
                image = await self._sdk.Image.from_id.aio(native_snapshot)
                return await self._create(spec, image), True
            except (exc.NotFoundError, exc.InvalidError):
                pass  # expired or deleted: the portable snapshot is the fallback
        return await self.create(spec), False

    async def attach(self, sandbox_id: str) -> ModalSandbox:
        exc = _exceptions()
        try:
            sb = await self._sdk.Sandbox.from_id.aio(sandbox_id)
        except exc.NotFoundError:
            raise SandboxLost(sandbox_id, "Modal does not know it any more") from None
        code = await sb.poll.aio()
        if code is not None:
            raise SandboxLost(sandbox_id, f"it has finished (exit code {code}): terminated or timed out")
        return ModalSandbox(self, sb, SandboxSpec(network=False))
