"""`gs://` snapshot store: Google Cloud Storage via google-cloud-storage.

Create-only writes use a generation precondition (``if_generation_match=0``: "only if no live object has this
name"), which GCS checks atomically, so racing writers cannot clobber each other; the loser gets 412 and `put`
returns False. Objects over 8 MiB go up as resumable uploads, one chunk in memory at a time; GCS checks the
precondition when it finalizes the upload (fake-gcs-server up to v1.54 does not: see tests/emulators.py).
Credentials come from Application Default Credentials; with ``STORAGE_EMULATOR_HOST`` set (fake-gcs-server in
the tests) the client talks to the emulator anonymously.
Retries are ours (`retry.py`), so every SDK call passes ``retry=None``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import google.auth.exceptions
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from tardigrade.sandboxes.stores.base import ObjectInfo, ObjectMissing, StoreError, missing_bucket, require_length
from tardigrade.sandboxes.stores.cloud import CloudStore
from tardigrade.sandboxes.stores.retry import DEFAULT_POLICY, RetryPolicy, is_network_error, is_transient_status

_MiB = 1 << 20
_PAGE = 1000
_SINGLE_REQUEST_LIMIT = 8 * _MiB  # google-cloud-storage uploads anything larger as a resumable upload
_TIMEOUT = (10, 60)  # (connect, read) seconds per request


def _status(e: BaseException) -> int | None:
    code = getattr(e, "code", None)
    return code if isinstance(code, int) else None


def is_transient(e: BaseException) -> bool:
    """429, 5xx, dropped connections, token-endpoint hiccups and checksum mismatches in transit; never 404/412."""
    if isinstance(e, gexc.GoogleAPICallError):
        return is_transient_status(_status(e))
    if isinstance(e, google.auth.exceptions.TransportError):
        return True
    # A download whose bytes do not match the server's checksum was damaged in transit: fetch it again.
    return type(e).__name__ == "DataCorruption" or is_network_error(e)


def _generation(blob: Any) -> str | None:
    """GCS gives every write of an object a new generation number: the object's version tag."""
    return str(blob.generation) if blob.generation is not None else None


class GCSStore(CloudStore):
    """Objects under ``prefix/`` in one GCS bucket. Thread-safe: the client is shared across threads, which
    google-cloud-storage documents as safe; each call makes its own `Blob` object."""

    service = "GCS"
    reach_advice = "check the network (and STORAGE_EMULATOR_HOST if you use an emulator)"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        project: str | None = None,
        chunk_size: int = 8 * _MiB,
        retry: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        self.prefix = prefix.strip("/")
        self._key_prefix = f"{self.prefix}/" if self.prefix else ""
        self.url = (
            f"gs://{bucket}" + (f"/{self.prefix}" if self.prefix else "") + (f"?project={project}" if project else "")
        )
        self._chunk_size = max(256 << 10, chunk_size // (256 << 10) * (256 << 10))  # GCS wants multiples of 256 KiB
        self._retry = retry
        self._emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        self.endpoint = self._emulator or "https://storage.googleapis.com"
        self._client = self._make_client(project)
        self._bucket = self._client.bucket(bucket)
        self.bucket = bucket
        try:
            self._check_bucket()
        except BaseException:
            self.close()  # a store that failed to open is not returned, so nobody else would close its connections
            raise

    def _make_client(self, project: str | None) -> storage.Client:
        if self._emulator:
            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
            return storage.Client(project=project or "tardigrade", credentials=credentials)
        try:
            try:
                if project:
                    return storage.Client(project=project)
                return storage.Client()
            except OSError:
                # No project could be inferred. Object reads and writes do not need one.
                return storage.Client(project=None)
        except google.auth.exceptions.DefaultCredentialsError:
            raise StoreError(
                f"no Google Cloud credentials found for {self.url}: set GOOGLE_APPLICATION_CREDENTIALS to a service"
                " account key file, run `gcloud auth application-default login`, or run with a workload identity"
            ) from None

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _blob(self, key: str, *, upload: bool = False) -> storage.Blob:
        blob = self._bucket.blob(self._key(key))
        if upload:
            # Otherwise resumable uploads buffer 100 MiB chunks. Not for downloads: with a chunk size set they
            # become a series of ranged GETs instead of one streamed response.
            blob.chunk_size = self._chunk_size
        return blob

    def _is_transient(self, e: BaseException) -> bool:
        return is_transient(e)

    def _not_found(self, e: BaseException, key: str | None) -> StoreError | None:
        if not isinstance(e, gexc.NotFound):
            return None
        # The bucket was checked at open, so a 404 on an object request means the object is missing.
        return ObjectMissing(key, self.url) if key is not None else self._no_bucket()

    def _explain_sdk_error(self, what: str, e: BaseException) -> StoreError | None:
        if isinstance(e, gexc.Forbidden | gexc.Unauthorized | google.auth.exceptions.RefreshError):
            return StoreError(
                f"{what}: access denied ({type(e).__name__}). Check that the credentials are valid and grant"
                f" roles/storage.objectAdmin (or storage.objects.create/get/list/delete) on bucket {self.bucket!r}"
            )
        if isinstance(e, gexc.GoogleAPICallError):
            detail = f"{_status(e)} {e.message}".strip()
            return StoreError(f"{what} failed: {detail}" + (self._still_failing() if is_transient(e) else ""))
        return None

    def _no_bucket(self) -> StoreError:
        return missing_bucket("bucket", self.bucket, self.endpoint, self.url)

    def _check_bucket(self) -> None:
        """Fail at open, not at the first snapshot: the bucket must exist and be listable with these credentials."""

        def probe() -> None:
            pages = self._client.list_blobs(
                self._bucket, prefix=self._key_prefix, max_results=1, retry=None, timeout=_TIMEOUT
            )
            next(iter(pages), None)

        self._call("list", None, probe)

    # -- writes -----------------------------------------------------------------------------------------------

    def _create(self, upload: Callable[[], object]) -> bool:
        try:
            upload()
            return True
        except gexc.PreconditionFailed:
            return False

    def put(self, key: str, data: bytes) -> bool:
        blob = self._blob(key, upload=True)
        return self._call(
            "put",
            key,
            lambda: self._create(
                lambda: blob.upload_from_string(
                    data, content_type="application/octet-stream", if_generation_match=0, retry=None, timeout=_TIMEOUT
                )
            ),
        )

    def put_file(self, key: str, path: Path) -> bool:
        blob = self._blob(key, upload=True)
        size = path.stat().st_size
        # Don't upload a large object that is already there. Only a shortcut: the upload itself is conditional.
        if size > _SINGLE_REQUEST_LIMIT and self.exists(key):
            return False

        def attempt() -> bool:
            with open(path, "rb") as f:  # reopened per attempt: a failed upload has consumed the stream
                return self._create(
                    lambda: blob.upload_from_file(
                        f,
                        size=size,
                        content_type="application/octet-stream",
                        if_generation_match=0,
                        retry=None,
                        timeout=_TIMEOUT,
                    )
                )

        return self._call("put", key, attempt)

    # -- reads ------------------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        blob = self._blob(key)
        return self._call("get", key, lambda: bytes(blob.download_as_bytes(retry=None, timeout=_TIMEOUT)))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            self.stat(key)  # still report a missing object
            return b""
        blob = self._blob(key)

        def attempt() -> bytes:
            try:
                # `end` is inclusive. Partial content carries no whole-object checksum to compare against.
                return bytes(
                    blob.download_as_bytes(
                        start=offset, end=offset + length - 1, checksum=None, retry=None, timeout=_TIMEOUT
                    )
                )
            except gexc.RequestRangeNotSatisfiable:
                return b""  # starts past the end: reported as a short read below

        return require_length(self._call("get range of", key, attempt), key, self.url, offset, length)

    def get_file(self, key: str, path: Path) -> None:
        blob = self._blob(key)

        def attempt() -> None:
            with open(path, "wb") as f:  # truncates what an interrupted attempt left
                blob.download_to_file(f, retry=None, timeout=_TIMEOUT)

        self._call("get", key, attempt)

    def _get_blob(self, key: str) -> Any:
        name = self._key(key)
        return self._call("stat", key, lambda: self._bucket.get_blob(name, retry=None, timeout=_TIMEOUT))

    def exists(self, key: str) -> bool:
        return self._get_blob(key) is not None

    def stat(self, key: str) -> ObjectInfo:
        blob = self._get_blob(key)
        if blob is None:
            raise ObjectMissing(key, self.url)
        return ObjectInfo(key, int(blob.size), blob.updated.timestamp(), _generation(blob))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        start = len(self._key_prefix)
        token: str | None = None
        while True:

            def fetch(token: str | None = token) -> tuple[list[Any], str | None]:
                pages = self._client.list_blobs(
                    self._bucket,
                    prefix=self._key_prefix + prefix,
                    page_token=token,
                    page_size=_PAGE,
                    retry=None,
                    timeout=_TIMEOUT,
                )
                page = next(pages.pages, None)  # one request per page, so each page is retried on its own
                return (list(page) if page is not None else []), pages.next_page_token

            blobs, token = self._call("list", None, fetch)
            for blob in blobs:
                yield ObjectInfo(blob.name[start:], int(blob.size), blob.updated.timestamp(), _generation(blob))
            if not token:
                return

    def delete(self, key: str) -> None:
        blob = self._blob(key)
        with contextlib.suppress(ObjectMissing):  # already gone: fine, garbage collection may race
            self._call("delete", key, lambda: blob.delete(retry=None, timeout=_TIMEOUT))

    def close(self) -> None:
        self._client.close()
