"""Attacks on the shortcuts of a rollback (sandboxes/snapshots/restore.py).

A rollback skips work three ways: a tree validated once keeps the verdict as an extended attribute on the worker's
cached copy; a file the stat cache vouches for costs one lstat; the new stat cache is written in the same pass.
Each shortcut must be bound to what it vouches for: a verdict to that very tree file, a cache line to the content
the file held when its stat was taken. These tests forge or race each one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import blake3
import pytest
import zstandard

from tardigrade.sandboxes.errors import UnsafeTree
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.snapshots import restore as restore_module
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.store_keys import tree_key
from tardigrade.sandboxes.stores import FileStore

CHECKED_ATTR = "user.tardigrade.checked"


@pytest.fixture
def engine(tmp_path: Path) -> SnapshotEngine:
    return SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch")


def workspace(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    for i in range(5):
        (root / "src" / f"m{i}.py").write_text(f"x = {i}\n")
    (root / "notes.txt").write_text("notes\n")
    return root


def tree_lines(engine: SnapshotEngine, snapshot_id: str) -> tuple[list[bytes], dict[str, object]]:
    with engine.open_tree(snapshot_id) as tree:
        *entries, footer = tree.read_bytes().split(b"\n")
    return entries, json.loads(footer)


def with_hostile_lines(entries: list[bytes], footer: dict[str, object]) -> bytes:
    """The tree plus a symlink pointing out and a file beneath it: the validator refuses the second line."""
    hostile = [
        b'{"p":"zlink","k":"l","m":511,"t":0,"l":"/tmp"}',
        b'{"p":"zlink/evil","k":"f","m":420,"t":0,"s":0,"c":[]}',
    ]
    footer = {**footer, "entries": int(str(footer["entries"])) + len(hostile)}
    return b"\n".join([*entries, *hostile, json.dumps(footer, separators=(",", ":")).encode()])


def target_with_marker(tmp_path: Path) -> Path:
    """A folder to restore into, holding a file the tree lacks: a merge that started would delete it first."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "0-marker").write_text("a merge that started deletes me")
    return out


def has_xattrs(path: Path) -> bool:
    try:
        os.setxattr(path, "user.tardigrade.probe", b"1")
    except OSError:
        return False
    return True


def test_a_verdict_copied_onto_another_tree_does_not_vouch_for_it(engine: SnapshotEngine, tmp_path: Path) -> None:
    """`cp -a`, `rsync -X` or shutil.copy2 carry user xattrs: a verdict earned by one tree must not pass another."""
    ws = workspace(tmp_path / "ws")
    good = engine.create(ws)
    engine.restore(good.id, tmp_path / "copy")  # validates the tree and keeps the verdict on the cached copy
    entries, footer = tree_lines(engine, good.id)
    body = with_hostile_lines(entries, footer)
    bad_id = blake3.blake3(body).hexdigest()
    engine.store.put(tree_key(bad_id), zstandard.ZstdCompressor().compress(body))
    with engine.open_tree(good.id) as good_tree, engine.open_tree(bad_id) as bad_tree:
        if not has_xattrs(bad_tree):
            pytest.skip("the scratch filesystem keeps no user xattrs: every restore validates")
        os.setxattr(bad_tree, CHECKED_ATTR, os.getxattr(good_tree, CHECKED_ATTR))
    out = target_with_marker(tmp_path)
    with pytest.raises(UnsafeTree):
        engine.restore(bad_id, out)
    assert (out / "0-marker").exists(), "the tree was acted on before it was validated"


def test_a_cached_tree_edited_in_place_is_validated_again(engine: SnapshotEngine, tmp_path: Path) -> None:
    """An edit that keeps the inode keeps its xattrs: the verdict must not outlive the bytes it was given for."""
    ws = workspace(tmp_path / "ws")
    good = engine.create(ws)
    engine.restore(good.id, tmp_path / "copy")
    entries, footer = tree_lines(engine, good.id)
    with engine.open_tree(good.id) as cached:
        if not has_xattrs(cached):
            pytest.skip("the scratch filesystem keeps no user xattrs: every restore validates")
        assert os.getxattr(cached, CHECKED_ATTR)
        with open(cached, "r+b") as f:  # same inode, xattr kept
            f.write(with_hostile_lines(entries, footer))
            f.truncate()
    out = target_with_marker(tmp_path)
    with pytest.raises(UnsafeTree):
        engine.restore(good.id, out)
    assert (out / "0-marker").exists(), "the tree was acted on before it was validated"


def test_a_file_rewritten_while_the_restore_settles_it_is_not_vouched_for(
    engine: SnapshotEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept file whose mode changed is hashed, then given the tree's mode and mtime. A sandbox process writing
    it in between (same size, in place) must not leave a stat cache that says it still holds the tree's content:
    the next snapshot would record content the workspace does not have."""
    ws, cache = workspace(tmp_path / "ws"), tmp_path / "cache"
    old = 1_700_000_000 * 10**9
    os.utime(ws / "notes.txt", ns=(old, old))  # past the racy window
    info = engine.create(ws, cache_path=cache)
    (ws / "notes.txt").chmod(0o600)  # the attempt only changed its mode: the content still matches the tree

    hash_local = restore_module._Restorer._hash_local

    def hash_then_race(self: restore_module._Restorer, path: str) -> str:
        digest = hash_local(self, path)
        if path == "notes.txt":  # a sandbox process writes right after the restore read it
            with open(ws / path, "r+b") as f:
                f.write(b"NOTES\n")
        return digest

    monkeypatch.setattr(restore_module._Restorer, "_hash_local", hash_then_race)
    engine.restore(info.id, ws, cache_path=cache)
    monkeypatch.undo()
    assert (ws / "notes.txt").read_bytes() == b"NOTES\n"
    with_cache = engine.create(ws, cache_path=cache)
    assert with_cache.id == engine.create(ws).id, "the stat cache vouched for content the file no longer held"
    assert with_cache.id != info.id


def test_a_changeset_restore_over_an_unsorted_tree_writes_nothing_through_its_symlink(
    engine: SnapshotEngine, tmp_path: Path
) -> None:
    """A planted tree that lists a symlink after a file beneath it (out of order): the binary search may find the
    file without ever seeing the symlink. The restore must not write through a symlink or outside the target; it
    may restore (into real folders only) or refuse the tree, never anything else."""
    outside = tmp_path / "outside"
    outside.mkdir()
    lines = [
        b'{"p":"a","k":"d","m":493,"t":0}',
        b'{"p":"d/x","k":"f","m":420,"t":0,"s":0,"c":[]}',
        b'{"p":"d","k":"l","m":511,"t":0,"l":"' + str(outside).encode() + b'"}',
        b'{"p":"z","k":"d","m":493,"t":0}',
    ]
    _, real_footer = tree_lines(engine, engine.create(workspace(tmp_path / "ws")).id)
    footer = {**real_footer, "entries": len(lines)}
    body = b"\n".join([*lines, json.dumps(footer, separators=(",", ":")).encode()])
    bad_id = blake3.blake3(body).hexdigest()
    engine.store.put(tree_key(bad_id), zstandard.ZstdCompressor().compress(body))
    for disk in ("symlink", "folder", "nothing"):
        out = tmp_path / f"out-{disk}"
        out.mkdir()
        if disk == "symlink":
            os.symlink(outside, out / "d")
        elif disk == "folder":
            (out / "d").mkdir()
        with contextlib.suppress(UnsafeTree):
            engine.restore(bad_id, out, changes=ChangeSet(frozenset({"d/x"})))
        assert list(outside.iterdir()) == [], disk
        assert not (out / "d").is_symlink() or disk == "symlink", disk


def rewrite_keeping_mtime(path: Path, data: bytes) -> None:
    """What a sandbox process can do to hide a write from mtime: same size, in place, mtime put back."""
    st = path.lstat()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_file_changed_after_the_restore_wrote_it_is_not_vouched_for_by_the_walk_fingerprint(
    engine: SnapshotEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore records the folder's walk fingerprint, which lets the next snapshot reuse this one whole. A file
    (or symlink) the restore made and a sandbox process changed before the restore ended must not be part of it."""
    ws, cache = workspace(tmp_path / "ws"), tmp_path / "cache"
    os.symlink("src/m0.py", ws / "link")
    old = 1_700_000_000 * 10**9
    for path in [*ws.rglob("*"), ws]:
        os.utime(path, ns=(old, old), follow_symlinks=False)
    time.sleep(1.1)  # past the racy window (statcache.RACY_NS): ctimes cannot be set back
    info = engine.create(ws, cache_path=cache)
    write_files = restore_module._Restorer._write_files

    for victim in ("src/m1.py", "link"):
        # The attempt changed the victim: the restore makes it anew.
        (ws / victim).unlink()
        if victim == "link":
            os.symlink("src/m2.py", ws / victim)
        else:
            (ws / victim).write_text("x = 'attempt'\n")

        def write_then_race(self: restore_module._Restorer, cache: object, victim: str = victim) -> None:
            write_files(self, cache)  # type: ignore[arg-type]
            if victim == "link":  # swapped for another of the same length
                (ws / victim).unlink()
                os.symlink("src/m3.py", ws / victim)
                os.utime(ws / victim, ns=(old, old), follow_symlinks=False)
            else:
                rewrite_keeping_mtime(ws / victim, b"x = 'raced'\n"[: (ws / victim).stat().st_size])

        monkeypatch.setattr(restore_module._Restorer, "_write_files", write_then_race)
        engine.restore(info.id, ws, cache_path=cache)
        monkeypatch.undo()
        with_cache = engine.create(ws, cache_path=cache)
        assert with_cache.id == engine.create(ws).id != info.id, victim
        engine.restore(info.id, ws, cache_path=cache)  # back to the snapshot for the next victim
        assert engine.create(ws, cache_path=cache).id == info.id


def test_a_line_the_stat_cache_vouches_for_is_still_validated(engine: SnapshotEngine, tmp_path: Path) -> None:
    """A file the stat cache vouches for costs one lstat, its tree line not even parsed. A planted tree whose line
    for that file is hostile (and a cache line carrying the same bytes, so the two compare equal) must still be
    refused before anything is touched: validation does not depend on which lines the merge parses."""
    ws, cache = workspace(tmp_path / "ws"), tmp_path / "cache"
    old = 1_700_000_000 * 10**9
    for path in [*ws.rglob("*"), ws]:
        os.utime(path, ns=(old, old), follow_symlinks=False)
    time.sleep(1.1)  # past the racy window: the cache vouches for every file
    info = engine.create(ws, cache_path=cache)
    entries, footer = tree_lines(engine, info.id)
    [good] = [line for line in entries if line.startswith(b'{"p":"notes.txt"')]
    hostile = good.replace(b'"m":420', b'"m":%d' % (0o10000 | 0o644))  # mode bits no file has
    assert hostile != good
    body = b"\n".join([hostile if line == good else line for line in entries] + [json.dumps(footer).encode()])
    bad_id = blake3.blake3(body).hexdigest()
    engine.store.put(tree_key(bad_id), zstandard.ZstdCompressor().compress(body))
    assert good in cache.read_bytes()
    cache.write_bytes(cache.read_bytes().replace(good, hostile))
    (ws / "0-marker").write_text("a merge that started deletes me")
    with pytest.raises(UnsafeTree):
        engine.restore(bad_id, ws, cache_path=cache)
    assert (ws / "0-marker").exists(), "the tree was acted on before it was validated"
