"""`tardigrade snapshot create` costs what changed, and its stat cache never hides a change (issue 12, item 5).

The CLI used to snapshot without a stat cache, so every call re-read and re-hashed the whole folder: end to end it
cost as much as `tar -cf`. It now keeps one stat cache per folder and store (tardigrade/cli/snapshots.py). These
tests run the real command in a subprocess against a real folder store, and check both sides: unchanged files are
not read again, and every kind of change (content with the old size and mtime, a store emptied behind the cache,
another encryption key, two snapshots of one folder at once, an edit while a large walk is published) still ends
in a snapshot that restores to exactly the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tardigrade.sandboxes.snapshots import SnapshotEngine, create
from tardigrade.sandboxes.snapshots.statcache import StatCacheCursor, StatCacheWriter
from tardigrade.sandboxes.stores import open_store
from tests.conftest import REPO, run_cli

FILES = 30


def _cli(home: Path, *args: str) -> dict[str, Any]:
    proc = run_cli(*args, "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _restored(home: Path, store: str, snapshot_id: str, target: Path) -> dict[str, bytes]:
    shutil.rmtree(target, ignore_errors=True)
    _cli(home, "snapshot", "restore", snapshot_id, str(target), "--store", store)
    return _files(target)


def _workspace(root: Path) -> None:
    (root / "src").mkdir(parents=True)
    for i in range(FILES):
        (root / "src" / f"f{i:02}.txt").write_bytes(f"file {i}\n".encode() * 40)


def test_create_reads_only_what_changed_and_restores_it(tmp_path: Path) -> None:
    home, ws, store = tmp_path / "home", tmp_path / "ws", (tmp_path / "store").as_uri()
    _workspace(ws)
    first = _cli(home, "snapshot", "create", str(ws), "--store", store)
    assert first["files_read"] == FILES

    (ws / "src" / "f07.txt").write_bytes(b"changed\n")
    second = _cli(home, "snapshot", "create", str(ws), "--store", store, "--parent", first["snapshot_id"])
    assert (second["files_read"], second["files_unchanged"]) == (1, FILES - 1)
    assert _restored(home, store, second["snapshot_id"], tmp_path / "r1") == _files(ws)

    unchanged = _cli(home, "snapshot", "create", str(ws), "--store", store, "--parent", second["snapshot_id"])
    assert unchanged["snapshot_id"] == second["snapshot_id"] and unchanged["files_read"] == 0


def test_same_size_same_mtime_rewrite_is_seen(tmp_path: Path) -> None:
    """An edit that keeps the size and puts the old mtime back (as `cp -p`, `rsync -t` or a tool may do) still
    changes the ctime and the inode-level stat: the cache must not reuse the old content."""
    home, ws, store = tmp_path / "home", tmp_path / "ws", (tmp_path / "store").as_uri()
    _workspace(ws)
    target = ws / "src" / "f03.txt"
    before = target.stat()
    first = _cli(home, "snapshot", "create", str(ws), "--store", store)
    old = target.read_bytes()
    target.write_bytes(old.upper())  # same size
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    second = _cli(home, "snapshot", "create", str(ws), "--store", store, "--parent", first["snapshot_id"])
    assert second["snapshot_id"] != first["snapshot_id"] and second["files_read"] == 1
    assert _restored(home, store, second["snapshot_id"], tmp_path / "r")["src/f03.txt"] == old.upper()


def test_restore_then_create_reads_nothing(tmp_path: Path) -> None:
    """A restore records what it wrote, so the next create of that folder is the same snapshot, read for free."""
    home, ws, store = tmp_path / "home", tmp_path / "ws", (tmp_path / "store").as_uri()
    _workspace(ws)
    snapshot_id = _cli(home, "snapshot", "create", str(ws), "--store", store)["snapshot_id"]
    target = tmp_path / "restored"
    _cli(home, "snapshot", "restore", snapshot_id, str(target), "--store", store)
    again = _cli(home, "snapshot", "create", str(target), "--store", store)
    assert again["snapshot_id"] == snapshot_id and again["files_read"] == 0


def test_emptied_store_behind_the_cache_gets_everything_again(tmp_path: Path) -> None:
    """The store folder deleted and made anew at the same URL: the cache describes the old store (its identity),
    so nothing it remembers may be reused; the new snapshot must restore from the new store alone."""
    home, ws, store_dir = tmp_path / "home", tmp_path / "ws", tmp_path / "store"
    store = store_dir.as_uri()
    _workspace(ws)
    _cli(home, "snapshot", "create", str(ws), "--store", store)
    shutil.rmtree(store_dir)
    again = _cli(home, "snapshot", "create", str(ws), "--store", store)
    assert again["files_read"] == FILES
    assert _restored(home, store, again["snapshot_id"], tmp_path / "r") == _files(ws)
    verified = run_cli("snapshot", "verify", again["snapshot_id"], "--store", store, home=home)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_two_writers_of_one_cache_do_not_collide(tmp_path: Path) -> None:
    """Two snapshots of one folder at once (two CLI calls) each write a whole cache; the last to commit wins, and
    neither fails nor leaves a mix of the two."""
    path = tmp_path / "cache" / "statcache"
    first, second = StatCacheWriter(path, "store-a"), StatCacheWriter(path, "store-a")
    for writer, tag in ((first, b"1"), (second, b"2")):
        for i in range(100):
            writer.add(f"f{i:03}", f"{i}:{tag.decode()}", "a" * 64, 0o644, b'{"p":"x%s"}' % tag)
    first.commit("1" * 64, "f" * 64, "d" * 64, 100, 0)
    second.commit("2" * 64, "f" * 64, "d" * 64, 100, 0)
    cursor = StatCacheCursor(path, "store-a")
    try:
        assert cursor.snapshot == "2" * 64
        keys = [cached.stat_key for i in range(100) if (cached := cursor.seek(f"f{i:03}")) is not None]
    finally:
        cursor.close()
    assert keys == [f"{i}:2" for i in range(100)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["statcache"]


def test_concurrent_cli_creates_of_one_folder(tmp_path: Path) -> None:
    home, ws, store = tmp_path / "home", tmp_path / "ws", (tmp_path / "store").as_uri()
    _workspace(ws)
    _cli(home, "snapshot", "create", str(ws), "--store", store)
    (ws / "src" / "f01.txt").write_bytes(b"both see this\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "TARDIGRADE_"))}
    command = [sys.executable, "-m", "tardigrade.cli", "snapshot", "create", str(ws), "--store", store, "--json"]
    procs = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env={**env, "TARDIGRADE_HOME": str(home)}
        )
        for _ in range(3)
    ]
    digests = set()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        digests.add(json.loads(out)["digest"])  # ids may differ (each stored the new file in a pack of its own)
    assert len(digests) == 1
    (ws / "src" / "f02.txt").write_bytes(b"and then this\n")
    after = _cli(home, "snapshot", "create", str(ws), "--store", store)
    assert after["files_read"] == 1
    assert _restored(home, store, after["snapshot_id"], tmp_path / "r") == _files(ws)


def test_a_change_while_a_large_walk_is_published_is_not_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk too large to keep used to be taken a third time, after the tree was published, for the cache's
    fingerprint: a file edited in between got its new stat into the fingerprint but its old content into the
    tree, so the next snapshot matched the fingerprint and reused the old tree whole, losing the edit."""
    monkeypatch.setattr(create, "MAX_WALK_KEPT", 5)  # this small workspace counts as "too large to keep"
    ws, cache = tmp_path / "ws", tmp_path / "statcache"
    _workspace(ws)
    engine = SnapshotEngine(
        open_store((tmp_path / "store").as_uri()), scratch_dir=tmp_path / "scratch", encryption=None
    )
    put_tree = engine._put_tree

    def put_tree_then_edit(snapshot_id: str, body: Path) -> None:
        put_tree(snapshot_id, body)
        (ws / "src" / "f05.txt").write_bytes(b"edited while the snapshot was being published\n")

    try:
        monkeypatch.setattr(engine, "_put_tree", put_tree_then_edit)
        first = engine.create(ws, cache_path=cache)
        monkeypatch.setattr(engine, "_put_tree", put_tree)
        second = engine.create(ws, cache_path=cache)
        assert second.id != first.id
        engine.restore(second.id, tmp_path / "r")
    finally:
        engine.close()
    assert _files(tmp_path / "r") == _files(ws)


def test_another_encryption_key_does_not_reuse_the_cache(tmp_path: Path) -> None:
    """The cache's lines go into new trees as they are: lines naming blobs encrypted with key A (or with none)
    must not end up in a snapshot taken with key B, which could then never be restored with key B."""
    from tardigrade.sandboxes.snapshots.crypto import new_key

    home, ws, store = tmp_path / "home", tmp_path / "ws", (tmp_path / "store").as_uri()
    _workspace(ws)
    key_a, key_b = new_key(), new_key()
    for key in ("", key_a, key_b):
        env = {"TARDIGRADE_ENCRYPTION_KEY": key} if key else {}
        created = run_cli("snapshot", "create", str(ws), "--store", store, "--json", home=home, env=env)
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["files_read"] == FILES  # nothing reused from the other key's snapshot
        snapshot_id = json.loads(created.stdout)["snapshot_id"]
        target = tmp_path / f"restored-{len(key)}-{key[:4]}"
        restored = run_cli("snapshot", "restore", snapshot_id, str(target), "--store", store, home=home, env=env)
        assert restored.returncode == 0, restored.stderr
        assert _files(target) == _files(ws)
