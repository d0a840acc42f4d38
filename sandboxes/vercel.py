"""The Vercel provider: sandboxes are Vercel Sandboxes (Firecracker microVMs), driven through the ``vercel`` SDK.

Registered through the ``tardigrade.providers`` entry point (pyproject.toml), like Daytona. The SDK's async
`vercel.sandbox.SandboxClient` reads its credentials from the worker's environment: ``VERCEL_OIDC_TOKEN`` (project
and team from the token, or ``VERCEL_PROJECT_ID``/``VERCEL_TEAM_ID``), or an access token ``VERCEL_TOKEN`` with
``VERCEL_TEAM_ID`` and ``VERCEL_PROJECT_ID``. ``sandbox.options`` (`VercelOptions`) may name an ``image``,
``vcpus``/``memory``, a ``region``, the session ``lifetime`` and ``native_snapshot: true``.

A Vercel sandbox is a named identity with *sessions*: the compute that runs it. A session has a maximum lifetime
(``execution_time_limit``: 45 minutes on Hobby, hours on Pro) after which Vercel stops it. The SDK's `Sandbox`
handle would then silently start a new session on the next call - on a clean disk, for a non-persistent sandbox.
So this adapter pins the session it created and drives only that (`SandboxRuntimeSession`, whose calls never
resume): a session that ended - lifetime reached, stopped, failed - is `SandboxLost`, and the workflow rehydrates
the run on a new sandbox from its last portable snapshot, exactly as after a crash. The sandbox's id is its name.

Commands: every process runs with ``sudo`` (the API's root launcher; the environment is sent in the request body,
never on a command line; sudo sets ``HOME=/root``, so the command's own ``HOME`` travels under another name and is
put back); step commands drop to uid 1000 with ``setpriv``. Output is merged and streamed as text (as the SDK
decodes it); files stream byte-exact through the files API (``fs.open``), in 1 MiB chunks.

Network: off unless the pipeline allows it, as Vercel's network policy (``deny-all``, ``allow-all``, or a custom
policy whose domains are the allowlist's names and whose subnets are its CIDRs). Sandboxes are created
non-persistent (our portable snapshots are the persistence), except with ``native_snapshot``: a Vercel snapshot
ends its session, so the sandbox is made persistent and continues on a new session booted from that snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import shlex
import subprocess
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from tardigrade.sandboxes.errors import ProviderUnavailable, SandboxLost
from tardigrade.sandboxes.network.providers import _split
from tardigrade.sandboxes.network.rules import NetworkRule
from tardigrade.sandboxes.provider import FaultInjector, SandboxSpec
from tardigrade.sandboxes.provider_options import VercelOptions
from tardigrade.sandboxes.remote import RemoteProcess, RemoteProvider, RemoteSandbox, as_sandbox_user

_SETUP = (
    "pip install 'tardigrade-temporal[vercel]' and set VERCEL_OIDC_TOKEN, or VERCEL_TOKEN with VERCEL_TEAM_ID and"
    " VERCEL_PROJECT_ID, in the worker's environment, or use another provider"
)
MISSING_SDK = f"the vercel provider needs the vercel SDK, which is not installed on this worker: {_SETUP}"
NOT_CONFIGURED = f"the vercel provider is not configured on this worker (no Vercel credentials): {_SETUP}"
_HOME_VAR = "TARDIGRADE_COMMAND_HOME"  # sudo resets HOME; the command's own comes back from this
_CHUNK = 1 << 20
_OUT_DIR = "/tmp/.tardigrade-out"  # root-owned, 0755: copies the files API may read
_GONE_CODES = {"sandbox_stopped", "sandbox_stopping", "sandbox_snapshotting", "not_found"}


def _sdk() -> Any:
    try:
        import vercel.sandbox as sdk
    except ImportError:
        raise ProviderUnavailable(MISSING_SDK) from None
    return sdk


def has_credentials(env: Mapping[str, str]) -> bool:
    """What the SDK's credential resolution needs (vercel.oidc.credentials.get_credentials)."""
    if env.get("VERCEL_OIDC_TOKEN") or env.get("VERCEL_OIDC_TOKEN_FILE"):
        return True
    return all(env.get(name) for name in ("VERCEL_TOKEN", "VERCEL_TEAM_ID", "VERCEL_PROJECT_ID"))


def vercel_network_policy(rule: NetworkRule) -> Any:
    """The pipeline's network rule as Vercel's `NetworkPolicy`."""
    sdk = _sdk()
    if rule.mode == "off":
        return sdk.NetworkPolicy.deny_all()
    if rule.mode == "internet":
        return sdk.NetworkPolicy.allow_all()
    names, cidrs = _split(rule.allow)
    subnets = sdk.NetworkPolicySubnets(allow=cidrs) if cidrs else None
    return sdk.NetworkPolicy.custom({name: () for name in names}, subnets=subnets)


def _status(obj: Any) -> str:
    status = getattr(obj, "status", None)
    return str(getattr(status, "value", status) or "unknown")


class _VercelProcess:
    """A process in the pinned session; its merged output is pumped to the callback until it ends."""

    def __init__(self, process: Any, pump: asyncio.Future[None]) -> None:
        self._process = process
        self._pump = pump

    async def wait(self) -> int:
        code = await self._process.wait()
        with contextlib.suppress(Exception):  # the stream ends with the process; its errors are the wait's
            await asyncio.wait_for(asyncio.shield(self._pump), 30)
        return int(code)

    async def kill(self) -> None:
        self._pump.cancel()
        await self._process.kill()


class VercelSandbox(RemoteSandbox):
    provider = "vercel"

    def __init__(self, provider: VercelProvider, sdk_sandbox: Any, session: Any, spec: SandboxSpec) -> None:
        super().__init__(provider, str(sdk_sandbox.name), spec)
        self._sb = sdk_sandbox
        self._session = session

    async def _spawn(
        self, command: str, *, env: Mapping[str, str], cwd: str, root: bool, on_output: Callable[[bytes], None]
    ) -> RemoteProcess:
        run = as_sandbox_user(command, root=root)
        send = dict(env)
        restore_home = ""
        if "HOME" in send:
            send[_HOME_VAR] = send.pop("HOME")
            restore_home = f'export HOME="${_HOME_VAR}"; unset {_HOME_VAR}; '
        script = f"{restore_home}cd {shlex.quote(cwd)} || exit 1; {run}"
        process = await self._session.create_process(
            "/bin/sh", ["-c", script], cwd="/", env=send, sudo=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

        async def pump() -> None:
            async for text in process.stdout:
                on_output(text.encode("utf-8", "surrogateescape"))

        return _VercelProcess(process, asyncio.ensure_future(pump()))

    # Vercel's files API reads and writes as the image's user (vercel-sandbox), not root, and that user may be the
    # uid the sandbox's commands run as. So files cross through /tmp: out of the sandbox as a root-owned copy in a
    # root-owned folder (readable, not replaceable), into it under an unguessable name that root then moves into
    # place and checks against the hash of what was sent (a sandbox that swapped it in between is caught).

    async def _download(self, remote_path: str, local_path: Path) -> None:
        out = f"{_OUT_DIR}/{uuid.uuid4().hex}"
        await self._run_root(
            f"mkdir -p {_OUT_DIR} && chown 0:0 {_OUT_DIR} && chmod 755 {_OUT_DIR} &&"
            f" cp -- {shlex.quote(remote_path)} {out} && chmod 644 {out}",
            "preparing a download",
        )
        try:
            async with self._sdk(f"downloading {remote_path}"):
                with open(local_path, "wb") as local:
                    async with self._session.fs.open(out, "rb") as remote:
                        while chunk := await remote.read(_CHUNK):
                            local.write(chunk)
        finally:
            await self._run_root(f"rm -f {out}", "removing a downloaded copy")

    async def _upload(self, local_path: Path, remote_path: str) -> None:
        with open(local_path, "rb") as source:
            await self._send(source, os.fstat(source.fileno()).st_size, remote_path)

    async def _put_bytes(self, data: bytes, remote_path: str) -> None:
        await self._send(io.BytesIO(data), len(data), remote_path)

    async def _send(self, source: BinaryIO, size: int, remote_path: str) -> None:
        """Stream ``size`` bytes into a staging file, then let root move it into place and check its hash."""
        staged = f"/tmp/.tardigrade-in-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        writer = self._session.fs.open(staged, "wb", size=size, permissions=0o600)
        async with self._sdk(f"uploading {remote_path}"), writer as remote:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                await remote.write(chunk)
        target = shlex.quote(remote_path)
        await self._run_root(
            f"mv -f -- {staged} {target} && chown 0:0 -- {target} && chmod 600 -- {target} &&"
            f' if [ "$(sha256sum < {target} | cut -c1-64)" != {digest.hexdigest()} ]; then rm -f -- {target};'
            f" echo 'the uploaded file changed before it was moved into place' >&2; exit 1; fi",
            f"placing {remote_path}",
        )

    async def _probe_alive(self) -> bool:
        try:
            await self._session.refresh()
        except _sdk().SandboxApiError as e:
            if e.status_code in (404, 410):
                return False
            raise
        return _status(self._session) == "running"

    async def _terminate(self) -> None:
        await self._sb.destroy()

    def _is_gone_error(self, error: BaseException) -> bool:
        """The API's words for an ended session: 410 Gone, or a lifecycle code (also in-band, on a log stream).
        A plain 404 may be a file or a process, so it is settled by the liveness probe."""
        sdk = _sdk()
        if isinstance(error, sdk.SandboxApiError):
            return error.status_code == 410 or error.code in _GONE_CODES - {"not_found"}
        if isinstance(error, sdk.SandboxStreamError):
            return error.code in _GONE_CODES
        if isinstance(error, sdk.SandboxPathNotFoundError):
            return False
        return False

    async def _native_snapshot(self) -> str | None:
        """Vercel's snapshot ends the session: continue on a new one booted from it (the same disk)."""
        async with self._sdk("taking a Vercel snapshot"):
            snapshot = await self._session.snapshot()
            await self._sb.update(current_snapshot_id=snapshot.id)
            self._session = await self._sb.session()
        return str(snapshot.id)


class VercelProvider(RemoteProvider):
    name = "vercel"

    def __init__(self, state_root: Path, *, client: Any = None) -> None:
        """``client`` is a `vercel.sandbox.SandboxClient` (made from the environment on first use; tests pass a
        fake)."""
        super().__init__(state_root)
        if client is None:
            _sdk()  # fail now, naming the extra, rather than at the first sandbox
        self._client = client

    @classmethod
    def from_env(cls, state_root: Path) -> VercelProvider:
        _sdk()
        if not has_credentials(os.environ):
            raise ProviderUnavailable(NOT_CONFIGURED)
        return cls(state_root)

    def client(self) -> Any:
        if self._client is None:
            self._client = _sdk().SandboxClient.create()  # no I/O; credentials are read per request
        return self._client

    def _params(self, spec: SandboxSpec, snapshot: str | None) -> dict[str, Any]:
        sdk = _sdk()
        options = VercelOptions.model_validate(
            {k: v for k, v in spec.options.items() if k in VercelOptions.model_fields}
        )
        params: dict[str, Any] = {
            "name": f"tardigrade-{uuid.uuid4().hex[:16]}",
            "execution_time_limit": options.lifetime,
            "persistent": options.native_snapshot,  # see _native_snapshot
            "network_policy": vercel_network_policy(spec.network_rule),
            "tags": {"created-by": "tardigrade"},
        }
        if snapshot is not None:
            params["source"] = sdk.SnapshotSource(snapshot_id=snapshot)
        elif options.image:
            params["image"] = options.image
        if options.vcpus or options.memory:
            params["resources"] = sdk.SandboxResources(vcpus=options.vcpus, memory=options.memory)
        if options.region:
            params["region"] = options.region
        return params

    async def _create(self, spec: SandboxSpec, snapshot: str | None) -> VercelSandbox:
        params = self._params(spec, snapshot)

        async def make() -> VercelSandbox:
            sb = await self.client().create_sandbox(**params)
            return VercelSandbox(self, sb, await self._pinned_session(sb), spec)

        sandbox = await self._prepared(make)
        assert isinstance(sandbox, VercelSandbox)
        return sandbox

    @staticmethod
    async def _pinned_session(sb: Any) -> Any:
        session = sb.current_session
        if session is None:  # a response without the attachment: acquire the (running) current session
            session = await sb.session()
        return session

    async def create(self, spec: SandboxSpec) -> VercelSandbox:
        return await self._create(spec, None)

    async def create_from(self, spec: SandboxSpec, native_snapshot: str | None) -> tuple[VercelSandbox, bool]:
        if native_snapshot:
            try:
                return await self._create(spec, native_snapshot), True
            except _sdk().SandboxApiError as e:
                if e.status_code not in (400, 404, 410, 422):
                    raise  # an outage, not an expired snapshot: wait, do not fall back silently
        return await self.create(spec), False

    async def attach(self, sandbox_id: str) -> VercelSandbox:
        sdk = _sdk()
        try:
            sb = await self.client().get_sandbox(name=sandbox_id)  # never resumes
        except sdk.SandboxApiError as e:
            if e.status_code in (404, 410):
                raise SandboxLost(sandbox_id, "Vercel does not know it any more") from None
            raise
        session = sb.current_session
        state = _status(session if session is not None else sb)
        if state != "running":
            raise SandboxLost(sandbox_id, f"its Vercel session is {state} (ended, or reached its lifetime)")
        return VercelSandbox(self, sb, await self._pinned_session(sb), SandboxSpec(network=False))

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
        await super().close()


def provider_factory(
    name: str, state_dir: Path, *, worker_id: str, fault_injector: FaultInjector | None = None
) -> VercelProvider:
    """The ``tardigrade.providers`` entry point (sandboxes/provider_kit.py): a provider from the environment."""
    return VercelProvider.from_env(state_dir / "remote" / name)


provider_factory.options = VercelOptions  # type: ignore[attr-defined]
