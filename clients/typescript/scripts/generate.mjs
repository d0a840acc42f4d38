// Regenerates what this package derives from the Python models, or checks that the checked-in copies are current.
//
//   npm run generate            schema/pipeline.schema.json (from `tardigrade schema`) and src/generated/types.ts
//   npm run generate -- --check exit 1 if either differs from what would be generated (the tests run this)
//
// The schema comes from the Python CLI: TARDIGRADE_CLI, else the repository's .venv, else `tardigrade` on PATH.
// The types come from the schema with json-schema-to-typescript. A field added in Python reaches TypeScript by
// running this once.
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { compile } from "json-schema-to-typescript";

const root = fileURLToPath(new URL("..", import.meta.url));
const schemaFile = `${root}schema/pipeline.schema.json`;
const typesFile = `${root}src/generated/types.ts`;
const check = process.argv.includes("--check");

export function tardigradeCli() {
  const inRepo = `${root}../../.venv/bin/tardigrade`;
  return process.env.TARDIGRADE_CLI || (existsSync(inRepo) ? inRepo : "tardigrade");
}

// Keywords that only constrain values (which keys go together, how many items) say nothing a type should: left
// out of the copy types are made from, or json-schema-to-typescript would make index signatures and tuple types.
const CONSTRAINTS_ONLY = ["allOf", "if", "then", "else", "not", "propertyNames", "minItems", "maxItems"];

function forTypes(node) {
  if (Array.isArray(node)) return node.map(forTypes);
  if (node === null || typeof node !== "object") return node;
  // A $ref with siblings (a description, a default) would become a second, numbered copy of the referenced type.
  if (typeof node.$ref === "string" && node.$ref !== "#") return { $ref: node.$ref };
  const out = {};
  for (const [key, value] of Object.entries(node)) {
    if (!CONSTRAINTS_ONLY.includes(key)) out[key] = forTypes(value);
  }
  return out;
}

const schemaText = execFileSync(tardigradeCli(), ["schema"], { encoding: "utf8" });
const schema = forTypes(JSON.parse(schemaText));
// RunInput's pipeline is this schema's root ("$ref": "#"), which is the Pipeline type.
schema.$defs.RunInput.properties.pipeline = { ...schema.$defs.RunInput.properties.pipeline, tsType: "Pipeline" };
delete schema.$defs.RunInput.properties.pipeline.$ref;

const banner = `/* Generated from schema/pipeline.schema.json by scripts/generate.mjs (npm run generate); do not edit.
 * Pipeline and Step describe a pipeline as written (durations may be text such as "5m"); RunStatus and RunResult
 * are what the workflow's status query and result return, every field present once decoded. */`;
const types = await compile(schema, "Pipeline", {
  bannerComment: banner,
  unreachableDefinitions: true, // RunInput, RunStatus and RunResult are not reachable from a pipeline file
  additionalProperties: false,
  strictIndexSignatures: true,
  style: { printWidth: 120 },
});

let stale = false;
for (const [file, text] of [
  [schemaFile, schemaText],
  [typesFile, types],
]) {
  const current = existsSync(file) ? readFileSync(file, "utf8") : "";
  if (current === text) continue;
  if (check) {
    console.error(`${file} is stale: run \`npm run generate\` in clients/typescript and commit the result`);
    stale = true;
  } else {
    writeFileSync(file, text);
    console.log(`wrote ${file}`);
  }
}
process.exit(stale ? 1 : 0);
