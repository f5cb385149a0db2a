// The `send` frame, the producer's hot path, written straight into one Buffer: the same msgpack
// as the generic encoder gives, without walking each message as a generic object.
import { HEADER_BYTES } from "./codec.js";

// Most bytes of msgpack around a value: a str/bin/array/map header is at most 5 bytes.
const HEAD = 5;
const KEYS = {
  op: Buffer.from([0xa2, 0x6f, 0x70]),
  send: Buffer.from([0xa4, 0x73, 0x65, 0x6e, 0x64]),
  rid: Buffer.from([0xa3, 0x72, 0x69, 0x64]),
  producer: Buffer.from([0xa8, ...Buffer.from("producer")]),
  msgs: Buffer.from([0xa4, ...Buffer.from("msgs")]),
  payloads: Buffer.from([0xa8, ...Buffer.from("payloads")]),
  keys: Buffer.from([0xa4, ...Buffer.from("keys")]),
  payload: Buffer.from([0xa7, ...Buffer.from("payload")]),
  key: Buffer.from([0xa3, ...Buffer.from("key")]),
  attrs: Buffer.from([0xa5, ...Buffer.from("attrs")]),
};

/**
 * {"op": "send", "rid", "producer", "msgs": [{"payload", "key"?, "attrs"?}]} as one frame.
 * msgs[i].payload is a Buffer, .key a string or undefined, .attrs an object of strings or undefined.
 */
export function encodeSendFrame(rid, producer, msgs) {
  let size = HEADER_BYTES + 64;
  for (const m of msgs) {
    size += 24 + HEAD + m.payload.length;
    if (m.key !== undefined && m.key !== null) size += 4 + HEAD + Buffer.byteLength(m.key);
    if (m.attrs !== undefined && m.attrs !== null) {
      size += 6 + HEAD;
      for (const name in m.attrs) size += 2 * HEAD + Buffer.byteLength(name) + Buffer.byteLength(m.attrs[name]);
    }
  }
  const w = sendHead(size, 4, rid, producer);
  w.raw(KEYS.msgs);
  w.arrayHead(msgs.length);
  for (const m of msgs) {
    const hasKey = m.key !== undefined && m.key !== null;
    const hasAttrs = m.attrs !== undefined && m.attrs !== null;
    w.byte(0x81 + (hasKey ? 1 : 0) + (hasAttrs ? 1 : 0));
    w.raw(KEYS.payload);
    w.bin(m.payload);
    if (hasKey) {
      w.raw(KEYS.key);
      w.str(m.key);
    }
    if (hasAttrs) {
      w.raw(KEYS.attrs);
      w.strMap(m.attrs);
    }
  }
  w.buf.writeUInt32BE(w.at - HEADER_BYTES, 0);
  return w.buf.subarray(0, w.at);
}

/**
 * The v2 `send` (docs/protocol.md, "Protocol version 2"): {"op": "send", "rid", "producer",
 * "payloads": [bin, ...], "keys"?: [str|nil, ...], "attrs"?: [{str: str}, ...]}, as one frame.
 * `keys` is left out when no message has a key, `attrs` when none has attributes (an empty
 * object is none); where the column is there, a message without is nil / {}.
 */
export function encodeSendFrameV2(rid, producer, msgs) {
  let size = HEADER_BYTES + 96;
  let keyed = false;
  let attributed = false;
  for (const m of msgs) {
    size += 3 * HEAD + m.payload.length;
    if (m.key !== undefined && m.key !== null) {
      keyed = true;
      size += Buffer.byteLength(m.key);
    }
    if (m.attrs !== undefined && m.attrs !== null) {
      for (const name in m.attrs) {
        attributed = true;
        size += 2 * HEAD + Buffer.byteLength(name) + Buffer.byteLength(m.attrs[name]);
      }
    }
  }
  const w = sendHead(size, 4 + (keyed ? 1 : 0) + (attributed ? 1 : 0), rid, producer);
  w.raw(KEYS.payloads);
  w.arrayHead(msgs.length);
  for (const m of msgs) w.bin(m.payload);
  if (keyed) {
    w.raw(KEYS.keys);
    w.arrayHead(msgs.length);
    for (const m of msgs) {
      if (m.key !== undefined && m.key !== null) w.str(m.key);
      else w.byte(0xc0);
    }
  }
  if (attributed) {
    w.raw(KEYS.attrs);
    w.arrayHead(msgs.length);
    for (const m of msgs) w.strMap(m.attrs !== undefined && m.attrs !== null ? m.attrs : {});
  }
  w.buf.writeUInt32BE(w.at - HEADER_BYTES, 0);
  return w.buf.subarray(0, w.at);
}

/** A writer of `size` bytes holding the start of a `send` map of `fields` entries: op, rid, producer. */
function sendHead(size, fields, rid, producer) {
  const w = new Writer(Buffer.allocUnsafe(size));
  w.at = HEADER_BYTES;
  w.byte(0x80 + fields);
  w.raw(KEYS.op);
  w.raw(KEYS.send);
  w.raw(KEYS.rid);
  w.uint(rid);
  w.raw(KEYS.producer);
  w.uint(producer);
  return w;
}

class Writer {
  constructor(buf) {
    this.buf = buf;
    this.at = 0;
  }

  byte(b) {
    this.buf[this.at++] = b;
  }

  raw(bytes) {
    this.buf.set(bytes, this.at);
    this.at += bytes.length;
  }

  // A msgpack header carrying n: in the type byte itself up to fixMax, then with an 8-, 16- or
  // 32-bit n after its code (code8 null: the type has no 8-bit form).
  head(n, fixBase, fixMax, code8, code16, code32) {
    const buf = this.buf;
    if (n <= fixMax) buf[this.at++] = fixBase | n;
    else if (code8 !== null && n < 0x100) {
      buf[this.at++] = code8;
      buf[this.at++] = n;
    } else if (n < 0x10000) {
      buf[this.at++] = code16;
      buf.writeUInt16BE(n, this.at);
      this.at += 2;
    } else {
      buf[this.at++] = code32;
      buf.writeUInt32BE(n, this.at);
      this.at += 4;
    }
  }

  uint(n) {
    if (n < 2 ** 32) {
      this.head(n, 0, 0x7f, 0xcc, 0xcd, 0xce);
    } else {
      this.byte(0xcf);
      this.buf.writeBigUInt64BE(BigInt(n), this.at);
      this.at += 8;
    }
  }

  arrayHead(n) {
    this.head(n, 0x90, 15, null, 0xdc, 0xdd);
  }

  mapHead(n) {
    this.head(n, 0x80, 15, null, 0xde, 0xdf);
  }

  /** A map of str to str (a message's attrs). */
  strMap(obj) {
    const names = Object.keys(obj);
    this.mapHead(names.length);
    for (const name of names) {
      this.str(name);
      this.str(obj[name]);
    }
  }

  str(s) {
    // Written after a gap as long as the longest header, then moved back behind the real one.
    const start = this.at;
    const length = this.buf.write(s, start + HEAD, "utf8");
    this.head(length, 0xa0, 31, 0xd9, 0xda, 0xdb);
    if (this.at !== start + HEAD) this.buf.copy(this.buf, this.at, start + HEAD, start + HEAD + length);
    this.at += length;
  }

  bin(bytes) {
    this.head(bytes.length, 0, -1, 0xc4, 0xc5, 0xc6);
    this.buf.set(bytes, this.at);
    this.at += bytes.length;
  }
}
