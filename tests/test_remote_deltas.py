"""Block deltas between a remote sandbox and its mirror (sandboxes/block_delta.py), through the E2B and Modal fakes.

A 1-byte change in a large file must move a block, not the file, in both directions (snapshot: sandbox -> mirror;
rollback: mirror -> sandbox), and give the same snapshot as a whole-file fetch. The fakes count every byte that
crosses the SDK layer (file reads, file writes, command output). The attacks tamper with what the sandbox sends
back at that layer - what root in a real sandbox could make its helper commands answer - and each must end in a
whole-file transfer with the right content, never a wrong mirror.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tardigrade.sandboxes import block_delta
from tardigrade.sandboxes.block_delta import BLOCK_SIZE, ManifestInvalid, parse_manifest
from tardigrade.sandboxes.errors import SandboxError
from tardigrade.sandboxes.manifest import SnapshotPaths
from tardigrade.sandboxes.provider import Sandbox, SandboxProvider, SandboxSpec
from tardigrade.sandboxes.remote import RemoteSandbox
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tests.provider_fakes import FakeCloud, FakeMachine, bind_e2b, bind_modal, fakes_unavailable

SIZE = 20 * 1000 * 1000  # 20 MB keeps the tests quick; bench/snapshot.py measures 100 MB
SELECTION = SnapshotPaths(include=["/workspace"]).selection()
FLIP_AT = 10000001
# big is made with "A" at FLIP_AT, so FLIP always changes a byte (a random byte there is "X" once in 256 runs).
FLIP = f"printf X | dd of=/workspace/big bs=1 seek={FLIP_AT} conv=notrunc 2>/dev/null"
CHANGED = FLIP_AT // BLOCK_SIZE  # the block FLIP changes


def traffic(machine: FakeMachine) -> int:
    return sum(machine.traffic.values())


@dataclass
class Harness:
    provider: SandboxProvider
    cloud: FakeCloud


@pytest.fixture(params=["e2b-fake", "modal-fake"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    reason = fakes_unavailable()
    if reason:
        pytest.skip(reason)
    from tardigrade.sandboxes.e2b import E2BProvider
    from tardigrade.sandboxes.modal import ModalProvider

    cloud = FakeCloud(tmp_path / "cloud")
    provider: SandboxProvider
    if request.param == "e2b-fake":
        provider = E2BProvider(tmp_path / "e2b", sdk=bind_e2b(cloud))
    else:
        provider = ModalProvider(tmp_path / "modal", sdk=bind_modal(cloud))
    try:
        yield Harness(provider, cloud)
    finally:
        cloud.close()
        await provider.close()


async def sh(sandbox: Sandbox, command: str) -> tuple[int, str]:
    result = await sandbox.exec(command, env={}, timeout=120)
    return result.exit_code, result.output_tail.decode(errors="replace")


@pytest.fixture
def engine(tmp_path: Path) -> SnapshotEngine:
    return SnapshotEngine(open_store((tmp_path / "store").as_uri()))


async def big_sandbox(h: Harness, engine: SnapshotEngine) -> tuple[RemoteSandbox, FakeMachine, str, str]:
    """A sandbox with a SIZE-byte random file and a small one, snapshotted once (a whole fetch)."""
    sandbox = await h.provider.create(SandboxSpec())
    assert isinstance(sandbox, RemoteSandbox)
    make = f"head -c {SIZE} /dev/urandom > big && printf A | dd of=big bs=1 seek={FLIP_AT} conv=notrunc 2>/dev/null"
    code, out = await sh(sandbox, f"{make} && echo small > small && sha256sum big")
    assert code == 0, out
    snap = await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
    return sandbox, h.cloud.machines[sandbox.id], snap.id, out.split()[0]


async def remote_sha(sandbox: RemoteSandbox) -> str:
    code, out = await sh(sandbox, "sha256sum big")
    assert code == 0, out
    return out.split()[0]


def mirror_sha(sandbox: RemoteSandbox) -> str:
    return hashlib.sha256((sandbox.mirror / "workspace" / "big").read_bytes()).hexdigest()


async def full_fetch_digest(sandbox: RemoteSandbox, engine: SnapshotEngine) -> str:
    """The digest of a snapshot taken from an empty mirror (every file fetched whole)."""
    sandbox._mirror_index().forget()
    shutil.rmtree(sandbox.mirror)
    sandbox.mirror.mkdir()
    (sandbox.state / "statcache").unlink(missing_ok=True)
    snap = await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert sandbox.last_pull is not None and sandbox.last_pull.patched == 0
    return snap.digest


def tamper(sandbox: RemoteSandbox, suffix: str, change: Callable[[Path], None]) -> None:
    """Rewrite what the sandbox sends back for downloads whose name ends in ``suffix`` (the first one only)."""
    download = sandbox._download
    done = False

    async def tampered(remote_path: str, local_path: Path) -> None:
        nonlocal done
        await download(remote_path, local_path)
        if remote_path.endswith(suffix) and not done:
            done = True
            change(local_path)

    sandbox._download = tampered  # type: ignore[method-assign]


# -- the protocol's parser --------------------------------------------------------------------------------------


def test_the_block_list_is_parsed_strictly() -> None:
    good = hashlib.sha256(b"x").hexdigest().encode()
    size = BLOCK_SIZE + 5
    ok = b"%d\n%s\n%s\n" % (size, good, good)
    assert parse_manifest(ok, [size]) == [[good.decode()] * 2]
    assert parse_manifest(b"-\n" + ok, [7, size])[0] is None
    assert parse_manifest(ok, [size + 1]) == [None]  # another size than listed: that file goes whole
    for bad in (ok + good + b"\n", ok[:-1], ok.replace(good, good.upper(), 1), b"%d\n%s\n" % (size, good),
                b"99999999999999999999\n" + good + b"\n", b"-5\n", b"", ok.replace(b"\n", b"\r\n")):  # fmt: skip
        with pytest.raises(ManifestInvalid):
            parse_manifest(bad, [size])


def test_a_patch_that_does_not_hash_to_the_claim_leaves_the_old_copy(tmp_path: Path) -> None:
    root = tmp_path / "mirror"
    root.mkdir()
    old = bytes(range(256)) * (3 * BLOCK_SIZE // 256)
    (root / "f").write_bytes(old)
    new = bytearray(old)
    new[BLOCK_SIZE + 3] ^= 1
    claimed = [hashlib.sha256(new[i : i + BLOCK_SIZE]).hexdigest() for i in range(0, len(new), BLOCK_SIZE)]
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(new[BLOCK_SIZE : 2 * BLOCK_SIZE - 1]) + b"?")  # the sent block is not the claimed one
    assert not block_delta.patch(root, "f", len(new), claimed, {1: 0}, blob)
    assert (root / "f").read_bytes() == old and sorted(p.name for p in root.iterdir()) == ["f"]
    blob.write_bytes(new[BLOCK_SIZE : 2 * BLOCK_SIZE])
    assert block_delta.patch(root, "f", len(new), claimed, {1: 0}, blob)
    assert (root / "f").read_bytes() == new and sorted(p.name for p in root.iterdir()) == ["f"]


def test_both_hashers_give_the_same_block_list(tmp_path: Path) -> None:
    """python3 and dd+sha256sum (run here with this machine's sh and coreutils) answer alike, as the parser wants."""
    (tmp_path / "f").write_bytes(bytes(range(256)) * (2 * BLOCK_SIZE // 256) + b"tail")
    (tmp_path / "link").symlink_to("f")
    (tmp_path / "small").write_bytes(b"abc")
    outputs = []
    for body in (block_delta.HASH_SCRIPT, block_delta.SHELL_HASH):
        (tmp_path / "s.sh").write_bytes(block_delta.script(body, ["./f", "./link", "./missing", "./small"]))
        outputs.append(subprocess.run(["sh", "s.sh"], cwd=tmp_path, capture_output=True, check=True).stdout)
    assert outputs[0] == outputs[1]
    parsed = parse_manifest(outputs[0], [2 * BLOCK_SIZE + 4, 0, 0, 3])
    data = (tmp_path / "f").read_bytes()
    assert parsed[0] == [hashlib.sha256(data[i : i + BLOCK_SIZE]).hexdigest() for i in range(0, len(data), BLOCK_SIZE)]
    assert parsed[1] is None and parsed[2] is None  # a symlink is never followed
    assert parsed[3] == [hashlib.sha256(b"abc").hexdigest()]


# -- through the fakes ------------------------------------------------------------------------------------------


@pytest.fixture(params=["python3", "dd+sha256sum"])
def hasher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a sandbox hashes its blocks: python3 when the image has it, dd and sha256sum otherwise."""
    if request.param == "dd+sha256sum":
        monkeypatch.setattr(block_delta, "HASH_SCRIPT", block_delta.SHELL_HASH)
    return str(request.param)


async def test_a_one_byte_change_pulls_one_block(harness: Harness, engine: SnapshotEngine, hasher: str) -> None:
    sandbox, machine, _, _ = await big_sandbox(harness, engine)
    first = traffic(machine)
    assert first > SIZE  # the first snapshot fetched the file whole
    assert (await sh(sandbox, FLIP))[0] == 0
    before = traffic(machine)
    snap = await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
    moved = traffic(machine) - before
    assert sandbox.last_pull is not None and sandbox.last_pull.patched == 1, sandbox.last_pull
    assert moved < 2_000_000 and sandbox.last_pull.bytes == BLOCK_SIZE, (moved, sandbox.last_pull)
    assert mirror_sha(sandbox) == await remote_sha(sandbox)
    before = traffic(machine)
    assert await full_fetch_digest(sandbox, engine) == snap.digest
    assert traffic(machine) - before > SIZE


async def test_a_rollback_pushes_one_block(harness: Harness, engine: SnapshotEngine, hasher: str) -> None:
    sandbox, machine, snap_id, original = await big_sandbox(harness, engine)
    _, stat_before = await sh(sandbox, "stat -c '%u %g %a %y' big")
    assert (await sh(sandbox, FLIP + " && echo more >> small"))[0] == 0  # a failed attempt's changes
    before = traffic(machine)
    await sandbox.restore(engine, snap_id, selection=SELECTION)
    moved = traffic(machine) - before
    assert sandbox.last_push is not None and sandbox.last_push.patched == 1, sandbox.last_push
    assert moved < 2_000_000, (moved, sandbox.last_push)
    assert await remote_sha(sandbox) == original
    after = (await sh(sandbox, "stat -c '%u %g %a %y' big; cat small; ls -a"))[1]
    assert after == stat_before + "small\n.\n..\nbig\nsmall\n"  # owner, mode, mtime kept; no temporary file left
    again = await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert sandbox.last_pull is not None and sandbox.last_pull.transferred == 0  # the sync index trusts the push
    assert again.id == snap_id


# -- attacks: each ends in a whole-file transfer with the right content ------------------------------------------


def _lie_about_a_hash(path: Path) -> None:
    """Claim a hash no block has for the changed block: the block fetched fails the claim."""
    lines = path.read_bytes().split(b"\n")
    lines[1 + CHANGED] = b"0" * 64
    path.write_bytes(b"\n".join(lines))


def _extra_block(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * BLOCK_SIZE)


def _extra_line(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"0" * 64 + b"\n")


def _wrong_size(path: Path) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[0] = str(SIZE - 1).encode()
    path.write_bytes(b"\n".join(lines))


def _huge_size(path: Path) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[0] = b"9" * 18
    path.write_bytes(b"\n".join(lines))


def _short_blob(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _garbled_blob(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "order, change",
    [
        (0, _lie_about_a_hash), (0, _extra_line), (0, _wrong_size), (0, _huge_size),
        (1, _extra_block), (1, _short_blob), (1, _garbled_blob),
    ],
)  # fmt: skip
async def test_a_hostile_pull_answer_falls_back_to_the_whole_file(
    harness: Harness, engine: SnapshotEngine, order: int, change: Callable[[Path], None]
) -> None:
    sandbox, _, _, _ = await big_sandbox(harness, engine)
    assert (await sh(sandbox, FLIP))[0] == 0
    # The block list is the first helper output downloaded, the blocks the second.
    downloads = 0
    download = sandbox._download

    async def tampered(remote_path: str, local_path: Path) -> None:
        nonlocal downloads
        await download(remote_path, local_path)
        if remote_path.endswith(".out"):
            if downloads == order:
                change(local_path)
            downloads += 1

    sandbox._download = tampered  # type: ignore[method-assign]
    snap = await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert sandbox.last_pull is not None and sandbox.last_pull.patched == 0, sandbox.last_pull
    assert sandbox.last_pull.bytes in (SIZE, SIZE + BLOCK_SIZE)  # the whole file, and the block if it was sent
    assert mirror_sha(sandbox) == await remote_sha(sandbox)
    sandbox._download = download  # type: ignore[method-assign]
    assert await full_fetch_digest(sandbox, engine) == snap.digest


async def test_a_file_swapped_mid_transfer_is_fetched_whole(harness: Harness, engine: SnapshotEngine) -> None:
    sandbox, _, _, _ = await big_sandbox(harness, engine)
    assert (await sh(sandbox, FLIP))[0] == 0

    # After the block list is read, a process rewrites the changed block: the blocks sent are not the claimed ones.
    download = sandbox._download
    swapped = False

    async def swapping(remote_path: str, local_path: Path) -> None:
        nonlocal swapped
        await download(remote_path, local_path)
        if remote_path.endswith(".out") and not swapped:
            swapped = True
            assert (await sh(sandbox, FLIP.replace("printf X", "printf Y")))[0] == 0

    sandbox._download = swapping  # type: ignore[method-assign]
    await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert sandbox.last_pull is not None and sandbox.last_pull.patched == 0, sandbox.last_pull
    assert mirror_sha(sandbox) == await remote_sha(sandbox)
    assert (sandbox.mirror / "workspace" / "big").read_bytes()[10000001:10000002] == b"Y"


async def test_a_failed_pull_leaves_the_mirror_and_the_index_as_they_were(
    harness: Harness, engine: SnapshotEngine
) -> None:
    sandbox, _, _, original = await big_sandbox(harness, engine)
    index_before = (sandbox.state / "mirror.index").read_bytes()
    assert (await sh(sandbox, FLIP))[0] == 0
    download = sandbox._download
    seen = 0

    async def failing(remote_path: str, local_path: Path) -> None:
        nonlocal seen
        await download(remote_path, local_path)
        if remote_path.endswith(".out"):
            seen += 1
            if seen == 2:
                _garbled_blob(local_path)  # the delta fails...
        if remote_path.endswith(".tar"):
            raise SandboxError("the whole-file fetch fails too")  # ...and so does the fallback

    sandbox._download = failing  # type: ignore[method-assign]
    with pytest.raises(SandboxError, match="fails too"):
        await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert mirror_sha(sandbox) == original
    assert (sandbox.state / "mirror.index").read_bytes() == index_before
    assert not [p for p in (sandbox.mirror / "workspace").iterdir() if p.name.startswith(".tardigrade-delta")]


async def test_a_lying_sandbox_on_rollback_gets_the_whole_file(harness: Harness, engine: SnapshotEngine) -> None:
    sandbox, _, snap_id, original = await big_sandbox(harness, engine)
    assert (await sh(sandbox, FLIP))[0] == 0
    # It claims to hold the worker's version of the changed block, so that block is not sent: the patched file's
    # hash fails in the sandbox, which keeps its file; the worker sends it whole.
    ours = (sandbox.mirror / "workspace" / "big").read_bytes()[CHANGED * BLOCK_SIZE : (CHANGED + 1) * BLOCK_SIZE]

    def claim_the_changed_block(path: Path) -> None:
        lines = path.read_bytes().split(b"\n")
        lines[1 + CHANGED] = hashlib.sha256(ours).hexdigest().encode()
        path.write_bytes(b"\n".join(lines))

    tamper(sandbox, ".out", claim_the_changed_block)
    await sandbox.restore(engine, snap_id, selection=SELECTION)
    assert sandbox.last_push is not None and sandbox.last_push.patched == 0, sandbox.last_push
    assert sandbox.last_push.bytes == SIZE
    assert await remote_sha(sandbox) == original
    assert "tardigrade-delta" not in (await sh(sandbox, "ls -a"))[1]


async def test_appending_to_a_file_moves_the_tail_and_a_rollback_cuts_it(
    harness: Harness, engine: SnapshotEngine
) -> None:
    """A log that grows: the pull fetches the last old block and the new ones; the rollback truncates in place."""
    sandbox, machine, snap_id, original = await big_sandbox(harness, engine)
    assert (await sh(sandbox, "head -c 1500000 /dev/urandom >> big"))[0] == 0
    before = traffic(machine)
    await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert sandbox.last_pull is not None and sandbox.last_pull.patched == 1, sandbox.last_pull
    assert sandbox.last_pull.bytes == SIZE + 1_500_000 - (SIZE // BLOCK_SIZE) * BLOCK_SIZE  # from the last old block
    assert traffic(machine) - before < 2_000_000 + 100_000
    assert mirror_sha(sandbox) == await remote_sha(sandbox)
    await sandbox.restore(engine, snap_id, selection=SELECTION)
    assert sandbox.last_push is not None and sandbox.last_push.patched == 1, sandbox.last_push
    assert sandbox.last_push.bytes == SIZE - (SIZE // BLOCK_SIZE) * BLOCK_SIZE  # the old last block, now shorter
    assert await remote_sha(sandbox) == original


async def test_a_mostly_rewritten_file_goes_whole(harness: Harness, engine: SnapshotEngine) -> None:
    sandbox, _, _, _ = await big_sandbox(harness, engine)
    assert (await sh(sandbox, f"head -c {SIZE} /dev/urandom | dd of=big conv=notrunc 2>/dev/null"))[0] == 0
    await sandbox.snapshot(engine, selection=SELECTION, parent=None, labels={})
    assert sandbox.last_pull is not None and sandbox.last_pull.patched == 0 and sandbox.last_pull.bytes == SIZE
    assert mirror_sha(sandbox) == await remote_sha(sandbox)
