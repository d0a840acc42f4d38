"""Tardigrade: a Temporal plugin that makes AI agent pipelines survive crashes.

Public API: `TardigradePlugin` for your client and worker, the client helpers (`connect`, `start_pipeline`,
`run_status`, `run_result`), and `load_pipeline` for pipeline files. Imports are lazy so that the workflow
code can import `tardigrade.pipeline` without pulling in the plugin (which imports the workflow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tardigrade.client import connect, run_result, run_status, start_pipeline
    from tardigrade.pipeline import Pipeline, PipelineError, load_pipeline
    from tardigrade.plugin import TardigradePlugin

__all__ = [
    "Pipeline",
    "PipelineError",
    "TardigradePlugin",
    "connect",
    "load_pipeline",
    "run_result",
    "run_status",
    "start_pipeline",
]

_HOMES = {
    "TardigradePlugin": "tardigrade.plugin",
    "connect": "tardigrade.client",
    "start_pipeline": "tardigrade.client",
    "run_status": "tardigrade.client",
    "run_result": "tardigrade.client",
    "Pipeline": "tardigrade.pipeline",
    "PipelineError": "tardigrade.pipeline",
    "load_pipeline": "tardigrade.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'tardigrade' has no attribute {name!r}")
