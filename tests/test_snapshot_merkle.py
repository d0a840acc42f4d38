"""Trees stored as a Merkle tree of folder listings in packs (tardigrade-tree/2, merkle.py): what a one-file
change writes, that the flat tree and the workspace digest are those of tardigrade-tree/1, stores of flat trees,
garbage collection of listing packs, and crafted listings and root objects in a real store refused by name."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import zstandard

from tardigrade.sandboxes.errors import SnapshotCorrupt, SnapshotError, UnsafeTree
from tardigrade.sandboxes.snapshots import SnapshotEngine, merkle
from tardigrade.sandboxes.snapshots import tree as t
from tardigrade.sandboxes.snapshots.changes import ChangeSet
from tardigrade.sandboxes.snapshots.gc import GcPolicy
from tardigrade.sandboxes.snapshots.index import BlobIndex
from tardigrade.sandboxes.snapshots.packs import PackWriter
from tardigrade.sandboxes.snapshots.splice import SideFooter
from tardigrade.sandboxes.store_keys import INDEX, TREES, pack_key, record_key, tree_key
from tardigrade.sandboxes.stores import FileStore

NO_GRACE = GcPolicy(keep_last=1, keep_within=0, grace=0)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[SnapshotEngine]:
    e = SnapshotEngine(FileStore(tmp_path / "store"), scratch_dir=tmp_path / "scratch", encryption=None)
    e.merkle_from_bytes = 0  # tree/2 however small the workspace
    yield e
    e.close()


def fresh(engine: SnapshotEngine, tmp_path: Path, name: str) -> SnapshotEngine:
    """Another worker on the same store: nothing cached locally, every tree read from the store."""
    other = SnapshotEngine(engine.raw_store, scratch_dir=tmp_path / name, encryption=None)
    other.merkle_from_bytes = engine.merkle_from_bytes
    return other


def workspace(root: Path, folders: int = 20, files: int = 20) -> Path:
    """Files three folders deep: top<n>/d<nn>/deep/f<nn>.txt."""
    for d in range(folders):
        folder = root / f"top{d % 4}" / f"d{d:02}" / "deep"
        folder.mkdir(parents=True)
        for f in range(files):
            (folder / f"f{f:02}.txt").write_text(f"{d}.{f}\n")
    return root


def keys(engine: SnapshotEngine) -> set[str]:
    return {o.key for o in engine.store.list("")}


def blobs_in_packs(engine: SnapshotEngine, new: set[str]) -> int:
    """How many blobs the packs among ``new`` keys hold (from their index objects)."""
    return sum(len(json.loads(engine.store.get(k))["blobs"]) for k in new if k.startswith(INDEX))


def flat(engine: SnapshotEngine, snapshot_id: str) -> bytes:
    with engine.open_tree(snapshot_id) as path:
        return path.read_bytes()


@pytest.mark.parametrize("hinted", [False, True])
def test_one_changed_file_writes_only_the_listings_on_its_path(
    engine: SnapshotEngine, tmp_path: Path, hinted: bool
) -> None:
    ws = workspace(tmp_path / "ws")
    cache = tmp_path / "cache"
    first = engine.create(ws, cache_path=cache)
    assert first.stats and first.stats.tree_blobs == 4 + 20 + 20  # top*, top*/d*, top*/d*/deep
    time.sleep(1.1)  # past the stat cache's racy window for the files just written
    changed = "top1/d05/deep/f07.txt"
    (ws / changed).write_text("changed\n")
    before = keys(engine)
    changes = ChangeSet(frozenset({changed})) if hinted else None
    second = engine.create(ws, cache_path=cache, parent=first.id, changes=changes)
    new = keys(engine) - before
    # The file's blob, and the listings of top1/d05/deep, top1/d05 and top1 (depth 3), nothing else.
    assert second.stats and second.stats.tree_blobs == 3
    assert blobs_in_packs(engine, new) == 1 + 3
    # Store objects: one pack and index for the file, one of each per listing round (one per depth), the root
    # object and the record.
    assert len(new) == 2 + 2 * 3 + 2, sorted(new)
    assert sum(1 for k in new if k.startswith(TREES)) == 1
    # The untouched folders' listings are the parent's, taken as they were: not encoded, hashed or looked up.
    assert second.stats.spliced and second.stats.tree_deduped == 0
    # The side file kept for the next splice names the snapshot (the root object's id), not the flat body's hash.
    side = (engine.scratch / "trees" / engine.identity / f"{second.id}.side").read_bytes()
    footer = SideFooter.decode(side.rsplit(b"\n", 1)[-1])
    assert footer is not None and footer.tree == second.id
    # And the tree is the one a whole walk of the folder gives, each listing encoded and found stored by its hash.
    walker = fresh(engine, tmp_path, "walker")
    walked = walker.create(ws)
    assert walked.id == second.id and walked.stats and walked.stats.tree_deduped == 44 and walked.stats.tree_blobs == 0
    walker.close()
    other = fresh(engine, tmp_path, "other")
    other.restore(second.id, tmp_path / "out")
    assert (tmp_path / "out" / changed).read_text() == "changed\n"
    assert (tmp_path / "out" / "top3" / "d19" / "deep" / "f19.txt").read_text() == "19.19\n"
    assert other.verify(second.id).ok and other.verify(first.id).ok
    assert flat(other, second.id) == flat(engine, second.id), "assembled from the store as it was written"
    other.close()


def test_an_unchanged_workspace_writes_no_listing(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws", folders=4, files=3)
    first = engine.create(ws)
    again = engine.create(ws)  # no stat cache: walked and split again, every listing found stored
    assert again.id == first.id and again.stats and again.stats.tree_blobs == 0 and not again.stats.tree_written


def test_the_flat_tree_and_digest_are_those_of_the_flat_form(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws", folders=3, files=3)
    (ws / "empty").mkdir()
    (ws / 'odd "name"\n').write_text("odd")
    os.symlink("top0", ws / "link")
    merkle_form = engine.create(ws)
    engine.tree_format = 1
    flat_form = engine.create(ws)
    assert merkle_form.digest == flat_form.digest and merkle_form.id != flat_form.id
    assert blake3.blake3(flat(engine, flat_form.id)).hexdigest() == flat_form.id
    reader = fresh(engine, tmp_path, "reader")
    assert flat(reader, merkle_form.id) == flat(reader, flat_form.id)
    assert reader.info(merkle_form.id).digest == flat_form.digest
    reader.close()


def test_ten_thousand_files_in_a_hundred_folders_make_few_objects(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    for d in range(100):
        (ws / f"d{d:03}").mkdir(parents=True)
        for f in range(100):
            (ws / f"d{d:03}" / f"f{f:03}.txt").write_text(f"{d} {f}\n")
    info = engine.create(ws)
    assert info.stats and info.stats.tree_blobs == 100
    assert len(keys(engine)) <= 10, sorted(keys(engine))


def test_a_store_of_flat_trees_still_restores_verifies_and_is_collected(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws", folders=3, files=3)
    engine.tree_format = 1  # the writer of tardigrade-tree/1, as stores written before hold
    old = engine.create(ws, labels={"pipeline": "p"})
    reader = fresh(engine, tmp_path, "reader")  # writes tardigrade-tree/2
    reader.restore(old.id, tmp_path / "out")
    assert (tmp_path / "out" / "top2" / "d02" / "deep" / "f02.txt").read_text() == "2.2\n"
    assert reader.verify(old.id).ok and reader.folders_of(old.id) == {}
    (ws / "top0" / "d00" / "deep" / "f00.txt").write_text("new\n")
    new = reader.create(ws, labels={"pipeline": "p"})
    reader.collect_garbage(NO_GRACE, now=time.time() + 1)
    reader.collect_garbage(NO_GRACE, now=time.time() + 2)
    assert not reader.store.exists(tree_key(old.id)), "the old flat tree was collected"
    assert fresh(engine, tmp_path, "after").verify(new.id).ok
    reader.close()


def test_gc_after_many_snapshots_keeps_every_kept_one_whole(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws", folders=8, files=4)
    made = []
    for i in range(6):
        (ws / "top1" / "d05" / "deep" / "f00.txt").write_text(f"round {i}\n")
        (ws / f"top{i % 4}" / f"new{i}").mkdir()
        made.append(engine.create(ws, labels={"pipeline": "p"}))
    kept = GcPolicy(keep_last=3, keep_within=0, grace=0)
    first = engine.collect_garbage(kept, now=time.time() + 1)
    assert first.packs_condemned > 0  # the dropped snapshots' own listings (and contents)
    engine.collect_garbage(kept, now=time.time() + 2)
    reader = fresh(engine, tmp_path, "reader")
    for i in range(3, 6):
        report = reader.verify(made[i].id)
        assert report.ok, report.problems
        out = tmp_path / f"out{i}"
        reader.restore(made[i].id, out)
        assert (out / "top1" / "d05" / "deep" / "f00.txt").read_text() == f"round {i}\n"
    for info in made[:3]:
        with pytest.raises(SnapshotError):
            reader.restore(info.id, tmp_path / "gone")
    reader.close()


def test_listings_in_condemned_packs_are_stored_again(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws", folders=2, files=2)
    cache = tmp_path / "cache"
    old = engine.create(ws, cache_path=cache, labels={"pipeline": "p"})
    listing_packs = {ref.pack for refs in engine.folders_of(old.id).values() for ref in refs}
    engine.store.delete(record_key(old.id))  # dropped by whoever: its packs are garbage for the next GC
    report = engine.collect_garbage(NO_GRACE, now=time.time())
    assert report.packs_condemned >= len(listing_packs)
    again = engine.create(ws, cache_path=cache, labels={"pipeline": "p"})  # nothing changed in the folder
    assert again.digest == old.digest and again.id != old.id
    again_packs = {ref.pack for refs in engine.folders_of(again.id).values() for ref in refs}
    assert again_packs.isdisjoint(listing_packs), "a listing in a condemned pack was reused"
    engine.collect_garbage(GcPolicy(keep_last=1, keep_within=0, grace=0, keep_ids=frozenset({again.id})))
    for pack in listing_packs:
        assert not engine.store.exists(pack_key(pack))
    other = fresh(engine, tmp_path, "after")
    assert other.verify(again.id).ok
    other.close()


# -- crafted and damaged objects --------------------------------------------------------------------------------


def put_blob(engine: SnapshotEngine, data: bytes) -> t.ChunkRef:
    writer = PackWriter(engine.store, BlobIndex(engine.store, None))
    ref = writer.add(data)
    writer.finish()
    return writer.resolve(ref)


def line(path: str, kind: str = "d", refs: list[t.ChunkRef] | None = None) -> bytes:
    fields: dict[str, object] = {"p": path, "k": kind, "t": 0}
    fields |= {"m": 0o755} if kind == "d" else {"l": "elsewhere"}
    encoded = json.dumps(fields, separators=(",", ":")).encode()
    return encoded if refs is None else encoded[:-1] + b',"x":' + merkle.refs_json(refs) + b"}"


def listing(engine: SnapshotEngine, folder: str, lines: list[bytes]) -> list[t.ChunkRef]:
    return [put_blob(engine, b"".join(ln + b"\n" for ln in lines) + merkle.folder_footer(folder))]


def plant_root(engine: SnapshotEngine, lines: list[bytes], entries: int) -> str:
    footer = {"format": merkle.FORMAT, "entries": entries, "bytes": 0, "digest": "x", "selection": {}}
    body = b"".join(ln + b"\n" for ln in lines) + json.dumps(footer, separators=(",", ":")).encode()
    snapshot_id = blake3.blake3(body).hexdigest()
    engine.store.put(tree_key(snapshot_id), zstandard.ZstdCompressor().compress(body))
    return snapshot_id


def refused(engine: SnapshotEngine, tmp_path: Path, snapshot_id: str, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises((UnsafeTree, SnapshotCorrupt), match=match):
        engine.restore(snapshot_id, out)
    assert not any(out.iterdir()), "nothing is written from a refused tree"


def test_a_crafted_tree_that_is_well_formed_restores(engine: SnapshotEngine, tmp_path: Path) -> None:
    """The helpers below make trees the reader takes: each attack differs from this in one point."""
    b = listing(engine, "a/b", [line("a/b/link", "l")])
    a = listing(engine, "a", [line("a/b", refs=b)])
    engine.restore(plant_root(engine, [line("a", refs=a)], 3), tmp_path / "out")
    assert os.readlink(tmp_path / "out" / "a" / "b" / "link") == "elsewhere"


def test_a_line_in_another_folders_listing_is_refused(engine: SnapshotEngine, tmp_path: Path) -> None:
    a = listing(engine, "a", [line("elsewhere/x", "l")])
    refused(engine, tmp_path, plant_root(engine, [line("a", refs=a)], 2), "is listed in the listing of folder 'a'")
    b = listing(engine, "a", [line("b", "l")])  # a top-level path smuggled into a subfolder's listing
    refused(engine, tmp_path, plant_root(engine, [line("a", refs=b)], 2), "is listed in the listing of folder 'a'")


def test_the_listing_of_another_folder_is_refused(engine: SnapshotEngine, tmp_path: Path) -> None:
    other = listing(engine, "b", [])
    refused(engine, tmp_path, plant_root(engine, [line("a", refs=other)], 1), "listing of another folder")
    no_footer = [put_blob(engine, line("a/x", "l") + b"\n")]
    refused(engine, tmp_path, plant_root(engine, [line("a", refs=no_footer)], 2), "listing of another folder")


def test_a_listing_used_twice_is_refused(engine: SnapshotEngine, tmp_path: Path) -> None:
    """A DAG bomb: a few listings naming each other over and over would expand to billions of entries."""
    a = listing(engine, "a", [])
    refused(engine, tmp_path, plant_root(engine, [line("a", refs=a), line("b", refs=a)], 2), "already used")


def test_nesting_deeper_than_the_bound_is_refused(
    engine: SnapshotEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(merkle, "MAX_DEPTH", 4)
    refs: list[t.ChunkRef] = listing(engine, "/".join("d" * 6), [])
    for depth in range(6, 1, -1):
        here = "/".join("d" * depth)
        refs = listing(engine, here.rpartition("/")[0], [line(here, refs=refs)])
    refused(engine, tmp_path, plant_root(engine, [line("d", refs=refs)], 6), "nested deeper than 4 folders")


def test_an_entry_count_other_than_the_footers_is_refused(engine: SnapshotEngine, tmp_path: Path) -> None:
    a = listing(engine, "a", [line("a/x", "l"), line("a/y", "l")])
    refused(engine, tmp_path, plant_root(engine, [line("a", refs=a)], 2), "more than the 2 entries")
    refused(engine, tmp_path, plant_root(engine, [line("a", refs=a)], 4), "list 3 entries but the footer says 4")


def test_folder_references_in_the_wrong_places_are_refused(engine: SnapshotEngine, tmp_path: Path) -> None:
    a = listing(engine, "a", [])
    refused(engine, tmp_path, plant_root(engine, [line("a")], 1), "is a folder without its listing")
    refused(engine, tmp_path, plant_root(engine, [line("l", "l", refs=a)], 1), "is not a folder but names")
    bad = line("a", refs=a).replace(b'"x":[[', b'"x":[["nope",')
    refused(engine, tmp_path, plant_root(engine, [bad], 1), "malformed references")
    spaced = line("a", refs=a).replace(b'"x":[[', b'"x": [[')
    refused(engine, tmp_path, plant_root(engine, [spaced], 1), "in a form no writer makes")
    twice = line("a", refs=a)[:-1] + b',"x":' + merkle.refs_json(a) + b"}"
    refused(engine, tmp_path, plant_root(engine, [twice], 1), "in a form no writer makes")
    huge = [a[0]._replace(raw_length=t.MAX_BLOB_BYTES + 1)]
    refused(engine, tmp_path, plant_root(engine, [line("a", refs=huge)], 1), "impossible size")


def test_damaged_or_missing_listings_are_named(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws", folders=2, files=2)
    info = engine.create(ws)
    (ref,) = engine.folders_of(info.id)["top1"]
    pack = tmp_path / "store" / pack_key(ref.pack)
    data = bytearray(pack.read_bytes())
    data[ref.offset + ref.length // 2] ^= 0xFF
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt, match=f"{pack_key(ref.pack)}.*(fails its hash check|cannot be decoded)"):
        fresh(engine, tmp_path, "r1").restore(info.id, tmp_path / "out1")
    report = fresh(engine, tmp_path, "r2").verify(info.id)
    assert not report.ok and pack_key(ref.pack) in report.problems[0].key
    report = engine.verify(info.id)  # the tree is cached here: verify reads its listings again all the same
    assert not report.ok and any(p.path == "top1" for p in report.problems)
    pack.unlink()
    with pytest.raises(SnapshotCorrupt, match="is missing"):
        fresh(engine, tmp_path, "r3").restore(info.id, tmp_path / "out3")


def test_a_listing_that_inflates_past_its_reference_is_refused(engine: SnapshotEngine, tmp_path: Path) -> None:
    """A zstd bomb as a listing: decoding stops one byte past the length its reference claims."""
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    writer = PackWriter(engine.store, BlobIndex(engine.store, None))
    writer.encode = lambda data: (bomb, t.CODEC_ZSTD)  # type: ignore[method-assign]
    ref = writer.add(merkle.folder_footer("a"))
    writer.finish()
    ref = writer.resolve(ref)
    refused(engine, tmp_path, plant_root(engine, [line("a", refs=[ref])], 1), "fails its hash check")


def test_a_listing_of_tiny_lines_is_held_as_bytes(engine: SnapshotEngine, tmp_path: Path) -> None:
    """A memory bomb: a listing of hundreds of thousands of tiny lines compresses to little, and held as an
    object per line it took about six times its size (a crafted 1 GiB listing: gigabytes). Held as bytes, reading
    it costs about its size twice (fetched, then cut from its footer)."""
    import tracemalloc

    count = 150_000  # one blob, under its 8 MiB bound
    lines = [line(f"a/{i:07}", "l") for i in range(count)]
    refs = listing(engine, "a", lines)
    snapshot_id = plant_root(engine, [line("a", refs=refs)], count + 1)
    raw = refs[0].raw_length
    tracemalloc.start()
    try:
        assert len(flat(engine, snapshot_id)) > raw
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * raw, f"assembling a {raw >> 20} MiB listing peaked at {peak >> 20} MiB"


def test_listings_held_together_are_bounded(
    engine: SnapshotEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each listing under the bound, but a chain of them (all held while the walk is inside the deepest) over it:
    a crafted tree of thousands of nested big listings would hold them all at once."""
    monkeypatch.setattr(merkle, "MAX_LISTING", 4000)
    deepest = "/".join("d" * 4)
    refs = listing(engine, deepest, [line(f"{deepest}/l{i:02}", "l") for i in range(30)])
    entries = 1 + 30
    for depth in range(4, 1, -1):
        here = "/".join("d" * depth)
        parent = here.rpartition("/")[0]
        refs = listing(engine, parent, [line(here, refs=refs)] + [line(f"{parent}/z{i:02}", "l") for i in range(20)])
        entries += 1 + 20
    assert max(len(line(f"{deepest}/l{i:02}", "l")) for i in range(30)) * 30 < 4000, "each listing is under it"
    refused(engine, tmp_path, plant_root(engine, [line("d", refs=refs)], entries), "with those of its folders")


def test_a_listing_that_inflates_past_any_real_one_is_refused(engine: SnapshotEngine, tmp_path: Path) -> None:
    """A disk bomb: one line repeated for 7 MiB stores in under a KiB (ten thousand times smaller), so a small
    crafted store object became gigabytes of flat tree on the worker's disk; refused before it is read, like a
    flat tree object past its inflation bound."""
    repeated = line("a/x", "l") + b"\n"
    refs = listing(engine, "a", [line("a/x", "l")] * ((7 << 20) // len(repeated)))
    assert refs[0].raw_length > 1000 * refs[0].length
    snapshot_id = plant_root(engine, [line("a", refs=refs)], 1 + (7 << 20) // len(repeated))
    refused(engine, tmp_path, snapshot_id, "inflates over 1024 times")


@pytest.mark.parametrize("hinted", [False, True])
def test_reused_listings_give_the_tree_a_whole_walk_gives(engine: SnapshotEngine, tmp_path: Path, hinted: bool) -> None:
    """Spliced snapshots take the parent's listings of untouched folders as they are (merkle.split_changed): after
    each round of random edits - files changed, added, removed, folders made and removed, nested - the tree is the
    very one a fresh worker's whole walk of the folder stores."""
    import random
    import shutil

    rng = random.Random(12)
    ws = workspace(tmp_path / "ws", folders=6, files=3)
    cache = tmp_path / "cache"
    parent = engine.create(ws, cache_path=cache)
    for round_ in range(6):
        time.sleep(1.1)  # past the stat cache's racy window
        touched: set[str] = set()
        for _ in range(4):
            folders = sorted(str(p.relative_to(ws)) for p in ws.rglob("*") if p.is_dir())
            folder = rng.choice(folders)
            what = rng.choice(["edit", "add", "nest", "remove"])
            if what == "edit" and (files := sorted((ws / folder).glob("*.txt"))):
                rng.choice(files).write_text(f"edited {round_}\n")
                touched.add(folder)
            elif what == "add":
                (ws / folder / f"new{round_}-{rng.randrange(99)}.txt").write_text("new\n")
                touched.add(folder)
            elif what == "nest":
                (ws / folder / f"n{round_}" / "m").mkdir(parents=True, exist_ok=True)
                (ws / folder / f"n{round_}" / "m" / "x.txt").write_text("x\n")
                touched.add(folder)
            elif what == "remove" and folder.count("/") >= 1:
                shutil.rmtree(ws / folder)
                touched.add(folder.rpartition("/")[0])
        changes = ChangeSet(frozenset(touched)) if hinted else None
        child = engine.create(ws, cache_path=cache, parent=parent.id, changes=changes)
        assert child.stats and child.stats.spliced
        walker = fresh(engine, tmp_path, f"walker{round_}")
        assert walker.create(ws).id == child.id, f"round {round_}: {sorted(touched)}"
        walker.close()
        parent = child
    out = tmp_path / "out"
    fresh(engine, tmp_path, "reader").restore(parent.id, out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted(
        str(p.relative_to(ws)) for p in ws.rglob("*")
    )


@pytest.mark.parametrize("hinted", [False, True])
def test_a_spliced_tree_names_no_listing_of_a_removed_folder(
    engine: SnapshotEngine, tmp_path: Path, hinted: bool
) -> None:
    """The folder references kept for a spliced tree (GC marks their packs, the next splice reuses them) are the
    ones its root names: a removed empty folder's listing is not carried along from the parent."""
    ws, cache = tmp_path / "ws", tmp_path / "cache"
    (ws / "keep").mkdir(parents=True)
    (ws / "keep" / "f").write_text("1\n")
    (ws / "gone" / "inner").mkdir(parents=True)
    first = engine.create(ws, cache_path=cache)
    time.sleep(1.1)  # past the stat cache's racy window
    (ws / "gone" / "inner").rmdir()
    (ws / "gone").rmdir()
    changes = ChangeSet(frozenset({"gone"})) if hinted else None
    second = engine.create(ws, cache_path=cache, parent=first.id, changes=changes)
    assert second.stats and second.stats.spliced
    reader = fresh(engine, tmp_path, "reader")
    assert engine.folders_of(second.id) == reader.folders_of(second.id) == {"keep": engine.folders_of(first.id)["keep"]}
    reader.close()


def test_a_worker_without_the_tree_reads_listings_a_few_mib_at_a_time(engine: SnapshotEngine, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    for d in range(100):
        for sub in ("a", "b"):
            (ws / f"d{d:03}" / sub).mkdir(parents=True)
            (ws / f"d{d:03}" / sub / "f.txt").write_text(f"{d}{sub}\n")
    info = engine.create(ws)
    root = zstandard.ZstdDecompressor().decompress(engine.store.get(tree_key(info.id)), max_output_size=1 << 24)
    reader = merkle.ListingReader(engine.store, None, info.id)
    out = io.BytesIO()
    folders = merkle.assemble(info.id, root, reader, out)
    assert len(folders) == 300 and out.getvalue() == flat(engine, info.id)
    assert reader.reads <= 4, "300 listings in two packs: a ranged read per pack, not one per folder"
    # A reference past its pack's end is named, not read.
    (ref,) = folders["d000"]
    past = merkle.ListingReader(engine.store, None, info.id)
    with pytest.raises(SnapshotCorrupt, match="is shorter than"):
        past("d000", [ref._replace(offset=ref.offset + (1 << 30))])


def test_listings_read_backwards_do_not_each_download_a_window(engine: SnapshotEngine, tmp_path: Path) -> None:
    """A bandwidth bomb: a read brings the few MiB after the listing asked for along, so listings stored in
    reverse of the order a walk reads them, before a few MiB of filler, made every listing a download of a whole
    window (a hundred thousand tiny folders: hundreds of GB from a pack of a few MiB). Speculative bytes are
    bounded by what the listings used."""
    names = [f"f{i:03}" for i in range(40)]
    writer = PackWriter(engine.store, BlobIndex(engine.store, None))
    added = {name: writer.add(merkle.folder_footer(name)) for name in reversed(names)}  # f000 last: read first
    writer.add(os.urandom(merkle.WINDOW_BYTES))
    writer.finish()
    refs = {name: writer.resolve(ref) for name, ref in added.items()}
    assert len({ref.pack for ref in refs.values()}) == 1
    root = plant_root(engine, [line(name, refs=[refs[name]]) for name in names], len(names))
    reader = merkle.ListingReader(engine.store, None, root)
    body = zstandard.ZstdDecompressor().decompress(engine.store.get(tree_key(root)), max_output_size=1 << 20)
    merkle.assemble(root, body, reader, io.BytesIO())
    assert reader.bytes_read < 3 * merkle.WINDOW_BYTES, f"{reader.bytes_read >> 20} MiB for 40 tiny listings"


def test_a_large_listing_is_pieces_and_an_edit_rewrites_few_of_them(
    engine: SnapshotEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder too large for one blob is listed in pieces cut at line boundaries by content, so an edit in it
    rewrites the pieces around the edit, not the whole listing (small pieces here stand for the real MiB sizes)."""
    monkeypatch.setattr(merkle, "PIECE_MIN", 2048)
    monkeypatch.setattr(merkle, "PIECE_MAX", 8192)
    ws = tmp_path / "ws"
    (ws / "big").mkdir(parents=True)
    for f in range(400):
        (ws / "big" / f"file-{f:04}.txt").write_text(f"{f}\n")
    cache = tmp_path / "cache"
    first = engine.create(ws, cache_path=cache)
    before = engine.folders_of(first.id)["big"]
    assert len(before) >= 8
    time.sleep(1.1)  # past the stat cache's racy window
    (ws / "big" / "file-0200.txt").write_text("edited\n")
    second = engine.create(ws, cache_path=cache, parent=first.id)
    after = engine.folders_of(second.id)["big"]
    assert second.stats and 1 <= second.stats.tree_blobs <= 3
    assert len(set(after) - set(before)) == second.stats.tree_blobs
    reader = fresh(engine, tmp_path, "reader")
    reader.restore(second.id, tmp_path / "out")
    assert (tmp_path / "out" / "big" / "file-0200.txt").read_text() == "edited\n"
    assert (tmp_path / "out" / "big" / "file-0399.txt").read_text() == "399\n"
    assert flat(reader, second.id) == flat(engine, second.id)
    reader.close()


@pytest.mark.parametrize("hinted", [False, True])
def test_listings_stored_in_many_batches_make_the_same_tree(
    engine: SnapshotEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hinted: bool
) -> None:
    """A large tree's closed folders are stored in batches (merkle.PENDING_LIMIT); a batch's last listings may
    still be in the open pack when their parent's batch comes. One folder per batch here: the same tree."""
    ws = workspace(tmp_path / "ws", folders=6, files=2)
    (ws / "top1" / "z.txt").write_text("after the subfolders: top1 closes a line after them\n")
    cache = tmp_path / "cache"
    first = engine.create(ws, cache_path=cache)
    time.sleep(1.1)  # past the stat cache's racy window
    (ws / "top1" / "d05" / "deep" / "f01.txt").write_text("changed\n")
    (ws / "top2" / "new" / "deeper").mkdir(parents=True)
    monkeypatch.setattr(merkle, "PENDING_LIMIT", 0)
    changes = ChangeSet(frozenset({"top1/d05/deep/f01.txt", "top2/new"})) if hinted else None
    second = engine.create(ws, cache_path=cache, parent=first.id, changes=changes)
    batched = fresh(engine, tmp_path, "batched").create(ws)
    monkeypatch.undo()
    whole = fresh(engine, tmp_path, "whole").create(ws)
    assert second.id == batched.id == whole.id


def test_small_trees_stay_one_object_and_a_chain_may_cross_the_threshold(
    engine: SnapshotEngine, tmp_path: Path
) -> None:
    """Below `merkle_from_bytes` a tree is one tardigrade-tree/1 object (cheaper per checkpoint); a chain of
    spliced snapshots whose tree grows past it and shrinks back switches form and keeps the tree a walk gives."""
    ws = workspace(tmp_path / "ws", folders=4, files=5)
    cache = tmp_path / "cache"
    engine.merkle_from_bytes = 10_000  # between the two sizes below (flat bodies of ~7 KB and ~15 KB)
    parent = engine.create(ws, cache_path=cache)
    ids = [parent.id]
    time.sleep(1.1)  # past the stat cache's racy window for the files just written
    steps: list[set[str]] = []
    grown = {f"top0/d00/deep/g{i:02}.txt" for i in range(40)}
    steps.append(grown)
    steps.append(grown)  # removed again
    for n, changed in enumerate(steps):
        for rel in changed:
            path = ws / rel
            if n == 0:
                path.write_text(rel)
            else:
                path.unlink()
        parent = engine.create(ws, cache_path=cache, parent=parent.id, changes=ChangeSet(frozenset(changed)))
        ids.append(parent.id)
    forms = []
    for snapshot_id in ids:
        stored = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(engine.store.get(tree_key(snapshot_id))))
        forms.append(merkle.FORMAT.encode() in stored.read())  # the format is named in the footer, the last line
    assert forms == [False, True, False], forms
    reader = fresh(engine, tmp_path, "reader")
    walked = reader.create(ws)
    assert walked.id == ids[2]
    reader.restore(ids[1], tmp_path / "grown")
    assert (tmp_path / "grown" / "top0" / "d00" / "deep" / "g39.txt").read_text() == "top0/d00/deep/g39.txt"
    assert reader.verify(ids[1]).ok
    reader.close()
