/**
 * Tardigrade's Cloudflare bridge: a Worker that exposes Cloudflare's sandbox SDK (`@cloudflare/sandbox`) over
 * authenticated HTTP, because the SDK only runs inside a Worker and Tardigrade's workers are Python processes
 * (sandboxes/cloudflare.py is the client). The protocol is documented in README.md; the Python client, the local
 * fake of this bridge (tests/fake_cloudflare_bridge.py) and the ROUTES table below must name the same routes
 * (tests/test_cloudflare.py parses this table to check it).
 *
 * The bridge is deliberately dumb: every command runs as root in the container and the Python side decides who a
 * command runs as (it drops to uid 1000 with setpriv), where the helper files go and how the portable snapshot
 * mirror works. What the bridge adds is what only a Worker can know: which sandbox ids it created (Durable Object
 * storage), whether a sandbox's container still has the disk it was created with (a root-only boot marker: a
 * container that slept or crashed comes back empty, and that is a lost sandbox, never a silently fresh one), its
 * network policy (set before the container first starts), and Cloudflare's native directory backups (R2).
 */

import {
  Sandbox as SdkSandbox,
  getSandbox,
  parseSSEStream,
  streamFile,
  type DirectoryBackup,
  type ExecEvent,
  type SandboxOptions,
} from "@cloudflare/sandbox";

/** What a sandbox may reach: nothing (default), everything, or the named hosts only. */
export interface NetworkPolicy {
  internet: boolean;
  allowedHosts: string[];
}

interface BridgeState {
  created: boolean;
  network: NetworkPolicy;
}

const STATE_KEY = "tardigrade:bridge";
/** Root-only, outside every path Tardigrade snapshots: a container that lost its disk has no marker. */
const BOOT_DIR = "/var/lib/tardigrade-bridge";
const BOOT_MARKER = `${BOOT_DIR}/boot-id`;

/**
 * The Sandbox Durable Object, with the bridge's own bookkeeping. Internet is off unless the sandbox was created
 * with it: `enableInternet` is read when the container starts, so the policy is stored before the first command.
 */
export class Sandbox extends SdkSandbox<Env> {
  enableInternet = false;
  private bridgeState: BridgeState | undefined;

  constructor(ctx: DurableObjectState<{}>, env: Env) {
    super(ctx, env);
    void ctx.blockConcurrencyWhile(async () => {
      this.bridgeState = await ctx.storage.get<BridgeState>(STATE_KEY);
      if (this.bridgeState) this.applyNetwork(this.bridgeState.network);
    });
  }

  /** Record that the bridge made this sandbox, and its network policy (before its container starts). */
  async tardigradeCreate(network: NetworkPolicy): Promise<void> {
    this.bridgeState = { created: true, network };
    await this.ctx.storage.put(STATE_KEY, this.bridgeState);
    this.applyNetwork(network);
    if (!network.internet && network.allowedHosts.length > 0) await this.setAllowedHosts(network.allowedHosts);
  }

  /** Off: no internet; an allowlist: only those hosts (Cloudflare's globs, ports 80 and 443); on: everything.
   * Restored from storage whenever the object is rebuilt, so a policy never silently widens or vanishes. */
  private applyNetwork(network: NetworkPolicy): void {
    this.enableInternet = network.internet;
    this.allowedHosts = network.internet || network.allowedHosts.length === 0 ? undefined : network.allowedHosts;
  }

  /** Whether the bridge made this sandbox and whether its container is running now (without starting it). */
  async tardigradeInfo(): Promise<{ created: boolean; status: string }> {
    const state = await this.getState();
    return { created: this.bridgeState?.created === true, status: state.status };
  }

  /** Forget it: the next call for this id finds no sandbox. */
  async tardigradeForget(): Promise<void> {
    this.bridgeState = undefined;
    await this.ctx.storage.delete(STATE_KEY);
  }
}

export interface Env {
  Sandbox: DurableObjectNamespace<Sandbox>;
  /** The bearer token clients must send (`wrangler secret put BRIDGE_TOKEN`). */
  BRIDGE_TOKEN: string;
  /** Optional: how long an idle sandbox's container lives (default "30m"); past it, the sandbox is lost. */
  SLEEP_AFTER?: string;
  /** Optional R2 bucket for native backups (the SDK reads BACKUP_BUCKET and its R2 credentials). */
  BACKUP_BUCKET?: R2Bucket;
}

// -- the protocol ---------------------------------------------------------------------------------------------

type Handler = (ctx: RequestContext) => Promise<Response>;

interface RequestContext {
  request: Request;
  env: Env;
  params: Record<string, string>;
  url: URL;
}

interface Route {
  method: string;
  pattern: string;
  handler: Handler;
}

function route(method: string, pattern: string, handler: Handler): Route {
  return { method, pattern, handler };
}

/** Every route of the protocol (README.md documents each; tests/test_cloudflare.py reads this table). */
export const ROUTES: Route[] = [
  route("POST", "/v1/sandboxes", createSandbox),
  route("GET", "/v1/sandboxes/:id", describeSandbox),
  route("DELETE", "/v1/sandboxes/:id", destroySandbox),
  route("POST", "/v1/sandboxes/:id/exec", execCommand),
  route("GET", "/v1/sandboxes/:id/files", readFile),
  route("PUT", "/v1/sandboxes/:id/files", writeFile),
  route("GET", "/v1/sandboxes/:id/list", listFiles),
  route("GET", "/v1/sandboxes/:id/tar", tarOut),
  route("PUT", "/v1/sandboxes/:id/tar", tarIn),
  route("POST", "/v1/sandboxes/:id/backups", createBackups),
  route("POST", "/v1/sandboxes/:id/restore", restoreBackups),
];

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

function json(body: unknown, status = 200): Response {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });
}

function errorResponse(status: number, code: string, message: string): Response {
  return json({ error: code, message }, status);
}

/** Constant-time comparison of the presented token with the secret (through SHA-256, so lengths do not leak). */
async function authorized(request: Request, secret: string | undefined): Promise<boolean> {
  if (!secret) return false;
  const header = request.headers.get("authorization") ?? "";
  const presented = header.startsWith("Bearer ") ? header.slice("Bearer ".length) : "";
  const encoder = new TextEncoder();
  const [a, b] = await Promise.all([
    crypto.subtle.digest("SHA-256", encoder.encode(presented)),
    crypto.subtle.digest("SHA-256", encoder.encode(secret)),
  ]);
  return crypto.subtle.timingSafeEqual(a, b);
}

function match(pattern: string, path: string): Record<string, string> | null {
  const want = pattern.split("/");
  const got = path.split("/");
  if (want.length !== got.length) return null;
  const params: Record<string, string> = {};
  for (let i = 0; i < want.length; i++) {
    if (want[i].startsWith(":")) {
      if (!/^[a-z0-9-]{1,64}$/.test(got[i])) return null;
      params[want[i].slice(1)] = got[i];
    } else if (want[i] !== got[i]) {
      return null;
    }
  }
  return params;
}

function sandboxOptions(env: Env): SandboxOptions {
  // Each command is a process of its own (no shared shell): a reaper must be able to run beside a hung command.
  return { sleepAfter: env.SLEEP_AFTER ?? "30m", enableDefaultSession: false, normalizeId: true };
}

function stub(env: Env, id: string): Sandbox {
  return getSandbox(env.Sandbox, id, sandboxOptions(env));
}

function shellQuote(value: string): string {
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

function absolutePath(value: string | null, field: string): string {
  if (!value || !value.startsWith("/") || value.includes("\0")) {
    throw new HttpError(400, "bad_request", `${field} must be an absolute path`);
  }
  return value;
}

/** The sandbox, if the bridge created it and its container still has the disk it was created with. */
async function existing(env: Env, id: string): Promise<Sandbox> {
  const sandbox = stub(env, id);
  const info = await sandbox.tardigradeInfo();
  if (!info.created) throw new HttpError(404, "sandbox_not_found", `no sandbox ${id}`);
  if (info.status !== "running" && info.status !== "healthy") {
    throw new HttpError(404, "sandbox_not_found", `sandbox ${id}: its container is ${info.status}, its disk is gone`);
  }
  const marker = await sandbox.exec(`cat ${BOOT_MARKER} 2>/dev/null`, { origin: "internal" });
  if (marker.stdout.trim() !== id) {
    await sandbox.tardigradeForget();
    await sandbox.destroy();
    throw new HttpError(404, "sandbox_not_found", `sandbox ${id}: its container was replaced, its disk is gone`);
  }
  return sandbox;
}

async function runRoot(sandbox: Sandbox, command: string, doing: string): Promise<string> {
  const result = await sandbox.exec(command, { origin: "internal" });
  if (result.exitCode !== 0) {
    throw new HttpError(500, "command_failed", `${doing} failed (exit ${result.exitCode}): ${result.stderr.slice(-2000)}`);
  }
  return result.stdout;
}

// -- handlers -------------------------------------------------------------------------------------------------

async function createSandbox({ request, env }: RequestContext): Promise<Response> {
  const body = (await request.json().catch(() => ({}))) as { network?: Partial<NetworkPolicy> };
  const network: NetworkPolicy = {
    internet: body.network?.internet === true,
    allowedHosts: (body.network?.allowedHosts ?? []).filter((h): h is string => typeof h === "string"),
  };
  const id = crypto.randomUUID();
  const sandbox = stub(env, id);
  await sandbox.tardigradeCreate(network);
  await runRoot(
    sandbox,
    `mkdir -p ${BOOT_DIR} && chmod 700 ${BOOT_DIR} && printf %s ${shellQuote(id)} > ${BOOT_MARKER}`,
    "marking the new sandbox",
  );
  return json({ id }, 201);
}

async function describeSandbox({ env, params }: RequestContext): Promise<Response> {
  await existing(env, params.id);
  return json({ id: params.id, alive: true });
}

async function destroySandbox({ env, params }: RequestContext): Promise<Response> {
  const sandbox = stub(env, params.id);
  const info = await sandbox.tardigradeInfo();
  if (!info.created) throw new HttpError(404, "sandbox_not_found", `no sandbox ${params.id}`);
  await sandbox.tardigradeForget();
  await sandbox.destroy();
  return json({ id: params.id, destroyed: true });
}

/**
 * Run a command as root and stream its output as NDJSON lines: {"stream":"stdout"|"stderr","data":text}, ending
 * with {"exit_code":n}, or {"error":code,"message":text} if the sandbox failed under it.
 */
async function execCommand({ request, env, params }: RequestContext): Promise<Response> {
  const body = (await request.json()) as { command?: unknown; env?: unknown; cwd?: unknown; timeout_ms?: unknown };
  if (typeof body.command !== "string") throw new HttpError(400, "bad_request", "command must be a string");
  const commandEnv: Record<string, string> = {};
  for (const [k, v] of Object.entries((body.env as Record<string, unknown>) ?? {})) {
    if (typeof v === "string") commandEnv[k] = v;
  }
  const cwd = typeof body.cwd === "string" ? body.cwd : "/";
  const timeout = typeof body.timeout_ms === "number" ? body.timeout_ms : undefined;
  const sandbox = await existing(env, params.id);
  const abort = new AbortController();
  const events = await sandbox.execStream(body.command, { env: commandEnv, cwd, timeout, signal: abort.signal });
  const encoder = new TextEncoder();
  const output = new ReadableStream<Uint8Array>({
    async start(controller) {
      const send = (line: unknown) => controller.enqueue(encoder.encode(JSON.stringify(line) + "\n"));
      try {
        for await (const event of parseSSEStream<ExecEvent>(events, abort.signal)) {
          if (event.type === "stdout" || event.type === "stderr") {
            send({ stream: event.type, data: event.data ?? "" });
          } else if (event.type === "complete") {
            send({ exit_code: event.exitCode ?? event.result?.exitCode ?? -1 });
          } else if (event.type === "error") {
            send({ error: "exec_failed", message: event.error ?? "the command failed to run" });
          }
        }
      } catch (e) {
        send({ error: "exec_failed", message: String(e) });
      }
      controller.close();
    },
    cancel() {
      abort.abort(); // the client went away (a kill): stop following; its reaper kills the processes
    },
  });
  return new Response(output, { headers: { "content-type": "application/x-ndjson" } });
}

async function streamBytes(sandbox: Sandbox, path: string): Promise<Response> {
  const exists = await sandbox.exists(path);
  if (!exists.exists) throw new HttpError(404, "file_not_found", `${path}: no such file`);
  const source = await sandbox.readFileStream(path);
  const encoder = new TextEncoder();
  const body = new ReadableStream<Uint8Array>({
    async start(controller) {
      try {
        for await (const chunk of streamFile(source)) {
          controller.enqueue(typeof chunk === "string" ? encoder.encode(chunk) : chunk);
        }
        controller.close();
      } catch (e) {
        controller.error(e);
      }
    },
  });
  return new Response(body, { headers: { "content-type": "application/octet-stream" } });
}

async function readFile({ env, params, url }: RequestContext): Promise<Response> {
  const path = absolutePath(url.searchParams.get("path"), "path");
  return streamBytes(await existing(env, params.id), path);
}

async function writeFile({ request, env, params, url }: RequestContext): Promise<Response> {
  const path = absolutePath(url.searchParams.get("path"), "path");
  const sandbox = await existing(env, params.id);
  await sandbox.writeFile(path, request.body ?? new ReadableStream<Uint8Array>({ start: (c) => c.close() }));
  return new Response(null, { status: 204 });
}

async function listFiles({ env, params, url }: RequestContext): Promise<Response> {
  const path = absolutePath(url.searchParams.get("path"), "path");
  const sandbox = await existing(env, params.id);
  const exists = await sandbox.exists(path);
  if (!exists.exists) throw new HttpError(404, "file_not_found", `${path}: no such directory`);
  const recursive = url.searchParams.get("recursive") === "1";
  const listed = await sandbox.listFiles(path, { recursive, includeHidden: true });
  const files = listed.files.map((f) => ({ path: f.absolutePath, type: f.type, size: f.size, mode: f.mode }));
  return json({ path, files });
}

/** A folder as one tar stream (numeric owners, exact modes): the portable snapshot mirror's transfer unit. */
async function tarOut({ env, params, url }: RequestContext): Promise<Response> {
  const dir = absolutePath(url.searchParams.get("path"), "path");
  const sandbox = await existing(env, params.id);
  const archive = `${BOOT_DIR}/out-${crypto.randomUUID()}.tar`;
  await runRoot(sandbox, `tar --numeric-owner --format=posix -C ${shellQuote(dir)} -cf ${archive} .`, `packing ${dir}`);
  const response = await streamBytes(sandbox, archive);
  // The archive is removed once the client has it; a sandbox that dies first takes it along.
  const cleanup = new TransformStream<Uint8Array, Uint8Array>({
    async flush() {
      await sandbox.exec(`rm -f ${archive}`, { origin: "internal" });
    },
  });
  return new Response(response.body!.pipeThrough(cleanup), { headers: response.headers });
}

/** Unpack a tar stream into a folder as root, keeping its owners and modes. */
async function tarIn({ request, env, params, url }: RequestContext): Promise<Response> {
  const dir = absolutePath(url.searchParams.get("path"), "path");
  const sandbox = await existing(env, params.id);
  const archive = `${BOOT_DIR}/in-${crypto.randomUUID()}.tar`;
  await sandbox.writeFile(archive, request.body ?? new ReadableStream<Uint8Array>({ start: (c) => c.close() }));
  await runRoot(
    sandbox,
    `mkdir -p ${shellQuote(dir)} && tar -xpf ${archive} --numeric-owner --same-owner -C ${shellQuote(dir)};` +
      ` code=$?; rm -f ${archive}; exit $code`,
    `unpacking into ${dir}`,
  );
  return new Response(null, { status: 204 });
}

/** Cloudflare's native backups (squashfs archives in R2) of the given folders. */
async function createBackups({ request, env, params }: RequestContext): Promise<Response> {
  const body = (await request.json()) as { dirs?: unknown; ttl?: unknown };
  if (!Array.isArray(body.dirs) || body.dirs.length === 0) throw new HttpError(400, "bad_request", "dirs: a list");
  const ttl = typeof body.ttl === "number" ? body.ttl : undefined;
  const sandbox = await existing(env, params.id);
  const backups: DirectoryBackup[] = [];
  for (const dir of body.dirs) {
    backups.push(await sandbox.createBackup({ dir: absolutePath(String(dir), "dirs"), ttl }));
  }
  return json({ backups: backups.map((b) => ({ id: b.id, dir: b.dir })) }, 201);
}

async function restoreBackups({ request, env, params }: RequestContext): Promise<Response> {
  const body = (await request.json()) as { backups?: unknown };
  if (!Array.isArray(body.backups)) throw new HttpError(400, "bad_request", "backups: a list of {id, dir}");
  const sandbox = await existing(env, params.id);
  for (const item of body.backups as { id?: unknown; dir?: unknown }[]) {
    const backup: DirectoryBackup = { id: String(item.id), dir: absolutePath(String(item.dir), "dir") };
    try {
      await sandbox.restoreBackup(backup);
    } catch (e) {
      const name = e instanceof Error ? e.name : "";
      if (name === "BackupNotFoundError" || name === "BackupExpiredError") {
        throw new HttpError(404, "backup_not_found", `backup ${backup.id}: ${String(e)}`);
      }
      throw e;
    }
  }
  return json({ restored: body.backups.length });
}

// -- the Worker -----------------------------------------------------------------------------------------------

export default {
  async fetch(request: Request, env: Env): Promise<Response> {
    if (!(await authorized(request, env.BRIDGE_TOKEN))) {
      return errorResponse(401, "unauthorized", "a valid bearer token is required (Authorization: Bearer ...)");
    }
    const url = new URL(request.url);
    for (const r of ROUTES) {
      const params = match(r.pattern, url.pathname);
      if (params === null) continue;
      if (r.method !== request.method) continue;
      try {
        return await r.handler({ request, env, params, url });
      } catch (e) {
        if (e instanceof HttpError) return errorResponse(e.status, e.code, e.message);
        return errorResponse(502, "sandbox_error", e instanceof Error ? `${e.name}: ${e.message}` : String(e));
      }
    }
    return errorResponse(404, "no_route", `no route ${request.method} ${url.pathname}`);
  },
} satisfies ExportedHandler<Env>;
