"""Shared pieces of the security tests: an agent tool call run directly against a sandbox, without Temporal."""

from __future__ import annotations

from pathlib import Path

from tardigrade.activities.contract import ToolCallInput
from tardigrade.activities.conversation import AgentRoot
from tardigrade.activities.sandbox import SandboxActivities
from tardigrade.activities.tools import _ToolRun
from tardigrade.agent_spec import ModelConfig
from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider


def tool_run(
    activities: SandboxActivities,
    provider: LocalSandboxProvider,
    sandbox: LocalSandbox,
    tmp_path: Path,
    secrets: dict[str, str] | None = None,
    secret_values: list[str] | None = None,
) -> _ToolRun:
    """The object an `agent_tool` activity builds for one call: run its `call(name, json_arguments)`. ``secrets``
    are the commands' secret variables; ``secret_values`` the values to mask, when they differ (brokered)."""
    root = AgentRoot(
        run_id="r", index=0, attempt=1, label="agent", instructions="", model=ModelConfig(name="m"),
        tools=["exec", "read_file", "write_file", "list_files", "apply_patch"], done="finish",
        max_output_tokens=None, env={}, secrets=sorted(secrets or {}), cwd="/workspace", timeout=60,
    )  # fmt: skip
    call = ToolCallInput(
        sandbox=activities.ref_for(sandbox, provider), store=(tmp_path / "store").as_uri(), root="r", node="n",
        call_id="c", index=0, turn=1,
    )  # fmt: skip
    return _ToolRun(activities, sandbox, root, call, dict(secrets or {}), secret_values)
