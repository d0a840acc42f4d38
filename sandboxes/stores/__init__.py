"""Snapshot stores chosen by URL: ``file://`` (a local folder), ``s3://``/``r2://``, ``gs://``, ``az://``.

The cloud SDKs are optional extras, imported only when a URL needs them. URLs never carry credentials (each SDK
finds its own), so a URL with a user/password part or an unknown query parameter is refused, and errors about a
URL show it with such parts masked.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from tardigrade.sandboxes.stores.base import ObjectInfo, ObjectMissing, ObjectStore, StoreError, StoreUnavailable
from tardigrade.sandboxes.stores.folder import FileStore

__all__ = [
    "FileStore",
    "ObjectInfo",
    "ObjectMissing",
    "ObjectStore",
    "StoreError",
    "StoreUnavailable",
    "open_store",
    "redact_url",
]

_FORMS = {
    "s3": "s3://bucket/optional/prefix[?endpoint=https://host:port&region=NAME]",
    "r2": "r2://ACCOUNT_ID/bucket/optional/prefix",
    "gs": "gs://bucket/optional/prefix[?project=NAME]",
    "az": "az://container/optional/prefix[?account=NAME | ?endpoint=https://host/account]",
}
_PARAMS = {"s3": {"endpoint", "region"}, "r2": {"region"}, "gs": {"project"}, "az": {"account", "endpoint"}}
_EXTRAS = {
    "s3": ("boto3", "s3"),
    "r2": ("boto3", "s3"),
    "gs": ("google-cloud-storage", "gcs"),
    "az": ("azure-storage-blob", "azure"),
}
_SDK_MODULES = ("boto3", "botocore", "google", "azure")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_ALL_FORMS = "file:///path, s3://bucket/prefix, r2://account/bucket/prefix, gs://bucket/prefix or az://container/prefix"


def redact_url(url: str) -> str:
    """The URL as it may be shown: no user/password part, and only known, credential-free query values."""
    # A user/password part is cut even where urlsplit does not see a netloc (``s 3://user:pw@bucket``).
    url = re.sub(r"^([^/?#]*://)[^/?#]*@", r"\1", url)
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        query = [
            (k, redact_url(v) if k == "endpoint" else v if k in ("region", "project", "account") else "***")
            for k, values in parse_qs(parts.query, keep_blank_values=True).items()
            for v in values
        ]
        return parts._replace(netloc=host, query=urlencode(query, safe="*:/"), fragment="").geturl()
    except ValueError:
        return "<unparseable URL>"


def _bad(url: str, scheme: str, problem: str) -> StoreError:
    return StoreError(f"store URL {redact_url(url)!r}: {problem}; expected {_FORMS[scheme]}")


def open_store(url: str) -> ObjectStore:
    """Open the store a URL names. A bare path means a local folder. Cloud stores check at once that the bucket
    or container exists and is reachable with the credentials the environment provides."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        has_credentials = parts.username is not None or parts.password is not None
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise StoreError(f"store URL {redact_url(url)!r} cannot be parsed; use {_ALL_FORMS}") from None
    if not scheme and "://" in url:  # e.g. "s 3://bucket": not a path to create a folder at
        raise StoreError(f"store URL {redact_url(url)!r} has no valid scheme; use {_ALL_FORMS}")
    if scheme in ("", "file"):
        if parts.netloc not in ("", "localhost"):
            raise StoreError(
                f"store URL {redact_url(url)!r}: file:// URLs take an absolute path, e.g. file:///var/snapshots"
            )
        return FileStore(Path(parts.path if scheme else url))
    if scheme not in _FORMS:
        raise StoreError(f"store URL {redact_url(url)!r}: unknown scheme {scheme!r}; use {_ALL_FORMS}")

    if has_credentials or "@" in parts.netloc:
        raise _bad(
            url,
            scheme,
            "URLs must not contain credentials (they would end up in workflow history and"
            " logs); remove them and provide credentials the SDK's usual way (environment, profile, role)",
        )
    if parts.fragment:
        raise _bad(url, scheme, "unexpected '#' fragment")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _PARAMS[scheme])
    if unknown:
        raise _bad(url, scheme, f"unknown parameter(s) {', '.join(unknown)} (credentials never go in the URL)")
    if any(len(v) > 1 or not v[0] for v in query.values()):
        raise _bad(url, scheme, "each parameter must be given once, with a value")
    params = {k: v[0] for k, v in query.items()}
    endpoint = params.get("endpoint")
    if endpoint is not None:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname or "@" in ep.netloc or ep.query:
            raise _bad(url, scheme, "endpoint must be a plain http(s)://host[:port][/path] URL without credentials")

    path = parts.path.strip("/")
    if scheme == "r2":
        account = parts.netloc
        bucket, _, prefix = path.partition("/")
        if not account:
            raise _bad(url, scheme, "no Cloudflare account id")
    else:
        bucket, prefix = parts.netloc, path
    if not bucket:
        raise _bad(url, scheme, "no bucket" if scheme != "az" else "no container")
    if not _NAME.match(bucket):
        raise _bad(url, scheme, f"{bucket!r} is not a valid bucket/container name")
    if any(p in (".", "..") for p in prefix.split("/")):
        raise _bad(url, scheme, "the prefix must not contain '.' or '..' segments")

    try:
        if scheme in ("s3", "r2"):
            from tardigrade.sandboxes.stores.s3 import S3Store

            return S3Store(
                bucket,
                prefix,
                endpoint=endpoint,
                region=params.get("region"),
                r2_account=parts.netloc if scheme == "r2" else None,
            )
        if scheme == "gs":
            from tardigrade.sandboxes.stores.gcs import GCSStore

            return GCSStore(bucket, prefix, project=params.get("project"))
        from tardigrade.sandboxes.stores.azure import AzureBlobStore

        return AzureBlobStore(bucket, prefix, account=params.get("account"), endpoint=endpoint)
    except ImportError as e:
        if (e.name or "").split(".")[0] not in _SDK_MODULES:
            raise
        package, extra = _EXTRAS[scheme]
        raise StoreError(f"{scheme}:// stores need {package}: pip install 'tardigrade-temporal[{extra}]'") from None
