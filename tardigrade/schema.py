"""The JSON Schema of pipeline files, generated from the pydantic models: one schema for editors and other languages.

`tardigrade schema` prints it. Its root describes a pipeline file as people write it (durations such as ``5m``,
the shorthands), with the models' descriptions, so a YAML language server completes and checks files as they are
typed. Under ``$defs`` it also describes what a client in another language exchanges with the workflow, as the
plugin's pydantic JSON converter writes it: `RunInput` (what a client sends), `RunStatus` (the ``status`` query)
and `RunResult` (the result). clients/typescript/ validates files against it and generates its types from it.

Conventions:
- Draft-07, the draft YAML/JSON language servers know best; nothing newer is used.
- ``errorMessage`` on a subschema is the sentence to show when a value does not fit it (a convention of the
  YAML/JSON language servers; standard validators ignore it). The models put it next to the rule it explains.
- In `RunStatus` and `RunResult` every property is required, defaults included: a reader fills in what a writer
  omitted (some converters leave out fields at their defaults) and then has a complete, typed message.
- The models' validators stay the authority: the schema says what JSON Schema can (shapes, names, patterns,
  which keys go together) and the worker checks the rest. A run whose input it refuses fails at once, naming the
  field (see `RunInput`), instead of retrying a workflow task forever.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from tardigrade.pipeline import Pipeline
from tardigrade.workflows.state import RunInput, RunResult, RunStatus, StartPoint

DRAFT = "http://json-schema.org/draft-07/schema#"
REF_PREFIX = "#/$defs/"


class _Generator(GenerateJsonSchema):
    """pydantic's generator without per-field titles: they would become type names in generated code, and editors
    show descriptions anyway."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


class _CompleteMessages(_Generator):
    """For messages a client reads: every field is required (defaults included) and defaults made by a factory
    are written out, so a reader can fill in omitted fields and see complete objects."""

    def field_is_required(self, field: Any, total: bool) -> bool:
        return True if self.mode == "serialization" else super().field_is_required(field, total)

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().default_schema(schema)
        inner = self.generate_inner(schema["schema"])
        return {**inner, "default": self.encode_default(factory())}  # type: ignore[call-arg]


def _defs(models: list[tuple[type[BaseModel], JsonSchemaMode]], generator: type[GenerateJsonSchema]) -> Any:
    _, schema = models_json_schema(models, ref_template=REF_PREFIX + "{model}", schema_generator=generator)
    return schema["$defs"]


def _merge(into: dict[str, Any], defs: dict[str, Any]) -> None:
    for name, schema in defs.items():
        if name in into and into[name] != schema:
            raise ValueError(f"two different schemas are named {name!r}; rename one of the models")
        into[name] = schema


def _run_input() -> dict[str, Any]:
    """`RunInput` as a client writes it: its pipeline is the root of this schema (as written in a file), and its
    ``state`` is the workflow's own (carried through continue-as-new), never set by clients."""
    schema: dict[str, Any] = RunInput.model_json_schema(mode="validation", schema_generator=_Generator)
    schema.pop("$defs", None)
    properties = schema["properties"]
    properties["pipeline"] = {"$ref": "#", "description": "The pipeline, its Manifest files already staged."}
    properties["state"] = {
        "type": "null",
        "default": None,
        "description": "The workflow's own, set when it continues as new; clients leave it out.",
    }
    properties["start"] = {
        "anyOf": [{"$ref": REF_PREFIX + "StartPoint"}, {"type": "null"}],
        "default": None,
        "description": "Fork: start after this snapshot's step, with its files, instead of at step 1.",
    }
    leftover = [key for key, value in properties.items() if REF_PREFIX in json.dumps(value) and key != "start"]
    if leftover:
        raise ValueError(f"RunInput.{leftover[0]} refers to a model; add it to tardigrade/schema.py")
    return schema


def pipeline_schema() -> dict[str, Any]:
    """The whole schema: a pipeline file at the root; RunInput, RunStatus and RunResult under ``$defs``."""
    root: dict[str, Any] = Pipeline.model_json_schema(
        mode="validation", ref_template=REF_PREFIX + "{model}", schema_generator=_Generator
    )
    defs: dict[str, Any] = root.pop("$defs")
    _merge(defs, _defs([(RunStatus, "serialization"), (RunResult, "serialization")], _CompleteMessages))
    _merge(defs, {"RunInput": _run_input()})
    _merge(defs, _defs([(StartPoint, "serialization")], _CompleteMessages))
    return {"$schema": DRAFT, **root, "$defs": dict(sorted(defs.items()))}


def schema_json() -> str:
    """The schema as `tardigrade schema` prints it (and clients/typescript/schema/pipeline.schema.json holds it)."""
    return json.dumps(pipeline_schema(), indent=2, ensure_ascii=False) + "\n"
