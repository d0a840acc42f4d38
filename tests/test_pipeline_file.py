"""Bad pipeline files get one clear message that names the file and the field; good ones load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tardigrade.pipeline import PipelineError, load_pipeline, parse_duration
from tests.conftest import EXAMPLE, REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(text)
    return path


GOOD = """
name: ok
steps:
  - {name: one, run: "true"}
"""


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: x\nsteps: [{name: a, run: b}\n", "invalid YAML at line 3"),
        ("- just\n- a list\n", "expected a mapping"),
        ("name: x\nstepz: []\nsteps: [{name: a, run: b}]\n", "stepz: unknown key 'stepz'"),
        ("name: x\nsteps: [{name: a, run: b, timeout: soon}]\n", "steps[0].timeout: 'soon' is not a duration"),
        ("name: x\nsteps: [{name: a, run: b, retries: many}]\n", "steps[0].retries: Input should be a valid integer"),
        ("name: x\nsteps: [{name: a}]\n", "steps[0]: a step needs `run:`"),
        ("name: x\nsteps: []\n", "steps: List should have at least 1 item"),
        ("steps: [{name: a, run: b}]\n", "name: is required"),
        ("name: x\nsandbox: {provider: docker}\nsteps: [{name: a, run: b}]\n", "sandbox.provider: Input should be"),
        (
            "name: x\nmanifest: {files: [{path: ../../etc/passwd, content: x}]}\nsteps: [{name: a, run: b}]\n",
            "manifest.files[0].path: path '../../etc/passwd' is outside the sandbox's writable areas",
        ),
        (
            "name: x\nmanifest: {files: [{path: a.txt}]}\nsteps: [{name: a, run: b}]\n",
            "manifest.files[0]: give exactly one of 'content'",
        ),
        (
            "name: x\nmanifest: {secrets: [not-valid]}\nsteps: [{name: a, run: b}]\n",
            "manifest.secrets[0].name: String should match pattern",
        ),
        (
            "name: x\nmanifest: {env: {PATH: /evil}}\nsteps: [{name: a, run: b}]\n",
            "manifest.env: environment variable PATH is set by the sandbox",
        ),
        (
            "name: x\nmanifest: {env: {K: v}, secrets: [K]}\nsteps: [{name: a, run: b}]\n",
            "appear in both env and secrets",
        ),
        (
            "name: x\nmanifest: {snapshot: {include: [/etc]}}\nsteps: [{name: a, run: b}]\n",
            "manifest.snapshot.include: include path '/etc' is outside",
        ),
        ("name: x\nsteps: [{name: a, run: b, cwd: /usr}]\n", "steps[0].cwd: cwd '/usr' is outside"),
    ],
)
def test_bad_pipeline_files_name_the_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PipelineError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert message.startswith(str(path)), "the message names the file"
    assert expected in message
    assert "\n" not in message or "problems:" in message, "one message, not a traceback"


def test_several_problems_are_listed_together(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nbogus: 1\nsteps: [{name: a, run: b, timeout: never}]\n")
    with pytest.raises(PipelineError, match="2 problems") as info:
        load_pipeline(path)
    assert "bogus" in str(info.value) and "steps[0].timeout" in str(info.value)


def test_a_missing_source_file_is_named_with_where_it_was_looked_for(tmp_path: Path) -> None:
    path = write(
        tmp_path, "name: x\nmanifest: {files: [{path: s.py, source: scripts/s.py}]}\nsteps: [{name: a, run: b}]\n"
    )
    with pytest.raises(PipelineError) as info:
        load_pipeline(path)
    assert "manifest.files[0].source: file 'scripts/s.py' not found" in str(info.value)
    assert str(tmp_path / "scripts" / "s.py") in str(info.value)


def test_a_missing_pipeline_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no such pipeline file"):
        load_pipeline(tmp_path / "nope.yaml")


def test_durations() -> None:
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("1h30m") == 5400
    assert parse_duration(2.5) == 2.5
    for bad in ("", "5 minutes", "-1s", 0, True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_the_example_loads_and_paths_are_normalized(tmp_path: Path) -> None:
    loaded = load_pipeline(EXAMPLE)
    assert len(loaded.pipeline.steps) == 40
    assert loaded.pipeline.manifest.files[0].path == "/workspace/bin/pipeline.py"
    good = load_pipeline(write(tmp_path, GOOD))
    assert good.pipeline.checkpoint_after(0)


def test_the_cli_reports_a_bad_file_with_exit_code_2(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nsteps: [{name: a, run: b, timeout: soon}]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tardigrade.cli", "run", str(path), "--address", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"error: {path}: steps[0].timeout: 'soon' is not a duration; use e.g. 30s, 5m, 1h30m or a number of seconds"
    )
