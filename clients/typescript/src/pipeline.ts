/**
 * Loading pipeline files: YAML or JSON, checked against the schema generated from the Python models.
 *
 * Any problem - unreadable file, bad YAML, an unknown key, a wrong type, a missing `source:` file - is one
 * `PipelineError` whose message names the file and the field and says what is expected, in the words the Python
 * loader uses: `pipe.yaml: steps[3].timeout: 'soon': expected a duration such as 30s, 5m, 1h30m or a number of
 * seconds`. YAML is read as YAML 1.1, as Python's PyYAML reads it (`network: no` is false in both).
 */
import { statSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { parseDocument, type ScalarTag, type Tags } from "yaml";
import type { Pipeline } from "./generated/types.js";
import { describeErrors, validatePipelineFile } from "./schema.js";

// YAML 1.1 as PyYAML reads it: its booleans are yes/no/true/false/on/off; y and n stay text.
const PYYAML_BOOL = {
  true: /^(?:[Yy]es|YES|[Tt]rue|TRUE|[Oo]n|ON)$/,
  false: /^(?:[Nn]o|NO|[Ff]alse|FALSE|[Oo]ff|OFF)$/,
};

function pyyamlTags(tags: Tags): Tags {
  return tags.map((tag) => {
    if (typeof tag !== "object" || tag.tag !== "tag:yaml.org,2002:bool" || "collection" in tag) return tag;
    return { ...tag, test: tag.identify?.(true) ? PYYAML_BOOL.true : PYYAML_BOOL.false } satisfies ScalarTag;
  });
}

/** A pipeline is not valid. The message names the file and the field, and says how to fix it. */
export class PipelineError extends Error {
  override name = "PipelineError";
}

/** A validated pipeline and the file it came from: its relative `source:` files are relative to that file. */
export interface LoadedPipeline {
  pipeline: Pipeline;
  /** The pipeline file, absolute. */
  path: string;
}

/** Read, parse and validate a pipeline file (YAML or JSON), and check that its `source:` files exist. */
export async function loadPipeline(path: string): Promise<LoadedPipeline> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new PipelineError(
      code === "ENOENT" ? `${path}: no such pipeline file` : `${path}: cannot read it (${(e as Error).message})`,
    );
  }
  const document = parseDocument(text, { version: "1.1", customTags: pyyamlTags, uniqueKeys: false });
  const [problem] = document.errors;
  if (problem) {
    const at = problem.linePos?.[0];
    const where = at ? ` at line ${at.line}, column ${at.col}` : "";
    const what = problem.message.split("\n")[0]?.replace(/ at line \d+, column \d+:?$/, "");
    throw new PipelineError(`${path}: invalid YAML${where}: ${what}`);
  }
  const pipeline = parsePipeline(document.toJS({ maxAliasCount: -1 }), path);
  checkSources(pipeline, dirname(resolve(path)), path, "the pipeline file");
  return { pipeline, path: resolve(path) };
}

/** Validate a pipeline that is already data (parsed JSON, or built in TypeScript); `source` names it in errors. */
export function parsePipeline(data: unknown, source = "pipeline"): Pipeline {
  if (data === null || typeof data !== "object" || Array.isArray(data)) {
    throw new PipelineError(`${source}: expected a mapping with name, manifest, sandbox and steps at the top level`);
  }
  if (!validatePipelineFile(data)) {
    const lines = describeErrors(validatePipelineFile.errors ?? [], data).map((p) => `${p.field}: ${p.message}`);
    throw new PipelineError(
      lines.length === 1 ? `${source}: ${lines[0]}` : `${source}: ${lines.length} problems:\n  ${lines.join("\n  ")}`,
    );
  }
  return data as Pipeline;
}

/**
 * Every Manifest file copied from disk (`source:`) must exist; relative paths are resolved against `baseDir`.
 * Checked before anything is staged, so a typo is one clear error rather than a half-uploaded seed snapshot.
 */
export function checkSources(pipeline: Pipeline, baseDir: string, source: string, relativeTo: string): void {
  (pipeline.manifest?.files ?? []).forEach((file, i) => {
    if (file.source === undefined || file.source === null) return;
    const found = resolve(baseDir, file.source);
    if (!statSync(found, { throwIfNoEntry: false })?.isFile()) {
      throw new PipelineError(
        `${source}: manifest.files[${i}].source: file '${file.source}' not found (looked for ${found}); paths` +
          ` are relative to ${relativeTo}`,
      );
    }
  });
}
