"""Hostile data coming out of a remote sandbox (E2B, Modal) into the worker's mirror of it.

The mirror is a folder on the worker that `pull` fills from two things the sandbox produces: a file listing
(``find -printf`` run inside the sandbox) and a tar stream of changed files (``tar`` run inside the sandbox). Root
inside a sandbox can rewrite both, so the tests here play that root: they let the real helper commands run on the
fake provider's real bubblewrap machine and then swap what the worker downloads for crafted bytes. Whatever the
sandbox sends, nothing may be created outside the mirror, nothing may be written through a symlink, the mirror may
not grow beyond what the listing announced, and no file the worker holds may be setuid.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tardigrade.sandboxes.errors import SandboxError, WorkspaceChanged
from tardigrade.sandboxes.manifest import SnapshotPaths
from tardigrade.sandboxes.provider import SandboxSpec
from tardigrade.sandboxes.remote import RemoteSandbox
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tests.provider_fakes import FakeCloud, bind_e2b, bind_modal, fakes_unavailable

SELECTION = SnapshotPaths(include=["/workspace"]).selection()


class Hostile:
    """Root inside the sandbox: rewrites the listing and the tar the worker downloads after the helpers ran."""

    def __init__(self, sandbox: RemoteSandbox) -> None:
        self.sandbox = sandbox
        self.listing: bytes | None = None
        self.tar: bytes | None = None
        download, run_root = sandbox._download, sandbox._run_root

        async def crafted_download(remote_path: str, local_path: Path) -> None:
            await download(remote_path, local_path)
            name = remote_path.rsplit("/", 1)[-1]
            if name.startswith("list-") and self.listing is not None:
                local_path.write_bytes(self.listing)
            elif name.startswith("fetch-") and name.endswith(".tar") and self.tar is not None:
                local_path.write_bytes(self.tar)

        async def crafted_run_root(script: str, doing: str, *, timeout: float = 600) -> str:
            if self.tar is not None and doing == "packing changed files":
                script = f"true > {script.rsplit(' -cf ', 1)[1]}"  # the names do not exist; the tar is crafted
            return await run_root(script, doing, timeout=timeout)

        sandbox._download = crafted_download  # type: ignore[method-assign]
        sandbox._run_root = crafted_run_root  # type: ignore[method-assign]


def record(kind: str, path: str, *, mode: int = 0o644, size: int = 0, link: str = "", ino: int = 1) -> bytes:
    """One record of the listing format (``find -printf`` with nine NUL-terminated fields)."""
    fields = [kind, f"{mode:o}", str(size), "1700000000.5", "1700000000.5", str(ino), "1", path, link]
    return b"".join(os.fsencode(f) + b"\0" for f in fields)


def base_listing() -> bytes:
    return record("d", ".", mode=0o755) + record("d", "./workspace", mode=0o755, ino=2)


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def member(name: str, data: bytes | None = None, *, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if data is not None else 0
    return info, data


def everything_named(root: Path, marker: str) -> list[Path]:
    return [Path(d) / n for d, dirs, files in os.walk(root) for n in dirs + files if marker in n]


@pytest.fixture(params=["e2b-fake", "modal-fake"])
async def remote(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RemoteSandbox]:
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    from tardigrade.sandboxes.e2b import E2BProvider
    from tardigrade.sandboxes.modal import ModalProvider

    cloud = FakeCloud(tmp_path / "cloud")
    if request.param == "e2b-fake":
        provider: E2BProvider | ModalProvider = E2BProvider(tmp_path / "worker", sdk=bind_e2b(cloud))
    else:
        provider = ModalProvider(tmp_path / "worker", sdk=bind_modal(cloud))
    sandbox = await provider.create(SandboxSpec())
    assert isinstance(sandbox, RemoteSandbox)
    try:
        yield sandbox
    finally:
        with contextlib.suppress(Exception):
            await sandbox.destroy()
        cloud.close()


@pytest.fixture
def engine(tmp_path: Path) -> SnapshotEngine:
    return SnapshotEngine(open_store((tmp_path / "store").as_uri()))


def escape(sandbox: RemoteSandbox, tmp_path: Path, name: str) -> str:
    """A listing name that climbs from ``workspace/`` in the mirror up to ``tmp_path``."""
    depth = len(sandbox.mirror.relative_to(tmp_path).parts) + 1
    return "./workspace/" + "../" * depth + name


async def test_listing_names_with_dotdot_create_nothing_outside_the_mirror(
    remote: RemoteSandbox, engine: SnapshotEngine, tmp_path: Path
) -> None:
    marker = f"escaped-{uuid.uuid4().hex[:8]}"
    hostile = Hostile(remote)
    hostile.listing = (
        base_listing()
        + record("d", escape(remote, tmp_path, f"{marker}-dir"), mode=0o755, ino=3)
        + record("l", escape(remote, tmp_path, f"{marker}-link"), link="/etc", ino=4)
    )
    with pytest.raises(SandboxError, match=r"listing.*'\.\.'"):
        await remote.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert everything_named(tmp_path, marker) == []


async def test_a_tar_member_with_dotdot_writes_nothing_outside_the_mirror(
    remote: RemoteSandbox, engine: SnapshotEngine, tmp_path: Path
) -> None:
    marker = f"escaped-{uuid.uuid4().hex[:8]}"
    name = escape(remote, tmp_path, marker)
    hostile = Hostile(remote)
    hostile.listing = base_listing() + record("f", name, size=5, ino=3)
    hostile.tar = tar_of(member(name, b"owned"))
    with pytest.raises(SandboxError):
        await remote.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert everything_named(tmp_path, marker) == []


async def test_a_file_beneath_a_listed_symlink_is_never_written_through_it(
    remote: RemoteSandbox, engine: SnapshotEngine, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile = Hostile(remote)
    hostile.listing = (
        base_listing()
        + record("l", "./workspace/out", link=str(outside), ino=3)
        + record("f", "./workspace/out/planted", size=5, ino=4)
    )
    hostile.tar = tar_of(member("./workspace/out/planted", b"owned"))
    with pytest.raises(SandboxError, match="symlink"):
        await remote.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert list(outside.iterdir()) == []


async def test_tar_members_that_were_not_asked_for_or_link_outside_are_refused(
    remote: RemoteSandbox, engine: SnapshotEngine, tmp_path: Path
) -> None:
    hostile = Hostile(remote)
    hostile.listing = base_listing() + record("f", "./workspace/a", size=1, ino=3)
    for crafted in (
        tar_of(member("./workspace/a", kind=tarfile.LNKTYPE, link="../../../../etc/passwd")),
        tar_of(member("./workspace/a", kind=tarfile.SYMTYPE, link="/etc/passwd")),
        tar_of(member("./workspace/a", b"x"), member("./etc/cron.d/evil", b"* * * * * root sh")),
        tar_of(member("./workspace/a", kind=tarfile.FIFOTYPE)),
    ):
        hostile.tar = crafted
        with pytest.raises(SandboxError):
            await remote.snapshot(engine, selection=SELECTION, parent=None, labels={})
        a = remote.mirror / "workspace" / "a"
        assert not a.is_symlink() and not (a.exists() and a.stat().st_nlink > 1)
    assert everything_named(tmp_path, "evil") == []


@pytest.mark.parametrize("sent", [11, 8 << 20], ids=["one-byte-more", "8-MiB"])
async def test_the_mirror_never_receives_more_than_the_listing_announced(
    remote: RemoteSandbox, engine: SnapshotEngine, sent: int
) -> None:
    hostile = Hostile(remote)
    hostile.listing = base_listing() + record("f", "./workspace/small", size=10, ino=3)
    hostile.tar = tar_of(member("./workspace/small", b"x" * sent))
    with pytest.raises((WorkspaceChanged, SandboxError)):
        await remote.snapshot(engine, selection=SELECTION, parent=None, labels={})
    written = remote.mirror / "workspace" / "small"
    assert not written.exists() or written.stat().st_size <= 10


async def test_a_setuid_file_in_the_sandbox_is_not_setuid_on_the_worker(
    remote: RemoteSandbox, engine: SnapshotEngine, tmp_path: Path
) -> None:
    """No listing tampering needed: uid 1000 may set the setuid bit on its own file, and the worker (often root)
    would copy the file into its mirror with that bit and its own ownership."""
    result = await remote.exec("cp /bin/true tool && chmod 4755 tool && stat -c %a tool", env={}, timeout=60)
    assert result.output_tail.strip() == b"4755"
    await remote.snapshot(engine, selection=SELECTION, parent=None, labels={})
    copied = remote.mirror / "workspace" / "tool"
    assert copied.exists() and not copied.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    # Mirrors and raw command logs are the worker's alone: other local users cannot reach into them.
    assert stat.S_IMODE(os.stat(tmp_path / "worker").st_mode) & 0o077 == 0
