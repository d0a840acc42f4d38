/**
 * Encrypted history from TypeScript: the codec is byte-compatible with the Python plugin's both ways (checked
 * against the real Python code), rotates keys, and refuses what it cannot open with a message naming the key;
 * then, live, a pipeline started from TypeScript on a Python worker that holds the key completes, its history
 * holds no plaintext, and a client without the key is told which key to set.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { Client, type Payload } from "@temporalio/client";
import proto from "@temporalio/proto";
import {
  CodecError,
  getResult,
  KeylessCodec,
  keyId,
  keysFromEnv,
  parsePipeline,
  startPipeline,
  TardigradeCodec,
  tardigradeDataConverter,
} from "tardigrade-temporal";
import { CLI, python, type Services, startServices } from "./harness.js";

const { temporal } = proto;
const Payloads = temporal.api.common.v1.Payloads;
const newKey = () => randomBytes(32);
const utf8 = (value: string) => new TextEncoder().encode(value);
const plain: Payload = { metadata: { encoding: utf8("json/plain") }, data: utf8('{"pipeline": "okapi-ledger"}') };

/** Python's own codec (tardigrade/codec.py): `mode` is encode or decode; payloads travel as protobuf JSON. */
async function pythonCodec(mode: "encode" | "decode", keys: string, payloads: Payload[]): Promise<Payload[]> {
  const script = `
import asyncio, json, sys
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads
from tardigrade.codec import CodecKeys, EncryptionCodec
request = json.load(sys.stdin)
codec = EncryptionCodec(CodecKeys.parse(request["keys"]))
payloads = json_format.ParseDict(request["payloads"], Payloads()).payloads
out = asyncio.run(getattr(codec, request["mode"])(payloads))
print(json_format.MessageToJson(Payloads(payloads=out)))
`;
  const request = { mode, keys, payloads: Payloads.toObject(Payloads.create({ payloads }), { bytes: String }) };
  const answer = JSON.parse(await python(script, JSON.stringify(request)));
  return Payloads.fromObject(answer).payloads;
}

const text = (data: Uint8Array | null | undefined) => new TextDecoder().decode(data ?? new Uint8Array());

describe("the codec, against Python's", () => {
  test("Python encrypts, TypeScript decrypts; TypeScript encrypts, Python decrypts", async () => {
    const key = newKey();
    const codec = new TardigradeCodec([key]);
    const [fromPython] = await pythonCodec("encode", key.toString("base64"), [plain]);
    assert.equal(text(fromPython!.metadata!["encryption-key-id"]), keyId(key));
    assert.ok(!text(fromPython!.data).includes("okapi"));
    const [opened] = await codec.decode([fromPython!]);
    assert.equal(text(opened!.data), text(plain.data));
    assert.equal(text(opened!.metadata!.encoding), "json/plain");

    const [fromNode] = await codec.encode([plain]);
    assert.equal(text(fromNode!.metadata!.encoding), "binary/encrypted");
    const [back] = await pythonCodec("decode", key.toString("hex"), [fromNode!]);
    assert.equal(text(back!.data), text(plain.data));
  });

  test("rotation, unknown keys, tampering, no key", async () => {
    const [old, current] = [newKey(), newKey()];
    const before = new TardigradeCodec([old]);
    const rotated = new TardigradeCodec([current, old]);
    const [sealedOld] = await before.encode([plain]);
    assert.equal(text((await rotated.decode([sealedOld!]))[0]!.data), text(plain.data)); // old history stays readable
    const [sealedNew] = await rotated.encode([plain]);
    assert.equal(text(sealedNew!.metadata!["encryption-key-id"]), keyId(current));
    await assert.rejects(before.decode([sealedNew!]), (e: Error) => {
      assert.ok(e instanceof CodecError && e.message.includes(`codec key ${keyId(current)}, which is not among`));
      return true;
    });
    const tampered = { ...sealedNew!, data: Buffer.from(sealedNew!.data!).fill(0, 20, 21) };
    await assert.rejects(rotated.decode([tampered]), /fails authentication/);
    await assert.rejects(new KeylessCodec().decode([sealedNew!]), /no codec key is set here; set TARDIGRADE_CODEC_KEY/);
    assert.deepEqual(await rotated.decode([plain]), [plain]); // never-encrypted payloads are read as they are

    const both = `${current.toString("base64")}, ${old.toString("hex")}`;
    assert.deepEqual(keysFromEnv({ TARDIGRADE_CODEC_KEY: both }), [current, old]);
    assert.equal(keysFromEnv({}), undefined);
    assert.throws(() => keysFromEnv({ TARDIGRADE_CODEC_KEY: "c2hvcnQ=" }), /\(key 1\): a codec key must be 32 bytes/);
  });
});

describe("encrypted history, live: a Python worker with the key", { timeout: 300_000 }, () => {
  const key = newKey().toString("base64");
  let services: Services;

  before(async () => {
    services = await startServices({ TARDIGRADE_CODEC_KEY: key });
  });
  after(async () => services?.stop());

  test("a run from TypeScript completes; history holds no plaintext; no key means a clear error", async () => {
    const connection = services.client.connection;
    const client = new Client({ connection, dataConverter: tardigradeDataConverter({ keys: key }) });
    const pipeline = parsePipeline(
      { name: "okapi-ledger-ts", steps: [{ name: "marmoset-step", run: 'echo "tail-$((6*7))-quokka"' }] },
      "test",
    );
    const options = { taskQueue: services.taskQueue, store: services.store, tardigradeCli: CLI };
    const handle = await startPipeline(client, pipeline, options);
    assert.ok(!handle.workflowId.includes("okapi"), handle.workflowId); // ids are never encrypted
    const result = await getResult(handle);
    assert.equal(result.pipeline, "okapi-ledger-ts");
    assert.equal(result.steps_completed, 1);

    const history = await connection.workflowService.getWorkflowExecutionHistory({
      namespace: "default",
      execution: { workflowId: handle.workflowId },
    });
    const raw = Buffer.from(temporal.api.history.v1.History.encode(history.history!).finish()).toString("latin1");
    assert.ok(raw.includes("binary/encrypted"));
    for (const word of ["okapi-ledger", "marmoset", "quokka", "tail-42"]) assert.ok(!raw.includes(word), word);

    const keyless = new Client({ connection, dataConverter: tardigradeDataConverter({ keys: [] as Uint8Array[] }) });
    await assert.rejects(getResult(keyless.workflow.getHandle(handle.workflowId)), (e: Error) => {
      assert.ok(e instanceof CodecError, String(e));
      assert.match(e.message, /encrypted \(codec key [0-9a-f]{16}\) and no codec key is set here/);
      return true;
    });
  });
});
