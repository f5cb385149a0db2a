// Compiled (never run) by test/types.test.js: the README's uses of the API against src/index.d.ts.
import {
  ActorbrokerError, BrokerError, ClosedError, connect, type Consumer, type Message, type Producer, type TopicStats,
  PROTOCOL_VERSION, type ProtocolVersion,
} from "actorbroker-client";

const client = await connect("tls://127.0.0.1:6650", {
  token: "t", heartbeatMs: 5000, name: "typed", tls: { ca: "PEM" }, signal: AbortSignal.timeout(1000),
  protocolVersion: 1,
});
const spoken: ProtocolVersion = client.protocolVersion;
const highest: 2 = PROTOCOL_VERSION;
console.log(spoken, highest);
// @ts-expect-error: only versions 1 and 2 exist
await connect("127.0.0.1:6650", { protocolVersion: 3 });
const producer: Producer = await client.producer("/a/b", { dispatch: "reliable", access: "shared", lingerMs: 1 });
const id: number = await producer.send(Buffer.from("x"), { key: "k", attrs: { a: "b" } });
await producer.send("text");
await producer.flush({ timeoutMs: 100 });
const consumer: Consumer = await client.subscribe({
  topic: "/a/b", subscription: "s", type: "failover", consumer: "c", start: "earliest", maxUnacked: 5,
  ackTimeoutMs: 1000, maxRedeliveries: 3, deadLetterTopic: "/a/dlq", receiverQueue: 10,
});
consumer.on("active", (active: boolean) => console.log(active, consumer.active));
consumer.on("closed", (error) => {
  // @ts-expect-error: a lost connection gives its own error (a ConnectionError, ...): no reason
  const reason: string = error.reason;
  if (error instanceof ClosedError) console.log(error.reason, error.code, reason);
  else console.log(error.code, error.name);
});
client.on("close", (error: ActorbrokerError) => console.log(error.code));
client.on("close", (error) => console.log(error instanceof BrokerError ? error.rid : error.code));
for await (const msg of consumer) {
  const m: Message = msg;
  await m.ack();
  await m.nack({ delayMs: 10 });
  console.log(m.id, m.payload.length, m.key?.length, m.attrs.a, m.time, m.producer, m.redeliveries, id);
}
const next: Message = await consumer.receive({ signal: new AbortController().signal });
await consumer.ack([next, 1]);
await consumer.nack(next.id, { delayMs: 5 });
const stats: TopicStats = await client.stats("/a/b");
console.log(stats.subscriptions[0].consumers[0].unacked, (await client.topics())[0].name, await client.ping());
const listed = await client.topics({ timeoutMs: 100 });
const cut: boolean = listed.truncated;
const statsCut: boolean | undefined = stats.truncated;
console.log(listed.length, cut, statsCut);
try {
  await client.deleteTopic("/a/b");
} catch (e) {
  if (e instanceof BrokerError) console.log(e.code, e.rid);
}
await consumer.unsubscribe();
await producer.close();
await client.close({ timeoutMs: 1000 });
