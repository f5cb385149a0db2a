// Types of actorbroker-client (the JavaScript sources are in this folder).
import { EventEmitter } from "node:events";
import type { ConnectionOptions as TlsConnectionOptions } from "node:tls";

/** The highest protocol version the client speaks, and the one it asks for by default. */
export const PROTOCOL_VERSION: 2;
/** 1: PROTOCOL.md as written; 2: batched `send` and `message` push (docs/protocol.md, "Protocol version 2"). */
export type ProtocolVersion = 1 | 2;
export const DEFAULT_HOST: string;
export const DEFAULT_PORT: number;

export type Dispatch = "non_reliable" | "reliable";
export type SubscriptionType = "exclusive" | "shared" | "failover" | "key_shared";
/** A plain object; every name is an own key, "__proto__" included (never the prototype). */
export type Attrs = Record<string, string>;

/** Where a call can wait: an AbortSignal and/or a timeout (rejects with TimeoutError). */
export interface WaitOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
}

export interface ConnectOptions extends WaitOptions {
  /** Auth token (serve --auth-file). */
  token?: string;
  /** Heartbeat wish; the broker clamps it to [200, 60000]. */
  heartbeatMs?: number;
  /** The client name sent in hello. */
  name?: string;
  /** The protocol version asked for in hello (default 2); a broker that welcomes a 2 with 1 is
   * spoken v1. Anything but 1 or 2: connect() rejects with a RangeError. */
  protocolVersion?: ProtocolVersion;
  /** node:tls options (ca, cert, key, servername, ...) used for tls:// addresses. */
  tls?: TlsConnectionOptions;
}

/** Connects to "host:port", "tcp://host:port" or "tls://host:port" and says hello. */
export function connect(address?: string, options?: ConnectOptions): Promise<Client>;

export interface ProducerOptions extends WaitOptions {
  name?: string;
  /** Used when this producer creates the topic. */
  dispatch?: Dispatch;
  access?: "shared" | "exclusive";
  /** Most messages in one send frame (default 1000). */
  maxBatch?: number;
  /** Wait this long for more messages before sending a batch (default 0: the end of the current event-loop turn). */
  lingerMs?: number;
  /** Most messages sent and not yet receipted (default 20000); more wait in the client. */
  maxPending?: number;
}

export interface SubscribeOptions extends WaitOptions {
  topic: string;
  subscription: string;
  type?: SubscriptionType;
  /** Consumer name (default: a random one). */
  consumer?: string;
  start?: "latest" | "earliest";
  /** Used when this subscribe creates the topic. */
  dispatch?: Dispatch;
  maxUnacked?: number;
  ackTimeoutMs?: number;
  maxRedeliveries?: number;
  deadLetterTopic?: string;
  /** Messages buffered in the client; credits are granted back as they are taken (default 1000;
   * an integer from 1 to 2^32-1, else subscribe() rejects with a RangeError). */
  receiverQueue?: number;
}

export interface TopicInfo {
  name: string;
  dispatch: Dispatch;
  subscriptions: number;
  producers: number;
}

/** The topics reply: `truncated` is true when the broker cut the list to fit its max_frame, so
 * some topics are not in it (docs/protocol.md, "Admin ops this broker adds"). */
export interface TopicList extends Array<TopicInfo> {
  readonly truncated: boolean;
}

/** The broker's stats of one topic (fields as the broker names them; see docs/protocol.md). */
export interface TopicStats {
  topic: string;
  /** true when the broker cut a list (consumers, subscriptions) to fit its max_frame. */
  truncated?: boolean;
  dispatch: Dispatch;
  msgs_in: number;
  bytes_in: number;
  producers: number;
  subscriptions: Array<{
    name: string;
    type: SubscriptionType;
    backlog: number;
    msgs_out: number;
    dropped: number;
    redelivered: number;
    consumers: Array<{ consumer: number; name: string; active: boolean; credits: number; unacked: number; msgs_out: number; [field: string]: unknown }>;
    [field: string]: unknown;
  }>;
  [field: string]: unknown;
}

export declare class Client extends EventEmitter {
  readonly address: string;
  /** The broker's name, max_frame and heartbeat from its welcome. */
  readonly broker: string;
  readonly maxFrame: number;
  readonly heartbeatMs: number;
  /** The protocol version this connection speaks, as the broker's welcome settled it. */
  readonly protocolVersion: ProtocolVersion;
  readonly connected: boolean;
  producer(topic: string, options?: ProducerOptions): Promise<Producer>;
  subscribe(options: SubscribeOptions): Promise<Consumer>;
  topics(options?: WaitOptions): Promise<TopicList>;
  stats(topic: string, options?: WaitOptions): Promise<TopicStats>;
  deleteTopic(topic: string, options?: WaitOptions): Promise<void>;
  /** Round trip in milliseconds. */
  ping(options?: WaitOptions): Promise<number>;
  /** Sends the consumers' pending acks and flushes the producers (waiting for the answers up to
   * timeoutMs, default 5000), then closes the connection. */
  close(options?: WaitOptions): Promise<void>;
  /** Sends a raw protocol request (a rid is added) and resolves with its reply frame. */
  request(frame: Record<string, unknown>, options?: WaitOptions): Promise<Record<string, unknown>>;
  /** "close": the connection ended (the error says why: CLIENT_CLOSED, CONNECTION_LOST, a fatal broker code). */
  on(event: "close", listener: (error: ConnectionEndError) => void): this;
  /** "warning": an error frame that answered no request of this client. */
  on(event: "warning", listener: (error: BrokerError) => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
}

export declare class Producer {
  readonly id: number;
  readonly topic: string;
  readonly dispatch: Dispatch;
  /** Resolves with the message's id (its topic offset) once the broker receipted it. The payload
   * and attrs are copied at the call: the caller may reuse them at once. */
  send(payload: Uint8Array | string, options?: { key?: string | null; attrs?: Attrs }): Promise<number>;
  /** Resolves when everything sent so far is receipted; rejects with the first send error since the last flush. */
  flush(options?: WaitOptions): Promise<void>;
  close(options?: WaitOptions): Promise<void>;
}

export declare class Message {
  readonly id: number;
  readonly payload: Buffer;
  readonly key: string | null;
  readonly attrs: Attrs;
  /** Publish time, ms since the epoch. */
  readonly time: number;
  /** The name of the producer that published it. */
  readonly producer: string;
  readonly redeliveries: number;
  readonly consumer: Consumer;
  /** Resolves once the broker confirmed the ack (reliable topics: once it is on disk). */
  ack(): Promise<void>;
  nack(options?: { delayMs?: number }): Promise<void>;
}

export declare class Consumer extends EventEmitter implements AsyncIterable<Message> {
  readonly id: number;
  readonly topic: string;
  readonly subscription: string;
  readonly type: SubscriptionType;
  readonly dispatch: Dispatch;
  readonly receiverQueue: number;
  /** Failover: whether this consumer is the one receiving (undefined until the broker said). */
  readonly active: boolean | undefined;
  receive(options?: WaitOptions): Promise<Message>;
  [Symbol.asyncIterator](): AsyncIterator<Message>;
  ack(ids: number | Message | Array<number | Message>): Promise<void>;
  nack(ids: number | Message | Array<number | Message>, options?: { delayMs?: number }): Promise<void>;
  /** Grants more credits by hand (receiverQueue grants them automatically); an integer from 0
   * to 2^32-1, else it throws a RangeError. */
  flow(credits: number): void;
  close(options?: WaitOptions): Promise<void>;
  unsubscribe(options?: WaitOptions): Promise<void>;
  on(event: "active", listener: (active: boolean) => void): this;
  /** "closed": the broker ended this consumer (a ClosedError, with its reason), or the connection
   * ended (the client's "close" error: a ConnectionError, BrokerError or ProtocolError, no reason). */
  on(event: "closed", listener: (error: ClosedError | ConnectionEndError) => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
}

export function parseAddress(address: string): { host: string; port: number; tls: boolean };
export function encodeFrame(frame: Record<string, unknown>): Buffer;
export declare class FrameDecoder implements Iterable<Record<string, unknown>> {
  constructor(options?: { maxFrame?: number });
  readonly buffered: number;
  feed(chunk: Uint8Array): void;
  next(): Record<string, unknown> | undefined;
  [Symbol.iterator](): Iterator<Record<string, unknown>>;
}

/** Error codes: the protocol's (BAD_REQUEST, NOT_AUTHORIZED, ...) and the client's own. */
export type ErrorCode =
  | "BAD_FRAME" | "FRAME_TOO_LARGE" | "NOT_CONNECTED" | "UNSUPPORTED_VERSION" | "AUTH_FAILED"
  | "UNKNOWN_OP" | "BAD_REQUEST" | "BAD_TOPIC" | "NOT_AUTHORIZED" | "CONSUMER_BUSY" | "TYPE_MISMATCH"
  | "PRODUCER_BUSY" | "UNKNOWN_PRODUCER" | "UNKNOWN_CONSUMER" | "TOPIC_NOT_FOUND" | "OVERLOADED"
  | "INTERNAL" | "SLOW_CONSUMER"
  | "CONNECT_FAILED" | "CONNECTION_LOST" | "CLIENT_CLOSED" | "CLOSED" | "CONSUMER_CLOSED"
  | "PRODUCER_CLOSED" | "MESSAGE_TOO_LARGE" | "TIMEOUT";

export declare class ActorbrokerError extends Error {
  readonly code: ErrorCode | string;
}
export declare class BrokerError extends ActorbrokerError {
  readonly rid: number | undefined;
}
export declare class ProtocolError extends ActorbrokerError {}
export declare class ConnectionError extends ActorbrokerError {}
export declare class ClosedError extends ActorbrokerError {
  /** As in the broker's closed push: topic_deleted, replaced, unsubscribed, topic_lost, ... */
  readonly reason: string;
}
export declare class TimeoutError extends ActorbrokerError {}
/**
 * Why a connection ended: a ConnectionError (CLIENT_CLOSED, CONNECTION_LOST, CONNECT_FAILED,
 * INTERNAL), the fatal error frame the broker sent before closing (BrokerError: SLOW_CONSUMER,
 * BAD_FRAME, AUTH_FAILED, ...), or bytes from the broker this client could not read
 * (ProtocolError: BAD_FRAME, FRAME_TOO_LARGE).
 */
export type ConnectionEndError = ConnectionError | BrokerError | ProtocolError;
