/**
 * Encrypted history, from Node: the same AES-256-GCM payload codec as the Python plugin (tardigrade/codec.py),
 * byte for byte, so a TypeScript client reads and writes the history of workers that have a codec key.
 *
 *     const client = new Client({ connection, dataConverter: tardigradeDataConverter() });  // TARDIGRADE_CODEC_KEY
 *
 * Keys: `TARDIGRADE_CODEC_KEY` (32 bytes, base64 or hex; several comma-separated to rotate: the first encrypts,
 * all decrypt) or `TARDIGRADE_CODEC_KEY_FILE` (one per line), or passed in. Each encrypted payload carries the id
 * of its key (a hash of it), so a client without the right key says which one it needs.
 *
 * Wire format: metadata `encoding: binary/encrypted`, `encryption-key-id: <16 hex>`, `encryption-cipher:
 * AES-256-GCM`; data = 12-byte nonce, then the AES-GCM ciphertext and 16-byte tag of the serialized inner Payload
 * protobuf, with additional data `tardigrade-codec-v1:<key id>`.
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import type { DataConverter, Payload } from "@temporalio/client";
import proto from "@temporalio/proto";

export const ENV_KEY = "TARDIGRADE_CODEC_KEY";
export const ENV_KEY_FILE = "TARDIGRADE_CODEC_KEY_FILE";
const ENCODING = "binary/encrypted";
const CIPHER = "AES-256-GCM";
const NONCE_BYTES = 12;
const TAG_BYTES = 16;
const KEY_BYTES = 32;
const AAD_PREFIX = "tardigrade-codec-v1:";
const ProtoPayload = proto.temporal.api.common.v1.Payload;

/** A key cannot be used, or a payload cannot be decrypted with the keys at hand. */
export class CodecError extends Error {
  override name = "CodecError";
}

const bytes = (text: string) => new TextEncoder().encode(text);
const text = (data: Uint8Array | null | undefined) => (data ? new TextDecoder().decode(data) : "");

/** The public name of a key, as the Python plugin computes it: reveals nothing of the key. */
export function keyId(key: Uint8Array): string {
  return createHash("sha256")
    .update(Buffer.concat([Buffer.from("tardigrade codec key id\0"), key]))
    .digest("hex")
    .slice(0, 16);
}

/** One key, as base64 (44 characters) or hex (64). */
export function parseKey(value: string, where: string): Buffer {
  const trimmed = value.trim();
  const key = /^[0-9a-fA-F]{64}$/.test(trimmed)
    ? Buffer.from(trimmed, "hex")
    : /^[A-Za-z0-9+/]+={0,2}$/.test(trimmed)
      ? Buffer.from(trimmed, "base64")
      : Buffer.alloc(0);
  if (key.length !== KEY_BYTES) {
    throw new CodecError(
      `${where}: a codec key must be ${KEY_BYTES} bytes written as base64 (44 characters) or hex (64); ` +
        "generate one with `tardigrade snapshot keygen` (or `openssl rand -base64 32`)",
    );
  }
  return key;
}

/** Keys separated by commas or newlines (`#` starts a comment), the current one first. */
export function parseKeys(value: string, where: string = ENV_KEY): Buffer[] {
  const items = value
    .split("\n")
    .flatMap((line) => line.split(","))
    .map((item) => item.split("#", 1)[0]!.trim())
    .filter((item) => item !== "");
  if (items.length === 0) throw new CodecError(`${where} holds no key; put the current key first, then any older ones`);
  return items.map((item, n) => parseKey(item, `${where} (key ${n + 1})`));
}

/** The keys TARDIGRADE_CODEC_KEY or TARDIGRADE_CODEC_KEY_FILE name, or undefined when neither is set. */
export function keysFromEnv(env: NodeJS.ProcessEnv = process.env): Buffer[] | undefined {
  const value = env[ENV_KEY]?.trim();
  const file = env[ENV_KEY_FILE]?.trim();
  if (value && file) throw new CodecError(`both ${ENV_KEY} and ${ENV_KEY_FILE} are set; set only one of them`);
  if (value) return parseKeys(value, ENV_KEY);
  if (file) {
    let content: string;
    try {
      content = readFileSync(file, "utf8");
    } catch (error) {
      throw new CodecError(`${ENV_KEY_FILE}=${file}: cannot read it (${(error as Error).message})`);
    }
    return parseKeys(content, `${ENV_KEY_FILE} (${file})`);
  }
  return undefined;
}

function isEncrypted(payload: Payload): boolean {
  return text(payload.metadata?.encoding) === ENCODING;
}

function payloadKeyId(payload: Payload): string {
  return text(payload.metadata?.["encryption-key-id"]) || "(none)";
}

/** AES-256-GCM over whole payloads; a `PayloadCodec` for `@temporalio/client`'s data converter. */
export class TardigradeCodec {
  readonly keyId: string;
  private readonly keys: Map<string, Buffer>;

  constructor(keys: Uint8Array[]) {
    if (keys.length === 0) throw new CodecError("a codec key set needs at least one key");
    this.keys = new Map(keys.map((k) => [keyId(k), Buffer.from(k)]));
    this.keyId = keyId(keys[0]!);
  }

  async encode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((payload) => {
      const nonce = randomBytes(NONCE_BYTES);
      const cipher = createCipheriv("aes-256-gcm", this.keys.get(this.keyId)!, nonce);
      cipher.setAAD(bytes(AAD_PREFIX + this.keyId));
      const inner = ProtoPayload.encode(payload).finish();
      const sealed = Buffer.concat([nonce, cipher.update(inner), cipher.final(), cipher.getAuthTag()]);
      return {
        metadata: {
          encoding: bytes(ENCODING),
          "encryption-key-id": bytes(this.keyId),
          "encryption-cipher": bytes(CIPHER),
        },
        data: sealed,
      };
    });
  }

  async decode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((payload) => {
      if (!isEncrypted(payload)) return payload; // written before encryption was turned on
      const id = payloadKeyId(payload);
      const key = this.keys.get(id);
      if (key === undefined) {
        throw new CodecError(
          `a payload is encrypted with codec key ${id}, which is not among this process's keys ` +
            `(${[...this.keys.keys()].join(", ")}); add that key after the current one (${ENV_KEY}=CURRENT,OLD)`,
        );
      }
      const data = payload.data ?? new Uint8Array();
      const cipherName = payload.metadata?.["encryption-cipher"];
      if ((cipherName && text(cipherName) !== CIPHER) || data.length < NONCE_BYTES + TAG_BYTES) {
        throw new CodecError(`a payload encrypted with codec key ${id} is malformed (unknown cipher or truncated)`);
      }
      const decipher = createDecipheriv("aes-256-gcm", key, data.subarray(0, NONCE_BYTES));
      decipher.setAAD(bytes(AAD_PREFIX + id));
      decipher.setAuthTag(data.subarray(data.length - TAG_BYTES));
      let inner: Buffer;
      try {
        inner = Buffer.concat([decipher.update(data.subarray(NONCE_BYTES, data.length - TAG_BYTES)), decipher.final()]);
      } catch {
        throw new CodecError(
          `a payload encrypted with codec key ${id} fails authentication: it was corrupted or tampered with`,
        );
      }
      const decoded = ProtoPayload.decode(inner);
      return { metadata: decoded.metadata, data: decoded.data };
    });
  }
}

/** Without a key: payloads pass as they are, and an encrypted one is an error saying which key to set. */
export class KeylessCodec {
  async encode(payloads: Payload[]): Promise<Payload[]> {
    return payloads;
  }

  async decode(payloads: Payload[]): Promise<Payload[]> {
    for (const payload of payloads) {
      if (isEncrypted(payload)) {
        throw new CodecError(
          `this run's history is encrypted (codec key ${payloadKeyId(payload)}) and no codec key is set here; ` +
            `set ${ENV_KEY} (or ${ENV_KEY_FILE}) to the workers' key, or pass keys to tardigradeDataConverter`,
        );
      }
    }
    return payloads;
  }
}

/**
 * A data converter for `new Client({ dataConverter })`: the Tardigrade codec with `keys` (default: from the
 * environment), after any `payloadCodecs` of your own (e.g. compression). Without a key, payloads pass unchanged
 * and reading encrypted history fails with a `CodecError` naming the key to set.
 */
export function tardigradeDataConverter(
  options: { keys?: Uint8Array[] | string; payloadCodecs?: DataConverter["payloadCodecs"] } = {},
): DataConverter {
  const keys = typeof options.keys === "string" ? parseKeys(options.keys, "keys") : (options.keys ?? keysFromEnv());
  const codec = keys?.length ? new TardigradeCodec(keys) : new KeylessCodec(); // keys: [] means none, whatever the env
  return { payloadCodecs: [...(options.payloadCodecs ?? []), codec] };
}
