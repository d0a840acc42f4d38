"""`file://` snapshot store: objects as files in a local folder.

The embedded default. Objects are written to a temporary file, fsynced, and hard-linked into place: ``link(2)``
fails if the name exists, which gives the same create-only semantics as an object store's if-none-match, and a
crash leaves at worst a stray temporary file, never a truncated object under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tardigrade.sandboxes.stores.base import (
    ObjectInfo,
    ObjectMissing,
    ObjectStore,
    StoreError,
    StoreUnavailable,
    check_key,
)

_TMP_DIR = ".tmp"
_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _space_outage(root: Path) -> Iterator[None]:
    """A full disk is an outage to wait out (someone frees space, a volume grows), not a reason to fail a run."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL:
            raise StoreUnavailable(f"snapshot store folder {root} is full ({e.strerror}); free some space") from e
        raise


def _write_all(fd: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def stat_etag(st: os.stat_result) -> str:
    """A folder has no version tags: size, mtime, ctime and inode change whenever a file is rewritten."""
    return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ctime_ns}-{st.st_ino}"


class FileStore(ObjectStore):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()
        self._deferred: list[tuple[str, str]] = []  # (temporary file, key) waiting for flush()
        self._deferred_lock = threading.Lock()
        try:
            (self.root / _TMP_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create snapshot store folder {self.root}: {e.strerror}") from e

    def _path(self, key: str) -> Path:
        if check_key(key).split("/", 1)[0] == _TMP_DIR:
            raise StoreError(f"invalid object key {key!r}: {_TMP_DIR}/ holds writes in progress")
        return self.root / key

    def _publish(self, tmp: str, key: str, *, sync_dir: bool = True) -> bool:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        if sync_dir:
            _fsync_dir(final.parent)
        return True

    def put_deferred(self, key: str, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        with _space_outage(self.root):
            self._put_deferred(key, parts)

    def _put_deferred(self, key: str, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write and fsync now, link into place at `flush`: an object is never visible before it is durable, so a
        crash cannot leave a truncated object under its final name. The pack writer calls this from its upload
        threads, so the fsyncs overlap with reading and hashing the next files."""
        if self._path(key).exists():
            return
        fd, tmp = self._temp()
        try:
            _write_all(fd, parts)
            os.fsync(fd)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        with self._deferred_lock:
            self._deferred.append((tmp, key))

    def flush(self) -> None:
        with _space_outage(self.root):
            self._flush()

    def _flush(self) -> None:
        with self._deferred_lock:
            pending, self._deferred = self._deferred, []
        if not pending:
            return
        folders = set()
        for tmp, key in pending:
            if self._publish(tmp, key, sync_dir=False):
                folders.add(self._path(key).parent)
        for folder in folders:
            _fsync_dir(folder)

    def _temp(self) -> tuple[int, str]:
        return tempfile.mkstemp(dir=self.root / _TMP_DIR, prefix="put-")

    def _write_new(self, key: str, write: Callable[[int], None]) -> bool:
        """Write a temporary file with ``write(fd)``, fsync it, and link it into place unless the key exists."""
        if self._path(key).exists():
            return False
        with _space_outage(self.root):
            return self._write_temp(key, write)

    def _write_temp(self, key: str, write: Callable[[int], None]) -> bool:
        fd, tmp = self._temp()
        try:
            write(fd)
            os.fsync(fd)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return self._publish(tmp, key)

    def put(self, key: str, data: bytes) -> bool:
        return self._write_new(key, lambda fd: _write_all(fd, [data]))

    def put_file(self, key: str, path: Path) -> bool:
        def copy(fd: int) -> None:
            with open(path, "rb") as src, os.fdopen(fd, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)

        return self._write_new(key, copy)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(key, self.url) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectMissing(key, self.url) from None
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise StoreError(f"object {key!r} in {self.url} is shorter than expected (truncated?)")
        return data

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise ObjectMissing(key, self.url) from None

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            raise ObjectMissing(key, self.url) from None
        return ObjectInfo(key, st.st_size, st.st_mtime, stat_etag(st))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the folders that can hold matching keys.
        head, _, _ = prefix.rpartition("/")
        start = self.root / head if head else self.root
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d != _TMP_DIR]
                rel_dir = ""
            for name in filenames:
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue  # deleted while we listed
                    yield ObjectInfo(key, st.st_size, st.st_mtime, stat_etag(st))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
