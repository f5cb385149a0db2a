// Protocol version 2 (docs/protocol.md, "Protocol version 2") against a real `actorbroker serve`:
// what goes on the wire in each version, the same Messages from either push form, batches split
// within max_frame both ways, and the broker's BAD_REQUEST naming `message i`.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { connect, FrameDecoder } from "../src/index.js";
import { freshTopic, startBroker, take } from "./broker.js";

const MAX_FRAME = 8192;

// The length of each frame in a byte stream (its 4-byte header), as the bytes come.
function frameLengths() {
  let buf = Buffer.alloc(0);
  const lengths = [];
  return {
    lengths,
    feed(chunk) {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
        lengths.push(buf.readUInt32BE(0));
        buf = buf.subarray(4 + buf.readUInt32BE(0));
      }
    },
  };
}

// A client whose frames both ways are kept: sent (decoded from its writes) and received, with
// the length of every frame on the wire each way (after the hello).
async function watched(address, protocolVersion) {
  const client = await connect(address, { protocolVersion, name: `node-v${protocolVersion}` });
  const out = new FrameDecoder();
  const sent = [];
  const received = [];
  const wire = { out: frameLengths(), in: frameLengths() };
  const send = client.send.bind(client);
  client.send = (bytes) => {
    wire.out.feed(bytes);
    out.feed(bytes);
    sent.push(...out);
    send(bytes);
  };
  const take = client.received.bind(client);
  client.received = (chunk) => {
    wire.in.feed(chunk);
    take(chunk);
  };
  const dispatch = client.dispatch.bind(client);
  client.dispatch = (frame) => {
    received.push(frame);
    dispatch(frame);
  };
  return { client, sent, received, lengths: { out: wire.out.lengths, in: wire.in.lengths } };
}

function fields(m) {
  return { id: m.id, payload: m.payload.toString("hex"), key: m.key, attrs: m.attrs, producer: m.producer,
    redeliveries: m.redeliveries, time: typeof m.time };
}

// Messages with and without keys and attrs, payloads of several sizes.
function batch(count, size = (i) => i % 40) {
  return Array.from({ length: count }, (_, i) => ({
    payload: Buffer.alloc(size(i), i % 251),
    key: i % 3 === 0 ? undefined : `k${i % 17}`,
    attrs: i % 5 === 0 ? { n: String(i), "\u00e9": "\u{1F680}" } : undefined,
  }));
}

describe("protocol version 2", () => {
  let broker;
  before(async () => {
    broker = await startBroker("--max-frame", String(MAX_FRAME));
  });
  after(() => broker?.stop());

  it("v2 sends columns and gets runs, v1 maps; both consumers get the same Messages from either producer", async () => {
    const topic = freshTopic("v2-wire");
    const v1 = await watched(broker.address, 1);
    const v2 = await watched(broker.address, 2);
    assert.deepEqual([v1.client.protocolVersion, v2.client.protocolVersion], [1, 2]);
    const consumers = [
      await v1.client.subscribe({ topic, subscription: "one", consumer: "c1" }),
      await v2.client.subscribe({ topic, subscription: "two", consumer: "c2" }),
    ];
    const msgs = batch(300);
    const ids = [];
    for (const side of [v1, v2]) {
      const producer = await side.client.producer(topic, { name: `p-v${side.client.protocolVersion}` });
      ids.push(...await Promise.all(msgs.map((m) => producer.send(m.payload, m))));
      await producer.close();
    }
    assert.deepEqual(ids, Array.from({ length: 600 }, (_, i) => i));
    const [got1, got2] = await Promise.all(consumers.map((c) => take(c, 600)));
    assert.deepEqual(got1.map(fields), got2.map(fields));
    assert.deepEqual(got2.map((m) => m.id), ids);
    const expected = [...msgs, ...msgs];
    for (const [i, m] of got2.entries()) {
      assert.ok(m.payload.equals(expected[i].payload), `payload ${i}`);
      assert.equal(m.key, expected[i].key ?? null);
      assert.deepEqual(m.attrs, expected[i].attrs ?? {});
      assert.equal(m.producer, i < 300 ? "p-v1" : "p-v2");
    }
    const sends = (side) => side.sent.filter((f) => f.op === "send");
    const pushes = (side) => side.received.filter((f) => f.op === "message");
    assert.ok(sends(v1).every((f) => f.msgs && !f.payloads));
    assert.ok(sends(v2).every((f) => f.payloads && !f.msgs && f.keys.length === f.payloads.length));
    assert.ok(pushes(v1).every((f) => f.msgs && !f.runs));
    assert.ok(pushes(v2).every((f) => f.runs && !f.msgs));
    await v1.client.close();
    await v2.client.close();
  });

  it("a batch far over max_frame goes out in frames within it, and comes back in pushes within it", async () => {
    const topic = freshTopic("v2-split");
    const { client, sent, received, lengths } = await watched(broker.address, 2);
    const consumer = await client.subscribe({ topic, subscription: "s", consumer: "c", receiverQueue: 5000 });
    const producer = await client.producer(topic, { name: "p", maxBatch: 100000 });
    const msgs = batch(4000, (i) => (i % 997 === 0 ? 3000 : i % 60));
    const largest = Buffer.alloc(MAX_FRAME - 108 - 1, 7); // the broker's bound for producer "p"
    msgs.push({ payload: largest, key: undefined, attrs: undefined });
    msgs.push({ payload: largest.subarray(0, largest.length - 2 - (10 + 1 + 1)), key: "kk", attrs: { a: "b" } });
    const ids = await Promise.all(msgs.map((m) => producer.send(m.payload, m)));
    assert.deepEqual(ids, msgs.map((_, i) => i));
    const got = await take(consumer, msgs.length);
    for (const [i, m] of got.entries()) {
      assert.equal(m.id, i);
      assert.ok(m.payload.equals(msgs[i].payload), `payload ${i}`);
      assert.equal(m.key, msgs[i].key ?? null);
      assert.deepEqual(m.attrs, msgs[i].attrs ?? {});
    }
    const sends = sent.filter((f) => f.op === "send");
    const pushes = received.filter((f) => f.op === "message");
    assert.ok(sends.length > 10 && pushes.length > 10, `${sends.length} sends, ${pushes.length} pushes`);
    assert.ok(Math.max(...lengths.out, ...lengths.in) <= MAX_FRAME);
    assert.ok(Math.max(...lengths.out) > MAX_FRAME / 2 && Math.max(...lengths.in) > MAX_FRAME / 2); // (batches filled)
    await assert.rejects(producer.send(Buffer.alloc(largest.length + 1)), { code: "MESSAGE_TOO_LARGE" });
    await client.close();
  });

  it("the broker refuses a v2 send with a bad message whole, naming `message i`", async () => {
    const topic = freshTopic("v2-bad");
    const client = await connect(broker.address, { protocolVersion: 2 });
    const consumer = await client.subscribe({ topic, subscription: "s", consumer: "c" });
    const producer = await client.producer(topic);
    const ok = Buffer.from("ok");
    for (const [frame, message] of [
      [{ payloads: [ok, "not bin"] }, /^message 1: /],
      [{ payloads: [ok, ok, ok], keys: [null, null, "k".repeat(256)] }, /^message 2: /],
      [{ payloads: [ok], attrs: [{ a: 5 }] }, /^message 0: /],
      [{ payloads: [ok, ok], keys: [null] }, /'keys'/],
    ]) {
      await assert.rejects(client.request({ op: "send", producer: producer.id, ...frame }), { code: "BAD_REQUEST", message });
    }
    assert.equal(await producer.send("after"), 0); // nothing of the refused sends was published
    assert.equal((await consumer.receive({ timeoutMs: 5000 })).payload.toString(), "after");
    await client.close();
  });
});
