"""The snapshot engine on its own: round trips of what real workspaces hold, incremental work, and refusals."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import blake3
import pytest
import zstandard

from tardigrade.sandboxes.errors import SnapshotCorrupt, SnapshotError, SnapshotMissing, UnsafeTree
from tardigrade.sandboxes.snapshots import Selection, SnapshotEngine
from tardigrade.sandboxes.store_keys import tree_key
from tardigrade.sandboxes.stores import FileStore


@pytest.fixture
def engine(tmp_path: Path) -> SnapshotEngine:
    return SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch")


def tree_listing(root: Path) -> dict[str, tuple[str, int, str]]:
    """Everything a restore must reproduce: kind, permission bits, content or link target, hardlink groups."""
    out: dict[str, tuple[str, int, str]] = {}
    inodes: dict[int, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", 0, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
        else:
            first = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else rel
            content = blake3.blake3(path.read_bytes()).hexdigest()
            out[rel] = ("file", stat.S_IMODE(st.st_mode), content if first == rel else f"hardlink to {first}")
    return out


def make_workspace(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "a.csv").write_text("id,value\n1,2\n")
    (root / "empty" / "nested").mkdir(parents=True)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "readonly.txt").write_text("do not touch")
    (root / "readonly.txt").chmod(0o444)
    os.symlink("data/a.csv", root / "relative-link")
    os.symlink("/usr/bin/python3", root / "absolute-link")
    os.symlink("does/not/exist", root / "dangling-link")
    os.link(root / "data" / "a.csv", root / "hardlink.csv")
    (root / "weird name\twith\nnewline").write_text("x")
    (root / "unicode-é✓.txt").write_text("ü")
    (root / "zero").write_bytes(b"")
    return root


def test_round_trip_of_links_modes_empty_dirs_and_odd_names(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    info = engine.create(ws)
    out = tmp_path / "out"
    engine.restore(info.id, out)
    assert tree_listing(out) == tree_listing(ws)
    assert os.stat(out / "data" / "a.csv").st_ino == os.stat(out / "hardlink.csv").st_ino
    again = engine.create(out)
    assert again.digest == info.digest and again.id == info.id, "mtimes round-trip too, so the tree is identical"


def test_a_real_venv_round_trips_and_runs_after_restore(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(ws / "venv")], check=True)
    pkg = ws / "venv" / "lib" / "python3.11" / "site-packages" / "hello"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("GREETING = 'restored venv works'\n")
    assert os.path.isabs(os.readlink(ws / "venv" / "bin" / "python3")), "venvs carry absolute symlinks"
    info = engine.create(ws)
    shutil.rmtree(ws)  # restore to the same absolute path, as every sandbox has the same /workspace
    engine.restore(info.id, ws)
    out = subprocess.run(
        [str(ws / "venv" / "bin" / "python"), "-c", "import hello; print(hello.GREETING)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "restored venv works"


def test_unchanged_files_are_not_read_and_one_change_reads_one_file(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    for i in range(200):
        (ws / "data" / f"f{i:03}.txt").write_text(f"file {i}\n" * 50)
    cache = tmp_path / "cache"
    first = engine.create(ws, cache_path=cache)
    assert first.stats and first.stats.files_read >= 200

    same = engine.create(ws, cache_path=cache, parent=first.id)
    assert same.id == first.id and same.stats and same.stats.files_read == 0
    assert same.stats.bytes_new == 0 and not same.stats.tree_written

    (ws / "data" / "f007.txt").write_text("changed\n")
    changed = engine.create(ws, cache_path=cache, parent=first.id)
    assert changed.stats and changed.stats.files_read == 1 and changed.stats.bytes_new == len("changed\n")
    assert changed.id != first.id and changed.digest != first.digest

    # Same size, same mtime, new content: ctime still tells.
    st = (ws / "data" / "f008.txt").stat()
    (ws / "data" / "f008.txt").write_text("FILE 8\n" * 50)
    os.utime(ws / "data" / "f008.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    sneaky = engine.create(ws, cache_path=cache)
    assert sneaky.stats and sneaky.stats.files_read == 1 and sneaky.digest != changed.digest


def test_digest_ignores_mtimes_and_chunking_but_not_modes(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    base = engine.create(ws)
    os.utime(ws / "data" / "a.csv", (1, 1))
    touched = engine.create(ws)
    assert touched.digest == base.digest and touched.id != base.id
    (ws / "run.sh").chmod(0o700)
    assert engine.create(ws).digest != base.digest


def test_rollback_rewrites_only_what_differs(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    for i in range(100):
        (ws / "data" / f"f{i:03}.txt").write_text(f"file {i}\n")
    cache = tmp_path / "cache"
    info = engine.create(ws, cache_path=cache)
    expected = tree_listing(ws)

    # What a half-done step leaves behind: edits, additions, deletions, type changes, a symlink out.
    (ws / "data" / "f001.txt").write_text("half-written")
    (ws / "data" / "new.txt").write_text("new")
    (ws / "data" / "f002.txt").unlink()
    shutil.rmtree(ws / "empty")
    (ws / "empty").write_text("now a file")
    (ws / "run.sh").chmod(0o600)
    (ws / "newdir" / "deep").mkdir(parents=True)
    os.symlink("/etc", ws / "newdir" / "escape")
    (ws / "locked").mkdir()
    (ws / "locked" / "f").write_text("x")
    (ws / "locked").chmod(0o500)

    stats = engine.restore(info.id, ws, cache_path=cache)
    assert tree_listing(ws) == expected
    # The edited file, the deleted one, and data/a.csv: files with hard links are always remade, because
    # rewriting one name of a shared inode in place would change the other names too.
    assert stats.files_written == 3
    assert stats.files_kept >= 100
    assert engine.create(ws, cache_path=cache).id == info.id


def test_rollback_leaves_excluded_paths_alone(engine: SnapshotEngine, tmp_path: Path) -> None:
    root = tmp_path / "fs"
    ws = root / "workspace"
    make_workspace(ws)
    (ws / ".cache").mkdir()
    (ws / ".cache" / "big").write_text("cached")
    (root / "home").mkdir()
    (root / "home" / "outside").write_text("not covered")
    selection = Selection(roots=("workspace",), excludes=("**/.cache",))
    info = engine.create(root, selection=selection)
    (ws / ".cache" / "more").write_text("added later")
    (ws / "extra").write_text("extra")
    engine.restore(info.id, root, selection=selection)
    assert not (ws / "extra").exists()
    assert (ws / ".cache" / "more").exists() and (root / "home" / "outside").exists()


def test_a_200_mib_file_round_trips(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    with open(ws / "big.bin", "wb") as f:
        for _ in range(200):
            f.write(os.urandom(1 << 20))
    info = engine.create(ws)
    assert info.stats and info.stats.packs >= 12, "streamed into several packs, not one 200 MiB object"
    engine.restore(info.id, tmp_path / "out")
    assert (
        blake3.blake3((tmp_path / "out" / "big.bin").read_bytes()).digest()
        == blake3.blake3((ws / "big.bin").read_bytes()).digest()
    )


def test_special_files_are_skipped_and_reported(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    os.mkfifo(ws / "pipe")
    (ws / "file").write_text("x")
    info = engine.create(ws)
    assert info.stats and info.stats.skipped_special == ["pipe"]


# -- refusals -------------------------------------------------------------------------------------------------


def plant_tree(engine: SnapshotEngine, entries: list[dict[str, object]]) -> str:
    """Write a hand-made (malicious) tree straight into the store, the way an attacker with store access would."""
    body = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries)
    body += json.dumps(
        {"format": "tardigrade-tree/1", "entries": len(entries), "bytes": 0, "digest": "x", "selection": {}}
    ).encode()
    snapshot_id = blake3.blake3(body).hexdigest()
    engine.store.put(tree_key(snapshot_id), zstandard.ZstdCompressor().compress(body))
    return snapshot_id


def file_entry(path: str, engine: SnapshotEngine, content: bytes = b"pwned") -> dict[str, object]:
    from tardigrade.sandboxes.snapshots.index import BlobIndex
    from tardigrade.sandboxes.snapshots.packs import PackWriter

    writer = PackWriter(engine.store, BlobIndex(engine.store, None))
    ref = writer.add(content)
    writer.finish()
    ref = writer.resolve(ref)
    h = blake3.blake3(content).hexdigest()
    return {"p": path, "k": "f", "m": 0o644, "t": 0, "s": len(content), "h": h, "c": [list(ref)]}


@pytest.mark.parametrize(
    "entries, reason",
    [
        (lambda e: [file_entry("../escape", e)], "'.' or '..'"),
        (lambda e: [file_entry("/etc/evil", e)], "absolute"),
        (lambda e: [file_entry("a/../../x", e)], "'.' or '..'"),
        (lambda e: [{"p": "link", "k": "l", "t": 0, "l": "/tmp"}, file_entry("link/evil", e)], "beneath a symlink"),
        (lambda e: [{"p": "h", "k": "h", "l": "../../etc/passwd"}], "'.' or '..'"),
        (
            lambda e: [{"p": "l", "k": "l", "t": 0, "l": "/etc"}, {"p": "m", "k": "h", "l": "l/passwd"}],
            "through a symlink",
        ),
        (lambda e: [file_entry("b", e), file_entry("a", e)], "out of order"),
        (lambda e: [file_entry("a", e), file_entry("a", e)], "out of order or duplicated"),
    ],
)
def test_malicious_trees_are_refused_before_anything_is_written(
    engine: SnapshotEngine, tmp_path: Path, entries: object, reason: str
) -> None:
    snapshot_id = plant_tree(engine, entries(engine))  # type: ignore[operator]
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("existing")
    with pytest.raises(UnsafeTree, match=reason.replace("(", r"\(").replace(")", r"\)")):
        engine.restore(snapshot_id, target)
    assert sorted(p.name for p in target.iterdir()) == ["keep"], "nothing written, nothing deleted"
    assert not (tmp_path / "escape").exists()


def test_a_symlink_planted_in_the_target_does_not_redirect_writes(engine: SnapshotEngine, tmp_path: Path) -> None:
    """Even when the tree is fine, the folder being restored into may hold a symlink where a folder belongs."""
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "x").write_text("inside")
    info = engine.create(ws)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(outside, target / "data")
    engine.restore(info.id, target)
    assert (target / "data").is_dir() and not (target / "data").is_symlink()
    assert list(outside.iterdir()) == [], "nothing was written through the symlink"


def test_missing_and_corrupt_objects_are_loud_and_named(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws")
    info = engine.create(ws)
    fresh = SnapshotEngine(engine.store, scratch_dir=tmp_path / "scratch2")  # no locally cached tree

    with pytest.raises(SnapshotMissing, match="does not exist"):
        fresh.restore("0" * 64, tmp_path / "nothing")
    with pytest.raises(SnapshotError, match="not a snapshot id"):
        fresh.restore("../../etc", tmp_path / "nothing")

    packs = [p for p in (Path(engine.store.url.removeprefix("file://")) / "packs").rglob("*") if p.is_file()]
    data = bytearray(packs[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    packs[0].chmod(0o644)
    packs[0].write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt) as corrupt:
        fresh.restore(info.id, tmp_path / "out-corrupt")
    assert info.id in str(corrupt.value) and "packs/" in str(corrupt.value) and "file '" in str(corrupt.value)
    report = fresh.verify(info.id)
    assert not report.ok and any("packs/" in p.key for p in report.problems)

    packs[0].unlink()
    with pytest.raises(SnapshotCorrupt, match="is missing"):
        fresh.restore(info.id, tmp_path / "out-missing")

    tree = Path(engine.store.url.removeprefix("file://")) / tree_key(info.id)
    tree.write_bytes(zstandard.ZstdCompressor().compress(b"tampered"))
    another = SnapshotEngine(engine.store, scratch_dir=tmp_path / "scratch3")  # trees are cached once verified
    with pytest.raises(SnapshotCorrupt, match="does not match its hash"):
        another.restore(info.id, tmp_path / "out-tree")
