"""A store's identity: one small object, written once and never replaced, that says which store this is.

Worker-local caches (which packs hold which blobs, the stat cache, cached trees) describe the objects of one
store. A URL does not name one store for ever: two S3 endpoints can hold a bucket of the same name, a bucket can be
emptied or recreated, a prefix deleted. So caches are keyed by this identity instead, like restic's repository
config: a random id created with a create-only write (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``,
Azure ``If-None-Match: *``, a hard link for a folder), so two workers opening an empty store at once agree on one.
A store that lost its identity object lost everything else too, as far as a cache may assume: it gets a new one.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from tardigrade.sandboxes.store_keys import IDENTITY
from tardigrade.sandboxes.stores.base import ObjectMissing, ObjectStore, StoreError

FORMAT = "tardigrade-store/1"
_ID = re.compile(r"^[0-9a-f]{32}$")


def _parse(data: bytes, store: ObjectStore) -> str:
    try:
        record = json.loads(data)
        identity = record["id"] if record.get("format") == FORMAT else None
    except (ValueError, TypeError, AttributeError, KeyError):
        identity = None
    if not isinstance(identity, str) or not _ID.match(identity):
        raise StoreError(
            f"object {IDENTITY!r} in snapshot store {store.url} is not a Tardigrade store identity; this prefix"
            " holds something else - use another store URL (or prefix)"
        )
    return identity


def read_identity(store: ObjectStore) -> str | None:
    """The store's identity, or None if it has none (yet, or any more)."""
    try:
        return _parse(store.get(IDENTITY), store)
    except ObjectMissing:
        return None


def ensure_identity(store: ObjectStore) -> str:
    """The store's identity, created (create-only) if it has none. Concurrent callers all get the same one."""
    identity = read_identity(store)
    if identity is not None:
        return identity
    candidate = json.dumps({"format": FORMAT, "id": uuid.uuid4().hex, "created": time.time()}).encode()
    store.put(IDENTITY, candidate)  # False if another writer got there first: theirs stands, read it back
    identity = read_identity(store)
    if identity is None:
        raise StoreError(f"snapshot store {store.url} did not keep its identity object {IDENTITY!r}; is it writable?")
    return identity
