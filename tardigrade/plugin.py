"""`TardigradePlugin`: add Tardigrade to your own Temporal client and worker.

    client = await Client.connect("localhost:7233", plugins=[TardigradePlugin()])
    worker = Worker(client, task_queue="tardigrade")   # workflows and activities come from the plugin
    await worker.run()

On a client it installs the pydantic data converter. On a worker it registers the pipeline workflow, the
sandbox activities and the agent activities (model calls, tool calls), and runs a second, private worker on a
queue of this process's own: sandboxes of host-bound providers (the local one) live on this machine, so their
activities are routed to that queue, and a run whose host has died notices (its work is not picked up) and
rehydrates on another worker.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import temporalio.converter
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.plugin import SimplePlugin
from temporalio.worker import Worker, WorkerConfig

from tardigrade import config
from tardigrade.activities.conversation import Conversations
from tardigrade.activities.model_calls import ModelActivities
from tardigrade.activities.sandbox import SandboxActivities
from tardigrade.activities.tools import ToolActivities
from tardigrade.sandboxes.provider import FaultInjector, SandboxProvider
from tardigrade.workflows.pipeline import PipelineWorkflow

PLUGIN_NAME = "tardigrade.TardigradePlugin"


def _with_pydantic(existing: temporalio.converter.DataConverter | None) -> temporalio.converter.DataConverter:
    """Keep a user's codec and failure converter; only teach the payload converter about pydantic models."""
    base = existing or temporalio.converter.DataConverter.default
    return dataclasses.replace(base, payload_converter_class=PydanticPayloadConverter)


class TardigradePlugin(SimplePlugin):
    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        providers: Mapping[str, SandboxProvider] | None = None,
        fault_injector: FaultInjector | None = None,
        max_concurrent_sandbox_activities: int = 100,
    ) -> None:
        """
        Args:
            state_dir: where this worker keeps sandboxes and caches (default: ``TARDIGRADE_HOME`` or
                ``~/.local/state/tardigrade``).
            providers: sandbox providers by name, offered in addition to those built from the worker's environment
                on first use: local (bubblewrap), e2b (E2B_API_KEY), modal (MODAL_TOKEN_ID/MODAL_TOKEN_SECRET);
                TARDIGRADE_PROVIDERS=local,e2b narrows what the worker offers (see sandboxes/providers.py).
            fault_injector: a hook to destroy sandboxes mid-command, for the demo and the tests.
            max_concurrent_sandbox_activities: commands this worker runs at once across its sandboxes.
        """
        super().__init__(PLUGIN_NAME, data_converter=_with_pydantic, workflows=[PipelineWorkflow])
        self.state_dir = Path(state_dir) if state_dir else config.state_dir()
        self._providers = providers
        self._fault_injector = fault_injector
        self._max_concurrent = max_concurrent_sandbox_activities
        self.host_queue = f"tardigrade-host-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._activities: SandboxActivities | None = None
        self._agent_activities: list[Callable[..., Any]] = []

    def activities_for(self, shared_queue: str) -> SandboxActivities:
        if self._activities is None:
            self._activities = SandboxActivities(
                shared_queue=shared_queue,
                host_queue=self.host_queue,
                state_dir=self.state_dir,
                providers=self._providers,
                fault_injector=self._fault_injector,
            )
            sandboxes = self._activities
            conversations = Conversations(lambda url: sandboxes.engine(url).store)
            self._agent_activities = [
                *ModelActivities(conversations).all(),
                *ToolActivities(sandboxes, conversations).all(),
            ]
        return self._activities

    def _all_activities(self) -> list[Callable[..., Any]]:
        assert self._activities is not None
        return [*self._activities.all(), *self._agent_activities]

    def configure_worker(self, config: WorkerConfig) -> WorkerConfig:
        if config.get("task_queue") == self.host_queue:
            return config  # our own host-queue worker: it gets exactly the activities we give it
        config = super().configure_worker(config)
        self.activities_for(config["task_queue"])
        activities = self._all_activities()
        config["activities"] = [*config.get("activities", []), *activities]
        return config

    async def run_worker(self, worker: Worker, next: Callable[[Worker], Awaitable[None]]) -> None:
        if worker.task_queue == self.host_queue or self._activities is None:
            await next(worker)
            return
        host_worker = Worker(
            worker.client,
            task_queue=self.host_queue,
            activities=self._all_activities(),
            max_concurrent_activities=self._max_concurrent,
        )
        try:
            async with host_worker:
                await next(worker)
        finally:
            await self._activities.close()
            self._activities = None
