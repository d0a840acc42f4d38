"""Fuzzing the pipeline loader: YAML text and the data in it, as a careless or hostile author might write them.

Three generators: a valid pipeline whose values are replaced by anything YAML can say (using the real field names,
so the fuzzer gets deep into the models); the example pipeline's text with bytes cut, doubled and spliced and
YAML's sharper features inserted (anchors and aliases, merge keys, tags, complex keys, documents); and short
random YAML-ish text. The property: `load_pipeline` returns a pipeline - which then serializes as the client
sends it - or raises `PipelineError`, within a deadline and a memory bound, and never another exception.
"""

from __future__ import annotations

import json
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tardigrade.pipeline import Pipeline, PipelineError, load_pipeline
from tests.security.fuzz_settings import fuzz_settings

EXAMPLE = Path(__file__).parents[2] / "examples" / "data-pipeline.yaml"
MEMORY_BOUND = 64 << 20


def schema_keys() -> list[str]:
    keys: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "properties" and isinstance(v, dict):
                    keys.update(v)
                walk(v)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(Pipeline.model_json_schema())
    return sorted(keys)


KEYS = schema_keys()
BASE: dict[str, Any] = {
    "name": "fuzz",
    "manifest": {
        "files": [{"path": "a.txt", "content": "x"}],
        "env": {"A": "1"},
        "directories": ["d"],
        "snapshot": {"include": ["/workspace"], "exclude": ["**/x"]},
    },
    "sandbox": {"provider": "local", "network": False},
    "steps": [
        {"name": "one", "run": "true", "timeout": "5m"},
        {"name": "two", "agent": "do it", "model": {"name": "m"}, "tools": ["exec", "read_file"]},
    ],
}
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(
        [
            "5m",
            "1h30m",
            "0",
            "-1s",
            "1e400",
            "..",
            "../../etc/passwd",
            "/etc/shadow",
            "file:///etc",
            "s3://b/p",
            "s3://user:pw@b",
            "az://c?endpoint=http://evil",
            "~",
            "*",
            "a" * 300,
            "\0",
            "local",
            "e2b",
            "modal",
            "exec",
            "every_tool_call",
            "scripted",
            "ro",
            "rw",
            ".nan",
            "2024-01-01",
            "0x10",
            "NaN",
        ]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def mutated_data(draw: st.DrawFn) -> Any:
    data = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 4))):
        node: Any = data
        for _ in range(draw(st.integers(0, 4))):  # walk down a random path
            if isinstance(node, dict) and node:
                child = node[draw(st.sampled_from(sorted(node)))]
            elif isinstance(node, list) and node:
                child = node[draw(st.integers(0, len(node) - 1))]
            else:
                break
            if not isinstance(child, dict | list):
                break
            node = child
        if isinstance(node, dict):
            node[draw(st.sampled_from(KEYS) | st.text(max_size=6))] = draw(VALUES)
        elif isinstance(node, list):
            node.append(draw(VALUES))
    return draw(st.just(data) | VALUES)


YAML_FEATURES = [
    "&a ", "*a", "<<: *a\n", "!!python/object/apply:os.system ['touch /tmp/pwned']", "!!binary aGk=", "? [a, b]\n: c\n",
    "---\n", "...\n", "%YAML 1.1\n", "!!set {a, b}", "!!timestamp 2001-12-14", "{", "}", "[", "]", "'", '"', "\t",
    "\n  - ", ": ", "#", "|\n", ">-\n", "&b [*a, *a, *a, *a]", "\ufeff", "\x85", "\x00",
]  # fmt: skip


@st.composite
def mutated_text(draw: st.DrawFn) -> str:
    text = EXAMPLE.read_text()[:3000] if draw(st.booleans()) else yaml.safe_dump(BASE)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "cut", "double"]))
        if op == "insert":
            text = text[:i] + draw(st.sampled_from(YAML_FEATURES) | st.text(max_size=8)) + text[i:]
        elif op == "cut":
            text = text[:i] + text[i + draw(st.integers(1, 40)) :]
        else:
            j = min(len(text), i + draw(st.integers(1, 80)))
            text = text[:j] + text[i:j] * draw(st.integers(1, 3)) + text[j:]
    return text


YAML_ALPHABET = st.sampled_from([*"abc:- \n[]{},&*!|>'\"#?%@`0123456789.", "\t", "<<", "name", "steps"])
RANDOM_TEXT = st.lists(YAML_ALPHABET, max_size=80).map("".join)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-pipeline-") as name:
        yield Path(name)


def check_loads_or_pipeline_error(folder: Path, text: str) -> None:
    path = folder / "pipeline.yaml"
    path.write_text(text, errors="surrogateescape")
    tracemalloc.start()
    try:
        try:
            loaded = load_pipeline(path)
        except PipelineError as e:
            assert str(e).startswith(str(path)), f"the error names the file: {e}"
        else:
            loaded.pipeline.model_dump_json()  # what the client puts in the workflow input
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"loading a {len(text)}-character file peaked at {peak >> 20} MiB"
    assert sorted(p.name for p in folder.iterdir()) == ["pipeline.yaml"], "loading wrote nothing"


@fuzz_settings(examples=60)
@given(data=mutated_data(), as_json=st.booleans())
def test_mutated_pipelines_load_or_raise_pipeline_error(folder: Path, data: Any, as_json: bool) -> None:
    text = json.dumps(data) if as_json else yaml.safe_dump(data, allow_unicode=True)
    check_loads_or_pipeline_error(folder, text)


@fuzz_settings(examples=50)
@given(text=mutated_text())
def test_mutated_yaml_text_loads_or_raises_pipeline_error(folder: Path, text: str) -> None:
    check_loads_or_pipeline_error(folder, text)


@fuzz_settings(examples=150)
@given(text=RANDOM_TEXT)
def test_random_yaml_text_loads_or_raises_pipeline_error(folder: Path, text: str) -> None:
    check_loads_or_pipeline_error(folder, text)
