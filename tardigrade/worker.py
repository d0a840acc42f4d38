"""`tardigrade worker` (or `python worker.py` in a checkout): a Temporal worker with the Tardigrade plugin.

    tardigrade worker [--address HOST:PORT] [--task-queue NAME] [--namespace NS] [--profile NAME]

It serves the task queue `tardigrade run` uses by default, so `tardigrade worker` in one terminal and
`tardigrade run pipeline.yaml` in another just work. Run as many as you like, on as many machines: each also
serves a queue of its own for the sandboxes it hosts, and a run whose worker dies rehydrates on another one.
Secrets named in pipelines are read from this process's environment.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from temporalio.worker import Worker

from tardigrade import config
from tardigrade.client import Connection, connect, resolve_connection
from tardigrade.plugin import TardigradePlugin


async def serve(address: str | Connection | None, task_queue: str | None, namespace: str | None) -> int:
    """Run a worker until SIGINT or SIGTERM; the arguments default as `tardigrade worker --help` says. ``address``
    may be a `Connection` (TLS, API key: see `resolve_connection`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    conn = address if isinstance(address, Connection) else resolve_connection(address, namespace)
    plugin = TardigradePlugin()
    client = await connect(conn, namespace=namespace, plugin=plugin, timeout=10)
    task_queue = config.task_queue(task_queue)
    worker = Worker(client, task_queue=task_queue)

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
    async with worker:
        await stop.wait()
    logging.info("worker stopped; its sandboxes were destroyed (their runs rehydrate elsewhere)")
    return 0
