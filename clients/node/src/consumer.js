// A consumer: messages pushed by the broker wait in a receiver queue until taken with
// receive() or `for await`; credits are granted back as the queue is drained.
import { EventEmitter } from "node:events";

import { ActorbrokerError, ClosedError } from "./errors.js";
import { deferred, waitFor } from "./waiting.js";

// Bytes of an `ack` / `nack` frame around its ids: the map with op, rid, consumer, delay_ms and
// the list header, each number at its longest (9 bytes), with room to spare.
const IDS_FRAME_OVERHEAD = 96;
// The most credits of one `flow` (transport/validate.py MAX_CREDITS): more is BAD_REQUEST.
export const MAX_CREDITS = 2 ** 32 - 1;

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
  constructor(consumer, id, payload, key, attrs, time, producer, redeliveries) {
    this.consumer = consumer;
    this.id = id;
    this.payload = payload; // a Buffer: bin fields are decoded as views of the frame
    this.key = key ?? null;
    this.attrs = attrs ?? {};
    this.time = time;
    this.producer = producer;
    this.redeliveries = redeliveries;
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
 * "closed" (the broker ended the consumer, or the connection ended).
 * "active" is emitted as its push is read, in frame order: before any message that came after it
 * is handed over. One that came before the application had the consumer (with the `subscribed`
 * reply) waits for the first receive() (or `for await`) or the next turn of the event loop,
 * whichever comes first, so a listener attached right after `await client.subscribe(...)` sees
 * it. "closed" is emitted from a later turn of the event loop than its cause.
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
    this.receiverQueue = options.receiverQueue ?? 1000;   // (checked by Client.subscribe)
    this.active = undefined; // failover: the broker's last word on it
    this.queue = [];
    this.head = 0; // queue[head..] are not yet taken
    this.takers = []; // receive() waiters, oldest first
    this.taken = 0; // messages taken since the last flow
    this.acks = null; // ids waiting for the ack frame of this turn, with their waiters
    this.acksTimer = null; // the setImmediate that sends them
    this.unanswered = new Set(); // ack and nack frames sent and not yet answered (promises)
    this.endedWith = undefined; // null: closed by us; an error: ended by the broker or the connection
    this.inUse = false; // the application has had this consumer: events are emitted as they come
    this.early = []; // [event, value, later] that came before that (emitted once it is in use)
  }

  start() {
    this.flow(this.receiverQueue);
    setImmediate(() => this.use());
  }

  // The application has had a chance to add its listeners: the events held until now go out.
  use() {
    if (this.inUse) return;
    this.inUse = true;
    const early = this.early;
    this.early = [];
    for (const [event, value, later] of early) {
      if (later) setImmediate(() => this.emitNow(event, value));
      else this.emitNow(event, value);
    }
  }

  // From a later turn of the event loop (after any event held before it).
  emitLater(event, value) {
    if (this.inUse) setImmediate(() => this.emitNow(event, value));
    else this.early.push([event, value, true]);
  }

  emitNow(event, value) {
    try {
      this.emit(event, value);
    } catch (err) {
      // A listener's own failure, not the connection's: thrown as from any event's listener
      process.nextTick(() => {
        throw err;
      });
    }
  }

  /** Grants the broker `credits` more messages (done automatically from receiverQueue). */
  flow(credits) {
    if (!Number.isInteger(credits) || credits < 0 || credits > MAX_CREDITS) {
      throw new RangeError(`credits must be an integer from 0 to ${MAX_CREDITS}`);
    }
    if (credits > 0) this.client.write({ op: "flow", consumer: this.id, credits });
  }

  /**
   * The next message. Rejects with the reason the consumer ended (ClosedError, ConnectionError),
   * or with an ActorbrokerError of code CONSUMER_CLOSED after close().
   */
  receive({ signal, timeoutMs } = {}) {
    this.use(); // (an "active" still held goes before the message)
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
   * travel in one frame (in several when they do not fit in the broker's max_frame). Resolves
   * once the broker answered them all (reliable: once they are on disk); rejects if any failed. */
  ack(ids) {
    if (this.endedWith !== undefined) return rejected(this.endReason());
    if (!this.acks) {
      this.acks = { ids: [], wait: deferred() };
      this.acksTimer = setImmediate(() => this.sendAcks());
    }
    for (const id of idList(ids)) this.acks.ids.push(id);
    return this.acks.wait.promise;
  }

  /** Sends the acks of this turn now (also done by close() before it ends anything). */
  sendAcks() {
    if (!this.acks) return;
    clearImmediate(this.acksTimer);
    const { ids, wait } = this.acks;
    this.acks = null;
    this.acksTimer = null;
    this.sendIds({ op: "ack", consumer: this.id }, ids, wait);
  }

  /** Asks the broker to redeliver these ids (after delayMs). */
  nack(ids, { delayMs } = {}) {
    if (this.endedWith !== undefined) return rejected(this.endReason());
    const wait = deferred();
    this.sendIds({ op: "nack", consumer: this.id, delay_ms: delayMs }, idList(ids), wait);
    return wait.promise;
  }

  /**
   * Sends an `ack` / `nack` of `ids` in as many frames (each with its rid) as the broker's
   * max_frame needs (PROTOCOL.md: it bounds frames in both directions): `wait` resolves once
   * every part is answered, and rejects with the first error of any part.
   */
  sendIds(frame, ids, wait) {
    const parts = splitIds(ids, this.client.maxFrame - IDS_FRAME_OVERHEAD);
    let left = parts.length;
    let failed = false;
    for (const part of parts) {
      const answered = new Promise((settle) => {
        this.client.call({ ...frame, ids: part }, {
          reply: () => {
            settle();
            if (--left === 0 && !failed) wait.resolve();
          },
          fail: (error) => {
            settle();
            if (!failed) {
              failed = true;
              wait.reject(error);
            }
          },
        });
      });
      this.unanswered.add(answered);
      answered.then(() => this.unanswered.delete(answered));
    }
  }

  /** Sends the acks of this turn and resolves once every ack and nack sent is answered. */
  async settleAcks() {
    this.sendAcks();
    while (this.unanswered.size) await Promise.all([...this.unanswered]);
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
    this.sendAcks(); // acks of this turn go before the close, while the consumer is still there
    this.end(null);
    await this.client.request({ op, consumer: this.id }, wait);
  }

  // --- pushes from the broker ---------------------------------------------------------------------

  pushed(frame) {
    if (frame.op === "message") {
      if (frame.runs !== undefined) this.deliverRuns(frame.runs);
      else for (const r of frame.msgs) this.deliver(new Message(this, r.id, r.payload, r.key, r.attrs, r.time, r.producer, r.redeliveries));
    } else if (frame.op === "active") {
      this.active = frame.active;
      if (this.inUse) this.emitNow("active", frame.active);
      else this.early.push(["active", frame.active, false]);
    } else if (frame.op === "closed") {
      const error = new ClosedError(frame.reason, `consumer ${this.id}`);
      this.end(error);
      this.emitLater("closed", error);
    }
  }

  /**
   * The v2 push (docs/protocol.md, "Protocol version 2"): runs of [first, time, producer,
   * redeliveries, payloads, keys|nil, attrs|nil]; message i of a run is id first+i with
   * payloads[i], keys[i] and attrs[i] ({} when nil), and the run's time, producer and
   * redeliveries: the same Message as a v1 record gives, each counted against the credits.
   */
  deliverRuns(runs) {
    for (const [first, time, producer, redeliveries, payloads, keys, attrs] of runs) {
      for (let i = 0; i < payloads.length; i++) {
        this.deliver(new Message(this, first + i, payloads[i], keys == null ? null : keys[i],
          attrs == null ? null : attrs[i], time, producer, redeliveries));
      }
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
  // The connection ended: told as a `closed` event too, as a close by the broker is (once).
  lost(error) {
    if (this.endedWith !== undefined) return;
    this.end(error);
    this.emitLater("closed", error);
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

// ids cut into lists whose msgpack fits in `budget` bytes (at least one list, maybe empty).
function splitIds(ids, budget) {
  const parts = [];
  let part = [];
  let bytes = 0;
  for (const id of ids) {
    const size = uintBytes(id);
    if (part.length && bytes + size > budget) {
      parts.push(part);
      part = [];
      bytes = 0;
    }
    part.push(id);
    bytes += size;
  }
  parts.push(part);
  return parts;
}

// msgpack bytes of an id: a positive fixint, uint 8/16/32/64 (anything else counted at the longest).
function uintBytes(id) {
  if (typeof id !== "number" || !Number.isInteger(id) || id < 0) return 9;
  if (id < 0x80) return 1;
  if (id < 0x100) return 2;
  if (id < 0x10000) return 3;
  if (id < 2 ** 32) return 5;
  return 9;
}

function rejected(error) {
  const wait = deferred();
  wait.reject(error);
  return wait.promise;
}
