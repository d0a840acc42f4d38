/**
 * tardigrade-temporal: start, follow and cancel Tardigrade pipelines from Node.
 *
 *     const client = new Client({ connection: await Connection.connect({ address: "localhost:7233" }) });
 *     const handle = await startPipeline(client, await loadPipeline("pipeline.yaml"));
 *     const result = await followRun(handle, (s) => console.log(s.phase, s.current_step_name));
 *
 * The pipeline format, RunStatus and RunResult are those of the Python plugin, generated from its models (see
 * schema/pipeline.schema.json and src/generated/types.ts). Runs are executed by Python workers.
 */
export type * from "./generated/types.js";
export { checkSources, type LoadedPipeline, loadPipeline, PipelineError, parsePipeline } from "./pipeline.js";
export { decodeMessage, type Messages, pipelineSchema } from "./schema.js";
export {
  cancelRun,
  DEFAULT_TASK_QUEUE,
  defaultStoreUrl,
  followRun,
  getPipelineHandle,
  getResult,
  getStatus,
  needsStaging,
  newWorkflowId,
  type PipelineHandle,
  RunFailedError,
  STATUS_QUERY,
  type StartOptions,
  stagePipeline,
  startPipeline,
  WORKFLOW_TYPE,
} from "./client.js";
export {
  CodecError,
  KeylessCodec,
  keyId,
  keysFromEnv,
  parseKeys,
  TardigradeCodec,
  tardigradeDataConverter,
} from "./codec.js";
