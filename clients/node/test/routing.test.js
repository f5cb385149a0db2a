// The client against a stand-in for its socket, fed frames without a broker: the orders that a
// real broker produces only in races (docs/protocol.md, "Consuming"), and what the client writes.
import assert from "node:assert/strict";
import { EventEmitter, once } from "node:events";
import { describe, it } from "node:test";

import { Client, connect, encodeFrame, FrameDecoder } from "../src/index.js";

// Stands in for the socket: keeps what the client writes, and lets the test play the broker's bytes.
class Wire extends EventEmitter {
  constructor() {
    super();
    this.sent = new FrameDecoder();
  }
  setNoDelay() {}
  write(bytes) {
    this.sent.feed(bytes);
  }
  end() {
    this.emit("close");
  }
  destroy() {
    this.emit("close");
  }
  next() {
    return this.sent.next();
  }
  receive(...frames) {
    this.emit("data", Buffer.concat(frames.map(encodeFrame)));
  }
}

// A client past its hello: it asked for `asked` (undefined: the default) and was welcomed with
// `welcomed` (the version the broker repeats; 1 here for the tests written for v1).
async function ready({ asked, welcomed = 1, maxFrame = 1 << 20 } = {}) {
  const wire = new Wire();
  const client = new Client(wire, "test");
  const hello = client.hello({ protocolVersion: asked }, {});
  const frame = wire.next();
  wire.receive({ op: "welcome", rid: frame.rid, version: welcomed, broker: "b", heartbeat_ms: 5000, max_frame: maxFrame });
  await hello;
  return { wire, client, hello: frame };
}

async function producerOn(wire, client, options) {
  const opening = client.producer("/a/b", options);
  wire.receive({ op: "producer_ok", rid: wire.next().rid, producer: 2, topic: "/a/b", dispatch: "non_reliable" });
  return opening;
}

function turn() {
  return new Promise((resolve) => setImmediate(resolve));
}

function record(id) {
  return { id, payload: Buffer.from(`m${id}`), key: null, attrs: {}, time: 1, producer: "p", redeliveries: 0 };
}

async function failover(wire, client, consumerId, ...behind) {
  const subscribing = client.subscribe({ topic: "/a/b", subscription: "s", type: "failover", consumer: "b" });
  const { rid } = wire.next();
  wire.receive({ op: "subscribed", rid, consumer: consumerId, dispatch: "non_reliable" }, ...behind);
  return subscribing;
}

describe("push routing", () => {
  it("holds an `active` push that overtakes its consumer's `subscribed` reply", async () => {
    const { wire, client } = await ready();
    const subscribing = client.subscribe({ topic: "/a/b", subscription: "s", type: "failover", consumer: "b" });
    const { rid } = wire.next();
    wire.receive({ op: "active", consumer: 7, active: false }, { op: "subscribed", rid, consumer: 7, dispatch: "non_reliable" });
    const consumer = await subscribing;
    assert.equal(consumer.active, false);
    assert.deepEqual(await once(consumer, "active"), [false]);
    assert.deepEqual(wire.next(), { op: "flow", consumer: 7, credits: 1000 });
    await client.close();
  });

  it("emits `active` before handing over the messages that came after it (receive, for await)", async () => {
    // The event came from a later turn of the event loop: the application saw the first message
    // of a consumer just promoted while it still thought itself on standby.
    const { wire, client } = await ready();
    const consumer = await failover(wire, client, 4);
    const seen = [];
    consumer.on("active", (active) => seen.push(`active ${active}`));
    await new Promise((resolve) => setImmediate(resolve));
    const waiting = consumer.receive().then((m) => seen.push(`message ${m.id}`));
    wire.receive({ op: "active", consumer: 4, active: true }, { op: "message", consumer: 4, msgs: [record(0)] });
    await waiting;
    wire.receive({ op: "active", consumer: 4, active: false }, { op: "active", consumer: 4, active: true },
      { op: "message", consumer: 4, msgs: [record(1), record(2)] });
    for await (const msg of consumer) {
      seen.push(`message ${msg.id}`);
      if (msg.id === 2) break;
    }
    assert.deepEqual(seen, ["active true", "message 0", "active false", "active true", "message 1", "message 2"]);
    await client.close();
  });

  it("emits an `active` that came with the `subscribed` reply to a listener added after the await, "
    + "before the message behind it", async () => {
    const { wire, client } = await ready();
    const consumer = await failover(wire, client, 5, { op: "active", consumer: 5, active: true },
      { op: "message", consumer: 5, msgs: [record(0)] });
    const seen = [];
    consumer.on("active", (active) => seen.push(`active ${active}`));
    for await (const msg of consumer) {
      seen.push(`message ${msg.id}`);
      break;
    }
    assert.deepEqual(seen, ["active true", "message 0"]);
    await client.close();
  });

  it("drops pushes for a consumer it does not know when no subscribe is in flight", async () => {
    const { wire, client } = await ready();
    wire.receive({ op: "message", consumer: 9, msgs: [] }, { op: "active", consumer: 9, active: true });
    assert.equal(client.held.size, 0);
    await client.close();
  });

  it("refuses a receiverQueue beyond a flow's credits (2^32-1) at once, and sends nothing", { timeout: 5000 }, async () => {
    // It was sent: the `flow` of the whole queue failed while the `subscribed` reply was handled,
    // the subscribe never settled, and the connection ended with INTERNAL.
    const { wire, client } = await ready();
    for (const receiverQueue of [2 ** 32, 2 ** 53, Number.MAX_VALUE, Infinity, NaN]) {
      await assert.rejects(client.subscribe({ topic: "/a/b", subscription: "s", receiverQueue }), RangeError,
        String(receiverQueue));
    }
    assert.equal(wire.next(), undefined);
    assert.equal(client.subscribing, 0);
    const subscribing = client.subscribe({ topic: "/a/b", subscription: "s", consumer: "c", receiverQueue: 2 ** 32 - 1 });
    wire.receive({ op: "subscribed", rid: wire.next().rid, consumer: 3, dispatch: "non_reliable" });
    const consumer = await subscribing;
    assert.deepEqual(wire.next(), { op: "flow", consumer: 3, credits: 2 ** 32 - 1 });
    assert.throws(() => consumer.flow(2 ** 32), RangeError);
    assert.equal(client.connected, true);
    await client.close();
  });

  it("answers the broker's ping with a pong carrying its rid", async () => {
    const { wire, client } = await ready();
    wire.receive({ op: "ping", rid: 41 });
    assert.deepEqual(wire.next(), { op: "pong", rid: 41 });
    await client.close();
  });

  it("topics() tells a list the broker truncated to fit max_frame (.truncated)", async () => {
    const { wire, client } = await ready();
    const topics = [{ name: "/a/b", dispatch: "reliable", subscriptions: 0, producers: 1 }];
    for (const [reply, truncated] of [[{ truncated: true }, true], [{}, false]]) {
      const asking = client.topics();
      wire.receive({ op: "topics", rid: wire.next().rid, topics, ...reply });
      const listed = await asking;
      assert.equal(listed.truncated, truncated);
      assert.deepEqual(listed, topics); // (not an enumerable property: the list compares as before)
    }
    await client.close();
  });

  it("fails a request with the error frame that answers it, and keeps the connection", async () => {
    const { wire, client } = await ready();
    const asking = client.topics();
    const { rid } = wire.next();
    wire.receive({ op: "error", rid, code: "NOT_AUTHORIZED", message: "no" });
    await assert.rejects(asking, { name: "BrokerError", code: "NOT_AUTHORIZED", rid });
    assert.equal(client.connected, true);
    await client.close();
  });
});

describe("what the client writes", () => {
  for (const version of [1, 2]) {
    it(`v${version}: send() takes the payload and attrs as they are at the call: a Buffer reused at once is safe`, async () => {
      // The batch was encoded at the end of the turn, from the caller's Buffer: three sends of one
      // Buffer refilled after each carried the last content three times.
      const { wire, client } = await ready({ asked: version, welcomed: version });
      const producer = await producerOn(wire, client);
      const buf = Buffer.alloc(4);
      const bytes = new Uint8Array(1);
      const attrs = { n: "" };
      for (let i = 0; i < 3; i++) {
        buf.writeUInt32BE(i);
        bytes[0] = i;
        attrs.n = String(i);
        producer.send(buf, { attrs });
        producer.send(bytes, { attrs });
      }
      buf.fill(9);
      bytes.fill(9);
      attrs.n = "9";
      attrs.extra = "x";
      await turn(); // the batch goes out at the end of the turn
      const frame = wire.next();
      assert.equal(frame.op, "send");
      const msgs = version === 1 ? frame.msgs : frame.payloads.map((payload, i) => ({ payload, attrs: frame.attrs[i] }));
      assert.deepEqual(msgs.map((m) => [...m.payload]),
        [[0, 0, 0, 0], [0], [0, 0, 0, 1], [1], [0, 0, 0, 2], [2]]);
      assert.deepEqual(msgs.map((m) => m.attrs), ["0", "0", "1", "1", "2", "2"].map((n) => ({ n })));
      await client.close({ timeoutMs: 10 });
    });
  }
});

describe("protocol version 2 (docs/protocol.md)", () => {
  it("asks for version 2 by default, 1 with protocolVersion: 1, and refuses any other", async () => {
    const v2 = await ready({ welcomed: 2 });
    assert.equal(v2.hello.version, 2);
    assert.equal(v2.client.protocolVersion, 2);
    const v1 = await ready({ asked: 1, welcomed: 1 });
    assert.equal(v1.hello.version, 1);
    assert.equal(v1.client.protocolVersion, 1);
    for (const protocolVersion of [0, 3, "2", 1.5]) {
      await assert.rejects(connect("127.0.0.1:1", { protocolVersion }), RangeError, String(protocolVersion));
    }
    await v2.client.close({ timeoutMs: 10 });
    await v1.client.close({ timeoutMs: 10 });
  });

  it("speaks v1 when a broker welcomes its v2 hello with 1 (or with no version)", async () => {
    for (const welcomed of [1, undefined]) {
      const { wire, client, hello } = await ready({ welcomed });
      assert.equal(hello.version, 2);
      assert.equal(client.protocolVersion, 1);
      const producer = await producerOn(wire, client);
      const sent = producer.send("a", { key: "k" });
      await turn();
      const frame = wire.next();
      assert.deepEqual(frame.msgs, [{ payload: Buffer.from("a"), key: "k" }]);
      assert.equal(frame.payloads, undefined);
      wire.receive({ op: "receipt", rid: frame.rid, first: 7, count: 1 });
      assert.equal(await sent, 7);
      await client.close({ timeoutMs: 10 });
    }
  });

  it("sends a batch as columns: keys and attrs only when a message has them, nil / {} for the others", async () => {
    const { wire, client } = await ready({ welcomed: 2 });
    const producer = await producerOn(wire, client);
    const plain = [producer.send("a"), producer.send(Buffer.from([0, 255]))];
    await turn();
    let frame = wire.next();
    assert.deepEqual(frame, { op: "send", rid: frame.rid, producer: 2, payloads: [Buffer.from("a"), Buffer.from([0, 255])] });
    wire.receive({ op: "receipt", rid: frame.rid, first: 10, count: 2 });
    assert.deepEqual(await Promise.all(plain), [10, 11]);

    const mixed = [producer.send("a", { key: "" }), producer.send("b", { attrs: {} }), producer.send("c", { attrs: { x: "y" } }),
      producer.send("d", { key: null, attrs: null })];
    await turn();
    frame = wire.next();
    assert.deepEqual(frame, { op: "send", rid: frame.rid, producer: 2, payloads: ["a", "b", "c", "d"].map((p) => Buffer.from(p)),
      keys: ["", null, null, null], attrs: [{}, {}, { x: "y" }, {}] });
    wire.receive({ op: "receipt", rid: frame.rid, first: 12, count: 4 });
    assert.deepEqual(await Promise.all(mixed), [12, 13, 14, 15]);
    await client.close({ timeoutMs: 10 });
  });

  it("splits a turn's messages into send frames within max_frame, counting v2's smaller overhead", async () => {
    const maxFrame = 4096;
    const { wire, client } = await ready({ welcomed: 2, maxFrame });
    const producer = await producerOn(wire, client, { name: "p" });
    const sends = [];
    for (let i = 0; i < 500; i++) sends.push(producer.send(Buffer.alloc(i % 50, i), { key: i % 3 ? `k${i}` : undefined, attrs: i % 7 ? undefined : { n: String(i) } }));
    sends.push(producer.send(Buffer.alloc(maxFrame - 108 - 1))); // the largest message the broker takes from "p"
    await turn();
    const frames = [];
    for (let frame = wire.next(); frame; frame = wire.next()) frames.push(frame);
    let first = 0;
    const sizes = [];
    for (const frame of frames) {
      sizes.push(encodeFrame(frame).length - 4);
      wire.receive({ op: "receipt", rid: frame.rid, first, count: frame.payloads.length });
      first += frame.payloads.length;
    }
    assert.ok(Math.max(...sizes) <= maxFrame, String(sizes));
    assert.ok(frames.length < 20, `${frames.length} frames`); // packed, not a frame per message
    assert.equal(frames.at(-1).payloads.length, 1);
    assert.deepEqual(await Promise.all(sends), sends.map((_, i) => i));
    const payloads = frames.flatMap((f) => f.payloads);
    const keys = frames.flatMap((f) => f.keys ?? f.payloads.map(() => null));
    assert.deepEqual(payloads.slice(0, 500).map((p) => p.length), sends.slice(0, 500).map((_, i) => i % 50));
    assert.deepEqual(keys.slice(0, 500), sends.slice(0, 500).map((_, i) => (i % 3 ? `k${i}` : null)));
    await client.close({ timeoutMs: 10 });
  });

  it("fails the whole batch with the broker's BAD_REQUEST naming `message i`", async () => {
    const { wire, client } = await ready({ welcomed: 2 });
    const producer = await producerOn(wire, client);
    const sends = [producer.send("a"), producer.send("b")].map((p) => p.catch((e) => e));
    await turn();
    const { rid } = wire.next();
    wire.receive({ op: "error", rid, code: "BAD_REQUEST", message: "message 1: 'payload' must be bin" });
    for (const error of await Promise.all(sends)) assert.deepEqual([error.code, error.message], ["BAD_REQUEST", "message 1: 'payload' must be bin"]);
    await assert.rejects(producer.flush(), { code: "BAD_REQUEST" });
    assert.equal(client.connected, true);
    await client.close({ timeoutMs: 10 });
  });

  it("decodes the `runs` push into the Messages a v1 push gives, and grants credits per message", async () => {
    const { wire, client } = await ready({ welcomed: 2 });
    const consumer = await (async () => {
      const subscribing = client.subscribe({ topic: "/a/b", subscription: "s", consumer: "c", receiverQueue: 4 });
      wire.receive({ op: "subscribed", rid: wire.next().rid, consumer: 3, dispatch: "reliable" });
      return subscribing;
    })();
    assert.deepEqual(wire.next(), { op: "flow", consumer: 3, credits: 4 });
    const proto = JSON.parse('{"__proto__": "v"}');
    wire.receive({ op: "message", consumer: 3, runs: [
      [100, 5000, "p1", 0, [Buffer.from("a"), Buffer.alloc(0)], null, null],
      [7, 6000, "p2", 2, [Buffer.from("b"), Buffer.from("c")], ["k", null], [{ x: "y" }, null]],
    ] }, { op: "message", consumer: 3, runs: [[9, 7000, "p2", 0, [Buffer.from("d"), Buffer.from("e")], [null, ""], [proto, {}]]] });
    const fields = (m) => [m.id, m.payload.toString(), m.key, m.attrs, m.time, m.producer, m.redeliveries];
    const got = [];
    for (let i = 0; i < 6; i++) got.push(await consumer.receive());
    assert.deepEqual(got.map(fields), [
      [100, "a", null, {}, 5000, "p1", 0],
      [101, "", null, {}, 5000, "p1", 0],
      [7, "b", "k", { x: "y" }, 6000, "p2", 2],
      [8, "c", null, {}, 6000, "p2", 2],
      [9, "d", null, proto, 7000, "p2", 0],
      [10, "e", "", {}, 7000, "p2", 0],
    ]);
    assert.ok(got.every((m) => Buffer.isBuffer(m.payload) && m.consumer === consumer));
    assert.notEqual(got[0].attrs, got[1].attrs); // an object of its own each
    assert.equal(Object.getPrototypeOf(got[4].attrs), Object.prototype);
    assert.ok(Object.hasOwn(got[4].attrs, "__proto__"));
    // 6 taken of a queue of 4: credits go back in halves, per message
    assert.deepEqual([wire.next(), wire.next(), wire.next(), wire.next()], [
      { op: "flow", consumer: 3, credits: 2 }, { op: "flow", consumer: 3, credits: 2 }, { op: "flow", consumer: 3, credits: 2 }, undefined]);
    // acks name the ids first + i
    const acking = got[3].ack();
    await turn();
    const ack = wire.next();
    assert.deepEqual(ack, { op: "ack", rid: ack.rid, consumer: 3, ids: [8] });
    wire.receive({ op: "ok", rid: ack.rid });
    await acking;
    await client.close({ timeoutMs: 10 });
  });

  it("takes a v1 push on a v2 connection, and a runs push on a v1 one (by the push's shape)", async () => {
    for (const welcomed of [1, 2]) {
      const { wire, client } = await ready({ welcomed });
      const subscribing = client.subscribe({ topic: "/a/b", subscription: "s", consumer: "c" });
      wire.receive({ op: "subscribed", rid: wire.next().rid, consumer: 3, dispatch: "non_reliable" },
        { op: "message", consumer: 3, msgs: [record(4)] }, { op: "message", consumer: 3, runs: [[5, 1, "p", 0, [Buffer.from("m5")], null, null]] });
      const consumer = await subscribing;
      const got = [await consumer.receive(), await consumer.receive()];
      assert.deepEqual(got.map((m) => [m.id, m.payload.toString(), m.key, m.attrs, m.time, m.producer, m.redeliveries]),
        [[4, "m4", null, {}, 1, "p", 0], [5, "m5", null, {}, 1, "p", 0]]);
      await client.close({ timeoutMs: 10 });
    }
  });
});
