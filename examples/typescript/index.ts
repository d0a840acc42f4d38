/**
 * Start a Tardigrade pipeline from Node, print its progress, print its result.
 *
 *     npm install && npm start -- ../data-pipeline.yaml
 *
 * Needs a Temporal server and a Python worker (`tardigrade server` and `tardigrade worker`; see the README). A
 * pipeline with Manifest files, like the example, also needs the `tardigrade` CLI on this machine: it stages them
 * into the snapshot store. Settings come from the usual variables: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE,
 * TARDIGRADE_TASK_QUEUE, TARDIGRADE_STORE, TARDIGRADE_CLI.
 */
import { Client, Connection } from "@temporalio/client";
import { followRun, loadPipeline, startPipeline } from "tardigrade-temporal";

const file = process.argv[2] ?? "../data-pipeline.yaml";
const connection = await Connection.connect({ address: process.env.TEMPORAL_ADDRESS ?? "localhost:7233" });
const client = new Client({ connection, namespace: process.env.TEMPORAL_NAMESPACE ?? "default" });
try {
  const handle = await startPipeline(client, await loadPipeline(file));
  console.log(`started ${handle.workflowId}`);

  let shown = "";
  const result = await followRun(handle, (status) => {
    const where = status.current_step
      ? `step ${status.current_step}/${status.steps_total} · ${status.current_step_name}`
      : status.phase;
    const line = status.rehydrations ? `${where} (rehydrations: ${status.rehydrations})` : where;
    if (line !== shown) console.log(`  ${(shown = line)}`);
  });

  console.log(
    `${result.status}: ${result.steps_completed}/${result.steps_total} steps, ${result.rehydrations} rehydration(s)`,
  );
  console.log(`  workspace digest  ${result.workspace_digest}`);
  console.log(`  final snapshot    ${result.final_snapshot}`);
} catch (error) {
  // A bad pipeline file (PipelineError) or a run that failed or was cancelled (RunFailedError) says what to do.
  console.error(`error: ${error instanceof Error ? error.message : String(error)}`);
  process.exitCode = 1;
} finally {
  await connection.close();
}
