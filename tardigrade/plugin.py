"""`TardigradePlugin`: add Tardigrade to your own Temporal client and worker.

    client = await Client.connect("localhost:7233", plugins=[TardigradePlugin()])
    worker = Worker(client, task_queue="tardigrade")   # workflows and activities come from the plugin
    await worker.run()

On a client it makes sure the data converter handles pydantic models (see `compose_data_converter`: it composes
with other plugins' converters, such as OpenAIAgentsPlugin's, rather than replacing them), and adds the history
encryption codec when a key is set (tardigrade/codec.py). On a worker it registers
the pipeline workflow, the sandbox activities and the agent activities (model calls, tool calls), adds our modules
to the workflow sandbox's passthrough list (so a workflow file that imports `tardigrade` validates, and our models
are not re-imported for every workflow run; our own workflow code stays sandboxed), and runs a second, private
worker on a queue of this process's own: sandboxes of host-bound providers (the local one) live on this machine, so
their activities are routed to that queue, and a run whose host has died notices (its work is not picked up) and
rehydrates on another worker.
"""

from __future__ import annotations

import dataclasses
import os
import pkgutil
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import ClientConfig
from temporalio.contrib.pydantic import PydanticJSONPlainPayloadConverter, PydanticPayloadConverter
from temporalio.converter import CompositePayloadConverter, DataConverter, DefaultPayloadConverter
from temporalio.plugin import SimplePlugin
from temporalio.worker import ReplayerConfig, Worker, WorkerConfig, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from tardigrade import config
from tardigrade.activities.capacity import DEFAULT_MAX_CONCURRENT_SNAPSHOTS, DEFAULT_MAX_LIVE_SANDBOXES, WorkerCapacity
from tardigrade.activities.conversation import Conversations
from tardigrade.activities.function_tools import FunctionToolActivities
from tardigrade.activities.model_calls import ModelActivities
from tardigrade.activities.sandbox import SandboxActivities
from tardigrade.activities.tools import ToolActivities
from tardigrade.codec import CodecKeys, EncryptionCodec, codec_from_env, install_codec
from tardigrade.function_tools import FunctionTool, function_tools
from tardigrade.observability import tracing_interceptor
from tardigrade.sandboxes.policy import AppliedPolicy, WorkerPolicy, resolve_policy
from tardigrade.sandboxes.provider import FaultInjector, SandboxProvider
from tardigrade.workflows.pipeline import PipelineWorkflow

PLUGIN_NAME = "tardigrade.TardigradePlugin"


def _passthrough_modules() -> tuple[str, ...]:
    """Modules the workflow sandbox takes from the host instead of re-importing them for every workflow run: all
    of ours but tardigrade.workflows. The workflow code stays sandboxed, so Temporal's determinism checks keep
    guarding it; the package itself is lazy and cheap to re-import."""
    import tardigrade

    return tuple(f"tardigrade.{m.name}" for m in pkgutil.iter_modules(tardigrade.__path__) if m.name != "workflows")


def handles_pydantic(converter: DataConverter) -> bool:
    """Whether the converter's JSON encoding is pydantic's (plain `PydanticPayloadConverter`, or one built on it such
    as OpenAIAgentsPlugin's), which is what Tardigrade's inputs, results and queries are made of."""
    payload_converter = converter.payload_converter_class()
    return isinstance(payload_converter, CompositePayloadConverter) and any(
        isinstance(c, PydanticJSONPlainPayloadConverter) for c in payload_converter.converters.values()
    )


def _after(converter: DataConverter, plugins: Sequence[object]) -> DataConverter:
    """The converter the given plugins will leave, applied in order, as Temporal applies them (SimplePlugin's
    ``data_converter`` is a converter, a function of the existing one, or None). Other plugins are assumed to
    leave it alone: their behaviour cannot be known without running them."""
    for plugin in plugins:
        parameter = plugin.data_converter if isinstance(plugin, SimplePlugin) else None
        if callable(parameter):
            converter = parameter(converter)
        elif parameter is not None:
            converter = parameter
    return converter


def _name(plugin: object) -> str:
    return plugin.name() if isinstance(plugin, SimplePlugin) else type(plugin).__qualname__


def compose_data_converter(existing: DataConverter | None, later_plugins: Sequence[object] = ()) -> DataConverter:
    """The data converter for a client (or replayer) that has TardigradePlugin among its plugins.

    Compose, don't clobber: Tardigrade needs a pydantic JSON converter and nothing more, so
    - a converter that already handles pydantic (pydantic's, OpenAIAgentsPlugin's, your own built on it) is kept
      exactly as it is;
    - the default one is left alone when a plugin later in the list will turn it into a pydantic one (OpenAIAgentsPlugin
      does, and refuses any converter but the default), and otherwise gets pydantic's payload converter, keeping its
      codec, failure converter and external storage;
    - anything else is an error saying what to do, never silently replaced.
    """
    converter = existing or DataConverter.default
    if handles_pydantic(converter):
        return converter
    if converter.payload_converter_class is not DefaultPayloadConverter:
        raise ValueError(
            "TardigradePlugin needs a data converter that handles pydantic models, and this client's payload"
            f" converter ({converter.payload_converter_class.__qualname__}) does not. Build it on"
            " temporalio.contrib.pydantic.PydanticPayloadConverter (or include PydanticJSONPlainPayloadConverter"
            " in it), or leave the default converter and TardigradePlugin installs pydantic's."
        )
    try:
        deferred = handles_pydantic(_after(converter, later_plugins))
    except Exception:  # a later plugin that rejects the default converter will say so itself, when it runs
        deferred = False
    if deferred:
        return converter
    composed = dataclasses.replace(converter, payload_converter_class=PydanticPayloadConverter)
    try:
        final = _after(composed, later_plugins)
    except Exception:
        return composed  # that plugin raises its own error when the client applies it
    if not handles_pydantic(final):
        clobberers = [_name(p) for p in later_plugins if isinstance(p, SimplePlugin) and p.data_converter is not None]
        raise ValueError(
            f"{', '.join(clobberers)} (after TardigradePlugin in the client's plugins) replaces the data converter with"
            f" one that cannot carry pydantic models ({final.payload_converter_class.__qualname__}); put"
            " TardigradePlugin after it, or give it a converter built on PydanticPayloadConverter"
        )
    return composed


def pass_tardigrade_through(runner: WorkflowRunner | None) -> WorkflowRunner:
    """Add our modules to the sandbox's passthrough list, keeping everything else about the runner (as
    OpenTelemetryPlugin and OpenAIAgentsPlugin do for theirs). Other runners need nothing."""
    if runner is None:
        raise ValueError("TardigradePlugin found no workflow runner to configure; give the Worker one")
    if isinstance(runner, SandboxedWorkflowRunner):
        return dataclasses.replace(
            runner, restrictions=runner.restrictions.with_passthrough_modules(*_passthrough_modules())
        )
    return runner


class TardigradePlugin(SimplePlugin):
    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        providers: Mapping[str, SandboxProvider] | None = None,
        fault_injector: FaultInjector | None = None,
        max_concurrent_sandbox_activities: int = 100,
        max_live_sandboxes: int = DEFAULT_MAX_LIVE_SANDBOXES,
        max_concurrent_snapshots: int = DEFAULT_MAX_CONCURRENT_SNAPSHOTS,
        codec_keys: CodecKeys | None = None,
        policy: WorkerPolicy | str | Path | None = None,
        tools: Sequence[Callable[..., Any] | FunctionTool] = (),
        tracing: bool = False,
    ) -> None:
        """
        Args:
            state_dir: where this worker keeps sandboxes and caches (default: ``TARDIGRADE_HOME`` or
                ``~/.local/state/tardigrade``).
            providers: sandbox providers by name, offered in addition to those built from the worker's environment
                on first use: local (bubblewrap), e2b (E2B_API_KEY), modal (MODAL_TOKEN_ID/MODAL_TOKEN_SECRET);
                TARDIGRADE_PROVIDERS=local,e2b narrows what the worker offers (see sandboxes/provider_choice.py).
            fault_injector: a hook to destroy sandboxes mid-command, for the demo and the tests.
            max_concurrent_sandbox_activities: commands this worker runs at once across its sandboxes.
            max_live_sandboxes: sandboxes this worker hosts at once; more provisions wait for one to go.
            max_concurrent_snapshots: checkpoints and restores at once; more wait their turn (heartbeating).
            codec_keys: encrypt history with these keys (see tardigrade/codec.py); default: TARDIGRADE_CODEC_KEY or
                TARDIGRADE_CODEC_KEY_FILE, else payloads stay as they are and encrypted ones are a clear error.
            policy: what pipelines may reach on this worker (sandboxes/policy.py): a `WorkerPolicy` or a YAML/JSON
                file; default: the file TARDIGRADE_POLICY names, else nothing beyond the worker's own store. A client
                given one checks pipelines against it before starting them.
            tools: Python functions agent steps may call by name (tardigrade/function_tools.py): plain functions
                with type hints, or `function_tool(f, timeout=..., max_attempts=...)`. They run on this worker,
                outside the sandbox; every worker of the queue should register the same ones.
            tracing: OpenTelemetry spans from the client's start through the workflow, its activities and their
                sandbox commands (temporalio.contrib.opentelemetry; needs the ``otel`` extra and a tracer provider
                that exports somewhere, e.g. the OpenTelemetry SDK with an OTLP exporter).
        """
        # The data converter is composed in configure_client/configure_replayer, which can see the other plugins.
        super().__init__(
            PLUGIN_NAME,
            workflows=[PipelineWorkflow],
            workflow_runner=pass_tardigrade_through,
            interceptors=[tracing_interceptor()] if tracing else None,
        )
        self.state_dir = Path(state_dir) if state_dir else config.state_dir()
        self._providers = providers
        self._fault_injector = fault_injector
        self._max_concurrent = max_concurrent_sandbox_activities
        self.capacity = WorkerCapacity(max_live_sandboxes, max_concurrent_snapshots)  # checked now: bad ones stop us
        self._shutdown_grace: timedelta | None = None  # the worker's graceful_shutdown_timeout, for the host worker
        self.host_queue = f"tardigrade-host-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._activities: SandboxActivities | None = None
        self._agent_activities: list[Callable[..., Any]] = []
        self.function_tools = function_tools(tools)  # checked now: a bad tool stops the worker at startup
        self.codec = EncryptionCodec(codec_keys) if codec_keys else codec_from_env()
        # Read now, so a bad policy file stops the worker at startup with one line naming the field.
        self.explicit_policy = policy is not None
        self.policy = resolve_policy(policy)

    def activities_for(self, shared_queue: str) -> SandboxActivities:
        if self._activities is None:
            self._activities = SandboxActivities(
                shared_queue=shared_queue,
                host_queue=self.host_queue,
                state_dir=self.state_dir,
                providers=self._providers,
                fault_injector=self._fault_injector,
                policy=AppliedPolicy.for_worker(
                    self.policy,
                    state_dirs=[self.state_dir, config.state_dir()],
                    own_stores=[config.default_store_url()],
                ),
            )
            self._activities.capacity = self.capacity
            sandboxes = self._activities
            conversations = Conversations(lambda url: sandboxes.engine(url).store)
            self._agent_activities = [
                *ModelActivities(conversations, self.function_tools).all(),
                *ToolActivities(sandboxes, conversations).all(),
                *FunctionToolActivities(conversations, self.function_tools).all(),
            ]
        return self._activities

    def _all_activities(self) -> list[Callable[..., Any]]:
        assert self._activities is not None
        return [*self._activities.all(), *self._agent_activities]

    def configure_client(self, config: ClientConfig) -> ClientConfig:
        config = super().configure_client(config)
        plugins = list(config.get("plugins", ()))
        later = next((plugins[i + 1 :] for i, p in enumerate(plugins) if p is self), [])
        composed = compose_data_converter(config.get("data_converter"), later)
        config["data_converter"] = install_codec(composed, self.codec)
        return config

    def configure_replayer(self, config: ReplayerConfig) -> ReplayerConfig:
        # A Replayer does not tell plugins about each other: with OpenAIAgentsPlugin, list it before this one.
        config = super().configure_replayer(config)
        config["data_converter"] = install_codec(compose_data_converter(config.get("data_converter")), self.codec)
        return config

    def configure_worker(self, config: WorkerConfig) -> WorkerConfig:
        if config.get("task_queue") == self.host_queue:
            return config  # our own host-queue worker: it gets exactly the activities we give it
        config = super().configure_worker(config)
        self._shutdown_grace = config.get("graceful_shutdown_timeout")
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
            # Shutting down, steps in flight get the same time to finish (and report) as the worker's own tasks;
            # then they are cancelled, and their runs rehydrate from their last checkpoint elsewhere.
            graceful_shutdown_timeout=self._shutdown_grace or timedelta(0),
        )
        try:
            async with host_worker:
                await next(worker)
        finally:
            await self._activities.close()
            self._activities = None
