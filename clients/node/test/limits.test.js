// Acks and nacks against the broker's max_frame, flush() reporting sends refused before the
// wire, and close() sending the acks not yet sent: against a real `actorbroker serve`.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { brokerWithClient, connect, eventually, freshTopic, stopBoth, take } from "./broker.js";

const MAX_FRAME = 8192;
const MANY = 5000; // ids: far more than one ack frame of MAX_FRAME bytes holds

describe("limits", () => {
  let broker;
  let client;
  before(async () => ({ broker, client } = await brokerWithClient("node-limits-test", "--max-frame", String(MAX_FRAME))));
  after(() => stopBoth(broker, client));

  async function produce(topic, count) {
    const producer = await client.producer(topic);
    for (let i = 0; i < count; i++) producer.send(`m${i}`);
    await producer.flush();
    await producer.close();
  }

  async function subscription(topic) {
    return (await client.stats(topic)).subscriptions[0];
  }

  // A consumer on a connection of its own, so that a connection the broker closes shows here.
  async function manyDelivered(topic) {
    const c = await connect(broker.address, { name: "node-limits-acker" });
    const consumer = await c.subscribe({ topic, subscription: "s", consumer: "w", dispatch: "reliable",
      receiverQueue: MANY, maxUnacked: 2 * MANY });
    await produce(topic, MANY);
    return { c, consumer, msgs: await take(consumer, MANY) };
  }

  it("msg.ack() of thousands of messages in one turn: frames within max_frame, all confirmed", async () => {
    assert.equal(client.maxFrame, MAX_FRAME);
    const topic = freshTopic("turn-acks");
    const { c, msgs } = await manyDelivered(topic);
    const results = await Promise.allSettled(msgs.map((m) => m.ack()));
    assert.deepEqual(results.filter((r) => r.status === "rejected").map((r) => r.reason.code), []);
    assert.equal(c.connected, true);
    await c.ping();
    const sub = await subscription(topic);
    assert.equal(sub.backlog, 0);
    assert.equal(sub.consumers[0].unacked, 0);
    await c.close();
  });

  it("consumer.nack() and consumer.ack() of thousands of ids in one call", async () => {
    const topic = freshTopic("big-acks");
    const { c, consumer, msgs } = await manyDelivered(topic);
    await consumer.nack(msgs);
    assert.equal(c.connected, true);
    const again = await take(consumer, MANY);
    assert.deepEqual(again.map((m) => m.redeliveries), msgs.map(() => 1));
    await consumer.ack(again.map((m) => m.id));
    assert.equal(c.connected, true);
    const sub = await subscription(topic);
    assert.equal(sub.backlog, 0);
    assert.equal(sub.consumers[0].unacked, 0);
    await c.close();
  });

  it("an ack split in parts rejects when its parts fail, and the connection stays", async () => {
    const topic = freshTopic("failed-acks");
    const { c, consumer, msgs } = await manyDelivered(topic);
    await c.request({ op: "close_consumer", consumer: consumer.id }); // gone on the broker only
    await assert.rejects(consumer.ack(msgs), { code: "UNKNOWN_CONSUMER" });
    assert.equal(c.connected, true);
    await c.ping();
    await c.close();
  });

  it("flush() rejects with a send refused before the wire (MESSAGE_TOO_LARGE, BAD_REQUEST), once", async () => {
    const producer = await client.producer(freshTopic("refused"));
    const big = producer.send(Buffer.alloc(2 * MAX_FRAME));
    const good = producer.send("fine");
    await assert.rejects(producer.flush(), { code: "MESSAGE_TOO_LARGE" });
    await assert.rejects(big, { code: "MESSAGE_TOO_LARGE" });
    assert.equal(await good, 0);
    await producer.flush(); // reported once: by the first flush() after it

    producer.send("x", { key: "k".repeat(300) }); // never awaited: no unhandled rejection either
    producer.send("y", { attrs: { a: "v".repeat(300) } });
    await assert.rejects(producer.flush(), { code: "BAD_REQUEST" });
    await producer.flush();
    await producer.close();
  });

  it("flush() rejects with a send made after the broker closed the producer (topic deleted)", async () => {
    const topic = freshTopic("deleted");
    const producer = await client.producer(topic);
    await producer.send("before");
    await producer.flush();
    await client.deleteTopic(topic);
    await eventually(() => !client.producers.has(producer.id), { what: "the producer closed by the broker" });
    producer.send("late"); // never awaited
    await assert.rejects(producer.flush(), { code: "CLOSED", reason: "topic_deleted" });
  });

  it("client.close() sends the acks not yet sent and waits for their answers", async () => {
    const topic = freshTopic("close-acks");
    const c = await connect(broker.address, { name: "node-limits-closer" });
    const consumer = await c.subscribe({ topic, subscription: "s", consumer: "w", dispatch: "reliable" });
    await produce(topic, 50);
    const msgs = await take(consumer, 50);
    const acks = msgs.map((m) => m.ack());
    await c.close(); // in the same turn as the acks
    await Promise.all(acks);
    await eventually(async () => (await subscription(topic)).backlog === 0, { what: "backlog 0 after close" });
  });

  it("consumer.close() sends the acks of this turn before it detaches", async () => {
    const topic = freshTopic("detach-acks");
    const consumer = await client.subscribe({ topic, subscription: "s", consumer: "w", dispatch: "reliable" });
    await produce(topic, 20);
    const msgs = await take(consumer, 20);
    const acks = msgs.map((m) => m.ack());
    await consumer.close();
    await Promise.all(acks);
    await eventually(async () => (await subscription(topic)).backlog === 0, { what: "backlog 0 after close" });
  });

  it("refuses exactly what the broker would: payload, key and attrs against max_frame", async () => {
    const topic = freshTopic("exact-size");
    const producer = await client.producer(topic, { name: "p-exact" });
    const limit = MAX_FRAME - 108 - Buffer.byteLength("p-exact");
    assert.equal(typeof (await producer.send(Buffer.alloc(limit))), "number");
    await producer.send(Buffer.alloc(limit - 17), { key: "kkkkk", attrs: { a: "b" } }); // 5 + 1 + 1 + 10
    await assert.rejects(producer.send(Buffer.alloc(limit + 1)), { code: "MESSAGE_TOO_LARGE" });
    await assert.rejects(producer.send(Buffer.alloc(limit - 17), { key: "kkkkk", attrs: { a: "bb" } }),
      { code: "MESSAGE_TOO_LARGE" });
    await producer.close();
  });

  it("attrs that are not a plain object, a receiverQueue below 1 and bad credits are refused", async () => {
    const topic = freshTopic("wrong-types");
    const producer = await client.producer(topic);
    for (const attrs of ["abc", ["a"], new Map([["a", "b"]]), 5, true]) {
      assert.throws(() => producer.send("x", { attrs }), TypeError, String(attrs));
    }
    await producer.close();
    for (const receiverQueue of [0, -5, 1.5]) {
      await assert.rejects(client.subscribe({ topic, subscription: "s", receiverQueue }), RangeError);
    }
    const consumer = await client.subscribe({ topic, subscription: "s" });
    for (const credits of [-1, 1.5, "3", 2 ** 32]) assert.throws(() => consumer.flow(credits), RangeError);
    await consumer.close();
  });
});
