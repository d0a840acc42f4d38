"""Secret values must reach the sandbox's environment and nothing else: not a command line (``ps`` shows every
local user every command line), not an output tail in history, not a file left on the worker unredacted.

The tail tests place a secret exactly where the worker cuts the output: the raw tail the provider keeps starts
in the middle of a secret, and more copies of the secret after it make masking shorten the text, so that
"mask, then cut" would pull the unmasked fragment into what history or the model sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from tardigrade.activities.contract import OUTPUT_TAIL_BYTES, RunStepInput, SandboxPlan
from tardigrade.activities.sandbox import SandboxActivities
from tardigrade.activities.secrets import Redactor
from tardigrade.activities.tools import TOOL_OUTPUT_LIMIT
from tardigrade.pipeline import parse_pipeline
from tardigrade.sandboxes.bubblewrap import LocalSandbox, LocalSandboxProvider
from tardigrade.sandboxes.errors import SandboxError
from tardigrade.sandboxes.provider import SandboxSpec
from tests.security.helpers import tool_run

SECRET = "Tok3n-" + uuid.uuid4().hex  # 38 bytes, no byte of it in the fillers (x, y, z) below
L = len(SECRET)


def leaked(text: str, secret: str = SECRET, piece: int = 6) -> list[str]:
    """Every fragment of ``secret`` of ``piece`` characters that appears in ``text``."""
    return sorted({secret[i : i + piece] for i in range(len(secret) - piece + 1) if secret[i : i + piece] in text})


def fill(char: str, count: int) -> str:
    return f"head -c {count} /dev/zero | tr '\\0' {char};"


def secrets_times(count: int) -> str:
    return f'i=0; while [ $i -lt {count} ]; do printf %s "$TOKEN"; i=$((i+1)); done;'


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[LocalSandboxProvider]:
    p = LocalSandboxProvider(tmp_path / "sandboxes")
    assert p.bwrap, "these tests need bubblewrap: apt-get install -y bubblewrap"
    yield p
    await p.close()


@pytest.fixture
async def sandbox(provider: LocalSandboxProvider) -> LocalSandbox:
    return await provider.create(SandboxSpec())


@pytest.fixture
def activities(provider: LocalSandboxProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SandboxActivities:
    monkeypatch.setenv("TOKEN", SECRET)
    return SandboxActivities(
        shared_queue="shared", host_queue="host", state_dir=tmp_path / "state", providers={"local": provider}
    )


# -- row 7: never on a command line -------------------------------------------------------------------------------


def command_lines() -> dict[int, bytes]:
    lines = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                lines[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
    return lines


async def test_secret_values_are_on_no_command_line_while_a_command_runs(sandbox: LocalSandbox) -> None:
    run = asyncio.create_task(
        sandbox.exec('sleep 2; printf %s "$API_TOKEN" | wc -c', env={"API_TOKEN": SECRET}, timeout=30)
    )
    bwrap_seen = False
    exposed: list[str] = []
    while not run.done():
        for pid, line in command_lines().items():
            # The binds name the sandbox's folder: fs/ itself, or the overlay view over it (sandboxes/overlay.py).
            if b"bwrap" in line and str(sandbox.fs.parent).encode() in line:
                bwrap_seen = True
            if SECRET.encode() in line:
                shown = line.replace(b"\0", b" ").decode(errors="replace")
                exposed.append(f"{pid}: {shown[:300]}")
        await asyncio.sleep(0.05)
    result = await run
    assert bwrap_seen, "the command ran under bubblewrap"
    assert exposed == [], "a secret is visible to every local user in ps"
    assert result.output_tail.strip() == str(L).encode(), "and the command still got it"


async def test_an_environment_value_cannot_smuggle_in_bubblewrap_options(sandbox: LocalSandbox, tmp_path: Path) -> None:
    """The environment reaches bwrap as NUL-separated arguments: a NUL inside a value must not start a new one."""
    host = tmp_path / "host-secrets"
    host.mkdir()
    (host / "key").write_text("worker only")
    smuggled = f"x\0--bind\0{host}\0/workspace/stolen"
    with pytest.raises(SandboxError, match="NUL"):
        await sandbox.exec("cat /workspace/stolen/key", env={"INNOCENT": smuggled}, timeout=30)


# -- row 8: masking survives the cut ------------------------------------------------------------------------------


def step_input(activities: SandboxActivities, provider: LocalSandboxProvider, sandbox: LocalSandbox,
               tmp_path: Path, command: str) -> RunStepInput:  # fmt: skip
    steps = [{"name": "s", "run": command}]
    pipeline = parse_pipeline({"name": "p", "manifest": {"secrets": ["TOKEN"]}, "steps": steps})
    return RunStepInput(
        sandbox=activities.ref_for(sandbox, provider),
        plan=SandboxPlan.of(pipeline),
        step=pipeline.steps[0],
        store=(tmp_path / "store").as_uri(),
        index=0,
        attempt=1,
    )


async def test_a_step_tail_never_starts_with_part_of_a_secret(
    activities: SandboxActivities, provider: LocalSandboxProvider, sandbox: LocalSandbox, tmp_path: Path
) -> None:
    # The provider keeps OUTPUT_TAIL_BYTES + (L - 1) raw bytes: they start at the secret's second character.
    command = 'printf "start "; printf %s "$TOKEN";' + secrets_times(2) + fill("x", OUTPUT_TAIL_BYTES - 2 * L)
    outcome = await ActivityEnvironment().run(
        activities.run_step, step_input(activities, provider, sandbox, tmp_path, command)
    )
    assert outcome.exit_code == 0
    assert leaked(outcome.output_tail) == [], outcome.output_tail[:80]
    assert "***" in outcome.output_tail


async def test_no_file_on_the_worker_keeps_a_secret_unredacted_after_a_step(
    activities: SandboxActivities, provider: LocalSandboxProvider, sandbox: LocalSandbox, tmp_path: Path
) -> None:
    for command in ('echo "short: $TOKEN"', 'echo "long: $TOKEN";' + fill("x", 3 * OUTPUT_TAIL_BYTES)):
        outcome = await ActivityEnvironment().run(
            activities.run_step, step_input(activities, provider, sandbox, tmp_path, command)
        )
        assert outcome.exit_code == 0 and leaked(outcome.output_tail) == []
    holding = []
    for folder in (provider.root, activities.state_dir, tmp_path / "store"):
        for dirpath, _, files in os.walk(folder):
            for name in files:
                path = Path(dirpath) / name
                if not path.is_symlink() and SECRET.encode() in path.read_bytes():
                    holding.append(str(path.relative_to(tmp_path)))
    assert holding == [], "raw output with a secret was left on the worker's disk"


async def test_a_long_tool_output_leaks_no_part_of_a_secret_at_either_cut(
    activities: SandboxActivities, provider: LocalSandboxProvider, sandbox: LocalSandbox, tmp_path: Path
) -> None:
    half, overlap = TOOL_OUTPUT_LIMIT // 2, L - 1
    # Head: the worker reads half + overlap bytes; a secret starts 10 bytes before that read ends.
    head = secrets_times(2) + fill("x", half + overlap - 10 - 2 * L) + 'printf %s "$TOKEN";'
    # Tail: the provider keeps TOOL_OUTPUT_LIMIT + overlap bytes; they start at a secret's second character,
    # and enough copies follow for masking to shrink the text by more than the cut.
    tail = 'printf %s "$TOKEN";' + secrets_times(240) + fill("y", TOOL_OUTPUT_LIMIT + overlap - (L - 1) - 240 * L)
    run = tool_run(activities, provider, sandbox, tmp_path, {"TOKEN": SECRET})
    output = await ActivityEnvironment().run(run.call, "exec", json.dumps({"command": head + fill("z", 1000) + tail}))
    assert output.ok and output.output_log, output.text[:200]
    assert leaked(output.text) == [] and leaked(output.preview) == []


async def test_read_file_shows_no_part_of_a_secret_where_it_cuts_the_file(
    activities: SandboxActivities, provider: LocalSandboxProvider, sandbox: LocalSandbox, tmp_path: Path
) -> None:
    content = SECRET * 2 + "x" * (TOOL_OUTPUT_LIMIT + (L - 1) - 10 - 2 * L) + SECRET + "y" * 50_000
    await sandbox.write_file("notes.txt", content.encode())
    run = tool_run(activities, provider, sandbox, tmp_path, {"TOKEN": SECRET})
    output = await ActivityEnvironment().run(run.call, "read_file", json.dumps({"path": "notes.txt"}))
    assert output.ok and leaked(output.text) == [], output.text[-300:]


def test_redactor_masks_before_it_cuts() -> None:
    """The same rule, without a sandbox: whatever the cut, no 6-character piece of a secret survives."""
    redactor = Redactor([SECRET, "another-secret"])
    stream = ("a" * 5 + SECRET + "b" * 3 + SECRET + SECRET + "another-secret" + "c" * 7 + SECRET) * 3
    data = stream.encode()
    for keep in range(0, len(data) + 1, 7):
        for limit in (1, 10, 40, 100, len(data)):
            window = data[len(data) - keep :]
            tail = redactor.tail(window, limit, whole=keep == len(data)).decode()
            assert leaked(tail) == [] and leaked(tail, "another-secret") == [], (keep, limit, tail)
            head = redactor.head(data[:keep], limit, whole=keep == len(data)).decode()
            assert leaked(head) == [] and leaked(head, "another-secret") == [], (keep, limit, head)
