"""Snapshot stores chosen by URL: ``file://`` (a local folder), ``s3://``, ``gs://``, ``az://``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from sandboxes.stores.base import ObjectInfo, ObjectMissing, ObjectStore, StoreError
from sandboxes.stores.local import FileStore

__all__ = ["FileStore", "ObjectInfo", "ObjectMissing", "ObjectStore", "StoreError", "open_store"]


def open_store(url: str) -> ObjectStore:
    """Open the store a URL names. A bare path means a local folder."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"store URL {url!r}: file:// URLs take an absolute path, e.g. file:///var/snapshots")
        return FileStore(Path(parts.path if scheme else url))
    raise StoreError(
        f"store URL {url!r}: unknown scheme {scheme!r}; use file:///path, s3://bucket/prefix, gs://bucket/prefix"
        " or az://container/prefix"
    )
