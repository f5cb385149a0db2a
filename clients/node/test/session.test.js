// Sessions, admin ops, errors and the connection's end, against a real `actorbroker serve`.
import assert from "node:assert/strict";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";

import { BrokerError, ConnectionError, Consumer } from "../src/index.js";
import { brokerWithClient, connect, eventually, freshTopic, PROTOCOL, startBroker, stopBoth, take } from "./broker.js";

describe("session", () => {
  let broker;
  let client;
  before(async () => ({ broker, client } = await brokerWithClient("node-session-test")));
  after(() => stopBoth(broker, client));

  it("says hello and learns the broker's settings from welcome", async () => {
    const c = await connect(broker.address, { heartbeatMs: 1000 });
    assert.equal(c.broker.length > 0, true);
    assert.equal(c.heartbeatMs, 1000);
    assert.equal(c.maxFrame, 4 * 1024 * 1024);
    assert.equal(c.protocolVersion, PROTOCOL ?? 2); // the broker speaks both: it repeats the version asked for
    await c.close();
    assert.equal(c.connected, false);
  });

  it("clamps the heartbeat wish as the broker says", async () => {
    const c = await connect(broker.address, { heartbeatMs: 1 });
    assert.equal(c.heartbeatMs, 200);
    await c.close();
  });

  it("producer.close() called twice at once closes once, and both calls resolve", async () => {
    const producer = await client.producer(freshTopic("close"));
    await producer.send("x");
    await Promise.all([producer.close(), producer.close()]);
    await producer.close();
  });

  it("a broker that stops reading (its pings still coming) is lost after two heartbeats of unsent bytes", async () => {
    // A proxy passes the broker's frames on but stops passing the client's: the host of a hung
    // broker process whose socket still answers. Sends queued without bound before.
    const [host, port] = broker.address.split(":");
    let held = false;
    const proxy = net.createServer((downstream) => {
      const upstream = net.connect(Number(port), host);
      upstream.on("error", () => downstream.destroy());
      downstream.on("error", () => upstream.destroy());
      upstream.pipe(downstream);
      downstream.on("data", (chunk) => {
        if (held) downstream.pause();
        else upstream.write(chunk);
      });
    });
    await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
    const c = await connect(`127.0.0.1:${proxy.address().port}`, { heartbeatMs: 1000 });
    const closed = new Promise((resolve) => c.once("close", resolve));
    const producer = await c.producer(freshTopic("stuck-write"));
    held = true;
    const started = Date.now();
    const sends = [];
    for (let i = 0; i < 64; i++) sends.push(producer.send(Buffer.alloc(1 << 20)).catch((e) => e));
    const error = await closed;
    assert.equal(error.code, "CONNECTION_LOST");
    assert.match(error.message, /took none of the/); // (the broker's own 3-heartbeat check would say otherwise)
    assert.ok(Date.now() - started < 10000);
    assert.ok((await Promise.all(sends)).every((r) => r instanceof Error || typeof r === "number"));
    proxy.close();
  });

  it("a broker that reads steadily is not lost while one merged write takes longer than two heartbeats", async () => {
    // Node writes what queued up behind a write in progress as one writev, and the socket's
    // writableLength drops only once all of it is written: a broker reading 3 MB/s took seconds
    // to take the 12 MB below (beyond what the kernel's buffers hold), receipting all along, and
    // was declared lost after two heartbeats.
    const [host, port] = broker.address.split(":");
    const proxy = net.createServer((downstream) => {
      const upstream = net.connect(Number(port), host);
      upstream.on("error", () => downstream.destroy());
      downstream.on("error", () => upstream.destroy());
      upstream.pipe(downstream);
      downstream.on("data", (chunk) => { // at most one read (<= 64 KiB) every 20 ms
        upstream.write(chunk);
        downstream.pause();
        setTimeout(() => downstream.resume(), 20);
      });
    });
    await new Promise((resolve) => proxy.listen(0, "127.0.0.1", resolve));
    const c = await connect(`127.0.0.1:${proxy.address().port}`, { heartbeatMs: 200 });
    let lost = null;
    c.on("close", (error) => (lost = error));
    const producer = await c.producer(freshTopic("slow-reader"), { maxBatch: 1 });
    const started = Date.now();
    const sends = Array.from({ length: 96 }, () => producer.send(Buffer.alloc(128 * 1024, 1)).catch((e) => e));
    const results = await Promise.all(sends);
    assert.equal(lost, null, `${lost?.message}`);
    assert.deepEqual(results, Array.from({ length: 96 }, (_, i) => i));
    assert.ok(Date.now() - started > 2 * c.heartbeatMs, "the writes took more than two heartbeats");
    await c.close();
    proxy.close();
  });

  it("pings the broker", async () => {
    const ms = await client.ping();
    assert.equal(typeof ms, "number");
  });

  it("answers the broker's pings and stays connected while idle", async () => {
    const c = await connect(broker.address, { heartbeatMs: 200 });
    let pongs = 0;
    let threePongs;
    const seen = new Promise((resolve) => (threePongs = resolve));
    const write = c.write.bind(c);
    c.write = (frame) => {
      if (frame.op === "pong" && ++pongs === 3) threePongs();
      write(frame);
    };
    await seen; // the broker closes a client silent for 2 heartbeats: three pings answered in a row
    assert.equal(c.connected, true);
    await c.ping();
    await c.close();
  });

  it("opens a producer and resolves each send with its topic offset", async () => {
    const topic = freshTopic();
    const consumer = await client.subscribe({ topic, subscription: "s", consumer: "c" });
    const producer = await client.producer(topic, { name: "named-producer" });
    assert.equal(producer.topic, topic);
    assert.equal(producer.dispatch, "non_reliable");
    const ids = await Promise.all(Array.from({ length: 2500 }, (_, i) => producer.send(`m${i}`)));
    assert.deepEqual(ids, Array.from({ length: 2500 }, (_, i) => i));
    await producer.flush();
    const msgs = await take(consumer, 2500);
    assert.deepEqual(msgs.map((m) => m.payload.toString()), ids.map((i) => `m${i}`));
    assert.equal(msgs[0].producer, "named-producer");
    assert.equal(typeof msgs[0].time, "number");
    await producer.close();
    await consumer.close();
  });

  it("grants credits from the receiver queue: the broker holds the rest in the backlog", async () => {
    const topic = freshTopic();
    const consumer = await client.subscribe({ topic, subscription: "s", consumer: "c", receiverQueue: 10 });
    const producer = await client.producer(topic);
    for (let i = 0; i < 50; i++) producer.send(`m${i}`);
    await producer.flush();
    const stats = await eventually(async () => {
      const s = await client.stats(topic);
      return s.subscriptions[0].consumers[0].msgs_out === 10 && s;
    }, { what: "10 messages out" });
    assert.equal(stats.subscriptions[0].backlog, 40);
    const msgs = await take(consumer, 50);
    assert.deepEqual(msgs.map((m) => m.id), Array.from({ length: 50 }, (_, i) => i));
    await consumer.close();
  });

  it("lists topics, tells stats and deletes a topic, ending its producer and consumer", async () => {
    const topic = freshTopic();
    const producer = await client.producer(topic, { dispatch: "reliable" });
    const consumer = await client.subscribe({ topic, subscription: "s", consumer: "c" });
    const listed = (await client.topics()).find((t) => t.name === topic);
    assert.deepEqual(listed, { name: topic, dispatch: "reliable", subscriptions: 1, producers: 1 });
    const stats = await client.stats(topic);
    assert.equal(stats.dispatch, "reliable");
    assert.equal(stats.subscriptions[0].name, "s");
    const closed = new Promise((resolve) => consumer.once("closed", resolve));
    await client.deleteTopic(topic);
    assert.equal((await closed).reason, "topic_deleted");
    await assert.rejects(consumer.receive(), { code: "CLOSED", reason: "topic_deleted" });
    await eventually(() => !client.producers.has(producer.id), { what: "producer closed" });
    await assert.rejects(producer.send("late"), { code: "CLOSED", reason: "topic_deleted" });
    await assert.rejects(client.stats(topic), { name: "BrokerError", code: "TOPIC_NOT_FOUND" });
  });

  it("closes a consumer and unsubscribes, telling the other consumers", async () => {
    const topic = freshTopic();
    const a = await client.subscribe({ topic, subscription: "s", type: "shared", consumer: "a" });
    const b = await client.subscribe({ topic, subscription: "s", type: "shared", consumer: "b" });
    const other = new Promise((resolve) => b.once("closed", resolve));
    await a.unsubscribe();
    assert.equal((await other).reason, "unsubscribed");
    const c = await client.subscribe({ topic, subscription: "t", consumer: "c" });
    await c.close();
    await assert.rejects(c.receive(), { code: "CONSUMER_CLOSED" });
    // a non_reliable subscription ends once its last consumer has left; the broker answers the
    // close first, and the subscription's end reaches the topic a moment later
    await eventually(async () => (await client.stats(topic)).subscriptions.length === 0,
                     { what: "the subscription ended with its last consumer" });
  });

  it("ends `for await` after close()", async () => {
    const topic = freshTopic();
    const consumer = await client.subscribe({ topic, subscription: "s", consumer: "c" });
    const producer = await client.producer(topic);
    await producer.send("one");
    const got = [];
    for await (const msg of consumer) {
      got.push(msg.payload.toString());
      await consumer.close();
    }
    assert.deepEqual(got, ["one"]);
  });

  describe("errors carry the protocol's code", () => {
    it("BAD_TOPIC", async () => {
      await assert.rejects(client.producer("no-slash"), { name: "BrokerError", code: "BAD_TOPIC" });
    });
    it("BAD_REQUEST", async () => {
      await assert.rejects(client.subscribe({ topic: freshTopic(), subscription: "", consumer: "c" }),
        { code: "BAD_REQUEST" });
    });
    it("UNKNOWN_OP", async () => {
      await assert.rejects(client.request({ op: "frobnicate" }), { code: "UNKNOWN_OP" });
    });
    it("UNKNOWN_PRODUCER and UNKNOWN_CONSUMER", async () => {
      await assert.rejects(client.request({ op: "send", producer: 987654, msgs: [{ payload: Buffer.alloc(1) }] }),
        { code: "UNKNOWN_PRODUCER" });
      await assert.rejects(client.request({ op: "ack", consumer: 987654, ids: [1] }), { code: "UNKNOWN_CONSUMER" });
    });
    for (const [code, firstType] of [["TYPE_MISMATCH", "shared"], ["CONSUMER_BUSY", "exclusive"]]) {
      it(code, async () => {
        const topic = freshTopic();
        const a = await client.subscribe({ topic, subscription: "s", type: firstType, consumer: "a" });
        await assert.rejects(client.subscribe({ topic, subscription: "s", type: "exclusive", consumer: "b" }), { code });
        await a.close();
      });
    }
    it("PRODUCER_BUSY", async () => {
      const topic = freshTopic();
      const p = await client.producer(topic, { access: "exclusive" });
      await assert.rejects(client.producer(topic), { code: "PRODUCER_BUSY" });
      await p.close();
    });
    it("a message too large for max_frame is refused before it is sent", async () => {
      const producer = await client.producer(freshTopic());
      await assert.rejects(producer.send(Buffer.alloc(client.maxFrame)), { code: "MESSAGE_TOO_LARGE" });
      assert.equal(await producer.send("fits"), 0);
    });
    it("an invalid message fails alone: the valid ones sent in the same turn are receipted", async () => {
      // The broker refuses a whole send frame for one bad message; the client checks first.
      const producer = await client.producer(freshTopic(), { name: "p".repeat(255) });
      const first = producer.send("a");
      const longKey = producer.send("b", { key: "k".repeat(256) });
      const longAttr = producer.send("b", { attrs: { a: "é".repeat(128) } });
      // fits a send frame, but not the push that carries the producer's 255-byte name
      const tooBig = producer.send(Buffer.alloc(client.maxFrame - 64 - 48 - 100));
      const last = producer.send("c");
      await assert.rejects(longKey, { code: "BAD_REQUEST" });
      await assert.rejects(longAttr, { code: "BAD_REQUEST" });
      await assert.rejects(tooBig, { code: "MESSAGE_TOO_LARGE" });
      assert.deepEqual([await first, await last], [0, 1]);
      await producer.close();
    });
    for (const [code, bytes] of [["BAD_FRAME", [0, 0, 0, 1, 0xc1]], ["FRAME_TOO_LARGE", [0xff, 0xff, 0xff, 0xff]]]) {
      it(`${code} is fatal: what waits fails with it and the client closes`, async () => {
        const c = await connect(broker.address);
        const closed = new Promise((resolve) => c.once("close", resolve));
        // Sent before the bad bytes: answered before the close, or failed by it.
        const pending = c.subscribe({ topic: freshTopic(), subscription: "s", consumer: "c" }).catch((e) => e);
        c.socket.write(Buffer.from(bytes));
        const error = await closed;
        assert.ok(error instanceof BrokerError);
        assert.equal(error.code, code);
        const outcome = await pending;
        assert.ok(outcome instanceof Consumer || outcome.code === code, `${outcome}`);
        await assert.rejects(c.ping(), { code });
        assert.equal(c.connected, false);
      });
    }
  });

  describe("AbortSignal and timeouts", () => {
    it("an aborted signal refuses the call at once", async () => {
      await assert.rejects(client.ping({ signal: AbortSignal.abort() }), { name: "AbortError" });
      await assert.rejects(connect(broker.address, { signal: AbortSignal.abort() }), { name: "AbortError" });
      await assert.rejects(client.subscribe({ topic: freshTopic(), subscription: "s", signal: AbortSignal.abort() }),
        { name: "AbortError" });
      await assert.rejects(client.producer(freshTopic(), { signal: AbortSignal.abort() }), { name: "AbortError" });
      assert.equal(client.subscribing, 0);
    });

    it("abort ends a receive that waits", async () => {
      const consumer = await client.subscribe({ topic: freshTopic(), subscription: "s", consumer: "c" });
      const controller = new AbortController();
      const waiting = consumer.receive({ signal: controller.signal });
      controller.abort(new Error("enough"));
      await assert.rejects(waiting, { message: "enough" });
      await assert.rejects(consumer.receive({ timeoutMs: 20 }), { code: "TIMEOUT" });
      await consumer.close();
    });

    it("a subscribe abandoned in flight is closed again when its reply comes", async () => {
      const topic = freshTopic();
      const controller = new AbortController();
      const waiting = client.subscribe({ topic, subscription: "s", consumer: "gone", signal: controller.signal });
      controller.abort();
      await assert.rejects(waiting, { name: "AbortError" });
      await eventually(async () => {
        const s = await client.stats(topic).catch(() => null);
        return s && s.subscriptions.every((sub) => sub.consumers.length === 0);
      }, { what: "abandoned consumer closed" });
      const b = await client.subscribe({ topic, subscription: "s2", type: "exclusive", consumer: "b" });
      await b.close();
    });
  });
});

describe("auth and limits", () => {
  let broker;
  before(async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "actorbroker-node-auth-"));
    const file = path.join(dir, "auth.json");
    fs.writeFileSync(file, JSON.stringify({ admin: ["admin"], writer: ["produce:/orders/*"] }));
    broker = await startBroker("--auth-file", file, "--max-producers-per-connection", "2");
  });
  after(() => broker?.stop());

  it("AUTH_FAILED: connect rejects without a token or with a wrong one", async () => {
    await assert.rejects(connect(broker.address), { name: "BrokerError", code: "AUTH_FAILED" });
    await assert.rejects(connect(broker.address, { token: "wrong" }), { code: "AUTH_FAILED" });
  });

  it("NOT_AUTHORIZED: a token used beyond its permissions", async () => {
    const c = await connect(broker.address, { token: "writer" });
    const producer = await c.producer("/orders/eu");
    assert.equal(await producer.send("x"), 0);
    await assert.rejects(c.producer("/billing/eu"), { code: "NOT_AUTHORIZED" });
    await assert.rejects(c.subscribe({ topic: "/orders/eu", subscription: "s", consumer: "c" }), { code: "NOT_AUTHORIZED" });
    await assert.rejects(c.topics(), { code: "NOT_AUTHORIZED" });
    await c.close();
  });

  it("OVERLOADED: a limit refuses the request, the connection stays", async () => {
    const c = await connect(broker.address, { token: "admin" });
    await c.producer("/lim/a");
    await c.producer("/lim/b");
    await assert.rejects(c.producer("/lim/c"), { code: "OVERLOADED" });
    assert.ok((await c.topics()).length >= 2);
    await c.close();
  });
});

describe("a broker at its connection limit", () => {
  let broker;
  before(async () => { broker = await startBroker("--max-connections", "1"); });
  after(() => broker?.stop());

  it("OVERLOADED: connect rejects with the broker's code, not CONNECTION_LOST", async () => {
    const first = await connect(broker.address);
    await assert.rejects(connect(broker.address), { name: "BrokerError", code: "OVERLOADED" });
    await first.close();
  });
});

describe("a broker that goes away", () => {
  it("fails what waits with CONNECTION_LOST and ends the client", async () => {
    const broker = await startBroker();
    let stopped = false;
    try {
      const client = await connect(broker.address);
      const topic = freshTopic();
      const consumer = await client.subscribe({ topic, subscription: "s", consumer: "c" });
      const producer = await client.producer(topic);
      const closed = new Promise((resolve) => client.once("close", resolve));
      const consumerClosed = new Promise((resolve) => consumer.once("closed", resolve));
      const iterating = (async () => {
        for await (const msg of consumer) void msg;
      })().then(() => null, (err) => err);
      await broker.stop();
      stopped = true;
      const error = await closed;
      assert.ok(error instanceof ConnectionError);
      assert.equal(error.code, "CONNECTION_LOST");
      // A broker shutting down may end its topics (a `closed` push) before it closes the socket.
      const ended = ["CONNECTION_LOST", "CLOSED"];
      assert.ok(ended.includes((await iterating)?.code), `${await iterating}`);
      assert.ok(ended.includes((await consumerClosed).code), "the consumer's closed event tells the loss");
      const sendError = await producer.send("x").catch((e) => e);
      assert.ok(ended.includes(sendError.code), `${sendError}`);
      await assert.rejects(client.ping(), { code: "CONNECTION_LOST" });
      assert.equal(client.connected, false);
    } finally {
      if (!stopped) await broker.stop();
    }
  });

  it("refuses to connect where nothing listens", async () => {
    const broker = await startBroker();
    const address = broker.address;
    await broker.stop();
    await assert.rejects(connect(address), { code: "CONNECT_FAILED" });
  });
});
