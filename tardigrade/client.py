"""Client helpers: connect, stage a pipeline's files, start a run, read its status and result.

Staging is why no file content ever enters workflow history: the Manifest's files (inline or copied from disk)
become a *seed snapshot* in the snapshot store, and the workflow input carries only its id.

A pipeline comes from a file (`load_pipeline`, whose ``source:`` paths are relative to the file) or is built in
Python (`Pipeline(...)`, whose relative ``source:`` paths are relative to ``base_dir=``, by default the current
directory when the run is started).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError

from tardigrade import config
from tardigrade.pipeline import LoadedPipeline, Pipeline, check_sources
from tardigrade.plugin import TardigradePlugin
from tardigrade.sandboxes.manifest import SEED_SELECTION, tree_path
from tardigrade.sandboxes.snapshots import SnapshotEngine
from tardigrade.sandboxes.stores import open_store
from tardigrade.workflows.pipeline import PipelineWorkflow
from tardigrade.workflows.state import RunInput, RunResult, RunStatus

# Inline files get a fixed mtime, so the same Manifest always makes the same seed snapshot.
INLINE_MTIME_NS = 946_684_800 * 10**9  # 2000-01-01


async def connect(address: str, *, namespace: str | None = None, plugin: TardigradePlugin | None = None) -> Client:
    return await Client.connect(address, namespace=config.namespace(namespace), plugins=[plugin or TardigradePlugin()])


def _with_base_dir(pipeline: Pipeline | LoadedPipeline, base_dir: str | Path | None) -> tuple[Pipeline, Path]:
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
    check_sources(pipeline, folder, source=where, relative_to=relative_to)
    return pipeline, folder


def stage_pipeline(
    pipeline: Pipeline | LoadedPipeline, store_url: str | None = None, *, base_dir: str | Path | None = None
) -> RunInput:
    """Upload the Manifest's files and folders as a seed snapshot; return the workflow input that names it.

    ``base_dir`` is where relative ``source:`` files are read: by default the pipeline file's folder for a loaded
    pipeline, and the current directory for one built in Python.
    """
    pipeline, source_dir = _with_base_dir(pipeline, base_dir)
    store_url = store_url or pipeline.store or config.default_store_url()
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
                    source = source_dir / f.source
                    shutil.copyfile(source, target)
                    mtime = source.stat().st_mtime_ns
                os.chmod(target, 0o755 if f.executable else 0o644)
                os.utime(target, ns=(mtime, mtime))
            for folder in sorted(staging.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if folder.is_dir():
                    os.utime(folder, ns=(INLINE_MTIME_NS, INLINE_MTIME_NS))
            engine = SnapshotEngine(open_store(store_url))
            seed = engine.create(staging, selection=SEED_SELECTION, labels={"pipeline": pipeline.name, "seed": "1"}).id
            engine.store.close()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    staged = pipeline.model_copy(
        update={"manifest": manifest.model_copy(update={"files": [], "directories": []}), "store": store_url}
    )
    return RunInput(pipeline=staged, store=store_url, seed_snapshot=seed)


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
) -> WorkflowHandle[PipelineWorkflow, RunResult]:
    """Stage the pipeline's files and start a run; ``await handle.result()`` waits for its `RunResult`.

    ``pipeline`` is a `Pipeline` built in Python or what `load_pipeline` returned. ``base_dir``: where relative
    ``source:`` files are read (default: the pipeline file's folder, or the current directory for a `Pipeline`).
    ``store_url``: the snapshot store (default: the pipeline's ``store:``, else ``TARDIGRADE_STORE``, else a local
    folder). The client must carry `TardigradePlugin` (or another pydantic data converter).
    """
    run_input = stage_pipeline(pipeline, store_url, base_dir=base_dir)
    staged = run_input.pipeline
    return await client.start_workflow(
        PipelineWorkflow.run,
        run_input,
        id=workflow_id or new_workflow_id(staged.name),
        task_queue=config.task_queue(task_queue),
        static_summary=f"pipeline {staged.name} · {len(staged.steps)} steps",
    )


async def run_result(client: Client, workflow_id: str) -> RunResult:
    """Wait for the run (following continue-as-new) and return its result. Raises if it failed."""
    handle = client.get_workflow_handle_for(PipelineWorkflow.run, workflow_id)
    return await handle.result()


async def run_status(client: Client, workflow_id: str) -> RunStatus | RunResult:
    """Live status of a running pipeline, or the result of a finished one."""
    handle = client.get_workflow_handle_for(PipelineWorkflow.run, workflow_id)
    description = await handle.describe()
    if description.status == WorkflowExecutionStatus.RUNNING:
        try:
            return await handle.query(PipelineWorkflow.status)
        except RPCError as e:
            raise RuntimeError(
                f"run {workflow_id} is running but no worker answered ({e.message}); is `tardigrade worker` up?"
            ) from e
    return await handle.result()
