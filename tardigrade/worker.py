"""`tardigrade worker` (or `python worker.py` in a checkout): a Temporal worker with the Tardigrade plugin.

    tardigrade worker [--address HOST:PORT] [--task-queue NAME] [--namespace NS] [--profile NAME] [--policy FILE]

It serves the task queue `tardigrade run` uses by default, so `tardigrade worker` in one terminal and
`tardigrade run pipeline.yaml` in another just work. Run as many as you like, on as many machines: each also
serves a queue of its own for the sandboxes it hosts, and a run whose worker dies rehydrates on another one.
Secrets named in pipelines are read from this process's environment. What pipelines may reach (host folders,
endpoints, providers) is the worker policy: --policy FILE, else the file TARDIGRADE_POLICY names (sandboxes/policy.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import timedelta

from temporalio.worker import Worker

from tardigrade import config
from tardigrade.activities.capacity import DEFAULT_MAX_CONCURRENT_SNAPSHOTS, DEFAULT_MAX_LIVE_SANDBOXES
from tardigrade.client import Connection, connect, resolve_connection
from tardigrade.observability import JsonLogFormatter, install_otlp_tracing, metrics_runtime
from tardigrade.plugin import TardigradePlugin


async def serve(
    address: str | Connection | None,
    task_queue: str | None,
    namespace: str | None,
    policy: str | None = None,
    *,
    metrics: str | None = None,
    tracing: bool = False,
    log_format: str = "text",
    max_sandboxes: int = DEFAULT_MAX_LIVE_SANDBOXES,
    max_snapshots: int = DEFAULT_MAX_CONCURRENT_SNAPSHOTS,
    shutdown_grace: float = 30.0,
) -> int:
    """Run a worker until SIGINT or SIGTERM; the arguments default as `tardigrade worker --help` says. ``address``
    may be a `Connection` (TLS, API key: see `resolve_connection`). Observability: tardigrade/observability.py."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # The CLI quiets the SDK for its one-line errors; a worker's log is where its activities and workflows speak.
    logging.getLogger("temporalio").setLevel(logging.INFO)

    conn = address if isinstance(address, Connection) else resolve_connection(address, namespace)
    runtime = metrics_runtime(metrics) if metrics else None
    if tracing:
        logging.info("tracing: spans go to %s", install_otlp_tracing())
    if shutdown_grace < 0:
        raise ValueError(f"--shutdown-grace must be 0 or more seconds, not {shutdown_grace:g}")
    plugin = TardigradePlugin(
        policy=policy, tracing=tracing, max_live_sandboxes=max_sandboxes, max_concurrent_snapshots=max_snapshots
    )
    client = await connect(conn, namespace=namespace, plugin=plugin, timeout=10, runtime=runtime)
    if metrics:
        logging.info("metrics: http://%s/metrics", metrics)
    task_queue = config.task_queue(task_queue)
    # SIGTERM: stop taking work, let what is in flight finish (and report) for up to shutdown_grace seconds.
    worker = Worker(client, task_queue=task_queue, graceful_shutdown_timeout=timedelta(seconds=shutdown_grace))

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    logging.info(
        "worker on %s (namespace %s): task queue %r, sandbox queue %r, state in %s",
        conn.address,
        client.namespace,
        task_queue,
        plugin.host_queue,
        plugin.state_dir,
    )
    logging.info("policy: %s", plugin.policy.model_dump_json())
    async with worker:
        await stop.wait()
        logging.info("stopping: steps in flight have %g s to finish", shutdown_grace)
    logging.info("worker stopped; its sandboxes were destroyed (their runs rehydrate elsewhere)")
    return 0
