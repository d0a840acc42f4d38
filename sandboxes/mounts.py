"""Data mounts: the worker copies a bucket prefix or a folder into a folder of its own, with its own credentials.

Agents' generated code runs in the sandbox, so no cloud credential, config file or token may ever be there. The
worker therefore opens the source (`open_source`: an `ObjectStore` from sandboxes/stores, with the SDKs' usual
credential chains, or a read-only view of a local folder for ``file://``), lists it, and streams each object into a
*materialization folder* outside the sandbox: the local provider binds that folder into the sandbox (read-only for
``ro``), the remote providers push it into the sandbox as a tar stream.

`materialize` is a sync, not a copy: a state file next to the folder remembers, per object, the store's version tag
(S3/Azure ETag, GCS generation) and the local file's stat as written. An object whose tag is unchanged and whose
local file still has that stat is skipped; anything else is downloaded again; files whose object is gone are
deleted. So a rollback (same sandbox) costs a listing, and a rehydration into a fresh sandbox downloads everything.

Downloads run in parallel (a bounded window of in-flight objects, each streamed to disk by the store backend in
1 MiB pieces), so memory stays bounded by the thread count, not by object sizes; the listing is streamed too. Only
the set of seen object names is held (for deletions).

An ``rw`` mount's folder is bound into a local sandbox, which may plant symlinks in it: every file is put in place,
every stale one deleted and every folder's mode set through sandboxes/safe_folders.py, so a refresh replaces a
planted symlink and never writes, creates or deletes anything through one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tardigrade.sandboxes.errors import SandboxError, UnsafePath
from tardigrade.sandboxes.manifest import Mount
from tardigrade.sandboxes.safe_folders import SafeFolders, is_safe_relative, set_folder_modes, walk_bottom_up
from tardigrade.sandboxes.selection import glob_to_regex
from tardigrade.sandboxes.stores import ObjectInfo, ObjectMissing, ObjectStore, StoreError, open_store, redact_url
from tardigrade.sandboxes.stores.folder import stat_etag

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 8
_STATE_FORMAT = "tardigrade-mountstate/1"


class MountError(SandboxError):
    """A mount's source cannot be opened, listed or read. Names the mount and what to fix; never a credential."""


@dataclass
class MountStats:
    index: int
    source: str  # redacted URL
    path: str  # where it appears in the sandbox
    objects: int = 0  # objects that match the mount's globs
    bytes: int = 0  # their total size
    downloaded: int = 0
    bytes_downloaded: int = 0
    skipped: int = 0  # unchanged since the last materialization, not downloaded
    deleted: int = 0  # local files whose object is gone
    ignored: list[str] | None = None  # object names that cannot be files (first few)
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return asdict(self)


# -- sources ------------------------------------------------------------------------------------------------------


class ReadOnlyFolder(ObjectStore):
    """A local folder seen as a read-only object store: ``file://`` mount sources. Unlike `FileStore` it creates
    nothing in the folder, follows no symlinks out of it and refuses every write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()
        if not root.is_dir():
            raise StoreError(f"folder {root} does not exist on this worker (or is not a folder)")

    def _path(self, key: str) -> Path:
        if not is_safe_relative(key):
            raise StoreError(f"invalid object key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> bool:
        raise StoreError(f"{self.url} is a read-only mount source")

    def delete(self, key: str) -> None:
        raise StoreError(f"{self.url} is a read-only mount source")

    def _open(self, key: str) -> int:
        try:
            return os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(key, self.url) from None

    def get(self, key: str) -> bytes:
        fd = self._open(key)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        fd = self._open(key)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def get_file(self, key: str, path: Path) -> None:
        fd = self._open(key)
        with os.fdopen(fd, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = os.lstat(self._path(key))
        except FileNotFoundError:
            raise ObjectMissing(key, self.url) from None
        return ObjectInfo(key, st.st_size, st.st_mtime, stat_etag(st))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for dirpath, dirnames, filenames in os.walk(self.root):  # os.walk does not follow symlinked folders
            rel = os.path.relpath(dirpath, self.root)
            dirnames.sort()
            for name in sorted(filenames):
                key = name if rel == "." else f"{rel}/{name}"
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                if os.path.isfile(os.path.join(dirpath, name)) and not os.path.islink(os.path.join(dirpath, name)):
                    yield ObjectInfo(key, st.st_size, st.st_mtime, stat_etag(st))


def open_source(mount: Mount, index: int) -> ObjectStore:
    """Open a mount's source with this worker's credentials. Raises `MountError` naming the mount; a missing
    bucket, missing credentials or an unreachable endpoint are found here, before anything is copied."""
    where = f"manifest.mounts[{index}] ({redact_url(mount.source)})"
    parts = urlsplit(mount.source)
    try:
        if parts.scheme.lower() == "file":
            return ReadOnlyFolder(Path(parts.path))
        return open_store(mount.source)
    except StoreError as e:
        raise MountError(f"{where}: {e}") from None


# -- materialization ----------------------------------------------------------------------------------------------


class _Filter:
    def __init__(self, include: list[str], exclude: list[str]) -> None:
        def compile_globs(globs: list[str]) -> re.Pattern[str] | None:
            if not globs:
                return None
            return re.compile("^(?:" + "|".join(f"(?:{glob_to_regex(g.strip('/'))})" for g in globs) + ")$")

        self._include = compile_globs(include)
        self._exclude = compile_globs(exclude)

    def wanted(self, key: str) -> bool:
        if self._include is not None and not self._include.match(key):
            return False
        return not (self._exclude is not None and self._exclude.match(key))


def _local_sig(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_mode}"


def _load_state(path: Path, source: str) -> dict[str, tuple[str, str]]:
    """object name -> (version tag, local stat signature) as of the last materialization of this source."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            header = json.loads(f.readline() or "{}")
            if header.get("format") != _STATE_FORMAT or header.get("source") != source:
                return {}
            state = {}
            for line in f:
                key, etag, sig = json.loads(line)
                state[key] = (etag, sig)
            return state
    except (OSError, ValueError):
        return {}  # losing the state costs a full download, never correctness


class _StateWriter:
    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".new")
        self._file = open(self._tmp, "w", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
        self._file.write(json.dumps({"format": _STATE_FORMAT, "source": source}) + "\n")

    def add(self, key: str, etag: str, sig: str) -> None:
        self._file.write(json.dumps([key, etag, sig]) + "\n")

    def commit(self) -> None:
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def materialize(
    mount: Mount,
    index: int,
    store: ObjectStore,
    dest: Path,
    *,
    state_file: Path,
    workers: int = DEFAULT_WORKERS,
    progress: Callable[[MountStats], None] | None = None,
) -> MountStats:
    """Make ``dest`` hold exactly the source's objects that match the mount's globs, downloading only what changed
    since the last call with the same ``state_file``. Files are written read-only for ``ro`` mounts.

    A failure leaves ``dest`` partly updated and the old state file in place (the next call re-checks everything
    it cannot vouch for); a partial download never appears under its final name."""
    started = time.monotonic()
    source = redact_url(mount.source)
    stats = MountStats(index=index, source=source, path=mount.path, ignored=[])
    where = f"manifest.mounts[{index}] ({source})"
    dest.mkdir(parents=True, exist_ok=True)
    set_folder_modes(dest, 0o755)  # a read-only mount's folders were left 0555 last time
    partial = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    old_state = _load_state(state_file, mount.source)
    writer = _StateWriter(state_file, mount.source)
    wanted = _Filter(mount.include, mount.exclude)
    file_mode = 0o444 if mount.read_only else 0o644
    seen: set[str] = set()
    in_flight: dict[Future[str], ObjectInfo] = {}
    # One set of folder descriptors for the download threads and this one: placing a file is quick, so a lock.
    folders = SafeFolders(dest)
    lock = threading.Lock()

    def current_sig(key: str) -> str | None:
        with lock, contextlib.suppress(OSError, UnsafePath):
            return _local_sig(folders.lstat(key))
        return None

    def download(info: ObjectInfo) -> str:
        tmp = partial / uuid.uuid4().hex
        try:
            store.get_file(info.key, tmp)
            os.chmod(tmp, file_mode)
            os.utime(tmp, (info.modified, info.modified))
            with lock:
                parent, name = folders.parent_of(info.key, create=True, replace_symlinks=True)
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                        raise StoreError(f"object {info.key!r} clashes with a folder of the same name")
                os.replace(tmp, name, dst_dir_fd=parent)  # replaces a planted symlink, never follows it
                return _local_sig(os.stat(name, dir_fd=parent, follow_symlinks=False))
        finally:
            tmp.unlink(missing_ok=True)

    def settle(done: set[Future[str]]) -> None:
        for future in done:
            info = in_flight.pop(future)
            sig = future.result()  # raises the download's error
            writer.add(info.key, info.etag or "", sig)
            stats.downloaded += 1
            stats.bytes_downloaded += info.size
        if progress is not None:
            progress(stats)

    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix=f"mount-{index}")
    try:
        for info in store.list(""):
            key = info.key
            if key.endswith("/") or not wanted.wanted(key):
                continue  # "folder" markers, and objects the globs leave out
            if not is_safe_relative(key):  # an object name that cannot be a file inside the folder
                if stats.ignored is not None and len(stats.ignored) < 20:
                    stats.ignored.append(key)
                continue
            seen.add(key)
            stats.objects += 1
            stats.bytes += info.size
            old = old_state.get(key)
            if old is not None and info.etag and old[0] == info.etag and current_sig(key) == old[1]:
                writer.add(key, old[0], old[1])
                stats.skipped += 1
                continue
            in_flight[pool.submit(download, info)] = info
            if len(in_flight) >= 2 * workers:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                settle(done)
        if in_flight:
            done, _ = wait(in_flight)
            settle(done)
        stats.deleted = _delete_unlisted(dest, seen)
        writer.commit()
    except MountError:
        writer.abort()
        raise
    except (StoreError, UnsafePath) as e:
        writer.abort()
        raise MountError(f"{where}: {e}") from None
    except OSError as e:
        writer.abort()
        raise MountError(f"{where}: cannot write the mount's data on this worker: {e}") from None
    except BaseException:
        writer.abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        folders.close()
        shutil.rmtree(partial, ignore_errors=True)
    if mount.read_only:
        set_folder_modes(dest, 0o555)
    stats.seconds = round(time.monotonic() - started, 3)
    if stats.ignored:
        log.warning("%s: ignored %d object name(s) that cannot be files, e.g. %r", where, len(stats.ignored),
                    stats.ignored[0])  # fmt: skip
    return stats


def _delete_unlisted(dest: Path, seen: set[str]) -> int:
    """Remove files whose object is gone (or no longer matches the globs), planted symlinks and anything else that
    is not an object's file, and folders left empty - by descriptor, never through a symlink."""
    deleted = 0
    for path, parent, name, st in walk_bottom_up(dest):
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=parent)  # only if empty
        elif path not in seen or not stat.S_ISREG(st.st_mode):
            os.unlink(name, dir_fd=parent)
            deleted += 1
    return deleted
