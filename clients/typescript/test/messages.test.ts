/**
 * The same payloads both ways, with the real Python models (no server needed): what TypeScript sends is what the
 * workflow decodes, and what Python sends - complete, or with fields at their defaults left out, as some
 * converters do (OpenAIAgentsPlugin's) - is what TypeScript reads.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { decodeMessage, stagePipeline } from "tardigrade-temporal";
import { python } from "./harness.js";

const PY_MESSAGES = `
import json
from tardigrade.workflows.state import CheckpointRecord, RunResult, RunStatus
result = RunResult(workflow_id="w", pipeline="p", status="completed", steps_total=2, steps_completed=2, step_runs=2,
    rehydrations=0, final_snapshot="s2", workspace_digest="d", seed_snapshot=None, store="file:///s",
    checkpoints=[CheckpointRecord(step=-1, snapshot_id="s0"), CheckpointRecord(step=1, snapshot_id="s2")])
status = RunStatus(workflow_id="w", pipeline="p", phase="running", current_step=1, current_step_name="a",
    steps_total=2, steps_completed=0, rehydrations=0, sandbox=None, last_snapshot=None, checkpoints=[])
print(json.dumps({
    "result": result.model_dump(mode="json"), "result_lean": result.model_dump(mode="json", exclude_defaults=True),
    "status": status.model_dump(mode="json"), "status_lean": status.model_dump(mode="json", exclude_defaults=True),
}))
`;

describe("payloads", () => {
  test("Python -> TypeScript: RunResult and RunStatus, complete or with defaults left out", async () => {
    const sent = JSON.parse(await python(PY_MESSAGES));
    assert.ok(!("usage" in sent.result_lean) && !("agents" in sent.result_lean)); // really left out
    const full = decodeMessage("RunResult", sent.result);
    assert.deepEqual(decodeMessage("RunResult", sent.result_lean), full);
    assert.deepEqual(full.usage, { input_tokens: 0, output_tokens: 0, model_calls: 0 });
    assert.deepEqual([full.agents, full.outputs, full.providers], [[], [], []]);
    assert.equal(full.checkpoints[1]?.turn, null); // a nested default, filled in too
    const status = decodeMessage("RunStatus", sent.status_lean);
    assert.deepEqual(status, decodeMessage("RunStatus", sent.status));
    assert.equal(status.last_error, null);
    assert.equal(status.agent, null);
  });

  test("a field a newer worker adds is dropped; a missing one is named", () => {
    const newer = {
      workflow_id: "w",
      pipeline: "p",
      phase: "running",
      current_step: null,
      current_step_name: null,
      steps_total: 1,
      steps_completed: 0,
      rehydrations: 0,
      sandbox: null,
      last_snapshot: null,
      checkpoints: [],
      from_the_future: 1,
    };
    assert.ok(!("from_the_future" in decodeMessage("RunStatus", newer)));
    const { phase: _, ...older } = newer;
    assert.throws(() => decodeMessage("RunStatus", older), /cannot read \(phase: is required\)/);
  });

  test("TypeScript -> Python: the workflow input decodes, durations as written become seconds", async () => {
    const input = await stagePipeline(
      {
        name: "from-ts",
        steps: [{ name: "s", run: "true", timeout: "1h30m", retry_backoff: 2 }],
        checkpoint: "end_only",
      },
      { store: "file:///tmp/ts-store", tardigradeCli: "/nonexistent/tardigrade" }, // nothing to stage: no Python
    );
    const decoded = JSON.parse(
      await python(
        [
          "import sys",
          "from tardigrade.workflows.state import RunInput",
          "print(RunInput.model_validate_json(sys.stdin.read()).model_dump_json())",
        ].join("\n"),
        JSON.stringify(input),
      ),
    );
    assert.equal(decoded.store, "file:///tmp/ts-store");
    assert.equal(decoded.seed_snapshot, null);
    assert.equal(decoded.pipeline.steps[0].timeout, 5400);
    assert.equal(decoded.pipeline.checkpoint.every, 1_000_000_000);
  });

  test("TypeScript -> Python: input the models refuse fails the run at once, naming the field", async () => {
    const input = await stagePipeline(
      {
        name: "bad",
        steps: [{ name: "s", run: "true" }],
        outputs: [{ path: "out", to: "file:///tmp/o", after: "nope" }],
      },
      { store: "file:///tmp/ts-store" },
    );
    const said = await python(
      [
        "import sys",
        "from temporalio.exceptions import ApplicationError",
        "from tardigrade.workflows.state import RunInput",
        "try:",
        "    RunInput.model_validate_json(sys.stdin.read())",
        "except ApplicationError as e:",
        "    print(e.type, e.non_retryable, e.message)",
      ].join("\n"),
      JSON.stringify(input),
    );
    assert.match(said, /^InvalidRunInput True workflow input: pipeline: outputs\[0\]\.after: no step is named .nope./);
  });
});
