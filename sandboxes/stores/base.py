"""The object-store interface every snapshot store implements.

The snapshot engine only ever talks to an `ObjectStore`: a flat namespace of immutable objects named by keys such
as ``packs/ab/ab12...``. Objects are never overwritten: `put` is create-only (if-none-match), so two writers racing
on the same content-addressed key cannot clobber each other, and a reader never sees a half-written object.
Backends (local folder, S3/R2, GCS, Azure Blob) live in sibling modules and are chosen by URL in `open_store`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


class StoreError(Exception):
    """A snapshot store could not do what was asked (bad URL, unreachable, refused)."""


class StoreUnavailable(StoreError):
    """The store could not be reached or kept failing (refused or dropped connections, timeouts, 5xx,
    throttling) after the client's own retries. Transient: a run waits and tries again instead of failing."""


class ObjectMissing(StoreError):
    """The object does not exist in the store."""

    def __init__(self, key: str, store_url: str) -> None:
        super().__init__(f"object {key!r} is missing from snapshot store {store_url}")
        self.key = key
        self.store_url = store_url


def check_key(key: str) -> str:
    """Keys are relative, slash-separated and never climb out of the store."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid object key {key!r}")
    return key


def missing_bucket(kind: str, name: str, endpoint: str, store_url: str) -> StoreError:
    """Opening a store whose bucket (or container) is not there: say which, where, and what to do."""
    return StoreError(
        f"{kind} {name!r} does not exist at endpoint {endpoint} (store {store_url}); create it or fix the URL"
    )


def require_length(data: bytes, key: str, store_url: str, offset: int, length: int) -> bytes:
    """A ranged read must return exactly what was asked: a short one means a truncated or replaced object."""
    if len(data) != length:
        raise StoreError(
            f"object {key!r} in {store_url} is shorter than expected: asked for {length} bytes at offset {offset},"
            f" got {len(data)} (truncated or overwritten?)"
        )
    return data


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch, as the store reports it
    #: The store's version tag for this content (S3/R2/Azure ETag, GCS generation, a stat fingerprint for a
    #: folder): equal tags mean the object was not rewritten. None when the backend cannot tell.
    etag: str | None = None


class ObjectStore(abc.ABC):
    """A flat, create-only object store. Implementations must be safe to call from several threads."""

    #: The URL this store was opened from, without credentials. Shown in errors and recorded in history.
    url: str

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> bool:
        """Create ``key`` with ``data`` unless it exists. Returns False (and writes nothing) if it already existed."""

    def put_deferred(self, key: str, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Create ``key`` from the concatenation of ``parts`` unless it exists; it need only become durable and
        visible by the time `flush` returns. Stores that write synchronously (object stores) just `put`;
        the local folder store batches its fsyncs, which is most of the cost of a large snapshot."""
        self.put(key, b"".join(parts))

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make every `put_deferred` so far durable and visible. The default has nothing to wait for."""

    def put_file(self, key: str, path: Path) -> bool:
        """Like `put`, streaming the content from a local file. Backends override this to avoid reading it whole."""
        return self.put(key, path.read_bytes())

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object. Raises `ObjectMissing`."""

    @abc.abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``. Raises `ObjectMissing`; a short read is an error of the backend."""

    def get_file(self, key: str, path: Path) -> None:
        """Stream the object into a local file. Backends override this to avoid holding it in memory."""
        path.write_bytes(self.get(key))

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and modification time. Raises `ObjectMissing`."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in no particular order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error (garbage collection may race)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. The default does nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
