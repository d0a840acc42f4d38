"""Outputs: files a pipeline publishes to a bucket, uploaded from a checkpointed snapshot, never from a live sandbox.

    outputs:
      - {path: reports/, to: "s3://results/{pipeline}/{run}/", after: end}
      - {path: model.pt, to: "gs://models/{run}/step-{step}/", after: train}

An output is read from the snapshot the workflow recorded after a step (restored into a scratch folder on the
worker with the engine's verification), so what is published is exactly a durable state: a step that failed or
was retried never leaks its half-done files, and a retried upload sends identical bytes. Every object is written
create-only (``If-None-Match``/generation 0/``link``): a retry skips what already arrived, after checking that it
holds the same content, and an object that exists with *different* content is a loud `OutputConflict`, never an
overwrite. A manifest of the files and their BLAKE3 hashes is written last, under ``_tardigrade/``, so consumers
can tell a complete set from one still arriving.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tardigrade.sandboxes.errors import TardigradeError
from tardigrade.sandboxes.manifest import Output, tree_path
from tardigrade.sandboxes.selection import glob_to_regex
from tardigrade.sandboxes.snapshots import Selection, SnapshotEngine
from tardigrade.sandboxes.snapshots.packs import file_hash
from tardigrade.sandboxes.stores import ObjectStore, StoreError, StoreUnavailable, open_store, redact_url


class OutputError(TardigradeError):
    """An output's destination cannot be opened or written (missing bucket, no credentials, refused)."""


class OutputConflict(OutputError):
    """The destination already holds a different object under an output's name; nothing was overwritten."""


@dataclass
class OutputStats:
    index: int
    destination: str  # redacted URL
    files: int = 0
    bytes: int = 0
    created: int = 0  # objects this call wrote
    already_there: int = 0  # identical objects a previous attempt wrote
    skipped_links: int = 0  # symlinks are not published
    manifest: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _same_content(store: ObjectStore, key: str, local: Path, digest: str, scratch: Path) -> bool:
    info = store.stat(key)
    if info.size != local.stat().st_size:
        return False
    fd, name = tempfile.mkstemp(dir=scratch, prefix="existing-")
    os.close(fd)
    try:
        store.get_file(key, Path(name))
        return file_hash(Path(name)) == digest
    finally:
        os.unlink(name)


def _matcher(include: list[str], exclude: list[str]) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    def compile_globs(globs: list[str]) -> re.Pattern[str] | None:
        return re.compile("^(?:" + "|".join(f"(?:{glob_to_regex(g)})" for g in globs) + ")$") if globs else None

    return compile_globs(include), compile_globs(exclude)


def open_destination(url: str, index: int) -> ObjectStore:
    try:
        return open_store(url)
    except StoreUnavailable:
        raise  # an outage: the run waits and tries again
    except StoreError as e:
        raise OutputError(f"outputs[{index}] ({redact_url(url)}): {e}") from None


def upload_output(
    engine: SnapshotEngine,
    snapshot_id: str,
    output: Output,
    index: int,
    destination: ObjectStore,
    *,
    scratch: Path,
    progress: Callable[[OutputStats], None] | None = None,
) -> OutputStats:
    """Publish ``output`` as it is in snapshot ``snapshot_id``. Idempotent: call it again after any failure."""
    started = time.monotonic()
    stats = OutputStats(index=index, destination=destination.url)
    where = f"outputs[{index}] ({destination.url})"
    work = Path(tempfile.mkdtemp(dir=scratch, prefix="output-"))
    try:
        root = tree_path(output.path)
        engine.restore(snapshot_id, work / "tree", selection=Selection(roots=(root,)))
        base = work / "tree" / root
        if not base.exists() and not base.is_symlink():
            raise OutputError(
                f"{where}: {output.path} does not exist in the snapshot of this step; check the path, or publish"
                " it after the step that writes it"
            )
        include, exclude = _matcher(output.include, output.exclude)
        if base.is_file() and not base.is_symlink():
            files = [(base.name, base)]
        else:
            files = []
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames.sort()
                for name in sorted(filenames):
                    full = Path(dirpath) / name
                    key = full.relative_to(base).as_posix()
                    if full.is_symlink():
                        stats.skipped_links += 1
                        continue
                    if (include is None or include.match(key)) and not (exclude is not None and exclude.match(key)):
                        files.append((key, full))
        listing = []
        for key, full in files:
            digest = file_hash(full)
            size = full.stat().st_size
            try:
                created = destination.put_file(key, full)
                if not created and not _same_content(destination, key, full, digest, work):
                    raise OutputConflict(
                        f"{where}: {key} already exists there with different content; nothing was overwritten."
                        " Put {run} or {step} in `to` so each run or step publishes to its own prefix"
                    )
            except StoreUnavailable:
                raise  # an outage: the run waits and tries again (create-only writes make that safe)
            except StoreError as e:
                raise OutputError(f"{where}: {e}") from None
            stats.files += 1
            stats.bytes += size
            stats.created += int(created)
            stats.already_there += int(not created)
            listing.append({"path": key, "size": size, "blake3": digest})
            if progress is not None:
                progress(stats)
        manifest_key = f"_tardigrade/{snapshot_id}.json"
        manifest = json.dumps({"snapshot": snapshot_id, "source": output.path, "files": listing}, indent=1).encode()
        try:
            if not destination.put(manifest_key, manifest) and destination.get(manifest_key) != manifest:
                raise OutputConflict(f"{where}: {manifest_key} exists with different content")
        except StoreUnavailable:
            raise
        except StoreError as e:
            raise OutputError(f"{where}: {e}") from None
        stats.manifest = manifest_key
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stats.seconds = round(time.monotonic() - started, 3)
    return stats
