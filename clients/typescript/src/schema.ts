/**
 * The pipeline schema and the two validators built on it.
 *
 * schema/pipeline.schema.json is generated from the Python models (`tardigrade schema`; see scripts/generate.mjs).
 * Its root is a pipeline file; its `$defs` also hold RunInput, RunStatus and RunResult, the messages exchanged
 * with the workflow. Files are checked strictly, every problem named by its field (`steps[3].timeout`), like the
 * Python loader does; messages from the workflow are checked leniently: fields a converter left out at their
 * defaults are filled in, and fields a newer worker added are dropped, so the result matches the generated types.
 */
import { readFileSync } from "node:fs";
import { Ajv, type ErrorObject, type Options, type ValidateFunction } from "ajv";
import type { RunResult, RunStatus } from "./generated/types.js";

const SCHEMA_FILE = new URL("../schema/pipeline.schema.json", import.meta.url);

/** The JSON Schema of pipeline files (and, under `$defs`, of RunInput, RunStatus and RunResult). */
export const pipelineSchema: Record<string, unknown> = JSON.parse(readFileSync(SCHEMA_FILE, "utf8"));

function newAjv(options: Options): Ajv {
  // strictTypes off: the schema's cross-field rules (`if: {required: [agent]}`) rightly name no type.
  const ajv = new Ajv({ strictTypes: false, ...options });
  // "errorMessage" is the sentence to show when a subschema does not fit (the YAML/JSON language servers'
  // convention): an annotation for the validator, read back by `describeErrors`.
  ajv.addKeyword({ keyword: "errorMessage", schemaType: "string" });
  ajv.addSchema(pipelineSchema, "pipeline");
  return ajv;
}

const files = newAjv({ allErrors: true, verbose: true });
// Not strict: defaults inside unions (a CheckpointPolicy in a pipeline) are ignored here, and that is fine.
const messages = newAjv({ useDefaults: true, removeAdditional: true, strict: false });

function validator(ajv: Ajv, pointer: string): ValidateFunction {
  const validate = ajv.getSchema(`pipeline${pointer}`);
  if (!validate) throw new Error(`schema/pipeline.schema.json has no ${pointer}; regenerate it (npm run generate)`);
  return validate;
}

export const validatePipelineFile = validator(files, "");

/** One problem, as the Python loader reports it: the field's path and what is wrong with it. */
export interface Problem {
  field: string;
  message: string;
}

/** The messages a client reads, by their names in the schema. */
export interface Messages {
  RunStatus: RunStatus;
  RunResult: RunResult;
}

/**
 * Check a message from the workflow (the status query's answer, the result) and make it complete: omitted fields
 * get their defaults, unknown ones are dropped. Throws, naming the field, if it still does not fit.
 */
export function decodeMessage<K extends keyof Messages>(name: K, value: unknown): Messages[K] {
  const copy: unknown = structuredClone(value);
  const validate = validator(messages, `#/$defs/${name}`);
  if (!validate(copy)) {
    const [problem] = describeErrors(validate.errors ?? [], copy);
    throw new Error(
      `the workflow sent a ${name} this client cannot read (${problem?.field}: ${problem?.message}); is the` +
        " tardigrade-temporal package much older or newer than the worker?",
    );
  }
  return copy as Messages[K];
}

/** `/steps/3/timeout` -> `steps[3].timeout`, array indexes in brackets like the Python loader writes them. */
export function fieldPath(pointer: string, data: unknown, extra?: string): string {
  const parts =
    pointer === ""
      ? []
      : pointer
          .slice(1)
          .split("/")
          .map((p) => p.replace(/~1/g, "/").replace(/~0/g, "~"));
  if (extra !== undefined) parts.push(extra);
  let out = "";
  let node: unknown = data;
  for (const part of parts) {
    if (Array.isArray(node)) out += `[${part}]`;
    else out += out ? `.${part}` : part;
    node = node !== null && typeof node === "object" ? (node as Record<string, unknown>)[part] : undefined;
  }
  return out || "(top level)";
}

function errorMessage(error: ErrorObject): string | undefined {
  const parent = error.parentSchema as { errorMessage?: unknown } | undefined;
  return typeof parent?.errorMessage === "string" ? parent.errorMessage : undefined;
}

function shown(value: unknown): string {
  const text = typeof value === "string" ? `'${value}'` : JSON.stringify(value);
  return text.length > 60 ? `${text.slice(0, 57)}...` : text;
}

function plain(error: ErrorObject): string {
  switch (error.keyword) {
    case "type":
      return `expected ${String(error.params.type).replace(",", " or ")}, got ${shown(error.data)}`;
    case "enum":
      return `${shown(error.data)} is not one of ${(error.params.allowedValues as unknown[]).join(", ")}`;
    case "const":
      return `expected ${shown(error.params.allowedValue)}`;
    case "pattern":
      return `${shown(error.data)} does not have the expected form (${error.params.pattern})`;
    default:
      return error.message ?? error.keyword;
  }
}

/**
 * ajv's errors as one problem per field. Within a union (anyOf/oneOf), the union's own errorMessage wins; without
 * one, branches that failed only on the value's type are dropped, since the branch of the right type says what is
 * actually wrong (`'docker' is not one of local, e2b, modal`, not also "expected array").
 */
export function describeErrors(errors: ErrorObject[], data: unknown): Problem[] {
  // "if" only says which branch applied; "propertyNames" repeats the error about the name it found inside.
  let items: { error: ErrorObject; message?: string }[] = [];
  for (const error of errors) {
    if (error.keyword === "if" || error.keyword === "propertyNames") continue;
    if (error.keyword !== "anyOf" && error.keyword !== "oneOf") {
      items.push({ error });
      continue;
    }
    // ajv reports a union's failed branches just before the union itself, at its value or below (schema paths
    // cannot tell: a branch's errors inside a $ref carry the referenced schema's path).
    let first = items.length;
    while (first > 0 && within(items[first - 1]!.error.instancePath, error.instancePath)) first -= 1;
    const branches = items.splice(first);
    const telling = branches.filter((b) => b.error.keyword !== "type");
    if (errorMessage(error) !== undefined) {
      items.push({ error });
    } else if (telling.length > 0) {
      items.push(...telling);
    } else {
      const types = new Set(branches.flatMap((b) => String(b.error.params.type).split(",")));
      types.delete("null"); // "expected string or null": nobody means to write null
      items.push({
        error,
        message: `expected ${[...types].join(" or ") || "another value"}, got ${shown(error.data)}`,
      });
    }
  }
  const problems: Problem[] = [];
  for (const { error, message: given } of items) {
    let field = fieldPath(error.instancePath, data);
    let message = given ?? errorMessage(error) ?? plain(error);
    if (error.keyword === "required") {
      field = fieldPath(error.instancePath, data, String(error.params.missingProperty));
      message = errorMessage(error) ?? "is required";
    } else if (error.keyword === "additionalProperties") {
      const key = String(error.params.additionalProperty);
      field = fieldPath(error.instancePath, data, key);
      message = `unknown key '${key}' (check the spelling; see the README for the allowed keys)`;
    } else if (error.propertyName !== undefined) {
      field = fieldPath(error.instancePath, data, error.propertyName);
      message = errorMessage(error) ?? `the name '${error.propertyName}' is not allowed here`;
    } else if (given === undefined && errorMessage(error) !== undefined && isScalar(error.data)) {
      message = `${shown(error.data)}: ${message}`;
    }
    if (!problems.some((p) => p.field === field && p.message === message)) problems.push({ field, message });
  }
  return problems;
}

function within(path: string, prefix: string): boolean {
  return path === prefix || path.startsWith(`${prefix}/`);
}

function isScalar(value: unknown): boolean {
  return value !== undefined && (value === null || typeof value !== "object");
}
