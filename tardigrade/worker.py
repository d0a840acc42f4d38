"""`tardigrade worker` (or `python worker.py` in a checkout): a Temporal worker with the Tardigrade plugin.

    tardigrade worker [--address HOST:PORT] [--task-queue NAME] [--namespace NS]

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
from tardigrade.client import connect
from tardigrade.devserver import resolve_address
from tardigrade.plugin import TardigradePlugin


async def serve(address: str | None, task_queue: str | None, namespace: str | None) -> int:
    """Run a worker until SIGINT or SIGTERM; the arguments default as `tardigrade worker --help` says."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    address = resolve_address(address) or "localhost:7233"
    plugin = TardigradePlugin()
    client = await connect(address, namespace=namespace, plugin=plugin)
    task_queue = config.task_queue(task_queue)
    worker = Worker(client, task_queue=task_queue)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    logging.info(
        "worker on %s: task queue %r, sandbox queue %r, state in %s",
        address,
        task_queue,
        plugin.host_queue,
        plugin.state_dir,
    )
    async with worker:
        await stop.wait()
    logging.info("worker stopped; its sandboxes were destroyed (their runs rehydrate elsewhere)")
    return 0
