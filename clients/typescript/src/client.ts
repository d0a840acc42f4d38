/**
 * Start, follow and cancel Tardigrade pipeline runs from Node, with @temporalio/client.
 *
 * A run is the Python plugin's `TardigradePipeline` workflow, served by Python workers (`tardigrade worker`). Its
 * input, its `status` query and its result travel as pydantic JSON ("json/plain" payloads), which
 * @temporalio/client's default data converter writes and reads as plain JSON: nothing to configure.
 *
 * Staging. No file content ever enters workflow history: a Manifest's files and folders become a *seed snapshot*
 * in the snapshot store, and the workflow input carries only its id. Snapshots are written by the Python snapshot
 * engine (content-addressed, chunked, packed, optionally encrypted), which this package does not reimplement, so:
 *   - a pipeline with no `manifest.files` and no `manifest.directories` is started from Node alone;
 *   - one with them is staged by the Python CLI, `tardigrade stage` (pip install tardigrade-temporal), which runs
 *     exactly what the Python client runs: same seed snapshot, same workspace digest. `startPipeline` calls it.
 */
import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { homedir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import {
  CancelledFailure,
  type Client,
  TerminatedFailure,
  TimeoutFailure,
  type WorkflowHandle,
  WorkflowFailedError,
} from "@temporalio/client";
import { TardigradeCodec } from "./codec.js";
import type { Pipeline, RunInput, RunResult, RunStatus } from "./generated/types.js";
import { checkSources, type LoadedPipeline, PipelineError, parsePipeline } from "./pipeline.js";
import { decodeMessage } from "./schema.js";

/** The workflow type the Python plugin registers. */
export const WORKFLOW_TYPE = "TardigradePipeline";
/** The workflow's query answering with a `RunStatus`. */
export const STATUS_QUERY = "status";
export const DEFAULT_TASK_QUEUE = "tardigrade";

/** A started (or found) run: a Temporal workflow handle; `handle.workflowId` names the run. */
export type PipelineHandle = WorkflowHandle;

export interface StartOptions {
  /** The workers' task queue (default: $TARDIGRADE_TASK_QUEUE, else "tardigrade"). */
  taskQueue?: string;
  /** Default: the pipeline's name and a random suffix. */
  workflowId?: string;
  /** Snapshot store URL (default: the pipeline's `store`, else $TARDIGRADE_STORE, else a local folder). */
  store?: string;
  /** Where relative `source:` files are (default: the pipeline file's folder; for a `Pipeline`, the cwd). */
  baseDir?: string;
  /** The Python CLI that stages Manifest files (default: $TARDIGRADE_CLI, else `tardigrade` on the PATH). */
  tardigradeCli?: string;
}

/** A run ended without a result: it failed, was cancelled, terminated or timed out. */
export class RunFailedError extends Error {
  override name = "RunFailedError";
  constructor(
    message: string,
    readonly workflowId: string,
    readonly status: "failed" | "cancelled" | "terminated" | "timed out",
    /** The failure's type, e.g. StepFailed, TooManySandboxLosses, InvalidRunInput. */
    readonly failureType: string | undefined,
    options: { cause: unknown },
  ) {
    super(message, options);
  }
}

/** Stage the pipeline if it has Manifest files or folders, and start a run; returns its handle. */
export async function startPipeline(
  client: Client,
  pipeline: Pipeline | LoadedPipeline,
  options: StartOptions = {},
): Promise<PipelineHandle> {
  const input = await stagePipeline(pipeline, options);
  return client.workflow.start(WORKFLOW_TYPE, {
    args: [input],
    taskQueue: options.taskQueue ?? (process.env.TARDIGRADE_TASK_QUEUE || DEFAULT_TASK_QUEUE),
    // Workflow ids are never encrypted: with encrypted history, the default one does not name the pipeline.
    workflowId: options.workflowId ?? newWorkflowId(encrypts(client) ? "run" : input.pipeline.name),
    staticSummary: `pipeline ${input.pipeline.name} · ${input.pipeline.steps.length} steps`,
  });
}

function encrypts(client: Client): boolean {
  return client.options.loadedDataConverter.payloadCodecs.some((codec) => codec instanceof TardigradeCodec);
}

/** The handle of a run started elsewhere (by the Python CLI, say). */
export function getPipelineHandle(client: Client, workflowId: string): PipelineHandle {
  return client.workflow.getHandle(workflowId);
}

/** Where the run is now: the workflow's `status` query. Needs a worker to answer. */
export async function getStatus(handle: PipelineHandle): Promise<RunStatus> {
  return decodeMessage("RunStatus", await handle.query<unknown>(STATUS_QUERY));
}

/** Wait for the run to end (following continue-as-new) and return its result; a run that did not complete
 * rejects with a `RunFailedError` whose message is the failure's own (it names the step and says what to do). */
export async function getResult(handle: PipelineHandle): Promise<RunResult> {
  let value: unknown;
  try {
    value = await handle.result();
  } catch (error) {
    if (error instanceof WorkflowFailedError) throw runFailed(handle.workflowId, error);
    throw error;
  }
  return decodeMessage("RunResult", value);
}

/** Ask the run to stop: it kills its step, destroys its sandbox, keeps its last snapshot, and ends cancelled
 * (`getResult` then rejects with status "cancelled"). */
export async function cancelRun(handle: PipelineHandle): Promise<void> {
  await handle.cancel();
}

/** Call `onStatus` with the run's status every `intervalMs` until it ends; resolve with its result. */
export async function followRun(
  handle: PipelineHandle,
  onStatus: (status: RunStatus) => void,
  { intervalMs = 500 }: { intervalMs?: number } = {},
): Promise<RunResult> {
  const result = getResult(handle);
  let ended = false;
  const settled = result.then(
    () => (ended = true),
    () => (ended = true),
  );
  while (!ended) {
    let status: RunStatus | undefined;
    try {
      status = await getStatus(handle);
    } catch {
      // No worker answered yet, or the run ended meanwhile: the result says which.
    }
    if (status && !ended) onStatus(status);
    await Promise.race([settled, new Promise((wake) => setTimeout(wake, intervalMs))]);
  }
  return result;
}

/**
 * The workflow input for a pipeline: its Manifest files and folders staged as a seed snapshot (by the Python CLI,
 * `tardigrade stage`) when it has any, else built here.
 */
export async function stagePipeline(
  pipeline: Pipeline | LoadedPipeline,
  options: StartOptions = {},
): Promise<RunInput> {
  const loaded = "path" in pipeline && "pipeline" in pipeline ? pipeline : undefined;
  const data = loaded ? loaded.pipeline : parsePipeline(pipeline, `pipeline '${(pipeline as Pipeline).name}'`);
  const name = loaded ? loaded.path : `pipeline '${data.name}'`;
  const baseDir = resolve(options.baseDir ?? (loaded ? dirname(loaded.path) : process.cwd()));
  const relativeTo = loaded && options.baseDir === undefined ? "the pipeline file" : `baseDir (${baseDir})`;
  checkSources(data, baseDir, name, relativeTo);
  const store = options.store ?? data.store ?? defaultStoreUrl();
  if (!needsStaging(data)) return { pipeline: { ...data, store }, store, seed_snapshot: null };
  const cli = options.tardigradeCli ?? (process.env.TARDIGRADE_CLI || "tardigrade");
  const args = ["stage", "-", "--store", store, "--base-dir", baseDir, "--name", name];
  const { code, stdout, stderr } = await run(cli, args, JSON.stringify(data)).catch((e: NodeJS.ErrnoException) => {
    if (e.code !== "ENOENT") throw e;
    throw new Error(
      `${name} has Manifest files or folders, which are staged into the snapshot store by the Python CLI` +
        ` (\`tardigrade stage\`), and ${cli} was not found: install it (pip install tardigrade-temporal), or set` +
        " TARDIGRADE_CLI (or the tardigradeCli option) to its path",
    );
  });
  if (code !== 0) {
    // The CLI's last words are "error: <what to do>"; a problem with the pipeline starts with the name we gave it.
    const at = stderr.lastIndexOf("error: ");
    const said = (at >= 0 ? stderr.slice(at + "error: ".length) : stderr).trim();
    if (said.startsWith(`${name}: `)) throw new PipelineError(said);
    throw new Error(`\`tardigrade stage\` failed (exit code ${code}): ${said}`);
  }
  return JSON.parse(stdout) as RunInput;
}

/** Whether starting this pipeline needs the Python CLI: it has Manifest files or folders to stage. */
export function needsStaging(pipeline: Pipeline): boolean {
  return (pipeline.manifest?.files?.length ?? 0) > 0 || (pipeline.manifest?.directories?.length ?? 0) > 0;
}

/** The store the Python client uses by default: $TARDIGRADE_STORE, else `snapshots` in Tardigrade's state folder. */
export function defaultStoreUrl(): string {
  if (process.env.TARDIGRADE_STORE) return process.env.TARDIGRADE_STORE;
  const home = process.env.TARDIGRADE_HOME?.replace(/^~(?=$|\/)/, homedir());
  const state = home || join(process.env.XDG_STATE_HOME || join(homedir(), ".local", "state"), "tardigrade");
  return pathToFileURL(join(resolve(state), "snapshots")).href;
}

/** `nightly-orders-3f2a9c1b7e4d`, as the Python client names runs. */
export function newWorkflowId(pipelineName: string): string {
  const safe = [...pipelineName]
    .map((c) => (/[\p{L}\p{N}._-]/u.test(c) ? c : "-"))
    .join("")
    .slice(0, 60);
  return `${safe}-${randomUUID().replace(/-/g, "").slice(0, 12)}`;
}

function runFailed(workflowId: string, error: WorkflowFailedError): RunFailedError {
  // The innermost message says what to change ("step 3/40 · clean orders failed (exit code 1) ..."), as the
  // Python CLI prints it.
  let message = error.message;
  let failureType: string | undefined;
  let status: RunFailedError["status"] = "failed";
  for (let cause: unknown = error; cause instanceof Error; cause = cause.cause) {
    if (cause.message) message = cause.message;
    if (cause instanceof CancelledFailure) status = "cancelled";
    if (cause instanceof TerminatedFailure) status = "terminated";
    if (cause instanceof TimeoutFailure && cause === error.cause) status = "timed out";
    const type = (cause as { type?: unknown }).type;
    if (typeof type === "string" && type) failureType = type;
  }
  return new RunFailedError(`run ${workflowId} ${status}: ${message}`, workflowId, status, failureType, {
    cause: error,
  });
}

function run(
  command: string,
  args: string[],
  input: string,
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((done, fail) => {
    const child = spawn(command, args, { stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    child.on("error", fail);
    child.on("close", (code) => done({ code: code ?? 1, stdout, stderr }));
    // A CLI that exits early (bad arguments) closes its stdin: its exit code and stderr say why.
    child.stdin.on("error", () => undefined);
    child.stdin.end(input);
  });
}
