// One connection to a broker: the socket, requests and their replies, heartbeats, and the
// routing of broker pushes to the producers and consumers opened on it.
import { EventEmitter } from "node:events";
import net from "node:net";
import tls from "node:tls";

import { DEFAULT_HOST, DEFAULT_PORT, parseAddress } from "./address.js";
import { encodeFrame, FrameDecoder } from "./codec.js";
import { Consumer, MAX_CREDITS, subscribeFrame } from "./consumer.js";
import { ActorbrokerError, BrokerError, ConnectionError } from "./errors.js";
import { Producer } from "./producer.js";
import { noop, waitFor } from "./waiting.js";

/** The highest protocol version this client speaks, and the one it asks for by default: 2
 * (docs/protocol.md, "Protocol version 2"); a broker that welcomes it with 1 is spoken v1. */
export const PROTOCOL_VERSION = 2;
const VERSIONS = [1, 2];
// Nothing at all received for this many heartbeats: the broker is gone.
const DEAD_AFTER_HEARTBEATS = 3;
// Handlers of a request whose answer nobody waits for.
const QUIET = { reply: noop, fail: noop };
// Error codes after which the broker closes the connection (PROTOCOL.md, docs/protocol.md).
const FATAL_CODES = new Set(["BAD_FRAME", "FRAME_TOO_LARGE", "NOT_CONNECTED", "UNSUPPORTED_VERSION",
  "AUTH_FAILED", "SLOW_CONSUMER"]);

/**
 * Connects and says hello: resolves with a ready Client.
 * options: token, heartbeatMs, name (the client name sent in hello), protocolVersion (1 or 2,
 * default 2: the version asked for in hello), tls (node:tls options for tls:// addresses), signal,
 * timeoutMs (connect + hello, default 10000).
 */
export async function connect(address = `${DEFAULT_HOST}:${DEFAULT_PORT}`, options = {}) {
  const version = options.protocolVersion ?? PROTOCOL_VERSION;
  if (!VERSIONS.includes(version)) throw new RangeError(`protocolVersion must be 1 or 2, not ${version}`);
  const { host, port, tls: secure } = parseAddress(address);
  const timeoutMs = options.timeoutMs ?? 10000;
  const what = `connect to ${address}`;
  const socket = await openSocket(host, port, secure ? { ...options.tls } : null, options.signal, timeoutMs, what);
  const client = new Client(socket, address);
  try {
    await client.hello(options, { signal: options.signal, timeoutMs, what });
  } catch (err) {
    client.destroy(err);
    throw err;
  }
  return client;
}

function openSocket(host, port, tlsOptions, signal, timeoutMs, what) {
  let socket;
  return waitFor((resolve, reject) => {
    const ready = tlsOptions ? "secureConnect" : "connect";
    socket = tlsOptions
      ? tls.connect({ host, port, servername: net.isIP(host) ? undefined : host, ...tlsOptions })
      : net.connect({ host, port });
    socket.once(ready, () => {
      socket.removeAllListeners("error");
      resolve(socket);
    });
    socket.once("error", (err) => reject(new ConnectionError("CONNECT_FAILED", `${what}: ${err.message}`, { cause: err })));
  }, { signal, timeoutMs, what }, () => socket?.destroy());
}

export class Client extends EventEmitter {
  constructor(socket, address) {
    super();
    this.address = address;
    this.socket = socket;
    this.decoder = new FrameDecoder();
    this.nextRid = 1;
    this.pending = new Map(); // rid -> {reply(frame), fail(error)}
    this.producers = new Map(); // id -> Producer
    this.consumers = new Map(); // id -> Consumer
    this.held = new Map(); // consumer id -> pushes that came before its `subscribed` reply
    this.subscribing = 0; // subscribes in flight: pushes for unknown ids are held meanwhile
    this.maxFrame = undefined;
    this.heartbeatMs = undefined;
    this.protocolVersion = undefined; // the version spoken: 1 or 2, from the welcome
    this.broker = undefined;
    this.lastReceived = Date.now();
    this.lastCheck = 0;
    this.pingInFlight = false;
    this.queued = 0; // bytes given to the socket so far
    this.answers = 0; // replies and error frames answering our requests: the broker read those
    this.progress = 0; // writeProgress() at the last check...
    this.progressAt = Date.now(); // ... (more than before at this time, or nothing was waiting)
    this.heartbeat = null;
    this.fatal = null; // the fatal error frame the broker sent before closing, if any
    this.closedWith = null; // set once: the connection is over
    socket.setNoDelay(true);
    socket.on("data", (chunk) => this.received(chunk));
    // a reset right after a fatal error frame (the broker closed with our hello unread): the frame is the cause
    socket.on("error", (err) => this.destroy(this.fatal ?? new ConnectionError("CONNECTION_LOST", `connection to ${address} failed: ${err.message}`, { cause: err })));
    socket.on("close", () => this.destroy(this.fatal ?? new ConnectionError("CONNECTION_LOST", `connection to ${address} closed by the broker`)));
  }

  /** True until the connection ends (close(), a lost socket, a fatal error). */
  get connected() {
    return this.closedWith === null;
  }

  async hello({ token, heartbeatMs, name = "actorbroker-node", protocolVersion }, wait) {
    const asked = protocolVersion ?? PROTOCOL_VERSION;
    const welcome = await this.request({ op: "hello", version: asked, client: name, token,
      heartbeat_ms: heartbeatMs }, wait);
    // The welcome repeats the version asked for; a broker of v1 only welcomes a v2 hello with 1
    // (or says no version at all): then this connection speaks v1.
    this.protocolVersion = asked === 2 && welcome.version === 2 ? 2 : 1;
    this.broker = welcome.broker;
    this.maxFrame = welcome.max_frame;
    this.heartbeatMs = welcome.heartbeat_ms;
    this.lastCheck = Date.now();
    this.heartbeat = setInterval(() => this.checkAlive(), Math.max(50, this.heartbeatMs / 4));
    this.heartbeat.unref();
  }

  // --- requests -------------------------------------------------------------------------------

  /** Sends `frame` with a new rid; `handlers.reply(frame)` / `handlers.fail(error)` settle it. */
  call(frame, handlers) {
    this.callEncoded((rid) => {
      frame.rid = rid;
      return encodeFrame(frame);
    }, handlers);
  }

  /** call() for a frame that encode(rid) gives as bytes (the producer's `send` frames). */
  callEncoded(encode, handlers) {
    if (this.closedWith) {
      handlers.fail(this.closedWith);
      return;
    }
    const rid = this.nextRid++;
    this.pending.set(rid, handlers);
    this.send(encode(rid));
  }

  /** Bytes to the socket, counted: checkAlive tells a broker that takes none of them for two
   * heartbeats (a hung host that still answers pings) from a slow one. */
  send(bytes) {
    this.queued += bytes.length;
    this.socket.write(bytes);
  }

  /** Sends `frame` and resolves with its reply; an `error` reply rejects with a BrokerError. */
  request(frame, { signal, timeoutMs, what = frame.op } = {}) {
    return waitFor((resolve, reject) => {
      this.call(frame, { reply: resolve, fail: reject });
    }, { signal, timeoutMs, what });
  }

  write(frame) {
    if (this.closedWith) return;
    this.send(encodeFrame(frame));
  }

  // --- producers and consumers ----------------------------------------------------------------

  /**
   * Opens a producer. options: name, dispatch ("non_reliable"|"reliable"), access
   * ("shared"|"exclusive"), maxBatch, lingerMs, maxPending, signal, timeoutMs.
   */
  producer(topic, options = {}) {
    const frame = { op: "producer", topic, name: options.name, dispatch: options.dispatch, access: options.access };
    return this.open(frame, options, `producer on ${topic}`,
      (reply) => {
        const producer = new Producer(this, reply, options);
        this.producers.set(producer.id, producer);
        return producer;
      },
      (reply) => this.call({ op: "close_producer", producer: reply.producer }, QUIET));
  }

  /**
   * Subscribes. options: topic, subscription, type, consumer, start, dispatch, maxUnacked,
   * ackTimeoutMs, maxRedeliveries, deadLetterTopic, receiverQueue, signal, timeoutMs.
   */
  subscribe(options) {
    if (options.signal?.aborted) return Promise.reject(options.signal.reason);
    const queue = options.receiverQueue;
    // It is granted as one flow: at most MAX_CREDITS (the broker's bound of a flow's credits)
    if (queue !== undefined && (!Number.isInteger(queue) || queue < 1 || queue > MAX_CREDITS)) {
      return Promise.reject(new RangeError(`receiverQueue must be an integer from 1 to ${MAX_CREDITS}`));
    }
    const frame = subscribeFrame(options);
    this.subscribing++;
    const settled = () => {
      this.subscribing--;
      if (this.subscribing === 0) this.held.clear();
    };
    return this.open(frame, options, `subscribe to ${options.topic}`,
      (reply) => {
        const consumer = new Consumer(this, reply, options);
        this.consumers.set(consumer.id, consumer);
        this.replayHeld(consumer.id);
        consumer.start();
        settled();
        return consumer;
      },
      (reply) => {
        settled();
        this.call({ op: "close_consumer", consumer: reply.consumer }, QUIET);
      },
      settled);
  }

  /**
   * A request that opens something: make(reply) builds it while the reply is handled (so that
   * pushes right behind the reply find it); undo(reply) closes it again when the caller has
   * given up waiting (signal, timeout) before the reply came.
   */
  open(frame, { signal, timeoutMs }, what, make, undo, failed = noop) {
    let abandoned = false;
    return waitFor((resolve, reject) => {
      this.call(frame, {
        reply: (reply) => (abandoned ? undo(reply) : resolve(make(reply))),
        fail: (err) => {
          failed();
          reject(err);
        },
      });
    }, { signal, timeoutMs, what }, () => {
      abandoned = true;
    });
  }

  // --- admin and liveness -----------------------------------------------------------------------

  /** Every topic: [{name, dispatch, subscriptions, producers}]; `.truncated` (true or false, not
   * enumerable) tells a list the broker cut to fit its max_frame (docs/protocol.md). */
  async topics(wait) {
    const reply = await this.request({ op: "topics" }, wait);
    const listed = reply.topics;
    Object.defineProperty(listed, "truncated", { value: reply.truncated === true, enumerable: false });
    return listed;
  }

  /** The stats of one topic, as the broker sends them (snake_case fields). */
  async stats(topic, wait) {
    const { op, rid, ...stats } = await this.request({ op: "stats", topic }, wait);
    return stats;
  }

  async deleteTopic(topic, wait) {
    await this.request({ op: "delete_topic", topic }, wait);
  }

  /** Round trip to the broker, in milliseconds. */
  async ping(wait) {
    const start = performance.now();
    await this.request({ op: "ping" }, wait);
    return performance.now() - start;
  }

  /**
   * Ends everything: sends the consumers' acks not yet sent and flushes the producers (waiting
   * for the broker's answers to acks, nacks and sends up to `timeoutMs`, default 5000), then
   * closes the connection. Consumers' iterators end.
   */
  async close({ signal, timeoutMs = 5000 } = {}) {
    if (this.closedWith) return;
    const deadline = Date.now() + timeoutMs;
    const settles = [...this.consumers.values()].map((c) => c.settleAcks());
    const flushes = [...this.producers.values()].map((p) => p.flush().catch(noop));
    let aborted = null;
    await waitFor((resolve) => Promise.all([...settles, ...flushes]).then(resolve), { signal, timeoutMs, what: "close" })
      .catch((error) => { if (signal?.aborted) aborted = error; });
    if (!this.closedWith) {
      const socket = this.socket;
      const closing = new Promise((resolve) => socket.once("close", resolve));
      this.destroy(new ConnectionError("CLIENT_CLOSED", "the client was closed"), { graceful: true });
      // The broker closes its side on our EOF; one that does not is cut off, within timeoutMs
      // in all (at most 2 s more after the flush), and at once when the call was aborted.
      const left = aborted ? 0 : Math.min(2000, deadline - Date.now());
      if (left <= 0) socket.destroy();
      else await waitFor((resolve) => closing.then(resolve), { timeoutMs: left }).catch(() => socket.destroy());
    }
    if (aborted) throw aborted;
  }

  // --- incoming ---------------------------------------------------------------------------------

  received(chunk) {
    this.lastReceived = Date.now();
    this.decoder.feed(chunk);
    try {
      for (let frame = this.decoder.next(); frame !== undefined; frame = this.decoder.next()) {
        this.dispatch(frame);
        if (this.closedWith) return;
      }
    } catch (err) {
      this.destroy(err instanceof ActorbrokerError ? err
        : new ConnectionError("INTERNAL", `client failed handling a frame: ${err.message}`, { cause: err }));
    }
  }

  dispatch(frame) {
    switch (frame.op) {
      case "message":
      case "active":
        return this.push(frame, frame.consumer);
      case "closed":
        return frame.producer !== undefined ? this.producers.get(frame.producer)?.ended(frame.reason)
          : this.push(frame, frame.consumer);
      case "ping":
        return this.write({ op: "pong", rid: frame.rid });
      case "error":
        return this.brokerError(frame);
      default:
        return this.answer(frame);
    }
  }

  answer(frame) {
    const handlers = this.pending.get(frame.rid);
    if (!handlers) return; // not a request of ours (or one already failed by the connection)
    this.answers++;
    this.pending.delete(frame.rid);
    handlers.reply(frame);
  }

  brokerError(frame) {
    const error = new BrokerError(frame.code, frame.message, frame.rid);
    // the close follows; it is the cause. So it is for an error without rid before the welcome:
    // a connection the broker refuses at once (OVERLOADED: --max-connections)
    if (FATAL_CODES.has(frame.code) || (frame.rid === undefined && this.maxFrame === undefined)) this.fatal = error;
    const handlers = frame.rid !== undefined && this.pending.get(frame.rid);
    if (handlers) {
      this.answers++;
      this.pending.delete(frame.rid);
      handlers.fail(error);
    } else {
      this.emit("warning", error);
    }
  }

  push(frame, consumerId) {
    const consumer = this.consumers.get(consumerId);
    if (consumer) return consumer.pushed(frame);
    if (this.subscribing === 0) return; // a push for a consumer already closed here
    const list = this.held.get(consumerId);
    if (list) list.push(frame);
    else this.held.set(consumerId, [frame]);
  }

  replayHeld(consumerId) {
    const frames = this.held.get(consumerId);
    if (!frames) return;
    this.held.delete(consumerId);
    const consumer = this.consumers.get(consumerId);
    for (const frame of frames) consumer.pushed(frame);
  }

  /**
   * A count that grows as the broker takes what this client writes: the bytes the kernel has
   * taken from the socket (of the TCP socket under TLS), plus the broker's answers. Not
   * socket.writableLength, nor socket.bytesWritten: Node writes the chunks queued behind a write
   * in progress as one writev, and both move only once all of it is written, which takes
   * seconds of a broker that reads steadily.
   */
  writeProgress() {
    const handle = this.socket._handle;
    const stream = handle?._parent ?? handle; // libuv's stream: bytes dispatched, and still queued
    let taken = stream ? stream.bytesWritten - stream.writeQueueSize : NaN;
    if (!Number.isFinite(taken)) taken = this.queued - (this.socket.writableLength ?? 0); // (no libuv stream)
    return taken + this.answers;
  }

  checkAlive() {
    const now = Date.now();
    const stalled = now - this.lastCheck > this.heartbeatMs; // the event loop was blocked: data may be waiting unread
    this.lastCheck = now;
    const progress = this.writeProgress();
    if (stalled || progress !== this.progress || !(this.socket.writableLength > 0)) {
      // (blocked, we gave the socket no chance to write either)
      this.progress = progress;
      this.progressAt = now;
      if (stalled) return;
    }
    const silent = now - this.lastReceived;
    if (now - this.progressAt >= 2 * this.heartbeatMs) {
      // A send never waits longer than that, as in the Python client: the broker reads nothing
      this.destroy(new ConnectionError("CONNECTION_LOST", `the broker took none of the ${this.socket.writableLength} `
        + `bytes waiting to be written for ${now - this.progressAt} ms (2 heartbeats)`));
    } else if (silent >= DEAD_AFTER_HEARTBEATS * this.heartbeatMs) {
      this.destroy(new ConnectionError("CONNECTION_LOST", `nothing received from the broker for ${silent} ms`));
    } else if (silent >= 2 * this.heartbeatMs && !this.pingInFlight) {
      // The broker pings a silent client after heartbeatMs; pinging it ourselves only after
      // twice that finds a broker that went away while this client kept talking.
      this.pingInFlight = true;
      const done = () => {
        this.pingInFlight = false;
      };
      this.call({ op: "ping" }, { reply: done, fail: done });
    }
  }

  // --- the end ----------------------------------------------------------------------------------

  /** Ends the connection with `error` as the reason given to everything still waiting. */
  destroy(error, { graceful = false } = {}) {
    if (this.closedWith) return;
    this.closedWith = error;
    clearInterval(this.heartbeat);
    if (graceful) this.socket.end();
    else this.socket.destroy();
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const handlers of pending) handlers.fail(error);
    for (const producer of this.producers.values()) producer.lost(error);
    for (const consumer of this.consumers.values()) consumer.lost(error);
    this.producers.clear();
    this.consumers.clear();
    this.held.clear();
    this.emit("close", error);
  }
}
