// Framing of the wire protocol: a 4-byte big-endian length, then one msgpack map.
// Pure functions and a push-style decoder, no sockets, so it can be tested byte by byte.
import { Decoder, Encoder } from "@msgpack/msgpack";

import { ProtocolError } from "./errors.js";

export const HEADER_BYTES = 4;
export const DEFAULT_MAX_FRAME = 64 * 1024 * 1024;

// Optional fields left undefined are simply not sent.
const encoder = new Encoder({ ignoreUndefined: true });

/** One frame (header + msgpack map) as a Buffer of its own. */
export function encodeFrame(map) {
  const body = encoder.encodeSharedRef(map);
  const frame = Buffer.allocUnsafe(HEADER_BYTES + body.length);
  frame.writeUInt32BE(body.length, 0);
  frame.set(body, HEADER_BYTES);
  return frame;
}

/** Bytes in, frames out: feed() any split of the stream, then take frames with next(). */
export class FrameDecoder {
  constructor({ maxFrame = DEFAULT_MAX_FRAME } = {}) {
    this.maxFrame = maxFrame;
    this.decoder = new Decoder();
    this.chunks = [];
    this.size = 0;
    this.need = -1; // body length of the frame being read, -1 before its header
  }

  feed(chunk) {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.size += chunk.length;
  }

  /** Bytes received and not yet part of a returned frame. */
  get buffered() {
    return this.size;
  }

  /** The next complete frame, or undefined; throws ProtocolError on a broken stream. */
  next() {
    if (this.need < 0) {
      if (this.size < HEADER_BYTES) return undefined;
      const head = this.joined();
      this.need = head.readUInt32BE(0);
      if (this.need > this.maxFrame) {
        throw new ProtocolError("FRAME_TOO_LARGE", `frame of ${this.need} bytes is over ${this.maxFrame}`);
      }
    }
    const end = HEADER_BYTES + this.need;
    if (this.size < end) return undefined;
    const buf = this.joined();
    const body = buf.subarray(HEADER_BYTES, end);
    const rest = buf.subarray(end);
    this.chunks = rest.length ? [rest] : [];
    this.size = rest.length;
    this.need = -1;
    return decodeBody(this.decoder, body);
  }

  *[Symbol.iterator]() {
    for (let frame = this.next(); frame !== undefined; frame = this.next()) yield frame;
  }

  // All buffered bytes as one Buffer; copies only when they arrived in several chunks.
  joined() {
    if (this.chunks.length > 1) this.chunks = [Buffer.concat(this.chunks, this.size)];
    return this.chunks[0];
  }
}

function decodeBody(decoder, body) {
  let value;
  try {
    value = decoder.decode(body);
  } catch (err) {
    throw new ProtocolError("BAD_FRAME", `frame is not valid msgpack: ${err.message}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value) || value instanceof Uint8Array) {
    throw new ProtocolError("BAD_FRAME", "frame is not a msgpack map");
  }
  if (typeof value.op !== "string") throw new ProtocolError("BAD_FRAME", "frame has no 'op'");
  return value;
}
