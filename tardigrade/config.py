"""Defaults shared by the CLI, the worker and the client helpers: task queue, state folder, store, address.

Every default can be overridden by an environment variable, so one `export` configures both `tardigrade worker`
and `tardigrade run`: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TARDIGRADE_TASK_QUEUE, TARDIGRADE_STORE,
TARDIGRADE_HOME. How to reach Temporal beyond an address (profiles, TLS, API keys: TEMPORAL_PROFILE,
TEMPORAL_CONFIG_FILE, TEMPORAL_API_KEY, TEMPORAL_TLS*) is Temporal's own client configuration, read by
`tardigrade.client.resolve_connection`; TARDIGRADE_WEB_UI tells the CLI where the Web UI is, for its links.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TASK_QUEUE = "tardigrade"
DEFAULT_NAMESPACE = "default"


def state_dir() -> Path:
    """Where the worker keeps sandboxes, caches, the embedded server's database and the default store."""
    if explicit := os.environ.get("TARDIGRADE_HOME"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tardigrade"


def task_queue(explicit: str | None = None) -> str:
    return explicit or os.environ.get("TARDIGRADE_TASK_QUEUE") or DEFAULT_TASK_QUEUE


def namespace(explicit: str | None = None) -> str:
    return explicit or os.environ.get("TEMPORAL_NAMESPACE") or DEFAULT_NAMESPACE


def default_store_url() -> str:
    """The snapshot store used when a pipeline names none: TARDIGRADE_STORE, else a folder in the state dir."""
    return os.environ.get("TARDIGRADE_STORE") or (state_dir() / "snapshots").absolute().as_uri()
