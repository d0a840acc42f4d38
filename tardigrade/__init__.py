"""Tardigrade: a Temporal plugin that makes AI agent pipelines survive crashes.

Public API:
- `TardigradePlugin`: put it on your Temporal client (and so on its workers); `function_tool` to register a
  Python function agent steps may call (`TardigradePlugin(tools=[...])`).
- `Pipeline` and `Step` to build a pipeline in Python, or `load_pipeline` to read a file; `PipelineError` for a
  pipeline file's mistakes.
- `start_pipeline` to start a run, `run_status` and `run_result` to follow it, `connect` for a client with the
  plugin.
- `PipelineWorkflow` (the workflow type ``TardigradePipeline``) and its input, result and ``status`` query:
  `RunInput`, `RunResult`, `RunStatus`.

Imports are lazy: ``import tardigrade`` loads nothing else, so workflow code can import `tardigrade.pipeline`
without pulling in the plugin (which imports the workflow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tardigrade.client import connect, run_result, run_status, start_pipeline
    from tardigrade.function_tools import FunctionTool, function_tool
    from tardigrade.pipeline import Pipeline, PipelineError, Step, load_pipeline
    from tardigrade.plugin import TardigradePlugin
    from tardigrade.workflows.pipeline import PipelineWorkflow
    from tardigrade.workflows.state import RunInput, RunResult, RunStatus

__all__ = [
    "FunctionTool",
    "Pipeline",
    "PipelineError",
    "PipelineWorkflow",
    "RunInput",
    "RunResult",
    "RunStatus",
    "Step",
    "TardigradePlugin",
    "connect",
    "function_tool",
    "load_pipeline",
    "run_result",
    "run_status",
    "start_pipeline",
]

_HOMES = {
    "TardigradePlugin": "tardigrade.plugin",
    "connect": "tardigrade.client",
    "FunctionTool": "tardigrade.function_tools",
    "function_tool": "tardigrade.function_tools",
    "start_pipeline": "tardigrade.client",
    "run_status": "tardigrade.client",
    "run_result": "tardigrade.client",
    "Pipeline": "tardigrade.pipeline",
    "PipelineError": "tardigrade.pipeline",
    "Step": "tardigrade.pipeline",
    "load_pipeline": "tardigrade.pipeline",
    "PipelineWorkflow": "tardigrade.workflows.pipeline",
    "RunInput": "tardigrade.workflows.state",
    "RunResult": "tardigrade.workflows.state",
    "RunStatus": "tardigrade.workflows.state",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'tardigrade' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
