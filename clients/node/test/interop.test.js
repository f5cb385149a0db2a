// Interop with the Python client, both ways, in protocol versions 1 and 2 on each side (the
// Python client speaks v2 by default, `protocol_version=1` v1): payloads, keys and attrs arrive
// byte for byte.
import assert from "node:assert/strict";
import crypto from "node:crypto";
import { after, before, describe, it } from "node:test";

import { connect, freshTopic, runPython, startBroker, take } from "./broker.js";

// Python's side reads {"address", "topic", ...} as JSON on stdin; payloads travel as hex.
const PY_CONSUME = `
import json, sys
from actorbroker.transport.client import Client, parse_url
job = json.load(sys.stdin)
client = Client(*parse_url(job["address"]), name="py-interop", protocol_version=job["version"])
assert client.welcome["version"] == job["version"], client.welcome
consumer = client.subscribe(job["topic"], "interop", "exclusive", "py")
print("ready", flush=True)
got = []
for _ in range(job["count"]):
    m = consumer.receive(timeout=20)
    got.append({"id": m.id, "payload": m.payload.hex(), "key": m.key, "attrs": m.attrs})
client.close()
print(json.dumps(got))
`;

const PY_PRODUCE = `
import json, sys
from actorbroker.transport.client import Client, parse_url
job = json.load(sys.stdin)
client = Client(*parse_url(job["address"]), name="py-interop", protocol_version=job["version"])
assert client.welcome["version"] == job["version"], client.welcome
producer = client.producer(job["topic"], name="py-producer")
futures = [producer.send(bytes.fromhex(m["payload"]), key=m["key"], attrs=m["attrs"]) for m in job["msgs"]]
producer.flush(timeout=20)
ids = [f.result(5) for f in futures]
client.close()
print(json.dumps(ids))
`;

// Payloads of 0 B, 100 B and 1 MB; keys and attrs with non-ASCII text, empty strings, newlines,
// names of Object.prototype.
function messages() {
  return [
    { payload: Buffer.alloc(0), key: "", attrs: {} },
    { payload: crypto.randomBytes(100), key: "cl\u00e9-\u{1F511}", attrs: { "": "", "\u00fc": "\u{1F680}", lines: "a\nb\r\n\u0000z" } },
    { payload: crypto.randomBytes(1024 * 1024), key: null, attrs: { big: "\u00e9".repeat(127) } },
    { payload: Buffer.from([0, 255, 0x80, 0xc1]), key: "k".repeat(255), attrs: { ["n".repeat(255)]: "v".repeat(255) } },
    // names of Object.prototype: "__proto__" is an ordinary own attrs name (it ended the connection)
    { payload: Buffer.from("proto"), key: "__proto__",
      attrs: JSON.parse('{"__proto__": "evil", "constructor": "c", "toString": "t", "hasOwnProperty": "h"}') },
  ];
}

function asJson(msgs) {
  return msgs.map((m) => ({ payload: m.payload.toString("hex"), key: m.key, attrs: m.attrs }));
}

const VERSIONS = [1, 2];

let broker;
const clients = {}; // protocol version -> a Node client speaking it
before(async () => {
  broker = await startBroker();
  for (const version of VERSIONS) clients[version] = await connect(broker.address, { name: `node-interop-v${version}`, protocolVersion: version });
});
after(async () => {
  for (const client of Object.values(clients)) await client.close();
  await broker?.stop();
});

describe("interop with the Python client", () => {
  for (const nodeVersion of VERSIONS) {
    for (const pyVersion of VERSIONS) {
      it(`a Node producer (v${nodeVersion}) to a Python consumer (v${pyVersion})`, async () => {
        const client = clients[nodeVersion];
        assert.equal(client.protocolVersion, nodeVersion);
        const topic = freshTopic("interop");
        const sent = messages();
        let ready;
        const isReady = new Promise((resolve) => (ready = resolve));
        const consuming = runPython(PY_CONSUME, { address: broker.address, topic, count: sent.length, version: pyVersion },
          { onLine: (line) => line === "ready" && ready() });
        await isReady;
        const producer = await client.producer(topic);
        const ids = await Promise.all(sent.map((m) => producer.send(m.payload, { key: m.key, attrs: m.attrs })));
        const got = await consuming;
        assert.deepEqual(got.map((m) => m.id), ids);
        assert.deepEqual(got.map(({ id, ...m }) => m), asJson(sent));
        await producer.close();
      });

      it(`a Python producer (v${pyVersion}) to a Node consumer (v${nodeVersion})`, async () => {
        const client = clients[nodeVersion];
        const topic = freshTopic("interop");
        const sent = messages();
        const consumer = await client.subscribe({ topic, subscription: "interop", consumer: "node" });
        const ids = await runPython(PY_PRODUCE, { address: broker.address, topic, msgs: asJson(sent), version: pyVersion });
        const got = await take(consumer, sent.length);
        assert.deepEqual(got.map((m) => m.id), ids);
        for (const [i, m] of got.entries()) {
          assert.ok(m.payload.equals(sent[i].payload), `payload ${i}`);
          assert.equal(m.key, sent[i].key);
          assert.deepEqual(m.attrs, sent[i].attrs);
          assert.equal(m.producer, "py-producer");
          assert.equal(m.redeliveries, 0);
          assert.equal(typeof m.time, "number");
        }
        await consumer.close();
      });
    }
  }
});
