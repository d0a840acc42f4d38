"""Encryption at rest: nothing readable in the store, dedupe within a key, clear errors without the key."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from tardigrade.sandboxes.errors import SnapshotCorrupt, SnapshotError
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.snapshots.crypto import ENV_KEY, Encryption, EncryptionError, new_key
from tardigrade.sandboxes.stores import open_store

MARKER = b"PLAINTEXT-THAT-MUST-NOT-BE-STORED-" * 50


def key() -> Encryption:
    return Encryption(base64.b64decode(new_key()))


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "secret.txt").write_bytes(MARKER)
    (ws / "big.bin").write_bytes(MARKER * 1000)  # chunked, compressible
    (ws / "random.bin").write_bytes(os.urandom(3 << 20))
    return ws


def raw_objects(engine: SnapshotEngine) -> list[bytes]:
    return [engine.raw_store.get(o.key) for o in engine.raw_store.list("")]


def test_encrypted_round_trip_leaves_nothing_readable_in_the_store(store_url: str, tmp_path: Path) -> None:
    enc = key()
    engine = SnapshotEngine(open_store(store_url), scratch_dir=tmp_path / "s", encryption=enc)
    ws = workspace(tmp_path)
    info = engine.create(ws, labels={"pipeline": "secret-project"})
    for data in raw_objects(engine):
        assert MARKER[:30] not in data and b"secret-project" not in data and b"secret.txt" not in data
    engine.restore(info.id, tmp_path / "out")
    assert (tmp_path / "out" / "secret.txt").read_bytes() == MARKER
    assert engine.verify(info.id).ok
    plain = SnapshotEngine(open_store((tmp_path / "plain").as_uri()), scratch_dir=tmp_path / "p", encryption=None)
    assert plain.create(ws).digest == info.digest, "the workspace digest does not depend on encryption"


def test_dedupe_works_within_one_key(tmp_path: Path) -> None:
    engine = SnapshotEngine(open_store((tmp_path / "store").as_uri()), scratch_dir=tmp_path / "s", encryption=key())
    ws = workspace(tmp_path)
    engine.create(ws)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ws.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    again = engine.create(copy)
    assert again.stats and again.stats.bytes_new == 0


def test_reading_without_the_key_or_with_another_says_so(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    info = SnapshotEngine(open_store(url), scratch_dir=tmp_path / "s", encryption=key()).create(workspace(tmp_path))
    no_key = SnapshotEngine(open_store(url), scratch_dir=tmp_path / "n", encryption=None)
    with pytest.raises(EncryptionError, match=f"is encrypted .*set {ENV_KEY}"):
        no_key.restore(info.id, tmp_path / "x")
    with pytest.raises(EncryptionError, match="set TARDIGRADE_ENCRYPTION_KEY"):
        no_key.list()
    other = SnapshotEngine(open_store(url), scratch_dir=tmp_path / "o", encryption=key())
    with pytest.raises(EncryptionError, match="encrypted with another key"):
        other.restore(info.id, tmp_path / "y")


def test_tampering_fails_authentication(tmp_path: Path) -> None:
    enc = key()
    url = (tmp_path / "store").as_uri()
    engine = SnapshotEngine(open_store(url), scratch_dir=tmp_path / "s", encryption=enc)
    info = engine.create(workspace(tmp_path))
    pack = next(p for p in (tmp_path / "store" / "packs").rglob("*") if p.is_file())
    data = bytearray(pack.read_bytes())
    data[-1] ^= 1  # the last blob's GCM tag (which blob comes first in a pack is not fixed: ingest.py)
    pack.write_bytes(bytes(data))
    fresh = SnapshotEngine(open_store(url), scratch_dir=tmp_path / "f", encryption=enc)
    with pytest.raises(SnapshotCorrupt, match="fails authentication"):
        fresh.restore(info.id, tmp_path / "out")
    assert not fresh.verify(info.id).ok


def test_the_key_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_KEY, "not base64!")
    with pytest.raises(SnapshotError, match="not valid base64"):
        SnapshotEngine(open_store((tmp_path / "s").as_uri()))
    monkeypatch.setenv(ENV_KEY, base64.b64encode(b"short").decode())
    with pytest.raises(SnapshotError, match="must be 32 bytes"):
        SnapshotEngine(open_store((tmp_path / "s").as_uri()))
    monkeypatch.setenv(ENV_KEY, new_key())
    assert SnapshotEngine(open_store((tmp_path / "s").as_uri())).encryption is not None
