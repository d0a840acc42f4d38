"""Fault injection for the demo and the tests: lose a sandbox in the middle of a step, for real.

`DestroySandboxDuringStep` plugs into the local provider and, while step N's command is running, kills every
process of the sandbox and deletes its folder - what a dead container or a reclaimed VM does. Nothing in the
workflow or the activities knows about it; they find out the way they would in production.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import Any

from tardigrade.sandboxes.bubblewrap import LocalSandbox, destroy_like_a_crash
from tardigrade.sandboxes.provider import Sandbox


class DestroySandboxDuringStep:
    def __init__(self, step: int, *, after_seconds: float = 0.2, times: int = 1) -> None:
        """Destroy the sandbox ``after_seconds`` into step ``step`` (1-based), or as the command exits if sooner;
        do it the first ``times`` times that step runs."""
        self.step = step
        self.after_seconds = after_seconds
        self.remaining = times
        self.fired = 0

    async def __call__(self, sandbox: Sandbox, labels: Mapping[str, str], exited: Awaitable[Any]) -> None:
        if self.remaining <= 0 or labels.get("step") != str(self.step) or not isinstance(sandbox, LocalSandbox):
            return
        self.remaining -= 1
        self.fired += 1
        await asyncio.wait([asyncio.ensure_future(exited)], timeout=self.after_seconds)
        await destroy_like_a_crash(sandbox)
