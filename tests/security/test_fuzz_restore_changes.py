"""Fuzzing ChangeSet restores with trees an attacker with write access to the store could plant.

A ChangeSet restore does not validate a tree it has not seen before as a whole: it binary-searches the tree for the
changed paths and validates, in order, each line it acts on (sandboxes/snapshots/restore.py). So it meets crafted
lines the full validator never let through before anything was touched. The property, for planted trees drawn as in
test_fuzz_tree.py and ChangeSets drawn from hostile and ordinary paths: the restore works or fails with a
`SnapshotError` (a hint that is itself malformed is a `ValueError`); nothing is written outside the restore target,
even with a symlink planted in it that points beside it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tardigrade.sandboxes.errors import SnapshotError
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tests.security.fuzz_settings import fuzz_settings
from tests.security.test_fuzz_tree import NASTY_PATHS, Lab, listing, planted_jail, tree_body


def _hint_accepts(path: str) -> bool:
    """Paths a ChangeSet may hold (the others are refused up front with a ValueError, before anything is read)."""
    return (
        bool(path)
        and not path.startswith("/")
        and "\0" not in path
        and "" not in path.split("/")
        and not any(part in (".", "..") for part in path.split("/"))
    )


CHANGED = [p for p in NASTY_PATHS if _hint_accepts(p)] + [
    "dir/sub", "dir/sub/b.bin", "exec.sh", "escape/secret", "escape/new", "rel-link/x", "big",
]  # fmt: skip


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with tempfile.TemporaryDirectory(prefix="fuzz-changes-") as base:
        yield Lab(Path(base))


@fuzz_settings(examples=100)
@given(data=st.data())
def test_a_changeset_restore_of_any_planted_tree_writes_only_its_target(lab: Lab, data: st.DataObject) -> None:
    body = data.draw(tree_body(lab))
    if data.draw(st.booleans()):  # without its hard link, the real tree is one a ChangeSet restore takes on
        body = b"\n".join(line for line in body.split(b"\n") if b'"k":"h"' not in line)
    snapshot_id = lab.plant(body)
    changed = frozenset(data.draw(st.lists(st.sampled_from(CHANGED), min_size=1, max_size=4)))
    with planted_jail(lab) as (jail, outside, target):
        (target / "dir" / "sub").mkdir()
        os.symlink("../outside", target / "rel-link")
        before = listing(outside)
        with contextlib.suppress(SnapshotError, ValueError):
            lab.engine.restore(snapshot_id, target, changes=ChangeSet(changed))
        assert listing(outside) == before, "the restore wrote outside its target"
        assert sorted(p.name for p in jail.iterdir()) == ["outside", "target"]
