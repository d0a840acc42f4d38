"""Row 11 of the security review: `list_files` built a shell string from the model's path argument.

The path went unquoted into ``echo 'no such folder: PATH'``: a path with a quote in it ran any command in the
sandbox, even in a step whose tools do not include ``exec``. And the listing the sandbox prints back was parsed
as ``kind size name`` per line, so a file name holding a newline could make the tool crash the activity.
The tool's arguments never become shell text now; names come back NUL-separated.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tardigrade.activities.sandbox import SandboxActivities
from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.provider import SandboxSpec
from tests.security.helpers import tool_run


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[LocalSandboxProvider]:
    provider = LocalSandboxProvider(tmp_path / "sandboxes")
    assert provider.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    yield provider
    await provider.close()


@pytest.fixture
async def sandbox(provider: LocalSandboxProvider) -> LocalSandbox:
    return await provider.create(SandboxSpec())


def activities_for(provider: LocalSandboxProvider, tmp_path: Path) -> SandboxActivities:
    return SandboxActivities(
        shared_queue="shared", host_queue="host", state_dir=tmp_path / "state", providers={"local": provider}
    )


@pytest.mark.parametrize(
    "path",
    [
        "nope'; touch /workspace/pwned; echo '",
        "nope'$(touch /workspace/pwned)'",
        "nope`touch /workspace/pwned`",
        "nope\n touch /workspace/pwned",
    ],
)
async def test_list_files_never_runs_its_path_as_a_command(
    provider: LocalSandboxProvider, sandbox: LocalSandbox, tmp_path: Path, path: str
) -> None:
    run = tool_run(activities_for(provider, tmp_path), provider, sandbox, tmp_path)
    output = await run.call("list_files", json.dumps({"path": path}))
    assert not output.ok and "no such folder" in output.text, output.text
    assert not sandbox.host_path("/workspace/pwned").exists(), "the path argument ran as a shell command"


async def test_list_files_lists_a_folder_whose_name_needs_quoting(
    provider: LocalSandboxProvider, sandbox: LocalSandbox, tmp_path: Path
) -> None:
    folder = sandbox.host_path("/workspace/it's $HOME")
    folder.mkdir()
    (folder / "a.txt").write_text("hi")
    run = tool_run(activities_for(provider, tmp_path), provider, sandbox, tmp_path)
    output = await run.call("list_files", json.dumps({"path": "it's $HOME"}))
    assert output.ok and "a.txt  (2 bytes)" in output.text, output.text


async def test_a_file_name_with_newlines_cannot_break_the_listing(
    provider: LocalSandboxProvider, sandbox: LocalSandbox, tmp_path: Path
) -> None:
    """The sandbox names its files: a newline followed by 'f NOTANUMBER' made the tool's parser raise."""
    ws = sandbox.host_path("/workspace")
    (ws / "x\nf zz fake").write_text("1")
    (ws / "plain.txt").write_text("12345")
    run = tool_run(activities_for(provider, tmp_path), provider, sandbox, tmp_path)
    output = await run.call("list_files", json.dumps({"path": "."}))
    assert output.ok, output.text
    assert "plain.txt  (5 bytes)" in output.text
    assert "'x\\nf zz fake'  (1 bytes)" in output.text, output.text
