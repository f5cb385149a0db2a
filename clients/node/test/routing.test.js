// The client against a stand-in for its socket, fed frames without a broker: the orders that a
// real broker produces only in races (docs/protocol.md, "Consuming"), and what the client writes.
import assert from "node:assert/strict";
import { EventEmitter, once } from "node:events";
import { describe, it } from "node:test";

import { Client, encodeFrame, FrameDecoder } from "../src/index.js";

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

async function ready() {
  const wire = new Wire();
  const client = new Client(wire, "test");
  const hello = client.hello({}, {});
  const { rid } = wire.next();
  wire.receive({ op: "welcome", rid, version: 1, broker: "b", heartbeat_ms: 5000, max_frame: 1 << 20 });
  await hello;
  return { wire, client };
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
  it("send() takes the payload and attrs as they are at the call: a Buffer reused at once is safe", async () => {
    // The batch was encoded at the end of the turn, from the caller's Buffer: three sends of one
    // Buffer refilled after each carried the last content three times.
    const { wire, client } = await ready();
    const opening = client.producer("/a/b");
    wire.receive({ op: "producer_ok", rid: wire.next().rid, producer: 2, topic: "/a/b", dispatch: "non_reliable" });
    const producer = await opening;
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
    await new Promise((resolve) => setImmediate(resolve)); // the batch goes out at the end of the turn
    const frame = wire.next();
    assert.equal(frame.op, "send");
    assert.deepEqual(frame.msgs.map((m) => [...m.payload]),
      [[0, 0, 0, 0], [0], [0, 0, 0, 1], [1], [0, 0, 0, 2], [2]]);
    assert.deepEqual(frame.msgs.map((m) => m.attrs), ["0", "0", "1", "1", "2", "2"].map((n) => ({ n })));
    await client.close({ timeoutMs: 10 });
  });
});
