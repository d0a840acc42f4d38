"""`s3://` and `r2://` snapshot stores: Amazon S3 and S3-compatible services (Cloudflare R2, MinIO, moto) via boto3.

Create-only writes use S3's conditional write (``If-None-Match: *``), so two workers racing to upload the same
content-addressed pack cannot clobber each other: the loser gets 412 and `put` returns False. Large files go up as
multipart uploads whose parts stream from the file (bounded memory) and whose completion carries the same
condition. Credentials come only from boto3's usual chain (env, profile, instance role); they never appear in the
store's URL, its errors or its logs. Retries are ours (`retry.py`), not botocore's, so every backend behaves alike.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import boto3
import botocore.exceptions
from botocore.config import Config

from tardigrade.sandboxes.stores.base import ObjectInfo, ObjectMissing, StoreError, missing_bucket, require_length
from tardigrade.sandboxes.stores.cloud import CloudStore
from tardigrade.sandboxes.stores.retry import (
    DEFAULT_POLICY,
    RetryPolicy,
    Transient,
    is_network_error,
    is_transient_status,
)

_MiB = 1 << 20
_PAGE = 1000  # S3's maximum page size for ListObjectsV2
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_CODES = {"PreconditionFailed", "412"}
# 409 ConditionalRequestConflict: another conditional write to the same key is in flight; the winner is unknown yet.
_CONFLICT_CODES = {"ConditionalRequestConflict", "OperationAborted"}
_PART_CHECKSUMS = {"ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256"}
_DENIED_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestLimitExceeded",
    "InternalError",
    "ServiceUnavailable",
    "TooManyRequests",
}


def _code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: botocore.exceptions.ClientError) -> int | None:
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def is_transient(e: BaseException) -> bool:
    """Throttling, 5xx and dropped connections; never 404 or 412."""
    if isinstance(e, botocore.exceptions.ClientError):
        return _code(e) in _THROTTLE_CODES or is_transient_status(_status(e))
    return isinstance(
        e,
        botocore.exceptions.HTTPClientError  # connection closed, read/connect timeouts, streaming errors
        | botocore.exceptions.ConnectionError
        | botocore.exceptions.IncompleteReadError,
    ) or is_network_error(e)


class _FileSlice:
    """A seekable read-only window on a file, so botocore can stream (and checksum) one part of it without the
    part ever being held in memory."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close(), which botocore's caller drives
        self._start = start
        self._size = size
        self._pos = 0
        self._file.seek(start)

    def read(self, n: int = -1) -> bytes:
        remaining = self._size - self._pos
        n = remaining if n is None or n < 0 else min(n, remaining)
        data = self._file.read(n)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + offset))
        self._file.seek(self._start + self._pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return self._size

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _FileSlice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3Store(CloudStore):
    """Objects under ``prefix/`` in one S3 (or S3-compatible) bucket. Thread-safe: one boto3 client is shared,
    which boto3 supports (sessions are not shared; this store makes its own)."""

    service = "the S3 endpoint"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        r2_account: str | None = None,
        part_size: int = 8 * _MiB,
        multipart_threshold: int = 16 * _MiB,
        part_concurrency: int = 4,
        checksums: bool | None = None,
        retry: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._key_prefix = f"{self.prefix}/" if self.prefix else ""
        self._part_size = max(part_size, 5 * _MiB)  # S3's minimum for every part but the last
        self._multipart_threshold = max(multipart_threshold, self._part_size)
        self._part_concurrency = part_concurrency
        self._retry = retry
        if r2_account:
            endpoint = endpoint or f"https://{r2_account}.r2.cloudflarestorage.com"
            region = region or "auto"
            self.url = f"r2://{r2_account}/{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        else:
            query = urlencode({k: v for k, v in (("endpoint", endpoint), ("region", region)) if v}, safe=":/")
            self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "") + (f"?{query}" if query else "")

        # An endpoint other than AWS's (R2, MinIO, moto) gets path-style addressing and, unless ``checksums`` says
        # otherwise, checksums only where the API requires them: many S3-compatibles reject botocore's newer
        # default (CRC32 on every upload). Content is verified by its hash on read anyway.
        custom = bool(endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        self._checksums = not custom if checksums is None else checksums
        options: dict[str, Any] = {
            "retries": {"total_max_attempts": 1, "mode": "standard"},  # retry_call does the retrying
            "max_pool_connections": 32,
            "connect_timeout": 10,
            "read_timeout": 60,
            "user_agent_extra": "tardigrade",
        }
        if custom:
            options["s3"] = {"addressing_style": "path"}
        if not self._checksums:
            options |= {
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            }
        try:
            session = boto3.session.Session()
            self._client: Any = session.client(
                "s3", endpoint_url=endpoint, region_name=region, config=Config(**options)
            )
        except botocore.exceptions.BotoCoreError as e:
            raise StoreError(
                f"cannot set up an S3 client for {self.url}: {type(e).__name__}; check the endpoint,"
                " region and AWS configuration"
            ) from None
        self.endpoint: str = self._client.meta.endpoint_url
        try:
            self._check_bucket()
        except BaseException:
            self.close()  # a store that failed to open is not returned, so nobody else would close its connections
            raise

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _is_transient(self, e: BaseException) -> bool:
        return is_transient(e)

    def _not_found(self, e: BaseException, key: str | None) -> StoreError | None:
        if key is not None and isinstance(e, botocore.exceptions.ClientError) and _code(e) in _MISSING_CODES:
            return ObjectMissing(key, self.url)
        return None

    def _explain_sdk_error(self, what: str, e: BaseException) -> StoreError | None:
        if isinstance(e, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
            return StoreError(
                f"{what}: no AWS credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE,"
                " or run with an instance/task role (for R2 use an R2 API token's access key pair)"
            )
        if isinstance(e, botocore.exceptions.ClientError):
            code, status = _code(e), _status(e)
            if code == "NoSuchBucket":
                return self._no_bucket()
            if code in _DENIED_CODES:
                return StoreError(
                    f"{what}: access denied ({code}). Check that the credentials are valid and allow"
                    f" s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket on bucket {self.bucket!r}"
                )
            message = str(e.response.get("Error", {}).get("Message", "")).strip()
            advice = self._still_failing() if is_transient_status(status) else ""
            return StoreError(f"{what} failed: {code or status} {message}".rstrip() + advice)
        return None

    def _no_bucket(self) -> StoreError:
        return missing_bucket("bucket", self.bucket, self.endpoint, self.url)

    def _check_bucket(self) -> None:
        """Fail at open, not at the first snapshot: the bucket must exist and be listable with these credentials."""
        self._call(
            "list", None, lambda: self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._key_prefix, MaxKeys=1)
        )

    def _head(self, full_key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self._client.head_object(Bucket=self.bucket, Key=full_key)
            return head
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING_CODES:
                return None
            raise

    # -- writes -----------------------------------------------------------------------------------------------

    def _conditional(self, full_key: str, request: Callable[[], object]) -> bool:
        """One create-only request: True if it created the key, False if the key already existed."""
        try:
            request()
            return True
        except botocore.exceptions.ClientError as e:
            if _code(e) in _PRECONDITION_CODES or _status(e) == 412:
                return False
            if _code(e) in _CONFLICT_CODES or _status(e) == 409:
                if self._head(full_key) is not None:
                    return False
                raise Transient(f"conditional write conflict ({_code(e)})") from e
            raise

    def put(self, key: str, data: bytes) -> bool:
        full = self._key(key)
        return self._call(
            "put",
            key,
            lambda: self._conditional(
                full, lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
            ),
        )

    def put_file(self, key: str, path: Path) -> bool:
        full = self._key(key)
        size = path.stat().st_size
        if size <= self._multipart_threshold:

            def single() -> bool:
                with _FileSlice(path, 0, size) as body:
                    return self._conditional(
                        full,
                        lambda: self._client.put_object(
                            Bucket=self.bucket, Key=full, Body=body, ContentLength=size, IfNoneMatch="*"
                        ),
                    )

            return self._call("put", key, single)
        # Don't upload a large object that is already there (the completion is still conditional: this is only
        # a shortcut, not the guarantee).
        if self.exists(key):
            return False
        return self._multipart(key, full, path, size)

    def _multipart(self, key: str, full: str, path: Path, size: int) -> bool:
        # With checksums on (AWS), each part carries a CRC32 and the completion must repeat it, as s3transfer does.
        extra = {"ChecksumAlgorithm": "CRC32"} if self._checksums else {}
        upload_id: str = self._call(
            "start multipart upload of",
            key,
            lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=full, **extra),
        )["UploadId"]
        try:

            def upload(number: int) -> dict[str, Any]:
                start = (number - 1) * self._part_size
                length = min(self._part_size, size - start)

                def attempt() -> dict[str, Any]:
                    with _FileSlice(path, start, length) as body:
                        response = self._client.upload_part(
                            Bucket=self.bucket,
                            Key=full,
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=body,
                            ContentLength=length,
                        )
                    part = {"PartNumber": number, "ETag": response["ETag"]}
                    return part | {k: v for k, v in response.items() if k in _PART_CHECKSUMS}

                return self._call(f"upload part {number} of", key, attempt)

            count = (size + self._part_size - 1) // self._part_size
            pool = ThreadPoolExecutor(min(self._part_concurrency, count), thread_name_prefix="s3-part")
            try:
                parts = list(pool.map(upload, range(1, count + 1)))
            finally:
                pool.shutdown(cancel_futures=True)  # after a failed part, don't upload the rest
            created = self._call(
                "complete multipart upload of",
                key,
                lambda: self._conditional(
                    full,
                    lambda: self._client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=full,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                        IfNoneMatch="*",
                    ),
                ),
            )
        except BaseException:
            self._abort(full, upload_id)
            raise
        if not created:
            self._abort(full, upload_id)  # a refused completion leaves the parts behind, billed until aborted
        return created

    def _abort(self, full: str, upload_id: str) -> None:
        # Best effort: a bucket lifecycle rule for incomplete multipart uploads catches what this misses.
        with contextlib.suppress(Exception):
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)

    # -- reads ------------------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        full = self._key(key)
        return self._call(
            "get", key, lambda: bytes(self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read())
        )

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        full = self._key(key)
        if length <= 0:
            self.stat(key)  # still report a missing object
            return b""

        def attempt() -> bytes:
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=full, Range=f"bytes={offset}-{offset + length - 1}"
                )
            except botocore.exceptions.ClientError as e:
                if _code(e) == "InvalidRange" or _status(e) == 416:
                    return b""  # starts past the end: reported as a short read below
                raise
            return bytes(response["Body"].read())

        return require_length(self._call("get range of", key, attempt), key, self.url, offset, length)

    def get_file(self, key: str, path: Path) -> None:
        full = self._key(key)

        def attempt() -> None:
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
            try:
                with open(path, "wb") as out:  # truncates what an interrupted attempt left
                    for chunk in body.iter_chunks(_MiB):
                        out.write(chunk)
            finally:
                body.close()

        self._call("get", key, attempt)

    def exists(self, key: str) -> bool:
        full = self._key(key)
        return self._call("stat", key, lambda: self._head(full)) is not None

    def stat(self, key: str) -> ObjectInfo:
        full = self._key(key)
        head = self._call("stat", key, lambda: self._head(full))
        if head is None:
            raise ObjectMissing(key, self.url)
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp(), head.get("ETag"))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        start = len(self._key_prefix)
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key_prefix + prefix, "MaxKeys": _PAGE}
            if token:
                args["ContinuationToken"] = token

            def fetch(args: dict[str, Any] = args) -> dict[str, Any]:
                # One request per page, so each page is retried on its own.
                page: dict[str, Any] = self._client.list_objects_v2(**args)
                return page

            page = self._call("list", None, fetch)
            for obj in page.get("Contents", ()):
                yield ObjectInfo(obj["Key"][start:], int(obj["Size"]), obj["LastModified"].timestamp(), obj.get("ETag"))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def delete(self, key: str) -> None:
        full = self._key(key)
        with contextlib.suppress(ObjectMissing):  # already gone: fine, garbage collection may race
            self._call("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def close(self) -> None:
        self._client.close()
