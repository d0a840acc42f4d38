"""Fuzzing the snapshot tree parser and restore with trees an attacker with write access to the store could plant.

Each example is a tree of entries drawn from a real snapshot's lines, mutated field by field (wrong types, huge
numbers, ``..`` and absolute paths, symlinks, hard links to anything, chunk references into real packs with
lengths that lie) plus lines that are not JSON at all. Its id is the hash of its bytes, so it passes the hash
check and reaches the parser - as a crafted tree would. The property: restoring it, listing it and verifying it
either work or fail with a `SnapshotError`; nothing is written outside the restore target (a symlink planted in
the target points at a folder beside it, which must stay byte-for-byte the same).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from tardigrade.sandboxes.errors import SnapshotError
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.store_keys import tree_key
from tardigrade.sandboxes.stores import FileStore
from tests.security.fuzz_settings import fuzz_settings


def listing(root: Path) -> dict[str, str]:
    """Everything under ``root`` (not following symlinks): path -> kind and content or target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = "file:" + blake3.blake3(p.read_bytes()).hexdigest()
    return out


class Lab:
    """A store holding one real snapshot (its packs are what fuzzed chunk references point into)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        ws = base / "ws"
        (ws / "dir" / "sub").mkdir(parents=True)
        (ws / "dir" / "a.txt").write_text("alpha\n" * 10)
        (ws / "dir" / "sub" / "b.bin").write_bytes(os.urandom(3000))
        (ws / "big").write_bytes(os.urandom(1 << 20) + bytes(1 << 20))  # chunked, part compressible
        (ws / "exec.sh").write_text("#!/bin/sh\n")
        (ws / "exec.sh").chmod(0o755)
        os.symlink("dir/a.txt", ws / "rel-link")
        os.symlink("/etc/passwd", ws / "abs-link")
        os.link(ws / "dir" / "a.txt", ws / "hard")
        self.engine = SnapshotEngine(FileStore(base / "store"), scratch_dir=base / "scratch")
        info = self.engine.create(ws)
        with self.engine.open_tree(info.id) as tree:
            lines = tree.read_bytes().splitlines()
        self.entries: list[dict[str, Any]] = [json.loads(line) for line in lines[:-1]]
        self.footer: dict[str, Any] = json.loads(lines[-1])
        self.chunks = [c for e in self.entries for c in e.get("c", ())]

    def plant(self, body: bytes) -> str:
        snapshot_id = blake3.blake3(body).hexdigest()
        self.engine.store.put(tree_key(snapshot_id), zstandard.ZstdCompressor().compress(body))
        return snapshot_id


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with tempfile.TemporaryDirectory(prefix="fuzz-tree-") as base:
        yield Lab(Path(base))


# -- strategies -------------------------------------------------------------------------------------------------

NASTY_PATHS = ["..", "../x", "/etc/evil", "a/../../x", "", ".", "a//b", "a/./b", "escape/pwned", "escape",
               "dir/../..", "x\0y", "dir/sub/../../../out", "n" * 300, "é/✓", "\udcff", "a\nb", "dir", "dir/a.txt",
               "rel-link/x", "abs-link/x", "hard", "big", "new/deep/file"]  # fmt: skip
NASTY_LINKS = ["/", "..", "../outside", "/etc/passwd", "escape", "dir", "x" * 5000, "", "\0", "../../.."]
INTS = st.one_of(
    st.integers(-3, 5000),
    st.sampled_from([-(1 << 63), (1 << 63) - 1, 1 << 63, 1 << 45, 1 << 31, 0o7777, 0o100644, -1]),
)
JSON_ANY = st.recursive(
    st.one_of(st.none(), st.booleans(), INTS, st.floats(allow_nan=False), st.text(max_size=20)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=8,
)


@st.composite
def chunk_ref(draw: st.DrawFn, lab: Lab) -> list[Any]:
    ref = list(draw(st.sampled_from(lab.chunks)))
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, 5))
        ref[i] = draw(st.one_of(INTS, JSON_ANY, st.sampled_from([c[i] for c in lab.chunks])))
    if draw(st.booleans()):
        ref = ref[: draw(st.integers(0, 6))] + draw(st.lists(JSON_ANY, max_size=1))
    return ref


@st.composite
def entry(draw: st.DrawFn, lab: Lab) -> dict[str, Any]:
    e = dict(draw(st.sampled_from(lab.entries)))
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(["p", "k", "m", "t", "s", "h", "c", "l", "zz"]))
        value: Any
        if field == "p":
            value = draw(st.sampled_from(NASTY_PATHS) | st.text(max_size=12))
        elif field == "k":
            value = draw(st.sampled_from(["d", "f", "l", "h", "x", ""]) | JSON_ANY)
        elif field == "l":
            value = draw(st.sampled_from(NASTY_LINKS + NASTY_PATHS))
        elif field == "c":
            value = draw(st.lists(chunk_ref(lab), max_size=3) | JSON_ANY)
        else:
            value = draw(INTS | JSON_ANY)
        if draw(st.integers(0, 9)) == 9:
            e.pop(field, None)
        else:
            e[field] = value
    return e


@st.composite
def mutated_real_tree(draw: st.DrawFn, lab: Lab) -> list[dict[str, Any]]:
    """The real tree, canonical and complete, with one to three entries changed: gets past the order and folder
    checks, so the mutation itself is what restore meets."""
    entries = [dict(e) for e in lab.entries]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(entries) - 1))
        entries[i] = draw(entry(lab)) if draw(st.booleans()) else {**entries[i], **_one_field(draw, lab)}
    return entries


def _one_field(draw: st.DrawFn, lab: Lab) -> dict[str, Any]:
    field = draw(st.sampled_from(["k", "m", "t", "s", "h", "c", "l"]))
    values = {
        "k": st.sampled_from(["d", "f", "l", "h"]),
        "m": INTS,
        "t": INTS,
        "s": INTS,
        "h": st.sampled_from([c[0] for c in lab.chunks] + ["0" * 64, ""]),
        "c": st.lists(chunk_ref(lab), max_size=3),
        "l": st.sampled_from(NASTY_LINKS),
    }
    return {field: draw(values[field])}


@st.composite
def tree_body(draw: st.DrawFn, lab: Lab) -> bytes:
    lines = []
    chosen = draw(st.lists(entry(lab), max_size=8) | mutated_real_tree(lab))
    for e in chosen:
        lines.append(json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape"))
    if draw(st.integers(0, 4)) == 4:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.binary(max_size=40)))
    if draw(st.booleans()):
        lines.sort(key=lambda line: line.split(b'"', 4)[3] if line.count(b'"') > 4 else line)  # often canonical
    footer = dict(lab.footer, entries=len(lines))
    if draw(st.integers(0, 5)) == 5:
        footer = draw(st.dictionaries(st.sampled_from(["format", "entries", "bytes", "digest"]), JSON_ANY))
    return b"\n".join([*lines, json.dumps(footer).encode()])


# -- the property -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def planted_jail(lab: Lab) -> Iterator[tuple[Path, Path, Path]]:
    """A folder holding a worker file (``outside/secret``) beside a restore target in which the sandbox planted a
    symlink out (``escape``) and an old ``dir/a.txt``; yields (jail, outside, target) and removes it all after."""
    with tempfile.TemporaryDirectory(dir=lab.base) as jail_name:
        jail = Path(jail_name)
        outside = jail / "outside"
        outside.mkdir()
        (outside / "secret").write_text("worker file")
        target = jail / "target"
        (target / "dir").mkdir(parents=True)
        (target / "dir" / "a.txt").write_text("old")
        os.symlink("../outside", target / "escape")  # planted by the sandbox before the rollback
        yield jail, outside, target


@fuzz_settings(examples=100)
@given(data=st.data())
def test_any_planted_tree_restores_or_fails_with_a_snapshot_error_and_writes_only_its_target(
    lab: Lab, data: st.DataObject
) -> None:
    body = data.draw(tree_body(lab))
    snapshot_id = lab.plant(body)
    with planted_jail(lab) as (jail, outside, target):
        before = listing(outside)
        with contextlib.suppress(SnapshotError):
            lab.engine.restore(snapshot_id, target)
        assert listing(outside) == before, "the restore wrote outside its target"
        assert sorted(p.name for p in jail.iterdir()) == ["outside", "target"]
        with contextlib.suppress(SnapshotError):
            list(lab.engine.entries(snapshot_id))
        lab.engine.verify(snapshot_id)  # reports problems; must not raise
