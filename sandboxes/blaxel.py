"""The Blaxel provider: sandboxes are Blaxel micro-VMs, driven through the ``blaxel`` SDK's async `SandboxInstance`.

It is registered through the ``tardigrade.providers`` entry point (pyproject.toml), like Daytona.

Configuration comes from the worker's environment as the SDK reads it, when ``blaxel`` is first imported:
``BL_API_KEY`` and ``BL_WORKSPACE`` (or ``BL_CLIENT_CREDENTIALS``), optionally ``BL_REGION``; ``BLAXEL_IMAGE`` is
the worker's default image. The pipeline's
``sandbox.options`` may name an ``image``, ``memory`` (MiB; CPU follows it), a ``region``, ``idle_ttl`` (Blaxel
deletes a sandbox unused that long, default 24h, so a forgotten one does not sit in standby for ever) and
``native_snapshot: true``. ``sandbox.limits`` are not applied (the sandbox's size is its memory).

The image must have a GNU userland: ``setpriv`` (util-linux), GNU ``find`` and GNU ``tar``, which the mirror and
the uid drop use. Blaxel's default image is Alpine (busybox) and lacks them; a new sandbox is checked and refused
with a message naming ``sandbox.options.image`` (use a Debian/Ubuntu-based image).

Commands: Blaxel's sandbox API runs processes as root; step commands drop to uid 1000 with ``setpriv`` (as on
Modal and Daytona). Each command is a named process started with ``wait_for_completion`` and log callbacks, so
its output streams while the request is held open (``keep_alive``: the sandbox does not scale to zero under it),
and ``process.kill(name)`` ends it from beside. The environment travels in the request body, never on a command
line. Output arrives as lines of text (the sandbox API's log stream is line based): each line is passed on with
its newline; a last line without one gains one. Files are byte-exact (the filesystem API moves bytes).

Standby is the fast path: an idle Blaxel sandbox is snapshotted with its memory and processes and resumes in
milliseconds on the next request, so ``attach`` to a sandbox in standby needs nothing at all; an archived one
(disk kept, processes gone) is unarchived. "Gone" is an unknown sandbox (404) or one whose status is TERMINATED,
FAILED, DELETING or DEACTIVATED. Native snapshots are Blaxel's snapshots (filesystem, memory and processes; a
workspace resource that outlives its sandbox), restored by forking them into a new sandbox.

Network: Blaxel has no switch that turns egress off; its controls are the platform proxy's domain allowlist and
the ``proxy`` firewall ruleset (egress only through that proxy). ``network: false`` (the default) is an allowlist
holding one reserved name that never resolves (``egress-disabled.invalid``), so nothing is reachable; an allowlist
of host names maps to the proxy's ``allowed_domains``; ``network: true`` leaves the network as Blaxel makes it.
IP addresses in an allowlist are refused (Blaxel filters by name only). Blaxel documents these controls as a
preview, in some regions only: check them for your workspace before relying on them against a hostile sandbox.
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
from tardigrade.sandboxes.provider_options import BlaxelOptions
from tardigrade.sandboxes.remote import RemoteProcess, RemoteProvider, RemoteSandbox, as_sandbox_user

_GONE_STATUSES = {"TERMINATED", "FAILED", "DELETING", "DEACTIVATED", "DEACTIVATING"}
_ARCHIVED_STATUSES = {"ARCHIVED", "ARCHIVING"}
NO_EGRESS = "egress-disabled.invalid"  # RFC 2606: .invalid never resolves, so an allowlist of it allows nothing
_SETUP = (
    "pip install 'tardigrade-temporal[blaxel]' and set BL_API_KEY and BL_WORKSPACE (and BL_REGION to choose a"
    " region) in the worker's environment, or use another provider"
)
MISSING_SDK = f"the blaxel provider needs the blaxel SDK, which is not installed on this worker: {_SETUP}"
NOT_CONFIGURED = (
    f"the blaxel provider is not configured on this worker (BL_API_KEY or BL_WORKSPACE is not set): {_SETUP}"
)
#: What the mirror and the uid drop need from the image; busybox (Alpine) has none of the three.
_TOOLS_CHECK = (
    "command -v setpriv >/dev/null && find / -maxdepth 0 -printf '' 2>/dev/null"
    " && tar --version 2>/dev/null | grep -q 'GNU tar'"
)


def _sdk() -> Any:
    """``blaxel.core``: `SandboxInstance`, `Snapshot` and the models (imported lazily: the extra is optional)."""
    try:
        import blaxel.core
    except ImportError:
        raise ProviderUnavailable(MISSING_SDK) from None
    return blaxel.core


def _errors() -> tuple[type[Exception], type[Exception], type[Exception]]:
    """(control-plane error, sandbox-API error, snapshot error) - the SDK's own classes."""
    from blaxel.core.sandbox.default.sandbox import SandboxAPIError
    from blaxel.core.sandbox.types import ResponseError
    from blaxel.core.snapshot import SnapshotAPIError

    return SandboxAPIError, ResponseError, SnapshotAPIError


def _status_code(error: BaseException) -> int | None:
    code = getattr(error, "status_code", None)
    if code is None:
        code = getattr(error, "status", None)
    try:
        return int(code) if code is not None else None
    except (TypeError, ValueError):
        return None


def _status(instance: Any) -> str:
    status = getattr(instance, "status", None)
    value = getattr(status, "value", status)
    return str(value).upper() if isinstance(value, str) and value else "UNKNOWN"


def blaxel_network(rule: NetworkRule) -> Any:
    """The pipeline's network rule as Blaxel's ``SandboxNetwork`` (None: Blaxel's open default)."""
    if rule.mode == "internet":
        return None
    from blaxel.core.client.models import FirewallConfig, ProxyConfig, SandboxNetwork

    names, cidrs = _split(rule.allow)
    if cidrs:
        raise SandboxError(
            f"sandbox.network allows IP addresses ({', '.join(cidrs)}), but Blaxel filters egress by domain name"
            " only; list host names instead, or run this pipeline on another provider"
        )
    allowed = names if rule.mode == "allow" and names else [NO_EGRESS]
    return SandboxNetwork(
        firewall=FirewallConfig(rulesets=["proxy"]), proxy=ProxyConfig(allowed_domains=allowed, routing=[])
    )


def _lines_to_bytes(on_output: Callable[[bytes], None]) -> Callable[[str], None]:
    """The SDK hands over one line at a time, without its newline: put it back."""

    def forward(line: str) -> None:
        data = line.encode("utf-8", "surrogateescape")
        on_output(data if data.endswith(b"\n") else data + b"\n")

    return forward


class _BlaxelProcess:
    """A named process whose exec request is held open until it ends; its result carries the exit code."""

    def __init__(self, sandbox: BlaxelSandbox, name: str, request: asyncio.Future[Any]) -> None:
        self._sandbox = sandbox
        self._name = name
        self._request = request
        request.add_done_callback(lambda f: f.cancelled() or f.exception())  # a dropped request is not an error

    async def wait(self) -> int:
        response = await asyncio.shield(self._request)
        code = getattr(response, "exit_code", None)
        if not isinstance(code, int):
            raise SandboxError(f"blaxel sandbox {self._sandbox.id}: a finished command reported no exit code")
        return code

    async def kill(self) -> None:
        """Kill it by name; the reaper catches whatever escaped it."""
        with contextlib.suppress(Exception):  # already ended: nothing to kill
            await self._sandbox._sb.process.kill(self._name)
        self._request.cancel()


class BlaxelSandbox(RemoteSandbox):
    provider = "blaxel"

    def __init__(self, provider: BlaxelProvider, instance: Any, spec: SandboxSpec) -> None:
        super().__init__(provider, str(instance.metadata.name), spec)
        self._blaxel = provider
        self._sb = instance

    async def _prepare(self) -> None:
        out = bytearray()
        async with self._sdk("checking the image"):
            process = await self._spawn(_TOOLS_CHECK, env={}, cwd="/", root=True, on_output=out.extend)
            code = await process.wait()
        if code != 0:
            raise SandboxError(
                f"blaxel sandbox {self.id}: its image lacks setpriv, GNU find or GNU tar, which Tardigrade needs;"
                " set sandbox.options.image to a Debian/Ubuntu-based image (Blaxel's default image is Alpine)"
            )
        await super()._prepare()

    async def _spawn(
        self, command: str, *, env: Mapping[str, str], cwd: str, root: bool, on_output: Callable[[bytes], None]
    ) -> RemoteProcess:
        run = as_sandbox_user(command, root=root)
        script = f"cd {shlex.quote(cwd)} || exit 1; {run}"
        name = f"tardigrade-{uuid.uuid4().hex[:20]}"
        forward = _lines_to_bytes(on_output)
        request = {
            "command": f"/bin/sh -c {shlex.quote(script)}",
            "name": name,
            "working_dir": "/",
            "env": dict(env),  # in the request body: never on a command line
            "wait_for_completion": True,
            "keep_alive": True,  # no scale-to-zero under a running command
            "timeout": 0,  # no limit of Blaxel's: ours is enforced by the reaper
            "on_stdout": forward,
            "on_stderr": forward,
        }
        started = asyncio.ensure_future(self._sb.process.exec(request))
        await asyncio.sleep(0)  # let the request go out before anyone kills by name
        return _BlaxelProcess(self, name, started)

    async def _download(self, remote_path: str, local_path: Path) -> None:
        data = await self._sb.fs.read_binary(remote_path)
        await asyncio.to_thread(local_path.write_bytes, data)

    async def _upload(self, local_path: Path, remote_path: str) -> None:
        await self._sb.fs.write_binary(remote_path, str(local_path))  # a str is read as a local file path

    async def _put_bytes(self, data: bytes, remote_path: str) -> None:
        await self._sb.fs.write_binary(remote_path, bytes(data))

    async def _probe_alive(self) -> bool:
        """Standby counts as alive: the next request resumes it, processes and all."""
        control, _, _ = _errors()
        try:
            instance = await self._blaxel.sdk().SandboxInstance.get(self.id)
        except control as e:
            if _status_code(e) == 404:
                return False
            raise
        return _status(instance) == "DEPLOYED"

    async def _terminate(self) -> None:
        control, _, _ = _errors()
        try:
            await self._blaxel.sdk().SandboxInstance.delete(self.id)
        except control as e:
            if _status_code(e) != 404:  # already gone
                raise

    def _is_gone_error(self, error: BaseException) -> bool:
        """Only the control plane's 404 for the sandbox itself; the sandbox API's 404 may be a file or a process,
        so everything else is settled by a liveness probe (`RemoteSandbox._sdk`)."""
        control, _, _ = _errors()
        return isinstance(error, control) and _status_code(error) == 404

    async def _get_bytes(self, remote_path: str) -> bytes:
        data: bytes = await self._sb.fs.read_binary(remote_path)
        return data

    async def _native_snapshot(self) -> str | None:
        name = f"tardigrade-{uuid.uuid4().hex[:16]}"
        async with self._sdk("taking a Blaxel snapshot"):
            snapshot = await self._sb.snapshots.create(name)
        return str(snapshot.id)


class BlaxelProvider(RemoteProvider):
    name = "blaxel"

    def __init__(self, state_root: Path, *, sdk: Any = None, image: str | None = None) -> None:
        """``sdk`` is ``blaxel.core`` (imported on first use; the tests pass a fake with the same
        ``SandboxInstance`` and ``Snapshot``). ``image`` is this worker's default for pipelines that name none
        (``BLAXEL_IMAGE`` in the environment)."""
        super().__init__(state_root)
        if sdk is None:
            _sdk()  # fail now, naming the extra, rather than at the first sandbox
        self._sdk_module = sdk
        self.image = image

    @classmethod
    def from_env(cls, state_root: Path) -> BlaxelProvider:
        if not os.environ.get("BL_WORKSPACE") or not (
            os.environ.get("BL_API_KEY") or os.environ.get("BL_CLIENT_CREDENTIALS")
        ):
            _sdk()  # a missing SDK is the first thing to fix
            raise ProviderUnavailable(NOT_CONFIGURED)
        return cls(state_root, image=os.environ.get("BLAXEL_IMAGE") or None)

    def sdk(self) -> Any:
        if self._sdk_module is None:
            self._sdk_module = _sdk()
        return self._sdk_module

    @staticmethod
    def _options(spec: SandboxSpec) -> BlaxelOptions:
        mine = {k: v for k, v in spec.options.items() if k in BlaxelOptions.model_fields}  # a list's other keys
        return BlaxelOptions.model_validate(mine)

    def _configuration(self, spec: SandboxSpec) -> Any:
        from blaxel.core.client.models import ExpirationPolicy, SandboxLifecycle
        from blaxel.core.client.models.expiration_policy_action import ExpirationPolicyAction
        from blaxel.core.client.models.expiration_policy_type import ExpirationPolicyType
        from blaxel.core.sandbox.types import SandboxCreateConfiguration

        options = self._options(spec)
        lifecycle = None
        if options.idle_ttl:
            idle = ExpirationPolicy(
                type_=ExpirationPolicyType.TTL_IDLE, value=options.idle_ttl, action=ExpirationPolicyAction.DELETE
            )
            lifecycle = SandboxLifecycle(expiration_policies=[idle])
        return SandboxCreateConfiguration(
            image=options.image or self.image,
            memory=options.memory,
            region=options.region,
            labels={"created-by": "tardigrade"},
            lifecycle=lifecycle,
            network=blaxel_network(spec.network_rule),
        )

    async def create(self, spec: SandboxSpec) -> BlaxelSandbox:
        configuration = self._configuration(spec)

        async def make() -> BlaxelSandbox:
            return BlaxelSandbox(self, await self.sdk().SandboxInstance.create(configuration), spec)

        sandbox = await self._prepared(make)
        assert isinstance(sandbox, BlaxelSandbox)
        return sandbox

    async def create_from(self, spec: SandboxSpec, native_snapshot: str | None) -> tuple[BlaxelSandbox, bool]:
        """Fork the Blaxel snapshot into a new sandbox; a snapshot that is gone falls back to the portable one."""
        if native_snapshot:
            control, _, snapshots = _errors()
            sdk = self.sdk()
            target = f"tardigrade-{uuid.uuid4().hex[:16]}"
            try:
                snapshot = await sdk.Snapshot.get(native_snapshot)
                await snapshot.fork(target)
            except (control, snapshots) as e:
                if _status_code(e) not in (400, 404, 409, 410):
                    raise
            else:
                return await self._adopt_fork(spec, target), True
        return await self.create(spec), False

    async def _adopt_fork(self, spec: SandboxSpec, name: str) -> BlaxelSandbox:
        """A fork keeps its source's settings; the network rule is applied again all the same (it is the one
        setting whose drift would matter)."""
        from blaxel.core.sandbox.types import SandboxUpdateNetwork

        sdk = self.sdk()

        async def make() -> BlaxelSandbox:
            network = blaxel_network(spec.network_rule)
            if network is not None:
                await sdk.SandboxInstance.update_network(name, SandboxUpdateNetwork(network=network))
            return BlaxelSandbox(self, await sdk.SandboxInstance.get(name), spec)

        try:
            sandbox = await self._prepared(make)
        except BaseException:
            with contextlib.suppress(Exception):
                await sdk.SandboxInstance.delete(name)
            raise
        assert isinstance(sandbox, BlaxelSandbox)
        return sandbox

    async def attach(self, sandbox_id: str) -> BlaxelSandbox:
        control, _, _ = _errors()
        sdk = self.sdk()
        try:
            instance = await sdk.SandboxInstance.get(sandbox_id)
        except control as e:
            if _status_code(e) == 404:
                raise SandboxLost(sandbox_id, "Blaxel does not know it any more") from None
            raise
        status = _status(instance)
        if status in _GONE_STATUSES:
            raise SandboxLost(sandbox_id, f"Blaxel reports it {status}")
        if status in _ARCHIVED_STATUSES:  # the disk was kept: bring it back (standby needs nothing: it resumes)
            try:
                instance = await sdk.SandboxInstance.unarchive(sandbox_id)
            except control as e:
                raise SandboxLost(sandbox_id, f"it could not be unarchived ({e})") from None
        return BlaxelSandbox(self, instance, SandboxSpec(network=False))


def provider_factory(
    name: str, state_dir: Path, *, worker_id: str, fault_injector: FaultInjector | None = None
) -> BlaxelProvider:
    """The ``tardigrade.providers`` entry point (sandboxes/provider_kit.py): a provider from the environment."""
    return BlaxelProvider.from_env(state_dir / "remote" / name)


provider_factory.options = BlaxelOptions  # type: ignore[attr-defined]
