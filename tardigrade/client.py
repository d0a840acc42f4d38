"""Client helpers: connect, stage a pipeline's files, start a run, read its status and result.

Staging is why no file content ever enters workflow history: the Manifest's files (inline or copied from disk)
become a *seed snapshot* in the snapshot store, and the workflow input carries only its id.

A pipeline comes from a file (`load_pipeline`, whose ``source:`` paths are relative to the file) or is built in
Python (`Pipeline(...)`, whose relative ``source:`` paths are relative to ``base_dir=``, by default the current
directory when the run is started).

Where Temporal is comes from `resolve_connection`: an explicit address, else Temporal's own client configuration
(`temporalio.envconfig`: a TOML profile file and the TEMPORAL_* variables, which carry TLS and API keys, so
Temporal Cloud works), else a running `tardigrade server`, else localhost:7233. Failures to connect are raised as
`TemporalUnavailable` with one sentence saying what to do, never as the SDK's transport dump.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode, TLSConfig

from tardigrade import config
from tardigrade.codec import encrypts
from tardigrade.pipeline import LoadedPipeline, Pipeline, PipelineError, check_sources
from tardigrade.plugin import TardigradePlugin
from tardigrade.sandboxes.manifest import SEED_SELECTION, refuse_credentials, tree_path
from tardigrade.sandboxes.policy import AppliedPolicy, WorkerPolicy, client_policy
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tardigrade.workflows.pipeline import PipelineWorkflow
from tardigrade.workflows.search_attributes import PHASE, PIPELINE, PROVIDER, SEARCH_ATTRIBUTES, STEP
from tardigrade.workflows.state import RunInput, RunResult, RunStatus

# Inline files get a fixed mtime, so the same Manifest always makes the same seed snapshot.
INLINE_MTIME_NS = 946_684_800 * 10**9  # 2000-01-01
#: How long a status query waits for a worker to answer before we say none did.
QUERY_TIMEOUT = 10.0
#: A poller seen this recently counts as a live worker. Idle workers re-poll about once a minute; a dead one stays
#: listed by the server for five.
POLLER_RECENT = 120.0
#: With no poller listed, a worker that has only just started still answers a query well within this.
NO_POLLER_QUERY_TIMEOUT = 3.0
#: What to try when Temporal cannot be reached, for every message that says so.
WHERE_HINT = (
    "start one with `tardigrade server`, or point at yours with --address HOST:PORT, TEMPORAL_ADDRESS or --profile"
)


class TemporalUnavailable(RuntimeError):
    """Temporal cannot be reached or refused us; the message names the address and says what to do."""


class ConnectionConfigError(ValueError):
    """The client configuration (profile file, TLS files, TEMPORAL_* variables) cannot be used as it is."""


class NoWorker(RuntimeError):
    """A running pipeline has no worker to answer (nobody polls its task queue, or nobody answered in time)."""


@dataclass(frozen=True)
class Connection:
    """Where and how to reach Temporal. ``origin`` says where the address came from, for messages."""

    address: str
    namespace: str = config.DEFAULT_NAMESPACE
    api_key: str | None = field(default=None, repr=False)
    tls: bool | TLSConfig = False
    rpc_metadata: Mapping[str, str] = field(default_factory=dict, repr=False)
    origin: str = "default"

    @property
    def configured(self) -> bool:
        """Whether anybody said where Temporal is (rather than our localhost:7233 fallback)."""
        return self.origin != "default"

    def web_ui(self, workflow_id: str | None = None) -> str | None:
        """The Web UI page of a run (or of the namespace), when we know where the UI is: $TARDIGRADE_WEB_UI, a
        running `tardigrade server`, Temporal Cloud, or a dev server on its default ports."""
        from tardigrade.devserver import running_server

        host, _, port = self.address.rpartition(":")
        base = os.environ.get("TARDIGRADE_WEB_UI")
        server = running_server()
        if not base and server is not None and _same_endpoint(server.get("address", ""), self.address):
            base = server.get("ui")
        if not base and host.endswith((".tmprl.cloud", ".api.temporal.io")):
            base = "https://cloud.temporal.io"
        if not base and host in ("localhost", "127.0.0.1") and port == "7233":
            base = "http://localhost:8233"  # `temporal server start-dev`'s defaults
        if not base:
            return None
        page = f"{base.rstrip('/')}/namespaces/{quote(self.namespace, safe='')}/workflows"
        return f"{page}/{quote(workflow_id, safe='')}" if workflow_id else page


def _same_endpoint(a: str, b: str) -> bool:
    loopback = ("localhost", "127.0.0.1", "::1", "[::1]")
    (ha, _, pa), (hb, _, pb) = a.rpartition(":"), b.rpartition(":")
    return pa == pb and (ha == hb or (ha in loopback and hb in loopback))


def resolve_connection(
    address: str | None = None,
    namespace: str | None = None,
    *,
    profile: str | None = None,
    config_file: str | Path | None = None,
) -> Connection:
    """Settle where Temporal is: ``address``, else the client profile (``profile``, else $TEMPORAL_PROFILE, else
    "default", from ``config_file``, else $TEMPORAL_CONFIG_FILE, else Temporal's default file; TEMPORAL_ADDRESS,
    TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TEMPORAL_TLS* override it), else a running `tardigrade server`, else
    localhost:7233. Raises `ConnectionConfigError` for a file or profile that cannot be used."""
    from temporalio.envconfig import ClientConfigProfile

    from tardigrade.devserver import running_server_address

    if config_file is not None and not Path(config_file).is_file():
        raise ConnectionConfigError(f"Temporal config file {config_file} does not exist")
    name = profile or os.environ.get("TEMPORAL_PROFILE") or "default"
    where = f"config file {config_file}" if config_file else "your Temporal config file"
    try:
        loaded = ClientConfigProfile.load(profile, config_source=Path(config_file) if config_file else None)
    except Exception as e:  # the bridge's ConfigError: bad TOML, unknown profile, bad TEMPORAL_* value
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionConfigError(f"Temporal client profile {name!r} ({where}): {first}") from None
    try:
        settings = loaded.to_client_connect_config()
    except OSError as e:  # a TLS certificate or key file named by the profile
        raise ConnectionConfigError(
            f"Temporal client profile {name!r}: cannot read TLS file {e.filename}: {e.strerror}"
        ) from None
    if address:
        origin = "--address"
    elif loaded.address:
        address = loaded.address
        from_env = os.environ.get("TEMPORAL_ADDRESS") == loaded.address
        origin = "TEMPORAL_ADDRESS" if from_env else f"profile {name!r}"
    elif running := running_server_address():
        address, origin = running, "tardigrade server"
    else:
        address, origin = "localhost:7233", "default"
    return Connection(
        address=address,
        namespace=namespace or settings.get("namespace") or config.namespace(),
        api_key=settings.get("api_key"),
        tls=settings.get("tls", False),
        rpc_metadata=dict(settings.get("rpc_metadata") or {}),
        origin=origin,
    )


def _unreachable(conn: Connection, error: str) -> TemporalUnavailable:
    """Turn the core SDK's transport error text into one sentence with the likely cause and what to do."""
    lowered = error.lower()
    if "unauthenticated" in lowered or "permissiondenied" in lowered or "permission denied" in lowered:
        return TemporalUnavailable(
            f"Temporal at {conn.address} refused our credentials: check the API key (TEMPORAL_API_KEY or the"
            " profile's api_key) or the client certificate, and that they are for this namespace"
        )
    if "invalidcertificate" in lowered or "certificate" in lowered:
        reason = (
            "its TLS certificate is not trusted; give the server's CA in the profile (tls.server_ca_cert_path)"
            " or TEMPORAL_TLS_SERVER_CA_CERT_PATH"
        )
    elif "invalidcontenttype" in lowered or "corruptmessage" in lowered or "tls" in lowered:
        reason = "the TLS handshake failed: the server may not speak TLS (set TEMPORAL_TLS=false or drop tls)"
    elif "connectionrefused" in lowered or "connection refused" in lowered:
        reason = "connection refused (nothing listens there)"
    elif "dns error" in lowered:
        reason = "the host name does not resolve"
    elif "timeout" in lowered or "timed out" in lowered:
        reason = "it did not answer in time (is that a Temporal frontend, and does it expect TLS?)"
    elif "broken pipe" in lowered or "connection reset" in lowered or "transport error" in lowered:
        reason = "it closed the connection (does it expect TLS? set TEMPORAL_TLS=true or use a profile with TLS)"
    else:
        reason = error.removeprefix("Failed client connect: ").splitlines()[0][:200]
    origin = "" if conn.origin in ("default", "argument") else f" (from {conn.origin})"
    return TemporalUnavailable(f"cannot reach Temporal at {conn.address}{origin}: {reason}; {WHERE_HINT}")


async def connect(
    address: str | Connection,
    *,
    namespace: str | None = None,
    plugin: TardigradePlugin | None = None,
    timeout: float | None = None,
    runtime: Runtime | None = None,
) -> Client:
    """A client with the plugin. ``address`` is HOST:PORT or a `Connection` from `resolve_connection` (TLS, API
    key, namespace). Raises `TemporalUnavailable` with a readable reason when the server cannot be reached."""
    if isinstance(address, Connection):
        conn = replace(address, namespace=namespace) if namespace else address
    else:
        conn = Connection(address=address, namespace=config.namespace(namespace), origin="argument")
    attempt = Client.connect(
        conn.address,
        namespace=conn.namespace,
        api_key=conn.api_key,
        tls=conn.tls,
        rpc_metadata=conn.rpc_metadata,
        plugins=[plugin or TardigradePlugin()],
        runtime=runtime,  # e.g. one exporting metrics (tardigrade/observability.py); None: Temporal's default
    )
    try:
        return await (asyncio.wait_for(attempt, timeout) if timeout else attempt)
    except TimeoutError:
        raise _unreachable(conn, f"timed out after {timeout:.0f} s") from None
    except RuntimeError as e:
        if "client connect" not in str(e):
            raise
        raise _unreachable(conn, str(e)) from None
    except RPCError as e:
        if e.status in (RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.PERMISSION_DENIED):
            raise _unreachable(conn, "unauthenticated") from None
        raise


async def live_pollers(client: Client, task_queue: str) -> list[str]:
    """The identities of the workers polling ``task_queue`` for workflow tasks (seen in the last two minutes)."""
    response = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
    )
    now = time.time()
    return [
        p.identity
        for p in response.pollers
        if not p.HasField("last_access_time") or now - p.last_access_time.ToSeconds() < POLLER_RECENT
    ]


def _with_base_dir(
    pipeline: Pipeline | LoadedPipeline, base_dir: str | Path | None, policy: WorkerPolicy | None = None
) -> tuple[Pipeline, Path]:
    """The pipeline and the folder its relative ``source:`` files are read from, after checking they all exist."""
    if isinstance(pipeline, LoadedPipeline):
        where = str(pipeline.path)
        relative_to = "the pipeline file" if base_dir is None else f"base_dir ({base_dir})"
        folder = Path(base_dir if base_dir is not None else pipeline.base_dir).absolute()
        pipeline = pipeline.pipeline
    elif isinstance(pipeline, Pipeline):
        where = f"pipeline {pipeline.name!r}"
        folder = Path(base_dir if base_dir is not None else Path.cwd()).absolute()
        relative_to = f"base_dir ({folder}); pass start_pipeline(..., base_dir=...) to read them from elsewhere"
    else:
        raise TypeError(
            f"expected a Pipeline (built in Python) or a LoadedPipeline (from load_pipeline), not {type(pipeline)!r}"
        )
    roots = policy.file_roots if policy is not None else ()
    check_sources(pipeline, folder, source=where, relative_to=relative_to, roots=roots)
    return pipeline, folder


def check_before_start(pipeline: Pipeline, store_url: str, policy: WorkerPolicy | None) -> None:
    """What the client refuses before anything is staged or reaches workflow history: credentials in the store URL
    (always), and with a policy (``TARDIGRADE_POLICY`` or the client plugin's), whatever the worker would refuse."""
    try:
        refuse_credentials(store_url, "store")
    except ValueError as e:
        raise PipelineError(f"pipeline {pipeline.name!r}: {e}") from None
    if policy is None:
        return
    applied = AppliedPolicy.for_worker(policy, state_dirs=[config.state_dir()], own_stores=[config.default_store_url()])
    applied.check_run(
        store=store_url,
        mount_sources=[m.source for m in pipeline.manifest.mounts],
        output_urls=[o.destination(run="run", step=None, pipeline=pipeline.name) for o in pipeline.outputs],
        providers=pipeline.sandbox.preferences,
        network=pipeline.sandbox.network,
        secrets=pipeline.manifest.secrets,
        limits=pipeline.sandbox.limits,
    )


def stage_pipeline(
    pipeline: Pipeline | LoadedPipeline,
    store_url: str | None = None,
    *,
    base_dir: str | Path | None = None,
    policy: WorkerPolicy | None = None,
) -> RunInput:
    """Upload the Manifest's files and folders as a seed snapshot; return the workflow input that names it.

    ``base_dir`` is where relative ``source:`` files are read: by default the pipeline file's folder for a loaded
    pipeline, and the current directory for one built in Python; a ``source:`` must resolve inside it (or a
    policy's file_roots). ``policy``: check the pipeline against it first (default: the file TARDIGRADE_POLICY
    names, if any).
    """
    policy = policy if policy is not None else client_policy()
    pipeline, source_dir = _with_base_dir(pipeline, base_dir, policy)
    store_url = store_url or pipeline.store or config.default_store_url()
    check_before_start(pipeline, store_url, policy)
    manifest = pipeline.manifest
    seed = None
    if manifest.files or manifest.directories:
        staging = Path(tempfile.mkdtemp(prefix="tardigrade-stage-"))
        try:
            for root in (*SEED_SELECTION.roots, *(tree_path(d) for d in manifest.directories)):
                (staging / root).mkdir(parents=True, exist_ok=True)
            for f in manifest.files:
                target = staging / tree_path(f.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                if f.content is not None:
                    target.write_text(f.content)
                    mtime = INLINE_MTIME_NS
                else:
                    assert f.source is not None
                    source = (source_dir / f.source).resolve()  # what check_sources vetted, not a link to swap
                    shutil.copyfile(source, target)
                    mtime = source.stat().st_mtime_ns
                os.chmod(target, 0o755 if f.executable else 0o644)
                os.utime(target, ns=(mtime, mtime))
            for folder in sorted(staging.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if folder.is_dir():
                    os.utime(folder, ns=(INLINE_MTIME_NS, INLINE_MTIME_NS))
            engine = SnapshotEngine(open_store(store_url))
            try:
                labels = {"pipeline": pipeline.name, "seed": "1"}
                seed = engine.create(staging, selection=SEED_SELECTION, labels=labels).id
            finally:
                engine.close()  # its blob index, its store connections and its scratch folder (one per start)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    staged = pipeline.model_copy(
        update={"manifest": manifest.model_copy(update={"files": [], "directories": []}), "store": store_url}
    )
    return RunInput(pipeline=staged, store=store_url, seed_snapshot=seed)


def _policy_of(client: Client) -> WorkerPolicy | None:
    """The policy the client checks pipelines against: its TardigradePlugin's if given one, else TARDIGRADE_POLICY's."""
    for plugin in client.config().get("plugins", ()):
        if isinstance(plugin, TardigradePlugin) and plugin.explicit_policy:
            return plugin.policy
    return client_policy()


def new_workflow_id(pipeline_name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in pipeline_name)[:60]
    return f"{safe}-{uuid.uuid4().hex[:12]}"


async def start_pipeline(
    client: Client,
    pipeline: Pipeline | LoadedPipeline,
    *,
    task_queue: str | None = None,
    workflow_id: str | None = None,
    store_url: str | None = None,
    base_dir: str | Path | None = None,
    start_from: str | None = None,
) -> WorkflowHandle[PipelineWorkflow, RunResult]:
    """Stage the pipeline's files and start a run; ``await handle.result()`` waits for its `RunResult`.

    ``pipeline`` is a `Pipeline` built in Python or what `load_pipeline` returned. ``base_dir``: where relative
    ``source:`` files are read (default: the pipeline file's folder, or the current directory for a `Pipeline`).
    ``store_url``: the snapshot store (default: the pipeline's ``store:``, else ``TARDIGRADE_STORE``, else a local
    folder). ``start_from``: fork - ``RUN:STEP`` or a snapshot id (see tardigrade/fork.py): start after that step
    with its files, in the store they are in. The client must carry `TardigradePlugin` (or another pydantic data
    converter).
    """
    start = None
    if start_from is not None:
        from tardigrade.fork import ForkError, resolve_start

        loaded = pipeline.pipeline if isinstance(pipeline, LoadedPipeline) else pipeline
        default_store = store_url or loaded.store or config.default_store_url()
        start, fork_store = await resolve_start(client, start_from, default_store)
        if store_url is not None and store_url != fork_store:
            raise ForkError(
                f"--from {start_from!r}: its snapshot is in store {fork_store}, and a fork restores from the same"
                f" store; drop --store or pass --store {fork_store}"
            )
        store_url = fork_store
    run_input = stage_pipeline(pipeline, store_url, base_dir=base_dir, policy=_policy_of(client))
    if start is not None:
        from temporalio.exceptions import ApplicationError

        from tardigrade.fork import ForkError

        try:
            run_input = RunInput.model_validate({**run_input.model_dump(), "start": start.model_dump()})
        except ApplicationError as e:  # the start point is past the pipeline's end
            raise ForkError(f"--from {start_from!r}: {e.message}") from None
    staged = run_input.pipeline
    searchable = await registered_search_attributes(client)
    first_step = run_input.initial_state().next_step
    attributes = [
        pair
        for pair in _initial_search_attributes(staged, first_step, encrypts(client.data_converter))
        if pair.key.name in searchable
    ]
    # The workflow keeps the step and phase current only where it may: setting an unknown one fails it.
    run_input = run_input.model_copy(update={"search_attributes": {STEP.name, PHASE.name} <= searchable})
    return await client.start_workflow(
        PipelineWorkflow.run,
        run_input,
        search_attributes=TypedSearchAttributes(attributes),
        # Workflow ids are never encrypted: with encrypted history, the default one does not name the pipeline.
        id=workflow_id or new_workflow_id("run" if encrypts(client.data_converter) else staged.name),
        task_queue=config.task_queue(task_queue),
        static_summary=f"pipeline {staged.name} · {len(staged.steps)} steps",
        memo={"pipeline": staged.name, "steps": len(staged.steps)},  # for `tardigrade list`, without a query
    )


async def registered_search_attributes(client: Client) -> set[str]:
    """Which of Tardigrade's search attributes the client's namespace has (an empty set if it cannot say)."""
    try:
        response = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
    except RPCError:  # e.g. Temporal Cloud refuses the operator API to an API key without admin rights
        return set()
    return set(response.custom_attributes) & set(SEARCH_ATTRIBUTES)


def _initial_search_attributes(pipeline: Pipeline, next_step: int, encrypted: bool) -> list[SearchAttributePair[Any]]:
    """What a run is searchable by from its start; the workflow keeps the step and phase current. Search
    attributes are plain text on the server, so encrypted history leaves out the pipeline's name and provider."""
    pairs: list[SearchAttributePair[Any]] = [
        SearchAttributePair(STEP, next_step),
        SearchAttributePair(PHASE, "running"),
    ]
    if not encrypted:
        provider = pipeline.sandbox.provider
        preferred = provider if isinstance(provider, str) else provider[0]
        pairs += [SearchAttributePair(PIPELINE, pipeline.name), SearchAttributePair(PROVIDER, preferred)]
    return pairs


async def run_result(client: Client, workflow_id: str) -> RunResult:
    """Wait for the run (following continue-as-new) and return its result. Raises if it failed."""
    handle = client.get_workflow_handle_for(PipelineWorkflow.run, workflow_id)
    return await handle.result()


async def run_status(client: Client, workflow_id: str) -> RunStatus | RunResult:
    """Live status of a running pipeline, or the result of a finished one (raises if it failed). A running one
    needs a worker to answer: without one, `NoWorker` says so within seconds instead of waiting out a timeout."""
    handle = client.get_workflow_handle_for(PipelineWorkflow.run, workflow_id)
    description = await handle.describe()
    if description.status != WorkflowExecutionStatus.RUNNING:
        return await handle.result()
    queue = description.task_queue
    # No poller seen may only mean a worker that has just started and not polled yet, so a short query decides;
    # with pollers seen, the query gets the full timeout.
    polling = bool(await live_pollers(client, queue))
    timeout = QUERY_TIMEOUT if polling else NO_POLLER_QUERY_TIMEOUT
    try:
        return await handle.query(PipelineWorkflow.status, rpc_timeout=timedelta(seconds=timeout))
    except RPCError as e:
        if e.status not in (RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED):
            raise
        if not polling:
            raise NoWorker(
                f"run {workflow_id} is running, but no worker polls its task queue {queue!r} to answer;"
                f" start one with `tardigrade worker --task-queue {queue}`"
            ) from None
        raise NoWorker(
            f"run {workflow_id} is running, but no worker answered within {timeout:.0f} s; is"
            f" `tardigrade worker --task-queue {queue}` up and healthy?"
        ) from None
