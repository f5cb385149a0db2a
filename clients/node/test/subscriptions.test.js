// The four subscription types, failover promotion and reliable acks, nacks and redelivery,
// against a real `actorbroker serve`.
import assert from "node:assert/strict";
import { once } from "node:events";
import { after, before, describe, it } from "node:test";

import { brokerWithClient, connect, eventually, freshTopic, stopBoth, take } from "./broker.js";

let broker;
let client;
before(async () => ({ broker, client } = await brokerWithClient("node-subscriptions-test")));
after(() => stopBoth(broker, client));

async function produce(topic, count, options = {}, sendOptions = () => ({})) {
  const producer = await client.producer(topic, options);
  const ids = await Promise.all(Array.from({ length: count }, (_, i) => producer.send(`m${i}`, sendOptions(i))));
  await producer.close();
  return ids;
}

// How many messages each consumer of the (only) subscription has been sent, once `total` are out.
async function outCounts(topic, total) {
  return eventually(async () => {
    const [sub] = (await client.stats(topic)).subscriptions;
    const counts = Object.fromEntries(sub.consumers.map((c) => [c.name, c.msgs_out]));
    return Object.values(counts).reduce((a, b) => a + b, 0) === total && counts;
  }, { what: `${total} messages out` });
}

function nextActive(consumer) {
  return once(consumer, "active").then(([active]) => active);
}

describe("subscription types", () => {
  it("exclusive: one consumer gets everything in order", async () => {
    const topic = freshTopic();
    const c = await client.subscribe({ topic, subscription: "s", type: "exclusive", consumer: "only" });
    const ids = await produce(topic, 20);
    assert.deepEqual((await take(c, 20)).map((m) => m.id), ids);
    await c.close();
  });

  it("shared: consumers split the messages, each delivered once", async () => {
    const topic = freshTopic();
    const a = await client.subscribe({ topic, subscription: "s", type: "shared", consumer: "a" });
    const b = await client.subscribe({ topic, subscription: "s", type: "shared", consumer: "b" });
    await produce(topic, 100);
    const counts = await outCounts(topic, 100);
    assert.ok(counts.a > 0 && counts.b > 0, JSON.stringify(counts));
    const ids = [...await take(a, counts.a), ...await take(b, counts.b)].map((m) => m.id).sort((x, y) => x - y);
    assert.deepEqual(ids, Array.from({ length: 100 }, (_, i) => i));
    await a.close();
    await b.close();
  });

  it("key_shared: all messages of a key go to one consumer, in order", async () => {
    const topic = freshTopic();
    const a = await client.subscribe({ topic, subscription: "s", type: "key_shared", consumer: "a" });
    const b = await client.subscribe({ topic, subscription: "s", type: "key_shared", consumer: "b" });
    await produce(topic, 200, {}, (i) => ({ key: `k${i % 20}` }));
    const counts = await outCounts(topic, 200);
    const owner = new Map();
    for (const [name, consumer] of [["a", a], ["b", b]]) {
      const msgs = await take(consumer, counts[name]);
      const lastId = new Map();
      for (const msg of msgs) {
        assert.equal(owner.get(msg.key) ?? name, name, `key ${msg.key} went to two consumers`);
        owner.set(msg.key, name);
        assert.ok((lastId.get(msg.key) ?? -1) < msg.id, "order per key");
        lastId.set(msg.key, msg.id);
      }
    }
    assert.equal(owner.size, 20);
    assert.equal(new Set(owner.values()).size, 2, "keys spread over both consumers");
    await a.close();
    await b.close();
  });

  it("failover: the first consumer by name is active; its loss promotes the next, seen as `active`", async () => {
    const topic = freshTopic();
    const b = await client.subscribe({ topic, subscription: "s", type: "failover", consumer: "b" });
    assert.equal(await nextActive(b), true);
    const bDemoted = nextActive(b);
    const a = await client.subscribe({ topic, subscription: "s", type: "failover", consumer: "a" });
    assert.equal(await nextActive(a), true);
    assert.equal(await bDemoted, false);
    assert.equal(b.active, false);

    await produce(topic, 5);
    assert.deepEqual((await take(a, 5)).map((m) => m.id), [0, 1, 2, 3, 4]);

    const bPromoted = nextActive(b);
    await a.close();
    assert.equal(await bPromoted, true);
    await produce(topic, 5);
    assert.deepEqual((await take(b, 5)).map((m) => m.id), [5, 6, 7, 8, 9]);
    await b.close();
  });

  it("failover: a standby on another connection is promoted when the active one's connection drops", async () => {
    const topic = freshTopic();
    const other = await connect(broker.address);
    const a = await other.subscribe({ topic, subscription: "s", type: "failover", consumer: "a" });
    const b = await client.subscribe({ topic, subscription: "s", type: "failover", consumer: "b" });
    assert.equal(await nextActive(b), false);
    const promoted = nextActive(b);
    other.socket.destroy(); // the active consumer's connection is lost, no close frames
    assert.equal(await promoted, true);
    await produce(topic, 3);
    assert.deepEqual((await take(b, 3)).map((m) => m.id), [0, 1, 2]);
    await b.close();
    void a;
  });
});

describe("reliable delivery", () => {
  it("a consumer name subscribed again takes the old attachment's place and its unacked messages", async () => {
    const topic = freshTopic("rel");
    const other = await connect(broker.address);
    const old = await other.subscribe({ topic, subscription: "s", consumer: "same", dispatch: "reliable" });
    await produce(topic, 2);
    await take(old, 2); // delivered, never acknowledged
    const replaced = once(old, "closed").then(([error]) => error);
    const fresh = await client.subscribe({ topic, subscription: "s", consumer: "same" });
    assert.equal((await replaced).reason, "replaced");
    const again = await take(fresh, 2);
    assert.deepEqual(again.map((m) => m.id), [0, 1]);
    await fresh.ack(again);
    await fresh.close();
    await other.close();
  });

  it("credits by hand: flow() lets the broker send that many more", async () => {
    const topic = freshTopic();
    const c = await client.subscribe({ topic, subscription: "s", consumer: "c", receiverQueue: 1 });
    await produce(topic, 4);
    await outCounts(topic, 1); // one credit, from receiverQueue; nothing taken yet
    c.flow(2);
    await outCounts(topic, 3);
    assert.equal((await client.stats(topic)).subscriptions[0].backlog, 1);
    assert.deepEqual((await take(c, 4)).map((m) => m.id), [0, 1, 2, 3]);
    await c.close();
  });

  it("an acknowledged message is not delivered again; an unacknowledged one is redelivered", async () => {
    const topic = freshTopic("rel");
    let c = await client.subscribe({ topic, subscription: "s", consumer: "c", dispatch: "reliable" });
    assert.equal(c.dispatch, "reliable");
    await produce(topic, 4);
    const first = await take(c, 4);
    await Promise.all([first[0].ack(), c.ack([first[1], first[2].id])]);
    await c.close(); // message 3 was never acknowledged
    c = await client.subscribe({ topic, subscription: "s", consumer: "c" });
    const [again] = await take(c, 1);
    assert.equal(again.id, 3);
    assert.equal(again.payload.toString(), "m3");
    await again.ack();
    await c.close();
  });

  it("nack redelivers at once, or after delayMs, counting redeliveries", async () => {
    const topic = freshTopic("rel");
    const c = await client.subscribe({ topic, subscription: "s", consumer: "c", dispatch: "reliable" });
    await produce(topic, 2);
    const [m0, m1] = await take(c, 2);
    assert.equal(m0.redeliveries, 0);
    await m0.nack();
    const r0 = await c.receive({ timeoutMs: 10000 });
    assert.equal(r0.id, 0);
    assert.equal(r0.redeliveries, 1);
    const sent = Date.now();
    await m1.nack({ delayMs: 300 });
    const r1 = await c.receive({ timeoutMs: 10000 });
    assert.equal(r1.id, 1);
    assert.ok(Date.now() - sent >= 250, "redelivered after the delay");
    await c.ack([r0, r1]);
    await c.close();
  });

  it("start: earliest reads what was published before the subscription existed", async () => {
    const topic = freshTopic("rel");
    await produce(topic, 3, { dispatch: "reliable" });
    const c = await client.subscribe({ topic, subscription: "new", consumer: "c", start: "earliest" });
    assert.deepEqual((await take(c, 3)).map((m) => m.payload.toString()), ["m0", "m1", "m2"]);
    await c.close();
  });

  it("maxUnacked bounds what is out with a consumer; acks let more through", async () => {
    const topic = freshTopic("rel");
    const c = await client.subscribe({ topic, subscription: "s", consumer: "c", dispatch: "reliable", maxUnacked: 3 });
    await produce(topic, 6);
    const firstThree = await take(c, 3);
    await assert.rejects(c.receive({ timeoutMs: 300 }), { code: "TIMEOUT" });
    await c.ack(firstThree);
    assert.deepEqual((await take(c, 3)).map((m) => m.id), [3, 4, 5]);
    await c.close();
  });

  it("ackTimeoutMs redelivers; maxRedeliveries moves the message to the dead-letter topic", async () => {
    const topic = freshTopic("rel");
    const dlq = freshTopic("dlq");
    const c = await client.subscribe({ topic, subscription: "s", consumer: "c", dispatch: "reliable",
      ackTimeoutMs: 200, maxRedeliveries: 1, deadLetterTopic: dlq });
    const dead = await client.subscribe({ topic: dlq, subscription: "d", consumer: "d", dispatch: "reliable", start: "earliest" });
    await produce(topic, 1);
    const m = await c.receive({ timeoutMs: 10000 });
    const again = await c.receive({ timeoutMs: 10000 }); // not acked: the ack timeout redelivers it
    assert.equal(again.id, m.id);
    assert.equal(again.redeliveries, 1);
    await again.nack();
    const [letter] = await take(dead, 1);
    assert.equal(letter.payload.toString(), "m0");
    assert.equal(letter.redeliveries, 0);
    await letter.ack();
    await c.close();
    await dead.close();
  });
});
