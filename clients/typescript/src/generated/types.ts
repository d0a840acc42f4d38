/* Generated from schema/pipeline.schema.json by scripts/generate.mjs (npm run generate); do not edit.
 * Pipeline and Step describe a pipeline as written (durations may be text such as "5m"); RunStatus and RunResult
 * are what the workflow's status query and result return, every field present once decoded. */

/**
 * ``every: 1`` (the default) snapshots after every step; ``every: 5`` after every fifth step and the last.
 * A step's own ``checkpoint: true/false`` wins. A failure rolls back to the last checkpoint and re-runs the
 * steps after it.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "CheckpointPolicy".
 */
export type CheckpointPolicy =
  | ("every_step" | "end_only")
  | {
      /**
       * Snapshot after every N-th step (and the last).
       */
      every?: number;
    };
/**
 * One reply of a scripted model: text, tool calls, or both. Written in the pipeline file as
 *
 * - exec: {command: wc -l data.csv}                          # one call
 * - [read_file: {path: a.csv}, read_file: {path: b.csv}]      # several calls in one turn
 * - say: The numbers look right.                              # text, no calls
 * - finish: {summary: Wrote reports/triage.md}                # the last turn
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "ScriptedTurn".
 */
export type ScriptedTurn = ScriptedEntry | ScriptedEntry[];

/**
 * A Tardigrade pipeline: a Manifest (what the sandbox needs), a sandbox, and the steps to run in it. Every
 * step is a durable Temporal activity, and the sandbox's files are snapshotted after each one.
 */
export interface Pipeline {
  /**
   * Names the run (its workflow id starts with it).
   */
  name: string;
  /**
   * Free text.
   */
  description?: string;
  manifest?: Manifest;
  sandbox?: SandboxConfig;
  /**
   * Snapshot store URL (file://, s3://, r2://, gs://, az://); default: $TARDIGRADE_STORE, else a local folder.
   */
  store?: string | null;
  checkpoint?: CheckpointPolicy;
  timeouts?: Timeouts;
  /**
   * The steps, run in order.
   */
  steps: Step[];
  /**
   * Consecutive losses of the sandbox at one step before the run gives up.
   */
  max_rehydrations?: number;
  /**
   * Continue-as-new after this many steps, so history stays small.
   */
  steps_per_run?: number;
  /**
   * Paths published to object stores from checkpoints.
   */
  outputs?: Output[];
}
/**
 * What a sandbox needs, whichever provider runs it: files, folders, environment, secrets (by name), data
 * mounts, setup commands, and which paths snapshots cover.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "Manifest".
 */
export interface Manifest {
  /**
   * Files placed in the sandbox before setup: inline or copied from disk.
   */
  files?: ManifestFile[];
  /**
   * Folders to create; relative paths are inside /workspace, ~/ is /home/sandbox.
   */
  directories?: string[];
  /**
   * Environment variables of every command.
   */
  env?: {
    [k: string]: string | undefined;
  };
  /**
   * Secrets, read from the worker's environment: a name (its value goes into the sandbox's environment) or {name, hosts} (brokered: the sandbox sees a placeholder; the worker adds the value to HTTPS request headers for those hosts only).
   */
  secrets?: (string | SecretForHosts)[];
  /**
   * Commands run at provisioning, and again after every rehydration.
   */
  setup?: string[];
  /**
   * Buckets and folders the worker copies in, with its own credentials.
   */
  mounts?: Mount[];
  snapshot?: SnapshotPaths;
}
/**
 * A file placed in the sandbox before setup: inline ``content``, or ``source`` copied from the client's disk
 * (relative to the pipeline file). Contents travel through the snapshot store, never through workflow history.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "ManifestFile".
 */
export interface ManifestFile {
  /**
   * Where the file goes; relative paths are inside /workspace.
   */
  path: string;
  /**
   * The file's text, inline.
   */
  content?: string | null;
  /**
   * A local file to copy, relative to the pipeline file.
   */
  source?: string | null;
  /**
   * Set the exec bits (mode 755).
   */
  executable?: boolean;
}
/**
 * A brokered secret: the sandbox's environment holds an opaque placeholder, never the value; the worker's
 * egress proxy puts the value into the headers of HTTPS requests to ``hosts`` only (sandboxes/network/broker.py).
 * A plain name in ``secrets`` is the weaker mode: its value is in the sandbox's environment.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "SecretForHosts".
 */
export interface SecretForHosts {
  /**
   * The secret's name: the worker's environment variable holding its value.
   */
  name: string;
  /**
   * Hosts whose HTTPS requests get the value (api.github.com, *.example.com); no other host does.
   */
  hosts: string[];
}
/**
 * Data the worker copies into the sandbox before setup, with the worker's own credentials: none of them enters
 * the sandbox. ``ro`` (the default) is enforced by the sandbox (a read-only bind, or root-owned read-only files).
 * ``include``/``exclude`` are globs on object names relative to the source prefix (``*.csv``, ``2024/**``).
 * A mount is not part of any snapshot: it is copied in again (skipping unchanged objects) on rollback and
 * rehydration, so a step's writes into an ``rw`` mount do not survive a retry - write results elsewhere.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "Mount".
 */
export interface Mount {
  /**
   * The bucket or folder: s3://bucket/prefix[?endpoint=URL&region=NAME], r2://ACCOUNT_ID/bucket/prefix, gs://bucket/prefix, az://container/prefix?account=NAME or file:///absolute/folder.
   */
  source: string;
  /**
   * Where it appears in the sandbox; relative paths are inside /workspace.
   */
  path: string;
  /**
   * ro (read-only, the default) or rw.
   */
  mode?: "ro" | "rw";
  /**
   * Globs on object names, e.g. *.csv.
   */
  include?: string[];
  /**
   * Globs on object names left out.
   */
  exclude?: string[];
}
/**
 * What a snapshot covers. ``include`` are sandbox paths (``~/.local``, ``/workspace``); ``exclude`` are
 * globs: ``** /.cache`` anywhere, ``/workspace/tmp/**`` absolute, ``build/**`` relative to the workspace.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "SnapshotPaths".
 */
export interface SnapshotPaths {
  /**
   * Sandbox paths the snapshots cover (default: /workspace).
   */
  include?: string[];
  /**
   * Globs left out: ** /.cache anywhere, /workspace/tmp/** absolute, build/**.
   */
  exclude?: string[];
}
/**
 * ``provider`` is one name or a preference list (``[local, e2b]``): a run provisions on the first one the
 * worker offers, and after losing a sandbox is rehydrated on the next (see sandboxes/provider_choice.py).
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "SandboxConfig".
 */
export interface SandboxConfig {
  /**
   * Where sandboxes run: local, e2b, modal, daytona, runloop, vercel, blaxel, cloudflare (local is bubblewrap on the worker), an installed provider's entry-point name (acme.vm), or a preference list such as [local, e2b].
   */
  provider?:
    | ("local" | "e2b" | "modal" | "daytona" | "runloop" | "vercel" | "blaxel" | "cloudflare")
    | string
    | (("local" | "e2b" | "modal" | "daytona" | "runloop" | "vercel" | "blaxel" | "cloudflare") | string)[];
  /**
   * false: no network (the default); true: the internet, never the worker or its private networks; {allow: [pypi.org, '*.github.com']}: only those hosts, through the worker's egress proxy.
   */
  network?: boolean | NetworkAllow;
  /**
   * required: refuse to run without bubblewrap; preferred: run unisolated, with a loud warning.
   */
  isolation?: "required" | "preferred";
  /**
   * Provider-specific settings (sandboxes/provider_options.py): local takes none; e2b takes template, lifetime, native_snapshot; modal takes image, cpu, memory, app, lifetime, native_snapshot; daytona takes snapshot, image, cpu, memory, disk, auto_stop_interval, native_snapshot; runloop takes blueprint, resource_size, keep_alive, idle_suspend, native_snapshot; vercel takes image, vcpus, memory, region, lifetime, native_snapshot; blaxel takes image, memory, region, idle_ttl, native_snapshot; cloudflare takes native_snapshot, backup_ttl.
   */
  options?: {
    [k: string]: unknown | undefined;
  };
  limits?: Limits;
}
/**
 * ``network: {allow: [...]}``: the hosts a sandbox may reach (sandboxes/network/rules.py).
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "NetworkAllow".
 */
export interface NetworkAllow {
  /**
   * Hosts the sandbox may reach through the worker's egress proxy: names (pypi.org), `*.` suffix rules (*.github.com) or IP addresses.
   */
  allow: string[];
}
/**
 * What one sandbox may use. A field left out is None and means its default (`resolved`); the difference
 * matters under a worker's ceilings, which lower a default but refuse a value the pipeline asked for (`within`).
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "Limits".
 */
export interface Limits {
  /**
   * Memory of the step's processes together (default 4GiB).
   */
  memory?: (number | string) | null;
  /**
   * Processes and threads at once (default 512).
   */
  pids?: number | null;
  /**
   * Cores, e.g. 0.5 or 2 (default: no cap).
   */
  cpu?: number | null;
  /**
   * Bytes in /workspace and ~ together (default 20GiB).
   */
  disk?: (number | string) | null;
  /**
   * Size of the private /tmp, a tmpfs in memory (default 1GiB).
   */
  tmp?: (number | string) | null;
}
/**
 * How long Tardigrade waits before it presumes something lost, or gives up.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "Timeouts".
 */
export interface Timeouts {
  /**
   * A worker that stops heartbeating this long is presumed dead.
   */
  heartbeat?: number | string;
  /**
   * A sandbox whose worker does not pick up work this long is presumed lost.
   */
  host_pickup?: number | string;
  /**
   * Creating a sandbox, including setup commands.
   */
  provision?: number | string;
  /**
   * Taking one snapshot.
   */
  checkpoint?: number | string;
  /**
   * How long a run waits out an outage of its snapshot store (unreachable, throttling, full), retrying with backoff, before it fails. The run keeps its sandbox meanwhile.
   */
  outage?: number | string;
}
/**
 * One unit of work and of atomicity: it completes and is checkpointed, or it never happened. A shell command
 * (`run:`) or a task for an LLM agent (`agent:` with `model:`).
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "Step".
 */
export interface Step {
  /**
   * Shown in status, logs and the Web UI.
   */
  name: string;
  /**
   * A shell command, run as `sh -c` in `cwd` (default /workspace).
   */
  run?: string | null;
  /**
   * Instructions for an LLM agent that works with tools in the sandbox.
   */
  agent?: string | null;
  /**
   * Agent steps: which model answers.
   */
  model?: ModelConfig | null;
  /**
   * Agent steps: the tools offered (default: exec, read_file, write_file, list_files), and the names of function tools registered on the workers (TardigradePlugin(tools=[...])).
   */
  tools?: (("exec" | "read_file" | "write_file" | "list_files" | "apply_patch") | string)[] | null;
  /**
   * Agent steps: model calls before the step fails (default 50).
   */
  max_turns?: number | null;
  /**
   * Agent steps: per model call.
   */
  max_output_tokens?: number | null;
  /**
   * Agent steps: when the agent is done - it calls finish(summary) (the default), or replies without tool calls.
   */
  done?: ("finish" | "no_tool_calls") | null;
  /**
   * The command (or the whole agent step) is killed after it.
   */
  timeout?: number | string;
  /**
   * Environment variables of this step only.
   */
  env?: {
    [k: string]: string | undefined;
  };
  /**
   * Working directory, inside /workspace or ~.
   */
  cwd?: string;
  /**
   * On a non-zero exit, roll back to the last checkpoint and try again.
   */
  retries?: number;
  /**
   * Wait before a retry; doubles with every retry.
   */
  retry_backoff?: number | string;
  /**
   * Snapshot after this step (true/false; default: the pipeline's `checkpoint:`). Agent steps may say every_tool_call: a snapshot after each tool call that may change files.
   */
  checkpoint?: boolean | "every_tool_call" | null;
}
/**
 * Which model answers. ``provider: openai`` (the default) is any OpenAI-compatible endpoint: the key is read
 * from the worker's environment (``api_key_env``, default OPENAI_API_KEY) and the endpoint from ``base_url`` or
 * the worker's OPENAI_BASE_URL. ``provider: scripted`` replays ``script`` instead and needs no key or network;
 * with ``provider: openai`` a script is ignored, so a pipeline can keep one for offline runs.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "ModelConfig".
 */
export interface ModelConfig {
  /**
   * openai: any OpenAI-compatible endpoint; scripted: replay `script` offline.
   */
  provider?: "openai" | "scripted";
  /**
   * The model, e.g. gpt-4.1-mini.
   */
  name?: string | null;
  /**
   * chat_completions for servers without the Responses API.
   */
  api?: "responses" | "chat_completions";
  /**
   * The endpoint, e.g. http://127.0.0.1:8000/v1 (default: the worker's OPENAI_BASE_URL).
   */
  base_url?: string | null;
  /**
   * The worker's environment variable holding the key.
   */
  api_key_env?: string;
  temperature?: number | null;
  /**
   * One model call, in seconds.
   */
  request_timeout?: number;
  /**
   * Per model call, for 408/409/429/5xx and network errors.
   */
  max_attempts?: number;
  /**
   * provider scripted: the replies to replay, one turn per entry, finish last.
   */
  script?: ScriptedTurn[] | null;
}
/**
 * One entry of a scripted turn: a tool call (`exec: {command: ls}`) or text (`say: ...`).
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "ScriptedEntry".
 */
export interface ScriptedEntry {
  /**
   * Text the model replies with.
   */
  say?: string;
  exec?: ExecArgs;
  read_file?: ReadFileArgs;
  write_file?: WriteFileArgs;
  list_files?: ListFilesArgs;
  apply_patch?: ApplyPatchArgs;
  finish?: FinishArgs;
}
/**
 * Run a shell command (sh -c) in the sandbox's working directory. Returns its exit code and output.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "ExecArgs".
 */
export interface ExecArgs {
  /**
   * the shell command, e.g. `wc -l data/raw/*.csv`
   */
  command: string;
  /**
   * kill it after this long (default 300)
   */
  timeout_seconds?: number | null;
}
/**
 * Read a text file. Long files are cut; read parts of them with exec (sed -n, head, tail).
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "ReadFileArgs".
 */
export interface ReadFileArgs {
  /**
   * relative to /workspace, or absolute under /workspace or ~
   */
  path: string;
}
/**
 * Create or overwrite a file with the given text. Parent folders are created.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "WriteFileArgs".
 */
export interface WriteFileArgs {
  /**
   * relative to /workspace, or absolute under /workspace or ~
   */
  path: string;
  /**
   * the whole new content of the file
   */
  content: string;
}
/**
 * List the files and folders under a path, with sizes.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "ListFilesArgs".
 */
export interface ListFilesArgs {
  /**
   * the folder to list, relative to /workspace
   */
  path?: string;
  /**
   * how many levels down to go
   */
  depth?: number;
}
/**
 * Edit files with a patch: '*** Begin Patch', then '*** Add File: P' (lines start with +), '*** Delete
 * File: P', or '*** Update File: P' with '@@' hunks of ' ' context, '-' removed and '+' added lines, then
 * '*** End Patch'.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "ApplyPatchArgs".
 */
export interface ApplyPatchArgs {
  /**
   * the patch text, from *** Begin Patch to *** End Patch
   */
  patch: string;
}
/**
 * Call this once the task is complete: the step ends and the summary is recorded.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "FinishArgs".
 */
export interface FinishArgs {
  /**
   * what was done, for the people running the pipeline
   */
  summary: string;
}
/**
 * A sandbox path (a file or a folder) published to an object-store prefix after a step or at the end.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "Output".
 */
export interface Output {
  /**
   * A sandbox path (file or folder) in the snapshots.
   */
  path: string;
  /**
   * An object-store prefix; may contain {run}, {step} and {pipeline}.
   */
  to: string;
  /**
   * end (the default), each_step (every checkpoint), or the name of a step.
   */
  after?: string;
  /**
   * Globs of files to publish.
   */
  include?: string[];
  /**
   * Globs of files left out.
   */
  exclude?: string[];
}
/**
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "AgentProgress".
 */
export interface AgentProgress {
  step: number;
  turn: number;
  max_turns: number;
  tool_calls: number;
}
/**
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "AgentReport".
 */
export interface AgentReport {
  step: number;
  turns: number;
  tool_calls: number;
  usage: TokenUsage;
  finished: boolean;
  summary: string;
  conversation: string | null;
}
/**
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "TokenUsage".
 */
export interface TokenUsage {
  input_tokens: number;
  output_tokens: number;
  model_calls: number;
}
/**
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "CheckpointRecord".
 */
export interface CheckpointRecord {
  step: number;
  snapshot_id: string;
  turn: number | null;
}
/**
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "OutputRecord".
 */
export interface OutputRecord {
  index: number;
  step: number | null;
  destination: string;
  snapshot_id: string;
  files: number;
  bytes: number;
  created: number;
  manifest: string;
}
/**
 * The workflow's input: a pipeline whose Manifest files were already staged in the store as a seed snapshot.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "RunInput".
 */
export interface RunInput {
  /**
   * The pipeline, its Manifest files already staged.
   */
  pipeline: Pipeline;
  store: string;
  seed_snapshot?: string | null;
  /**
   * The workflow's own, set when it continues as new; clients leave it out.
   */
  state?: null;
  /**
   * Fork: start after this snapshot's step, with its files, instead of at step 1.
   */
  start?: StartPoint | null;
  /**
   * The namespace has Tardigrade's search attributes registered: the run keeps TardigradeStep and TardigradePhase up to date (see workflows/search_attributes.py).
   */
  search_attributes?: boolean;
}
/**
 * Where a fork starts: a recorded snapshot (of another run, or any snapshot in the store) and the step it was
 * taken after. The run restores it into a new sandbox and goes on with the step after that one.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "StartPoint".
 */
export interface StartPoint {
  snapshot: SnapshotRef;
  /**
   * What the user named: RUN:STEP or a snapshot id, for people reading history.
   */
  source: string;
}
/**
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "SnapshotRef".
 */
export interface SnapshotRef {
  snapshot_id: string;
  digest: string;
  step: number;
  files: number;
  bytes: number;
  bytes_new: number;
  seconds: number;
  native: string | null;
  native_provider: string | null;
}
/**
 * What a completed run returns.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "RunResult".
 */
export interface RunResult {
  workflow_id: string;
  /**
   * The pipeline's name.
   */
  pipeline: string;
  /**
   * completed (a failed or cancelled run raises instead of returning).
   */
  status: string;
  steps_total: number;
  steps_completed: number;
  /**
   * Step activities started, retries and re-runs after a loss included.
   */
  step_runs: number;
  /**
   * How many times a lost sandbox was replaced.
   */
  rehydrations: number;
  /**
   * The snapshot of the workspace after the last step.
   */
  final_snapshot: string | null;
  /**
   * Identifies the final files: equal for runs that left equal workspaces, crashed or not.
   */
  workspace_digest: string | null;
  /**
   * The Manifest's files and folders, staged before the run.
   */
  seed_snapshot: string | null;
  /**
   * The snapshot store's URL.
   */
  store: string;
  /**
   * The snapshots taken, in order (step -1: after setup).
   */
  checkpoints: CheckpointRecord[];
  usage: TokenUsage;
  /**
   * The last run of each agent step.
   */
  agents: AgentReport[];
  /**
   * Outputs published.
   */
  outputs: OutputRecord[];
  /**
   * Every provider the run's sandboxes ran on, in order.
   */
  providers: string[];
}
/**
 * Where a run is: the answer to the workflow's ``status`` query.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "RunStatus".
 */
export interface RunStatus {
  workflow_id: string;
  /**
   * The pipeline's name.
   */
  pipeline: string;
  /**
   * starting | provisioning | running | checkpointing | rolling back | rehydrating | waiting for the store | publishing outputs | completed | failed | cancelled
   */
  phase: string;
  /**
   * 1-based, for people; null before the first step.
   */
  current_step: number | null;
  current_step_name: string | null;
  steps_total: number;
  steps_completed: number;
  /**
   * How many times a lost sandbox was replaced.
   */
  rehydrations: number;
  /**
   * The live sandbox, if there is one.
   */
  sandbox: SandboxRef | null;
  /**
   * The last checkpoint: what a retry or rehydration restores.
   */
  last_snapshot: SnapshotRef | null;
  /**
   * The snapshots taken so far (step -1: after setup).
   */
  checkpoints: CheckpointRecord[];
  /**
   * The last loss or failed attempt, if any.
   */
  last_error: string | null;
  /**
   * What the run is waiting out right now, e.g. 'waiting for the store: <cause>'; null otherwise.
   */
  waiting_for: string | null;
  usage: TokenUsage;
  /**
   * The agent step running now, if any.
   */
  agent: AgentProgress | null;
}
/**
 * A live sandbox and where its activities must run.
 *
 * This interface was referenced by `Pipeline`'s JSON-Schema
 * via the `definition` "SandboxRef".
 */
export interface SandboxRef {
  provider: string;
  sandbox_id: string;
  task_queue: string;
  host_bound: boolean;
  worker: string;
}
