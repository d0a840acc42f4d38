"""`python worker.py`: a Temporal worker with the Tardigrade plugin.

    python worker.py [--address HOST:PORT] [--task-queue NAME] [--namespace NS]

It serves the task queue `tardigrade run` uses by default, so `python worker.py` in one terminal and
`tardigrade run pipeline.yaml` in another just work. Run as many as you like, on as many machines: each also
serves a queue of its own for the sandboxes it hosts, and a run whose worker dies rehydrates on another one.
Secrets named in pipelines are read from this process's environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from temporalio.worker import Worker

from tardigrade import config
from tardigrade.client import connect
from tardigrade.devserver import resolve_address
from tardigrade.plugin import TardigradePlugin


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        help="Temporal frontend (default: $TEMPORAL_ADDRESS, a running `tardigrade server`, or localhost:7233)",
    )
    parser.add_argument("--task-queue", help=f"default: $TARDIGRADE_TASK_QUEUE or {config.DEFAULT_TASK_QUEUE!r}")
    parser.add_argument("--namespace", help="default: $TEMPORAL_NAMESPACE or 'default'")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    address = resolve_address(args.address) or "localhost:7233"
    plugin = TardigradePlugin()
    client = await connect(address, namespace=args.namespace, plugin=plugin)
    task_queue = config.task_queue(args.task_queue)
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


if __name__ == "__main__":
    asyncio.run(main())
    # Skip interpreter finalization: the Temporal client's native threads can abort it (exit code -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
