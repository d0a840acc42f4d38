/**
 * Pipeline files in TypeScript: the examples load, mistakes are reported with the file and the field (as the
 * Python loader reports them), and the schema and types here are those the Python models generate today.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { promisify } from "node:util";
import { loadPipeline, type Pipeline, PipelineError, stagePipeline } from "tardigrade-temporal";
import { CLI, REPO } from "./harness.js";

const dir = mkdtempSync(join(tmpdir(), "tardigrade-ts-files-"));

function file(name: string, text: string): string {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}

async function problem(text: string): Promise<string> {
  const path = file("pipe.yaml", text);
  const error = await loadPipeline(path).then(
    () => assert.fail(`expected a PipelineError for ${JSON.stringify(text)}`),
    (e: unknown) => e,
  );
  assert.ok(error instanceof PipelineError, String(error));
  assert.ok(error.message.startsWith(`${path}: `), error.message);
  return error.message.slice(path.length + 2);
}

describe("loadPipeline", () => {
  test("every example pipeline loads", async () => {
    const examples = readdirSync(join(REPO, "examples")).filter((f) => /\.ya?ml$/.test(f));
    assert.ok(examples.length > 0);
    for (const name of examples) {
      const loaded = await loadPipeline(join(REPO, "examples", name));
      assert.ok(loaded.pipeline.steps.length > 0, name);
    }
    const example = await loadPipeline(join(REPO, "examples", "data-pipeline.yaml"));
    assert.equal(example.pipeline.steps.length, 40);
  });

  test("a mistake is one message naming the file and the field", async () => {
    const cases: [string, string][] = [
      ["name: p\nsteps:\n  - {name: s, run: 'true', timeout: soon}", "steps[0].timeout: 'soon': expected a duration"],
      ["name: p\nsteps:\n  - {name: s, run: 'true', tiemout: 5m}", "steps[0].tiemout: unknown key 'tiemout'"],
      ["name: p\nsteps:\n  - {name: s}", "steps[0].run: a step needs `run:` (a shell command) or `agent:`"],
      ["name: p\nsteps:\n  - {name: s, agent: do it}", "steps[0].model: an agent step needs `model:`"],
      ["name: p\nsteps:\n  - {name: s, run: x, tools: [exec]}", "steps[0].tools: tools only applies to agent steps"],
      ["name: p\nsandbox: {provider: docker}\nsteps: [{name: s, run: x}]", "sandbox.provider: 'docker': expected one of local, e2b, modal, daytona"],
      ["name: p\nsteps: []", "steps: must NOT have fewer than 1 items"],
      ["steps: [{name: s, run: x}]", "name: is required"],
      ["name: p\nmanifest: {env: {HOME: /x}}\nsteps: [{name: s, run: x}]", "manifest.env.HOME: variable names are"],
      [
        "name: p\nmanifest: {files: [{path: /etc/x, content: y}]}\nsteps: [{name: s, run: x}]",
        "manifest.files[0].path: '/etc/x': must be inside /workspace or ~",
      ],
      [
        "name: p\nmanifest: {files: [{path: a}]}\nsteps: [{name: s, run: x}]",
        "manifest.files[0]: give exactly one of 'content' (inline text) or 'source'",
      ],
      [
        "name: p\nmanifest: {files: [{path: a, source: nope.py}]}\nsteps: [{name: s, run: x}]",
        "manifest.files[0].source: file 'nope.py' not found",
      ],
      ["name: p\nsteps:\n  - {name: s, run: x\n", "invalid YAML at line 4, column 1"],
      ["- just a list", "expected a mapping with name, manifest, sandbox and steps at the top level"],
    ];
    for (const [text, expected] of cases) {
      const message = await problem(text);
      assert.ok(
        message.startsWith(expected),
        `${JSON.stringify(text)}\n  gave:     ${message}\n  expected: ${expected}`,
      );
    }
    const several = await problem("name: p\nsteps:\n  - {name: s, run: x, timeout: soon, retries: -1}");
    assert.match(several, /^2 problems:\n {2}steps\[0\]\.timeout: .*\n {2}steps\[0\]\.retries: must be >= 0$/);
  });

  test("YAML is read as PyYAML reads it", async () => {
    const path = file(
      "yaml11.yaml",
      "name: y\nsandbox: {network: no}\nmanifest: {env: {ANSWER: y}}\nsteps: [{name: s, run: x}]",
    );
    const { pipeline } = await loadPipeline(path);
    assert.equal(pipeline.sandbox?.network, false); // YAML 1.1: no is false
    assert.equal(pipeline.manifest?.env?.ANSWER, "y"); // but y is text, as in PyYAML
  });

  test("a pipeline built in TypeScript is checked the same way before anything starts", async () => {
    const pipeline = { name: "built", steps: [{ name: "s", run: "true", timeout: "soon" }] } as Pipeline;
    await assert.rejects(stagePipeline(pipeline), /^PipelineError: pipeline 'built': steps\[0\]\.timeout: 'soon'/);
    const sourced: Pipeline = {
      name: "built",
      manifest: { files: [{ path: "a", source: "missing.py" }] },
      steps: [{ name: "s", run: "true" }],
    };
    await assert.rejects(
      stagePipeline(sourced, { baseDir: dir }),
      /manifest\.files\[0\]\.source: file 'missing\.py' not found/,
    );
  });
});

describe("generated from the Python models", () => {
  test("schema/pipeline.schema.json and src/generated/types.ts are current (npm run generate)", async () => {
    const script = join(REPO, "clients", "typescript", "scripts", "generate.mjs");
    const { stderr } = await promisify(execFile)(process.execPath, [script, "--check"], {
      env: { ...process.env, TARDIGRADE_CLI: CLI },
    }).catch((e: { stderr: string }) => assert.fail(e.stderr));
    assert.equal(stderr, "");
  });
});
