"""Fuzzing URL parsing for snapshot stores (`open_store`, `redact_url`) and for mounts and outputs (`check_data_url`).

URLs are built from the pieces attackers play with: schemes in odd case, user:password parts, ``@`` in odd places,
ports that are not numbers, IPv6 brackets, percent-escapes, ``..`` segments, query parameters given twice or with
credentials in them, fragments, control characters and non-ASCII. The properties:

* `check_data_url` returns the URL or raises ValueError (what pydantic turns into the field's error);
* `open_store` on a cloud URL raises `StoreError` - here always, because the cloud SDKs are hidden as on a bare
  install, so every URL that parses reaches the "install the extra" error without touching the network - and its
  message never holds the password or a secret-looking query value;
* `redact_url` never raises and never shows a password or an unknown parameter's value.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tardigrade.sandboxes.manifest import check_data_url
from tardigrade.sandboxes.stores import StoreError, open_store, redact_url
from tests.security.fuzz_settings import fuzz_settings

SECRET = "Sup3rSecretValue"
SCHEMES = st.sampled_from(["s3", "S3", "r2", "gs", "az", "AZ", "file", "http", "", "s3+x", "ftp", "gcs", "s 3"])
HOSTS = st.sampled_from(
    ["bucket", "my-bucket.x", "ACCOUNT", "", "..", "b@c", "[::1]", "[::1", "b:99", "b:port", "b:-1", "b:99999999",
     "localhost", "a" * 300, "bü", "b%2Fc", "b\tc", "b\nc", "b\x00"]
)  # fmt: skip
PATHS = st.lists(
    st.sampled_from(["p", "..", ".", "", "%2e%2e", "a b", "ä", "x?y", "#", "\\", "\x7f", "~", "etc", "passwd"]),
    max_size=4,
).map("/".join)
PARAMS = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["region", "project", "account", "Region", ""]), st.sampled_from(["us-east-1", "p", ""])
        ),
        st.tuples(
            st.sampled_from(["sig", "token", "sas", "key", "Endpoint"]), st.sampled_from([SECRET, "%00", "a&b=c"])
        ),
        st.tuples(
            st.just("endpoint"),
            st.sampled_from(
                ["http://127.0.0.1:9", f"https://evil.example/x?sig={SECRET}", f"http://u:{SECRET}@h", "ftp://x", ""]
            ),
        ),
    ),
    max_size=3,
)


@st.composite
def urls(draw: st.DrawFn, noise: bool = True) -> str:
    scheme = draw(SCHEMES)
    creds = draw(st.sampled_from(["", "user@", f"user:{SECRET}@", f":{SECRET}@", "@", f"u:{quote(SECRET)}@"]))
    url = f"{scheme}://{creds}{draw(HOSTS)}/{draw(PATHS)}" if scheme else draw(PATHS)
    params = draw(PARAMS)
    if params:
        url += "?" + "&".join(f"{k}={v}" for k, v in params)
    if draw(st.booleans()):
        url += "#" + draw(st.sampled_from(["frag", ""]))
    if noise and draw(st.integers(0, 5)) == 5:
        i = draw(st.integers(0, len(url)))
        url = url[:i] + draw(st.text(max_size=4)) + url[i:]
    return url


@pytest.fixture
def bare_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The cloud SDKs as on `pip install tardigrade-temporal` without extras: importing them fails, so `open_store`
    goes through all of its parsing and then stops with its own error instead of dialing out."""
    keep = ("tardigrade.sandboxes.stores.base", "tardigrade.sandboxes.stores.folder")
    for name in list(sys.modules):
        sdk = name.split(".")[0] in ("boto3", "botocore", "google", "azure")
        if (sdk or name.startswith("tardigrade.sandboxes.stores.")) and name not in keep:
            monkeypatch.delitem(sys.modules, name)
    for sdk in ("boto3", "google.cloud.storage", "google", "azure", "azure.storage.blob"):
        monkeypatch.setitem(sys.modules, sdk, None)  # type: ignore[arg-type]
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a relative folder must not land in the checkout
    yield
    assert not any(tmp_path.iterdir()), f"open_store created {sorted(p.name for p in tmp_path.iterdir())}"


@fuzz_settings(examples=200, deadline_ms=500)
@given(url=urls())
def test_check_data_url_returns_the_url_or_raises_value_error(url: str) -> None:
    try:
        assert check_data_url(url, "source") == url
    except ValueError as e:
        assert "source" in str(e)


@fuzz_settings(examples=200, deadline_ms=500)
@given(url=urls(noise=False))
def test_check_data_url_errors_never_show_a_secret(url: str) -> None:
    try:
        check_data_url(url, "source")
    except ValueError as e:
        assert SECRET not in str(e), f"the error shows a secret: {e}"


@fuzz_settings(examples=200, deadline_ms=500)
@given(url=urls())
def test_open_store_on_a_cloud_url_raises_store_error(bare_install: None, url: str) -> None:
    if "://" not in url or url.split("://", 1)[0].lower() in ("", "file"):
        return  # local folders are opened (created) for real; the worker policy decides where they may be
    try:
        store = open_store(url)
    except StoreError:
        pass
    else:
        pytest.fail(f"{url!r} opened {store!r} although no cloud SDK is importable")


@fuzz_settings(examples=200, deadline_ms=500)
@given(url=urls(noise=False))
def test_open_store_errors_and_redact_url_never_show_a_secret(bare_install: None, url: str) -> None:
    shown = redact_url(url)
    assert SECRET not in shown, shown
    if "://" in url and url.split("://", 1)[0].lower() not in ("", "file"):
        with pytest.raises(StoreError) as e:
            open_store(url)
        assert SECRET not in str(e.value) and quote(SECRET) not in str(e.value), f"the error shows a secret: {e.value}"
