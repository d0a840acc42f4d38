"""How much one worker takes on at once: live sandboxes and snapshots in progress.

Without limits, 50 pipelines started together on one small worker all provision, restore and snapshot at the same
moment: memory and disk bandwidth run out, heartbeats stall, and runs fail for no fault of their own. With them,
overload queues instead: a provision waits (heartbeating, so it is not taken for a dead worker) until a sandbox of
this worker is destroyed, and a checkpoint or restore waits for a snapshot slot. Plain asyncio, no Temporal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

#: Defaults sized for a small machine: snapshots read and hash every changed file (CPU and disk bound), so more
#: than about one per core only makes each slower; sandboxes mostly wait on their commands, so many may live.
DEFAULT_MAX_LIVE_SANDBOXES = 64
DEFAULT_MAX_CONCURRENT_SNAPSHOTS = max(2, os.cpu_count() or 2)


class WorkerCapacity:
    """Counts this worker's live sandboxes and running snapshots against its limits."""

    def __init__(
        self,
        max_live_sandboxes: int = DEFAULT_MAX_LIVE_SANDBOXES,
        max_concurrent_snapshots: int = DEFAULT_MAX_CONCURRENT_SNAPSHOTS,
    ) -> None:
        if max_live_sandboxes < 1 or max_concurrent_snapshots < 1:
            raise ValueError(
                f"max_live_sandboxes ({max_live_sandboxes}) and max_concurrent_snapshots ({max_concurrent_snapshots})"
                " must be at least 1"
            )
        self.max_live_sandboxes = max_live_sandboxes
        self.max_concurrent_snapshots = max_concurrent_snapshots
        self.live: set[str] = set()
        self._reserved = 0  # provisions past the wait whose sandbox does not exist yet
        self._snapshots: asyncio.Semaphore | None = None
        self._changed: asyncio.Event | None = None
        self.waited_for_sandbox = 0  # provisions that had to queue, for benchmarks and logs
        self.waited_for_snapshot = 0

    async def reserve(self, phase: dict[str, Any]) -> None:
        """Hold a place for one new sandbox; waits while the worker is full (``phase`` says so in heartbeats).
        Then exactly one of `created` (it exists) or `unreserve` (creating it failed)."""
        waited = False
        while len(self.live) + self._reserved >= self.max_live_sandboxes:
            if not waited:
                self.waited_for_sandbox += 1
                waited = True
            phase["phase"] = (
                f"waiting for a sandbox slot: this worker has {len(self.live)} live (max_live_sandboxes"
                f" {self.max_live_sandboxes})"
            )
            changed = self._changed_event()
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)
        self._reserved += 1

    def unreserve(self) -> None:
        self._reserved -= 1
        self._changed_event().set()

    def created(self, sandbox_id: str) -> None:
        self._reserved -= 1
        self.live.add(sandbox_id)

    def gone(self, sandbox_id: str) -> None:
        """A sandbox of this worker was destroyed (or found gone): its slot is free."""
        self.live.discard(sandbox_id)
        self._changed_event().set()

    @contextlib.asynccontextmanager
    async def snapshot_slot(self) -> AsyncIterator[None]:
        """One snapshot or restore at a time per slot; the rest queue in order."""
        if self._snapshots is None:
            self._snapshots = asyncio.Semaphore(self.max_concurrent_snapshots)
        if self._snapshots.locked():
            self.waited_for_snapshot += 1
        async with self._snapshots:
            yield

    def _changed_event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed
