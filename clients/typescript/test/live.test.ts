/**
 * The real thing: a Temporal dev server and a Python worker (see harness.ts), driven from TypeScript.
 *
 * The 40-step example started from TypeScript ends with the same workspace digest as the same pipeline started by
 * the Python CLI; its status can be followed; a pipeline without Manifest files needs no Python on the client; a
 * failed step and a cancelled run reject with what happened; a pipeline the models refuse fails at once, naming
 * the field; the example in examples/typescript runs.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  cancelRun,
  followRun,
  getResult,
  getStatus,
  loadPipeline,
  type Pipeline,
  RunFailedError,
  type RunStatus,
  startPipeline,
  type StartOptions,
} from "tardigrade-temporal";
import { CLI, EXAMPLE, execute, FIXTURES, REPO, type Services, startServices } from "./harness.js";

describe("against a Temporal dev server and a Python worker", { timeout: 300_000 }, () => {
  let services: Services;
  let options: StartOptions;

  before(async () => {
    services = await startServices();
    options = { taskQueue: services.taskQueue, store: services.store, tardigradeCli: CLI };
  });
  after(async () => services?.stop());

  test(
    "the 40-step example from TypeScript: followed, and the Python CLI's workspace digest",
    { timeout: 180_000 },
    async () => {
      // The same file, started by the Python CLI on the same worker at the same time.
      const cli = execute(
        CLI,
        ["run", EXAMPLE, "--wait", "--json", "--address", services.address, "--task-queue", services.taskQueue],
        { env: services.env },
      );
      const handle = await startPipeline(services.client, await loadPipeline(EXAMPLE), options);
      const seen: RunStatus[] = [];
      const result = await followRun(handle, (status) => seen.push(status), { intervalMs: 200 });

      assert.equal(result.status, "completed");
      assert.equal(result.steps_completed, 40);
      assert.equal(result.workflow_id, handle.workflowId);
      const steps = seen.flatMap((s) => (s.current_step === null ? [] : [s.current_step]));
      assert.ok(seen.length >= 5 && Math.max(...steps) > 20, `followed: ${steps.join(",")}\n${services.logs()}`);
      assert.deepEqual(
        steps,
        [...steps].sort((a, b) => a - b),
        "the run moves forward",
      );

      const python = await cli;
      assert.equal(python.code, 0, `${python.stderr}\n${services.logs()}`);
      const json = python.stdout.slice(python.stdout.search(/^\{/m), python.stdout.lastIndexOf("}") + 1);
      const byPython = JSON.parse(json);
      assert.equal(byPython.status, "completed");
      // Both staged a seed (snapshot ids also record when they were taken; the digest is about the files alone).
      assert.ok(result.seed_snapshot && byPython.seed_snapshot);
      assert.equal(result.workspace_digest, byPython.workspace_digest);
      console.log(
        `# workspace digest: TypeScript ${result.workspace_digest} = Python CLI ${byPython.workspace_digest}` +
          ` (${seen.length} statuses followed)`,
      );
    },
  );

  test("a pipeline without Manifest files needs no Python on the client", { timeout: 60_000 }, async () => {
    const pipeline: Pipeline = {
      name: "no-files",
      steps: [
        { name: "write", run: "echo hello > out.txt", timeout: "1m" },
        { name: "check", run: "grep -q hello out.txt", retry_backoff: "1s" },
      ],
    };
    const handle = await startPipeline(services.client, pipeline, { ...options, tardigradeCli: "/nonexistent" });
    const result = await getResult(handle);
    assert.equal(result.steps_completed, 2);
    assert.equal(result.seed_snapshot, null);
    assert.equal((await getStatus(handle)).phase, "completed"); // the query answers after the end too
  });

  test("a failed step rejects with the run's own message", { timeout: 60_000 }, async () => {
    const pipeline: Pipeline = { name: "fails", steps: [{ name: "give up", run: "echo broken >&2; exit 3" }] };
    const handle = await startPipeline(services.client, pipeline, options);
    const error = await getResult(handle).then(
      () => assert.fail("the run should fail"),
      (e: unknown) => e,
    );
    assert.ok(error instanceof RunFailedError, String(error));
    assert.equal(error.status, "failed");
    assert.equal(error.failureType, "StepFailed");
    assert.match(error.message, /step 1\/1 · give up failed \(exit code 3\)[^]*broken/);
  });

  test("cancelRun stops a run: it ends cancelled, at once", { timeout: 60_000 }, async () => {
    const pipeline: Pipeline = { name: "cancel-me", steps: [{ name: "wait", run: "sleep 300" }] };
    const handle = await startPipeline(services.client, pipeline, options);
    for (let i = 0; (await getStatus(handle)).phase !== "running"; i++) {
      assert.ok(i < 150, `the step did not start\n${services.logs()}`);
      await new Promise((wake) => setTimeout(wake, 200));
    }
    const started = Date.now();
    await cancelRun(handle);
    const error = await getResult(handle).then(
      () => assert.fail("a cancelled run has no result"),
      (e: unknown) => e,
    );
    assert.ok(error instanceof RunFailedError, String(error));
    assert.equal(error.status, "cancelled");
    assert.ok(Date.now() - started < 30_000, "the step was killed, not waited out");
    assert.equal((await handle.describe()).status.name, "CANCELLED");
  });

  test(
    "a pipeline the schema lets through but the models refuse fails at once, naming the field",
    { timeout: 60_000 },
    async () => {
      const pipeline: Pipeline = {
        name: "bad-output",
        steps: [{ name: "a", run: "true" }],
        outputs: [{ path: "out", to: "file:///tmp/out", after: "no such step" }],
      };
      const handle = await startPipeline(services.client, pipeline, options);
      const error = await getResult(handle).then(
        () => assert.fail("the run should fail"),
        (e: unknown) => e,
      );
      assert.ok(error instanceof RunFailedError, String(error));
      assert.equal(error.failureType, "InvalidRunInput");
      assert.match(error.message, /outputs\[0\]\.after: no step is named 'no such step'/);
    },
  );

  test(
    "the example in examples/typescript connects, starts, prints progress and the result",
    { timeout: 60_000 },
    async () => {
      const example = `${REPO}clients/typescript/build/examples/typescript/index.js`;
      const run = await execute(process.execPath, [example, `${FIXTURES}/hello.yaml`], { env: services.env });
      assert.equal(run.code, 0, `${run.stdout}\n${run.stderr}\n${services.logs()}`);
      assert.match(run.stdout, /^started hello-from-node-[0-9a-f]{12}$/m);
      assert.match(run.stdout, /step \d\/3 · /);
      assert.match(run.stdout, /^completed: 3\/3 steps, 0 rehydration\(s\)$/m);
      assert.match(run.stdout, /^ {2}workspace digest {2}[0-9a-f]{16,}$/m);
    },
  );
});
