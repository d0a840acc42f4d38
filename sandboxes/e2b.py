"""The E2B provider: sandboxes are E2B microVMs, driven through the ``e2b`` SDK's `AsyncSandbox`.

Configuration comes from the worker's environment (``E2B_API_KEY``, and ``E2B_DOMAIN`` for self-hosted E2B, as the
SDK reads them); the pipeline's ``sandbox.options`` may name a ``template`` (default ``base``), a ``lifetime`` in
seconds (the sandbox's timeout at E2B, renewed every time a worker attaches; default 3600) and
``native_snapshot: true``. Network is off unless the pipeline allows it (``allow_internet_access``, and E2B's
egress rules for ``network: true`` and host allowlists: sandboxes/network/providers.py).

``sandbox.limits`` are not applied on E2B: a microVM's vCPUs, memory and disk are its template's (E2B's SDK has no
per-sandbox setting for them), and a fork bomb, disk filler or memory hog only exhausts that VM. Pick a template
built with the resources a pipeline needs; a step that kills its VM loses the sandbox, which the run survives by
rehydrating at most ``max_rehydrations`` times in a row.

Commands run as E2B's default user ``user`` (uid 1000, checked at creation) with ``HOME=/home/sandbox``; helper
commands (listing, tar, the reaper) run as ``root``. Output arrives decoded as UTF-8 by the SDK and is re-encoded,
so binary output is not byte-exact (files are: they move through the files API). "Gone" is
``SandboxNotRunningException`` (envd's proxy: not found) or ``SandboxNotFoundException`` (the API); both become
`SandboxLost`, as does any failure after which the sandbox no longer reports itself running.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from tardigrade.sandboxes.errors import ProviderUnavailable, SandboxError, SandboxLost
from tardigrade.sandboxes.layout import SANDBOX_UID
from tardigrade.sandboxes.manifest import sandbox_path
from tardigrade.sandboxes.network.providers import e2b_create_options
from tardigrade.sandboxes.provider import SandboxSpec
from tardigrade.sandboxes.remote import RemoteProcess, RemoteProvider, RemoteSandbox

DEFAULT_TEMPLATE = "base"
DEFAULT_LIFETIME = 3600


def _sdk_errors() -> Any:
    import e2b

    return e2b


class _E2BProcess:
    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def wait(self) -> int:
        e2b = _sdk_errors()
        try:
            result = await self._handle.wait()
        except e2b.CommandExitException as e:
            return int(e.exit_code)
        return int(result.exit_code)

    async def kill(self) -> None:
        await self._handle.kill()


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            yield block


class E2BSandbox(RemoteSandbox):
    provider = "e2b"

    def __init__(self, provider: E2BProvider, sdk_sandbox: Any, spec: SandboxSpec) -> None:
        super().__init__(provider, str(sdk_sandbox.sandbox_id), spec)
        self._sbx = sdk_sandbox

    async def _spawn(
        self, command: str, *, env: Mapping[str, str], cwd: str, root: bool, on_output: Callable[[bytes], None]
    ) -> RemoteProcess:
        def forward(text: str) -> None:
            on_output(text.encode("utf-8", "surrogateescape"))

        handle = await self._sbx.commands.run(
            command,
            background=True,
            envs=dict(env),
            user="root" if root else "user",
            cwd=cwd,
            on_stdout=forward,
            on_stderr=forward,
            timeout=0,  # no limit on the connection: our own timeout kills the command
            retain_output=False,
        )
        return _E2BProcess(handle)

    async def _download(self, remote_path: str, local_path: Path) -> None:
        stream = await self._sbx.files.read(remote_path, format="stream", user="root")
        try:
            with open(local_path, "wb") as out:
                async for chunk in stream:
                    out.write(chunk)
        finally:
            await stream.aclose()

    async def _upload(self, local_path: Path, remote_path: str) -> None:
        await self._sbx.files.write(remote_path, _chunks(local_path), user="root")

    async def _probe_alive(self) -> bool:
        return bool(await self._sbx.is_running())

    async def _terminate(self) -> None:
        await self._sbx.kill()

    def _is_gone_error(self, error: BaseException) -> bool:
        e2b = _sdk_errors()
        return isinstance(error, e2b.SandboxNotRunningException | e2b.SandboxNotFoundException)

    async def _prepare(self) -> None:
        out = bytearray()
        async with self._sdk("checking the sandbox user"):
            process = await self._spawn("id -u", env={}, cwd="/", root=False, on_output=out.extend)
            await process.wait()
        if out.decode().strip() != str(SANDBOX_UID):
            raise SandboxError(
                f"e2b sandbox {self.id}: the template's default user has uid {out.decode().strip()!r}, not"
                f" {SANDBOX_UID}; build the template with a user of uid {SANDBOX_UID} so files keep their owner"
                " across providers"
            )
        await super()._prepare()

    async def read_file(self, path: str, *, limit: int | None = None) -> bytes:
        e2b = _sdk_errors()
        target = sandbox_path(path)
        await self._user_shell(self._refuse_special(target), f"reading {target}")  # a FIFO would hang the read
        data = bytearray()
        async with self._sdk(f"reading {target}"):
            try:
                stream = await self._sbx.files.read(target, format="stream", user="user")
            except e2b.FileNotFoundException:
                raise FileNotFoundError(target) from None
            try:
                async for chunk in stream:
                    data += chunk
                    if limit is not None and len(data) >= limit:
                        break
            except e2b.FileNotFoundException:
                raise FileNotFoundError(target) from None
            finally:
                await stream.aclose()
        return bytes(data if limit is None else data[:limit])

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        target = sandbox_path(path)
        async with self._sdk(f"writing {target}"):
            await self._sbx.files.write(target, data, user="user")
        await self._user_shell(f"chmod {mode:o} -- '{target}'", f"setting the mode of {target}")

    async def _native_snapshot(self) -> str | None:
        async with self._sdk("taking an E2B snapshot"):
            info = await self._sbx.create_snapshot()
        return str(info.snapshot_id)


class E2BProvider(RemoteProvider):
    name = "e2b"

    def __init__(
        self,
        state_root: Path,
        *,
        sdk: Any = None,
        template: str = DEFAULT_TEMPLATE,
        lifetime: int = DEFAULT_LIFETIME,
    ) -> None:
        """``sdk`` is the ``AsyncSandbox`` class to use (the real one by default; the tests pass a fake)."""
        super().__init__(state_root)
        if sdk is None:
            try:
                from e2b import AsyncSandbox
            except ImportError:
                raise ProviderUnavailable(
                    "the e2b provider needs the e2b SDK: pip install 'tardigrade-temporal[e2b]'"
                ) from None
            sdk = AsyncSandbox
        self._sdk = sdk
        self.template = template
        self.lifetime = lifetime

    @classmethod
    def from_env(cls, state_root: Path) -> E2BProvider:
        if not os.environ.get("E2B_API_KEY"):
            raise ProviderUnavailable(
                "the e2b provider is not configured on this worker: set E2B_API_KEY in the worker's environment"
                " (https://e2b.dev/dashboard), or use another provider"
            )
        return cls(state_root)

    def _lifetime(self, spec: SandboxSpec) -> int:
        return int(spec.options.get("lifetime", self.lifetime))

    async def create(self, spec: SandboxSpec) -> E2BSandbox:
        return await self._create(spec, str(spec.options.get("template") or self.template))

    async def _create(self, spec: SandboxSpec, template: str) -> E2BSandbox:
        async def make() -> E2BSandbox:
            sbx = await self._sdk.create(
                template=template,
                timeout=self._lifetime(spec),
                **e2b_create_options(spec.network_rule, self._sdk.create),  # sandboxes/network/providers.py
                metadata={"created-by": "tardigrade"},
            )
            return E2BSandbox(self, sbx, spec)

        sandbox = await self._prepared(make)
        assert isinstance(sandbox, E2BSandbox)
        return sandbox

    async def create_from(self, spec: SandboxSpec, native_snapshot: str | None) -> tuple[E2BSandbox, bool]:
        if native_snapshot:
            e2b = _sdk_errors()
            try:
                return await self._create(spec, native_snapshot), True
            except (e2b.NotFoundException, e2b.InvalidArgumentException):
                pass  # expired or deleted: the portable snapshot is the fallback
        return await self.create(spec), False

    async def attach(self, sandbox_id: str) -> E2BSandbox:
        e2b = _sdk_errors()
        try:
            sbx = await self._sdk.connect(sandbox_id, timeout=self.lifetime)
        except (e2b.SandboxNotFoundException, e2b.NotFoundException, e2b.SandboxNotRunningException) as e:
            raise SandboxLost(sandbox_id, f"E2B does not know it any more ({type(e).__name__})") from None
        return E2BSandbox(self, sbx, SandboxSpec(network=False))
