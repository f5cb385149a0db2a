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
    // @msgpack/msgpack refuses a map key "__proto__" (an attrs name a producer may well send):
    // such a frame, and only a frame it refused, is read again by decodeMsgpack
    try {
      value = decodeMsgpack(body);
    } catch {
      throw new ProtocolError("BAD_FRAME", `frame is not valid msgpack: ${err.message}`);
    }
  }
  if (value === null || typeof value !== "object" || Array.isArray(value) || value instanceof Uint8Array) {
    throw new ProtocolError("BAD_FRAME", "frame is not a msgpack map");
  }
  if (typeof value.op !== "string") throw new ProtocolError("BAD_FRAME", "frame has no 'op'");
  return value;
}

/**
 * One msgpack value that fills `bytes` (a Buffer), decoded as @msgpack/msgpack decodes it (maps
 * as plain objects, bin as Buffers viewing `bytes`, 64-bit integers as numbers), except that a map
 * key "__proto__" is an own property like any other, never the object's prototype. Throws on
 * anything but exactly one valid value (no ext types: the protocol has none).
 */
export function decodeMsgpack(bytes) {
  let at = 0;
  const take = (n) => {
    if (n > bytes.length - at) throw new RangeError("msgpack value cut short");
    at += n;
    return at - n;
  };
  const str = (n) => {
    const start = take(n);
    return bytes.toString("utf8", start, start + n);
  };
  const array = (n) => {
    if (n > bytes.length - at) throw new RangeError("msgpack array cut short"); // (a byte each at least)
    const list = new Array(n);
    for (let i = 0; i < n; i++) list[i] = value();
    return list;
  };
  const map = (n) => {
    if (2 * n > bytes.length - at) throw new RangeError("msgpack map cut short");
    const object = {};
    for (let i = 0; i < n; i++) {
      const key = value();
      if (typeof key !== "string" && typeof key !== "number") throw new TypeError(`a map key of type ${typeof key}`);
      const item = value();
      if (key === "__proto__") Object.defineProperty(object, key, { value: item, enumerable: true, writable: true, configurable: true });
      else object[key] = item;
    }
    return object;
  };
  const value = () => {
    const type = bytes[take(1)];
    if (type < 0x80) return type;
    if (type < 0x90) return map(type & 0x0f);
    if (type < 0xa0) return array(type & 0x0f);
    if (type < 0xc0) return str(type & 0x1f);
    if (type >= 0xe0) return type - 0x100;
    switch (type) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return bin(bytes[take(1)]);
      case 0xc5: return bin(bytes.readUInt16BE(take(2)));
      case 0xc6: return bin(bytes.readUInt32BE(take(4)));
      case 0xca: return bytes.readFloatBE(take(4));
      case 0xcb: return bytes.readDoubleBE(take(8));
      case 0xcc: return bytes[take(1)];
      case 0xcd: return bytes.readUInt16BE(take(2));
      case 0xce: return bytes.readUInt32BE(take(4));
      case 0xcf: { const at8 = take(8); return bytes.readUInt32BE(at8) * 2 ** 32 + bytes.readUInt32BE(at8 + 4); }
      case 0xd0: return bytes.readInt8(take(1));
      case 0xd1: return bytes.readInt16BE(take(2));
      case 0xd2: return bytes.readInt32BE(take(4));
      case 0xd3: { const at8 = take(8); return bytes.readInt32BE(at8) * 2 ** 32 + bytes.readUInt32BE(at8 + 4); }
      case 0xd9: return str(bytes[take(1)]);
      case 0xda: return str(bytes.readUInt16BE(take(2)));
      case 0xdb: return str(bytes.readUInt32BE(take(4)));
      case 0xdc: return array(bytes.readUInt16BE(take(2)));
      case 0xdd: return array(bytes.readUInt32BE(take(4)));
      case 0xde: return map(bytes.readUInt16BE(take(2)));
      case 0xdf: return map(bytes.readUInt32BE(take(4)));
      default: throw new TypeError(`msgpack type 0x${type.toString(16)} is not supported`);
    }
  };
  const bin = (n) => {
    const start = take(n);
    return bytes.subarray(start, start + n);
  };
  const result = value();
  if (at !== bytes.length) throw new RangeError(`${bytes.length - at} bytes after the msgpack value`);
  return result;
}
