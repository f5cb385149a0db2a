// A consumer: messages pushed by the broker wait in a receiver queue until taken with
// receive() or `for await`; credits are granted back as the queue is drained.
import { EventEmitter } from "node:events";

import { ActorbrokerError, ClosedError } from "./errors.js";
import { deferred, waitFor } from "./waiting.js";

/** The `subscribe` frame for the options of Client.subscribe(). */
export function subscribeFrame(o) {
  return {
    op: "subscribe", topic: o.topic, subscription: o.subscription, type: o.type ?? "exclusive",
    consumer: o.consumer ?? `node-${process.pid}-${Math.random().toString(36).slice(2, 10)}`,
    start: o.start, dispatch: o.dispatch, max_unacked: o.maxUnacked, ack_timeout_ms: o.ackTimeoutMs,
    max_redeliveries: o.maxRedeliveries, dead_letter_topic: o.deadLetterTopic,
  };
}

/** One delivered message. `payload` is a Buffer, `key` a string or null, `attrs` an object. */
export class Message {
  constructor(consumer, record) {
    this.consumer = consumer;
    this.id = record.id;
    this.payload = record.payload; // a Buffer: bin fields are decoded as views of the frame
    this.key = record.key ?? null;
    this.attrs = record.attrs ?? {};
    this.time = record.time;
    this.producer = record.producer;
    this.redeliveries = record.redeliveries;
  }

  /** Acknowledges this message for its subscription; resolves once the broker confirmed it. */
  ack() {
    return this.consumer.ack(this.id);
  }

  /** Asks for redelivery, after `delayMs` if given. */
  nack({ delayMs } = {}) {
    return this.consumer.nack(this.id, { delayMs });
  }
}

/**
 * Events: "active" (boolean, failover subscriptions: this consumer receives or stands by),
 * "closed" (ClosedError: the broker ended the consumer). Both are emitted from a later turn of
 * the event loop than the frame that caused them, so a listener attached right after
 * `await client.subscribe(...)` sees the first one.
 */
export class Consumer extends EventEmitter {
  constructor(client, reply, options) {
    super();
    this.client = client;
    this.id = reply.consumer;
    this.dispatch = reply.dispatch;
    this.topic = options.topic;
    this.subscription = options.subscription;
    this.type = options.type ?? "exclusive";
    this.receiverQueue = options.receiverQueue ?? 1000;
    this.active = undefined; // failover: the broker's last word on it
    this.queue = [];
    this.head = 0; // queue[head..] are not yet taken
    this.takers = []; // receive() waiters, oldest first
    this.taken = 0; // messages taken since the last flow
    this.acks = null; // ids waiting for the ack frame of this turn, with their waiters
    this.endedWith = undefined; // null: closed by us; an error: ended by the broker or the connection
  }

  start() {
    this.flow(this.receiverQueue);
  }

  /** Grants the broker `credits` more messages (done automatically from receiverQueue). */
  flow(credits) {
    if (credits > 0) this.client.write({ op: "flow", consumer: this.id, credits });
  }

  /**
   * The next message. Rejects with the reason the consumer ended (ClosedError, ConnectionError),
   * or with an ActorbrokerError of code CONSUMER_CLOSED after close().
   */
  receive({ signal, timeoutMs } = {}) {
    if (this.head < this.queue.length) return Promise.resolve(this.take());
    if (this.endedWith !== undefined) return Promise.reject(this.endReason());
    let taker;
    return waitFor((resolve, reject) => {
      taker = { resolve, reject };
      this.takers.push(taker);
    }, { signal, timeoutMs, what: "receive" }, () => {
      this.takers = this.takers.filter((t) => t !== taker);
    });
  }

  /** `for await (const msg of consumer)`: ends after close(), throws when the broker ends it. */
  async *[Symbol.asyncIterator]() {
    for (;;) {
      let msg;
      try {
        msg = await this.receive();
      } catch (err) {
        if (err.code === "CONSUMER_CLOSED" || err.code === "CLIENT_CLOSED") return;
        throw err;
      }
      yield msg;
    }
  }

  /** Acknowledges ids (a number, a Message, or an array of them); acks of one event-loop turn
   * travel in one frame. Resolves once the broker answered (reliable: once it is on disk). */
  ack(ids) {
    if (this.endedWith !== undefined) return rejected(this.endReason());
    if (!this.acks) {
      this.acks = { ids: [], wait: deferred() };
      setImmediate(() => this.sendAcks());
    }
    for (const id of idList(ids)) this.acks.ids.push(id);
    return this.acks.wait.promise;
  }

  sendAcks() {
    const { ids, wait } = this.acks;
    this.acks = null;
    this.client.call({ op: "ack", consumer: this.id, ids }, { reply: () => wait.resolve(), fail: wait.reject });
  }

  /** Asks the broker to redeliver these ids (after delayMs). */
  nack(ids, { delayMs } = {}) {
    if (this.endedWith !== undefined) return rejected(this.endReason());
    const wait = deferred();
    this.client.call({ op: "nack", consumer: this.id, ids: idList(ids), delay_ms: delayMs },
      { reply: () => wait.resolve(), fail: wait.reject });
    return wait.promise;
  }

  /** Detaches this consumer; its unacknowledged messages return to the subscription. */
  close(wait) {
    return this.detach("close_consumer", wait);
  }

  /** Detaches and deletes the subscription with its cursor. */
  unsubscribe(wait) {
    return this.detach("unsubscribe", wait);
  }

  async detach(op, wait) {
    if (this.endedWith !== undefined) return;
    this.end(null);
    await this.client.request({ op, consumer: this.id }, wait);
  }

  // --- pushes from the broker ---------------------------------------------------------------------

  pushed(frame) {
    if (frame.op === "message") {
      for (const record of frame.msgs) this.deliver(new Message(this, record));
    } else if (frame.op === "active") {
      this.active = frame.active;
      setImmediate(() => this.emit("active", frame.active));
    } else if (frame.op === "closed") {
      const error = new ClosedError(frame.reason, `consumer ${this.id}`);
      this.end(error);
      setImmediate(() => this.emit("closed", error));
    }
  }

  deliver(msg) {
    if (this.endedWith !== undefined) return;
    const taker = this.takers.shift();
    if (taker) {
      this.credit();
      taker.resolve(msg);
    } else {
      this.queue.push(msg);
    }
  }

  take() {
    const msg = this.queue[this.head];
    this.queue[this.head++] = undefined;
    if (this.head === this.queue.length) {
      this.queue = [];
      this.head = 0;
    } else if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
    this.credit();
    return msg;
  }

  // One message left the receiver queue: grant credits back in halves of the queue.
  credit() {
    if (this.endedWith !== undefined) return;
    this.taken++;
    if (this.taken * 2 >= this.receiverQueue) {
      this.flow(this.taken);
      this.taken = 0;
    }
  }

  /** The connection is gone. */
  lost(error) {
    this.end(error);
  }

  // Messages already queued can still be taken; then receive() rejects with the reason.
  end(error) {
    if (this.endedWith !== undefined) return;
    this.endedWith = error;
    this.client.consumers.delete(this.id);
    if (error === null || error.code === "CLIENT_CLOSED") { // what is queued can no longer be acked
      this.queue = [];
      this.head = 0;
    }
    const takers = this.takers;
    this.takers = [];
    for (const t of takers) t.reject(this.endReason());
  }

  endReason() {
    return this.endedWith ?? new ActorbrokerError("CONSUMER_CLOSED", `consumer ${this.id} was closed`);
  }
}

function idList(ids) {
  const list = Array.isArray(ids) ? ids : [ids];
  return list.map((x) => (x instanceof Message ? x.id : x));
}

function rejected(error) {
  const wait = deferred();
  wait.reject(error);
  return wait.promise;
}
