// A producer: send() queues a message and resolves with its topic offset once receipted.
// Messages sent in one turn of the event loop travel in one `send` frame (up to maxBatch, and
// never a frame over the broker's max_frame); up to maxPending messages are in flight unreceipted.
import { ActorbrokerError, ClosedError } from "./errors.js";
import { encodeSendFrame, encodeSendFrameV2 } from "./send_frame.js";
import { deferred, noop, waitFor } from "./waiting.js";

// Bytes of a `send` frame around its messages (header, op, rid, producer id, list header), and
// an upper bound of the msgpack bytes around one message's fields: v1 (a map per message), v2
// (columns: `payloads`, `keys`, `attrs`; a message has a bin header, a key or nil and an attrs
// map header there).
const SEND_OVERHEAD = { 1: 64, 2: 96 };
const MESSAGE_OVERHEAD = { 1: 48, 2: 16 };
// An attribute's name and value headers (at most 2 bytes each for 255 bytes: within this).
const ATTR_OVERHEAD = 10;
// A message must also fit, alone, in the broker's `message` push: the broker refuses one whose
// payload, key and attrs (each attr counted 10 bytes more) exceed max_frame less this envelope
// (transport/codec.py PUSH_OVERHEAD, 44, and 64 more) and the producer's name. The same bound here.
const PUSH_ENVELOPE = 44 + 64;
// A key, and each attrs name and value: at most this many bytes of UTF-8 (the broker's bound).
const MAX_NAME_BYTES = 255;

export class Producer {
  constructor(client, reply, options = {}) {
    const { maxBatch = 1000, lingerMs = 0, maxPending = 20000 } = options;
    this.client = client;
    this.id = reply.producer;
    this.topic = reply.topic;
    this.dispatch = reply.dispatch;
    this.maxBatch = maxBatch;
    this.lingerMs = lingerMs;
    this.maxPending = maxPending;
    // The protocol version of the connection: v2 sends columns (docs/protocol.md)
    this.encode = client.protocolVersion === 2 ? encodeSendFrameV2 : encodeSendFrame;
    this.messageOverhead = MESSAGE_OVERHEAD[client.protocolVersion === 2 ? 2 : 1];
    this.frameBudget = client.maxFrame - SEND_OVERHEAD[client.protocolVersion === 2 ? 2 : 1];
    // The broker's default name is producer-<id>; it is copied into every message it delivers.
    const name = options.name ?? `producer-${reply.producer}`;
    this.maxMessage = client.maxFrame - PUSH_ENVELOPE - Buffer.byteLength(name);
    this.batch = newBatch();
    this.ready = []; // full batches waiting for room in flight
    this.inFlight = 0; // messages sent and not yet answered
    this.timer = null;
    this.closing = null; // the promise of the first close()
    this.idle = []; // flush() waiters: settled when nothing is queued or in flight
    this.failure = null; // the first send error since the last flush()
    this.closedWith = null;
  }

  /**
   * Queues one message; resolves with its id (the topic offset). payload: Buffer, Uint8Array or
   * string (UTF-8); key: string; attrs: {string: string}; both copied at the call. The promise
   * never goes unhandled: flush() reports a failed send too.
   */
  send(payload, { key, attrs } = {}) {
    const wait = deferred();
    if (this.closedWith) return this.refuse(wait, this.closedWith);
    const msg = { payload: asBytes(payload), key: key ?? undefined, attrs: attrs ?? undefined };
    // Every check the broker makes of one message is made here, before batching: the broker
    // refuses a whole `send` frame for one bad message, failing the others batched with it.
    const wire = messageSize(msg); // as the broker measures it (see PUSH_ENVELOPE)
    const tooLong = longName(msg);
    if (tooLong) {
      return this.refuse(wait, new ActorbrokerError("BAD_REQUEST", `${tooLong} is longer than ${MAX_NAME_BYTES} bytes`));
    }
    if (wire > this.maxMessage) {
      return this.refuse(wait, new ActorbrokerError("MESSAGE_TOO_LARGE", `a message of ${wire} bytes is over the `
        + `${this.maxMessage} that the broker's max_frame of ${this.client.maxFrame} allows`));
    }
    // The batch is encoded at the end of the turn (or after lingerMs): what the caller passed is
    // copied now, so that a Buffer or attrs object reused right after send() changes nothing.
    if (typeof payload !== "string") msg.payload = Buffer.from(msg.payload);
    if (msg.attrs !== undefined) msg.attrs = { ...msg.attrs }; // (own "__proto__" stays a name)
    // An upper bound of its bytes in the `send` frame: a batch never makes a frame over max_frame
    const size = wire + this.messageOverhead;
    if (this.batch.bytes + size > this.frameBudget) this.seal();
    this.batch.msgs.push(msg);
    this.batch.waits.push(wait);
    this.batch.bytes += size;
    if (this.batch.msgs.length >= this.maxBatch) this.seal();
    else this.schedule();
    return wait.promise;
  }

  // A send failed before it reached the wire: its promise rejects (handled: nobody need await
  // it), and the next flush() reports the error too.
  refuse(wait, error) {
    if (!this.failure) this.failure = error;
    wait.reject(error);
    return wait.promise;
  }

  /** Sends what is queued now and resolves once every message sent so far is answered;
   * rejects with the first send error since the previous flush(). */
  flush({ signal, timeoutMs } = {}) {
    this.seal();
    return waitFor((resolve, reject) => {
      this.idle.push({ resolve, reject });
      this.checkIdle();
    }, { signal, timeoutMs, what: "flush" });
  }

  /** Flushes, then closes the producer on the broker. Calls made meanwhile share the first. */
  close(wait = {}) {
    this.closing ??= this.closeOnce(wait);
    return this.closing;
  }

  async closeOnce(wait) {
    if (this.closedWith) return;
    await this.flush(wait).catch(noop);
    this.closedWith = new ActorbrokerError("PRODUCER_CLOSED", "the producer was closed");
    this.client.producers.delete(this.id);
    await this.client.request({ op: "close_producer", producer: this.id }, wait);
  }

  // --- batching ---------------------------------------------------------------------------------

  schedule() {
    if (this.timer) return;
    const fire = () => {
      this.timer = null;
      this.seal();
    };
    this.timer = this.lingerMs > 0 ? setTimeout(fire, this.lingerMs) : setImmediate(fire);
  }

  cancelTimer() {
    if (!this.timer) return;
    if (this.lingerMs > 0) clearTimeout(this.timer);
    else clearImmediate(this.timer);
    this.timer = null;
  }

  // The current batch is complete: it goes out as soon as there is room in flight.
  seal() {
    this.cancelTimer();
    if (this.batch.msgs.length) {
      this.ready.push(this.batch);
      this.batch = newBatch();
    }
    this.pump();
  }

  pump() {
    while (this.ready.length && (this.inFlight === 0 || this.inFlight + this.ready[0].msgs.length <= this.maxPending)) {
      const batch = this.ready.shift();
      this.inFlight += batch.msgs.length;
      this.client.callEncoded((rid) => this.encode(rid, this.id, batch.msgs), {
        reply: (receipt) => this.answered(batch, receipt, null),
        fail: (error) => this.answered(batch, null, error),
      });
    }
  }

  answered(batch, receipt, error) {
    this.inFlight -= batch.msgs.length;
    if (error) {
      if (!this.failure) this.failure = error;
      for (const wait of batch.waits) wait.reject(error);
    } else {
      for (let i = 0; i < batch.waits.length; i++) batch.waits[i].resolve(receipt.first + i);
    }
    this.pump();
    this.checkIdle();
  }

  checkIdle() {
    if (this.inFlight || this.ready.length || this.batch.msgs.length || !this.idle.length) return;
    const waiters = this.idle;
    const failure = this.failure;
    this.idle = [];
    this.failure = null;
    for (const w of waiters) failure ? w.reject(failure) : w.resolve();
  }

  // --- ends ---------------------------------------------------------------------------------------

  /** The broker ended this producer (`closed` push): queued messages fail; sent ones get answers. */
  ended(reason) {
    this.client.producers.delete(this.id);
    this.failQueued(new ClosedError(reason, `producer ${this.id}`));
  }

  /** The connection is gone: everything not answered fails. */
  lost(error) {
    this.failQueued(error);
  }

  failQueued(error) {
    if (!this.closedWith) this.closedWith = error;
    this.cancelTimer();
    if (this.batch.msgs.length) this.ready.push(this.batch);
    this.batch = newBatch();
    const batches = this.ready;
    this.ready = [];
    for (const batch of batches) {
      for (const wait of batch.waits) wait.reject(error);
    }
    if (batches.length && !this.failure) this.failure = error;
    this.checkIdle();
  }
}

function newBatch() {
  return { msgs: [], waits: [], bytes: 0 };
}

function asBytes(payload) {
  if (Buffer.isBuffer(payload)) return payload;
  if (payload instanceof Uint8Array) return Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
  if (typeof payload === "string") return Buffer.from(payload, "utf8");
  throw new TypeError("payload must be a Buffer, a Uint8Array or a string");
}

// What of a message is over MAX_NAME_BYTES, or null.
function longName(msg) {
  if (msg.key !== undefined && Buffer.byteLength(msg.key) > MAX_NAME_BYTES) return "key";
  if (msg.attrs !== undefined) {
    for (const [name, value] of Object.entries(msg.attrs)) {
      if (Buffer.byteLength(name) > MAX_NAME_BYTES) return "an attrs name";
      if (Buffer.byteLength(value) > MAX_NAME_BYTES) return `attrs.${name}`;
    }
  }
  return null;
}

// The message's size as the broker bounds it: payload, key, and each attribute's name and value
// plus ATTR_OVERHEAD (the msgpack around them, the frame's fields aside, is within that too).
function messageSize(msg) {
  if (msg.attrs !== undefined && (typeof msg.attrs !== "object" || Array.isArray(msg.attrs) || msg.attrs instanceof Map)) {
    throw new TypeError("attrs must be a plain object of strings"); // (a string or an array was sent as {"0": ...})
  }
  let size = msg.payload.length;
  if (msg.key !== undefined) {
    if (typeof msg.key !== "string") throw new TypeError("key must be a string");
    size += Buffer.byteLength(msg.key);
  }
  if (msg.attrs !== undefined) {
    for (const [name, value] of Object.entries(msg.attrs)) {
      if (typeof value !== "string") throw new TypeError(`attrs.${name} must be a string`);
      size += ATTR_OVERHEAD + Buffer.byteLength(name) + Buffer.byteLength(value);
    }
  }
  return size;
}
