"""Commands for clients in other languages: `schema` and `stage`.

    tardigrade schema                                       the JSON Schema of pipeline files (and the messages)
    tardigrade stage PIPELINE.yaml [--store URL] [--base-dir DIR]    print the workflow input, files staged
    tardigrade stage - [--base-dir DIR] [--name NAME] ...   the pipeline (YAML or JSON) on stdin

`stage` is how a client that cannot write snapshots (the TypeScript one) starts a pipeline with Manifest files:
it runs exactly what `start_pipeline` runs - the files become a seed snapshot in the store - and prints the
`RunInput` to send as the ``TardigradePipeline`` workflow's argument, as pydantic JSON.
"""

from __future__ import annotations

import argparse
import sys


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("schema", help="print the JSON Schema of pipeline files (for editors and other languages)")
    p.set_defaults(handler=cmd_schema)

    p = sub.add_parser("stage", help="stage a pipeline's Manifest files in the store; print the workflow input")
    p.add_argument("pipeline", help="the pipeline file, or - to read YAML or JSON from stdin")
    p.add_argument(
        "--store", help="snapshot store URL (default: the pipeline's `store`, $TARDIGRADE_STORE, or a local folder)"
    )
    p.add_argument(
        "--base-dir", help="where relative `source:` files are (default: the file's folder; for stdin, the cwd)"
    )
    p.add_argument("--name", default="pipeline (stdin)", help="what to call a pipeline read from stdin in messages")
    p.set_defaults(handler=cmd_stage)


async def cmd_schema(args: argparse.Namespace) -> int:
    from tardigrade.schema import schema_json

    sys.stdout.write(schema_json())
    return 0


async def cmd_stage(args: argparse.Namespace) -> int:
    from tardigrade.client import stage_pipeline
    from tardigrade.pipeline import LoadedPipeline, Pipeline, load_pipeline, load_yaml, parse_pipeline

    pipeline: Pipeline | LoadedPipeline
    if args.pipeline == "-":
        data = load_yaml(sys.stdin.read(), args.name)  # the same bounds as a file: no alias bombs
        pipeline = parse_pipeline(data, args.name)
    else:
        pipeline = load_pipeline(args.pipeline)
    run_input = stage_pipeline(pipeline, args.store, base_dir=args.base_dir)
    sys.stdout.write(run_input.model_dump_json() + "\n")
    return 0
