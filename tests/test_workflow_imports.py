"""Workflow code sees only pure models: importing it loads no I/O, no optional SDK, no engine, no provider.

A workflow module is re-imported inside Temporal's sandbox on every worker, so whatever it pulls in is loaded by
every worker (a missing optional extra breaks them all) and is one careless call away from non-determinism.
Each module is imported in a fresh interpreter, so one import cannot hide another's.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import tardigrade.workflows

# Optional SDKs and I/O libraries: none of them may be loaded by importing workflow code.
FORBIDDEN_LIBRARIES = (
    "cryptography",
    "boto3",
    "botocore",
    "google.cloud",
    "google.auth",
    "azure",
    "openai",
    "e2b",
    "modal",
    "daytona",
    "runloop_api_client",
    "vercel",
    "blaxel",
    "httpx",
    "sqlite3",
    "zstandard",
    "pyfastcdc",
    "blake3",
)
# Our own modules workflow code may load: the workflows themselves and the pure models they exchange.
ALLOWED_OWN = {
    "tardigrade",
    "tardigrade.pipeline",
    "tardigrade.agent_spec",
    "tardigrade.activities",
    "tardigrade.activities.contract",
    "tardigrade.workflows.state",
    "tardigrade.sandboxes",
    "tardigrade.sandboxes.manifest",
    "tardigrade.sandboxes.selection",
    "tardigrade.sandboxes.layout",
    "tardigrade.sandboxes.store_keys",
    "tardigrade.sandboxes.network",  # its __init__ is a docstring only
    "tardigrade.sandboxes.network.rules",  # network: and brokered secrets' host rules (pure parsing)
    "tardigrade.sandboxes.limits",  # sandbox.limits (the model; enforcement is limit_enforcement.py)
    "tardigrade.sandboxes.errors",  # exception classes the models raise
    "tardigrade.sandboxes.provider_options",  # sandbox.options per provider (pure models)
}

WORKFLOW_MODULES = sorted(m.name for m in pkgutil.iter_modules(tardigrade.workflows.__path__, "tardigrade.workflows."))

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


def test_there_are_workflow_modules() -> None:
    assert {"tardigrade.workflows.pipeline", "tardigrade.workflows.agent"} <= set(WORKFLOW_MODULES)


@pytest.mark.parametrize("module", WORKFLOW_MODULES)
def test_workflow_module_loads_only_pure_models(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    libraries = sorted(
        name for name in loaded if any(name == lib or name.startswith(lib + ".") for lib in FORBIDDEN_LIBRARIES)
    )
    assert not libraries, f"importing {module} loads {libraries}; import them where they are used, not here"
    own = sorted(
        name
        for name in loaded
        if name.split(".")[0] == "tardigrade"
        and name not in ALLOWED_OWN
        and not name.startswith("tardigrade.workflows")
    )
    assert not own, (
        f"importing {module} loads {own}: workflow code may import only the pure models ({sorted(ALLOWED_OWN)})"
    )
