"""`az://` snapshot store: Azure Blob Storage via azure-storage-blob.

Create-only writes carry ``If-None-Match: *``, which Azure checks atomically: a racing writer that loses gets
409 BlobAlreadyExists (or 412) and `put` returns False. Large files are uploaded as staged blocks committed with
the same condition. Block ids are random per upload: the SDK's own chunked upload numbers blocks 0, 1, 2..., so
two writers staging the same blob could mix each other's uncommitted blocks into one commit.

The account comes from ``?account=NAME`` (https://NAME.blob.core.windows.net) or ``?endpoint=URL``, or from the
connection string in ``AZURE_STORAGE_CONNECTION_STRING``; credentials from that connection string,
``AZURE_STORAGE_KEY``, ``AZURE_STORAGE_SAS_TOKEN`` or azure-identity's DefaultAzureCredential. None of them ever
appears in the store's URL, its errors or its logs. Retries are ours (`retry.py`): the SDK's are switched off.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from azure.core import MatchConditions
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    IncompleteReadError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobBlock, BlobClient, BlobServiceClient

from tardigrade.sandboxes.stores.base import ObjectInfo, ObjectMissing, StoreError, missing_bucket, require_length
from tardigrade.sandboxes.stores.cloud import CloudStore
from tardigrade.sandboxes.stores.retry import DEFAULT_POLICY, RetryPolicy, is_network_error, is_transient_status

_MiB = 1 << 20
_GET_CHUNK = 1 * _MiB
_PAGE = 1000  # Azure's default is 5000; smaller pages keep memory and per-request latency down


def is_transient(e: BaseException) -> bool:
    """429, 5xx, dropped connections and truncated responses; never 404, 409 or 412."""
    if isinstance(e, ServiceRequestError | ServiceResponseError | IncompleteReadError):
        return True
    if isinstance(e, HttpResponseError):
        return is_transient_status(e.status_code)
    return is_network_error(e)


def _error_code(e: BaseException) -> str | None:
    """The storage error code (BlobNotFound, InvalidBlockList...), which the SDK attaches to its errors."""
    code = getattr(e, "error_code", None)
    return str(code) if code is not None else None


def _first_line(e: AzureError) -> str:
    # Azure appends RequestId/Time/ErrorCode lines to the message; the first line is the human part.
    return str(e.message or "").strip().splitlines()[0] if e.message else type(e).__name__


def _account_from_connection_string(conn: str) -> str | None:
    match = re.search(r"(?:^|;)\s*AccountName=([^;]+)", conn, re.IGNORECASE)
    return match.group(1).strip() if match else None


class AzureBlobStore(CloudStore):
    """Objects under ``prefix/`` in one Azure Blob container. Thread-safe: one service client is shared, which
    the Azure SDK supports."""

    service = "Azure Blob Storage"
    reach_advice = "check the account/endpoint and the network"
    # Not chained: a transport error's text can hold the request URL, and with a SAS credential that URL holds
    # the signature. The explanation carries the status, the error code and Azure's message.
    chain_sdk_errors = False

    def __init__(
        self,
        container: str,
        prefix: str = "",
        *,
        account: str | None = None,
        endpoint: str | None = None,
        block_size: int = 8 * _MiB,
        single_put_size: int = 64 * _MiB,
        retry: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        self.container = container
        self.prefix = prefix.strip("/")
        self._key_prefix = f"{self.prefix}/" if self.prefix else ""
        query = urlencode({k: v for k, v in (("account", account), ("endpoint", endpoint)) if v}, safe=":/")
        self.url = f"az://{container}" + (f"/{self.prefix}" if self.prefix else "") + (f"?{query}" if query else "")
        self._block_size = block_size
        self._single_put_size = single_put_size
        self._retry = retry
        self._service = self._make_client(account, endpoint)
        # The endpoint without its query: a SAS token would be there.
        self.endpoint = urlsplit(self._service.primary_endpoint)._replace(query="").geturl().rstrip("/")
        self._container = self._service.get_container_client(container)
        try:
            self._check_container()
        except BaseException:
            self.close()  # a store that failed to open is not returned, so nobody else would close its connections
            raise

    def _make_client(self, account: str | None, endpoint: str | None) -> BlobServiceClient:
        options: dict[str, Any] = {
            "retry_total": 0,  # retry_call does the retrying
            "max_single_put_size": self._single_put_size,
            "max_block_size": self._block_size,
            # Downloads go in ranged GETs, each buffered whole; the SDK also builds a list of len(body) slots
            # per GET (list() of a stream whose __len__ is its byte count), 8 bytes per byte downloaded. Small
            # ranges keep a streamed download's memory low; reads into memory fetch ranges in parallel instead.
            "max_single_get_size": _GET_CHUNK,
            "max_chunk_get_size": _GET_CHUNK,
            "connection_timeout": 10,
            "read_timeout": 60,
        }
        conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if conn and not endpoint and (account is None or _account_from_connection_string(conn) == account):
            try:
                return BlobServiceClient.from_connection_string(conn, **options)
            except ValueError:
                # Never echo the connection string: it holds the account key.
                raise StoreError(
                    f"AZURE_STORAGE_CONNECTION_STRING is malformed (store {self.url}); copy it again from the"
                    " storage account's 'Access keys' page"
                ) from None
        if not account and not endpoint:
            raise StoreError(
                f"store URL {self.url!r} names no storage account: use az://container/prefix?account=NAME, or set"
                " AZURE_STORAGE_CONNECTION_STRING"
            )
        account_url = endpoint or f"https://{account}.blob.core.windows.net"
        credential: Any
        if os.environ.get("AZURE_STORAGE_KEY") and account:
            credential = AzureNamedKeyCredential(account, os.environ["AZURE_STORAGE_KEY"])
        elif os.environ.get("AZURE_STORAGE_SAS_TOKEN"):
            credential = AzureSasCredential(os.environ["AZURE_STORAGE_SAS_TOKEN"].lstrip("?"))
        else:
            try:
                from azure.identity import DefaultAzureCredential  # type: ignore[import-not-found,unused-ignore]
            except ImportError:
                raise StoreError(
                    f"no Azure credentials for {self.url}: set AZURE_STORAGE_KEY (with ?account=NAME),"
                    " AZURE_STORAGE_SAS_TOKEN or AZURE_STORAGE_CONNECTION_STRING, or `pip install azure-identity`"
                    " to use Entra ID (az login, managed identity, workload identity)"
                ) from None
            credential = DefaultAzureCredential()
        try:
            return BlobServiceClient(account_url, credential=credential, **options)
        except ValueError as e:
            raise StoreError(f"store {self.url}: invalid Azure endpoint {account_url!r} ({e})") from None

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _blob(self, key: str) -> BlobClient:
        return self._container.get_blob_client(self._key(key))

    def _is_transient(self, e: BaseException) -> bool:
        return is_transient(e)

    def _not_found(self, e: BaseException, key: str | None) -> StoreError | None:
        if not isinstance(e, ResourceNotFoundError):
            return None
        if _error_code(e) == "ContainerNotFound" or key is None:
            return self._no_container()
        return ObjectMissing(key, self.url)

    def _explain_sdk_error(self, what: str, e: BaseException) -> StoreError | None:
        if isinstance(e, ClientAuthenticationError) or (isinstance(e, HttpResponseError) and e.status_code == 403):
            return StoreError(
                f"{what}: access denied ({_first_line(e)}). Check the account key, SAS token or Entra ID role"
                f" (Storage Blob Data Contributor) for container {self.container!r}"
            )
        if isinstance(e, HttpResponseError) and e.status_code is not None:
            detail = f"{e.status_code} {_error_code(e) or ''} {_first_line(e)}".replace("  ", " ")
            return StoreError(f"{what} failed: {detail}" + (self._still_failing() if is_transient(e) else ""))
        return None

    def _no_container(self) -> StoreError:
        return missing_bucket("container", self.container, self.endpoint, self.url)

    def _check_container(self) -> None:
        """Fail at open, not at the first snapshot: the container must exist and be listable."""
        self._call(
            "list",
            None,
            lambda: next(
                self._container.list_blobs(name_starts_with=self._key_prefix, results_per_page=1).by_page(), None
            ),
        )

    def _properties(self, key: str) -> Any:
        blob = self._blob(key)

        def attempt() -> Any:
            try:
                return blob.get_blob_properties()
            except ResourceNotFoundError as e:
                if _error_code(e) == "ContainerNotFound":
                    raise
                return None

        return self._call("stat", key, attempt)

    # -- writes -----------------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> bool:
        if len(data) > self._single_put_size:
            view = memoryview(data)
            return self._put_blocks(key, len(data), lambda offset, n: bytes(view[offset : offset + n]))
        blob = self._blob(key)

        def attempt() -> bool:
            try:
                blob.upload_blob(data, length=len(data), overwrite=False)  # overwrite=False sends If-None-Match: *
                return True
            except (ResourceExistsError, ResourceModifiedError):
                return False

        return self._call("put", key, attempt)

    def put_file(self, key: str, path: Path) -> bool:
        size = path.stat().st_size
        if size <= self._block_size:
            return self.put(key, path.read_bytes())
        with open(path, "rb") as f:

            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            return self._put_blocks(key, size, read)

    def _put_blocks(self, key: str, size: int, read: Callable[[int, int], bytes]) -> bool:
        """Stage the content block by block (one block in memory), then commit it if the blob is still missing."""
        if self.exists(key):
            return False  # a shortcut only: the commit below is what guarantees create-only
        blob = self._blob(key)
        upload = uuid.uuid4().hex
        blocks = []
        for index, offset in enumerate(range(0, size, self._block_size)):
            block_id = f"{upload}{index:08d}"  # same length for every block, as Azure requires
            chunk = read(offset, min(self._block_size, size - offset))

            def stage(block_id: str = block_id, chunk: bytes = chunk) -> None:
                blob.stage_block(block_id, chunk, length=len(chunk))

            self._call(f"upload block {index} of", key, stage)
            blocks.append(BlobBlock(block_id=block_id))
            del chunk, stage

        def commit() -> bool:
            try:
                blob.commit_block_list(blocks, match_condition=MatchConditions.IfMissing)
                return True
            except (ResourceExistsError, ResourceModifiedError):
                return False
            except HttpResponseError as e:
                # A competing commit discards our uncommitted blocks; if the blob now exists, we simply lost.
                if _error_code(e) == "InvalidBlockList" and blob.exists():
                    return False
                raise

        return self._call("commit", key, commit)

    # -- reads ------------------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        blob = self._blob(key)
        # The whole object is in memory anyway, so fetch its ranges in parallel.
        return self._call("get", key, lambda: bytes(blob.download_blob(max_concurrency=4).readall()))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            self.stat(key)  # still report a missing object
            return b""
        blob = self._blob(key)

        def attempt() -> bytes:
            try:
                return bytes(blob.download_blob(offset=offset, length=length, max_concurrency=4).readall())
            except HttpResponseError as e:
                if e.status_code == 416:
                    return b""  # starts past the end: reported as a short read below
                raise

        return require_length(self._call("get range of", key, attempt), key, self.url, offset, length)

    def get_file(self, key: str, path: Path) -> None:
        blob = self._blob(key)

        def attempt() -> None:
            with open(path, "wb") as f:  # truncates what an interrupted attempt left
                blob.download_blob(max_concurrency=1).readinto(f)

        self._call("get", key, attempt)

    def exists(self, key: str) -> bool:
        return self._properties(key) is not None

    def stat(self, key: str) -> ObjectInfo:
        props = self._properties(key)
        if props is None:
            raise ObjectMissing(key, self.url)
        return ObjectInfo(key, int(props.size), props.last_modified.timestamp(), props.etag)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        start = len(self._key_prefix)
        token: str | None = None
        while True:

            def fetch(token: str | None = token) -> tuple[list[Any], str | None]:
                pages: Any = self._container.list_blobs(
                    name_starts_with=self._key_prefix + prefix, results_per_page=_PAGE
                ).by_page(continuation_token=token)  # a PageIterator: typed as a plain Iterator, has the token
                page = next(pages, None)  # one request per page, so each page is retried on its own
                items = list(page) if page is not None else []
                return items, pages.continuation_token

            items, token = self._call("list", None, fetch)
            for props in items:
                yield ObjectInfo(props.name[start:], int(props.size), props.last_modified.timestamp(), props.etag)
            if not token:
                return

    def delete(self, key: str) -> None:
        blob = self._blob(key)
        with contextlib.suppress(ObjectMissing):  # already gone: fine, garbage collection may race
            self._call("delete", key, lambda: blob.delete_blob(delete_snapshots="include"))

    def close(self) -> None:
        self._service.close()
