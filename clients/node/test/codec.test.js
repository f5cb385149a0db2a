// The frame codec on its own (no socket): any split of the byte stream gives the same frames.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { Decoder } from "@msgpack/msgpack";

import { decodeMsgpack } from "../src/codec.js";
import { encodeFrame, FrameDecoder } from "../src/index.js";
import { encodeSendFrame, encodeSendFrameV2 } from "../src/send_frame.js";

const FRAMES = [
  { op: "welcome", rid: 1, version: 1, broker: "actorbroker", heartbeat_ms: 5000, max_frame: 4194304 },
  { op: "message", consumer: 7, msgs: [
    { id: 0, payload: Buffer.alloc(0), key: null, attrs: {}, time: 1764662400000, producer: "p", redeliveries: 0 },
    { id: 1, payload: Buffer.alloc(300, 7), key: "k\u00e9y", attrs: { a: "\u{1F600}", b: "" },
      time: 1764662400001, producer: "p", redeliveries: 200 },
  ] },
  // the v2 push: runs of [first, time, producer, redeliveries, payloads, keys|nil, attrs|nil]
  { op: "message", consumer: 7, runs: [
    [2 ** 33, 1764662400000, "p", 0, [Buffer.alloc(0), Buffer.alloc(70000, 1)], null, null],
    [5, 1764662400001, "q\u00e9", 3, [Buffer.from("x")], ["k\u00e9y"], [{ a: "\u{1F600}", b: "" }]],
    [9, 1, "p", 0, [Buffer.from("y"), Buffer.from("z")], [null, ""], [{}, { c: "d" }]],
  ] },
  { op: "receipt", rid: 2 ** 40, first: 2 ** 33, count: 500 },
  { op: "error", rid: 3, code: "BAD_REQUEST", message: "x".repeat(200) },
  { op: "ping", rid: 0 },
];

function stream() {
  return Buffer.concat(FRAMES.map(encodeFrame));
}

function decodeAll(chunks) {
  const decoder = new FrameDecoder();
  const frames = [];
  for (const chunk of chunks) {
    decoder.feed(chunk);
    frames.push(...decoder);
  }
  assert.equal(decoder.buffered, 0);
  return frames;
}

// A small seeded generator: the same "random" splits on every run.
function prng(seed) {
  let x = seed >>> 0;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

describe("frame codec", () => {
  it("round-trips frames fed whole", () => {
    assert.deepEqual(decodeAll([stream()]), FRAMES);
  });

  it("round-trips frames fed byte by byte", () => {
    const bytes = stream();
    const chunks = [];
    for (let i = 0; i < bytes.length; i++) chunks.push(bytes.subarray(i, i + 1));
    assert.deepEqual(decodeAll(chunks), FRAMES);
  });

  it("round-trips frames fed in random splits", () => {
    const bytes = stream();
    for (let seed = 1; seed <= 200; seed++) {
      const random = prng(seed);
      const chunks = [];
      for (let at = 0; at < bytes.length;) {
        const size = Math.min(bytes.length - at, 1 + Math.floor(random() * 64));
        chunks.push(bytes.subarray(at, at + size));
        at += size;
      }
      assert.deepEqual(decodeAll(chunks), FRAMES, `seed ${seed}`);
    }
  });

  it("keeps a frame's length in a 4-byte big-endian header", () => {
    const frame = encodeFrame({ op: "ping", rid: 1 });
    assert.equal(frame.readUInt32BE(0), frame.length - 4);
  });

  it("leaves out fields that are undefined", () => {
    const [frame] = decodeAll([encodeFrame({ op: "producer", rid: 1, topic: "/a/b", name: undefined })]);
    assert.deepEqual(frame, { op: "producer", rid: 1, topic: "/a/b" });
  });

  it("refuses a frame over max_frame from its header alone", () => {
    const decoder = new FrameDecoder({ maxFrame: 100 });
    const header = Buffer.alloc(4);
    header.writeUInt32BE(101);
    decoder.feed(header);
    assert.throws(() => decoder.next(), { code: "FRAME_TOO_LARGE" });
  });

  it("decodes a map key __proto__ as an ordinary own key, the prototype untouched", () => {
    // @msgpack/msgpack refuses the key: a Python producer's attrs name "__proto__" ended the
    // connection with BAD_FRAME, failing the other messages of the push with it.
    const attrs = JSON.parse('{"__proto__": "evil", "constructor": "c", "toString": "t"}');
    const sent = { op: "message", consumer: 7, msgs: [
      { id: 0, payload: Buffer.from("a"), key: null, attrs: { a: "b" }, time: 1, producer: "p", redeliveries: 0 },
      { id: 1, payload: Buffer.from([0, 0xc1, 255]), key: "__proto__", attrs, time: -1.5, producer: "p", redeliveries: 2 ** 40 },
    ], [JSON.parse('"__proto__"')]: { x: [true, false, null] } };
    const [frame] = decodeAll([encodeFrame(sent), encodeFrame({ op: "ping", rid: 1 })]);
    assert.deepEqual(frame, sent);
    const got = frame.msgs[1].attrs;
    assert.equal(Object.getPrototypeOf(got), Object.prototype);
    assert.ok(Object.hasOwn(got, "__proto__"));
    assert.equal(got.__proto__, "evil");
    assert.deepEqual(Object.keys(got), ["__proto__", "constructor", "toString"]);
    assert.equal(Object.getPrototypeOf(frame), Object.prototype);
    assert.ok(Buffer.isBuffer(frame.msgs[1].payload));
  });

  it("reads frames without __proto__ as @msgpack/msgpack does, every size class", () => {
    const big = { op: "x", n: [0, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1, -1, -32, -33,
      -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, -(2 ** 53) + 1, 0.5, -1.25e300],
    s: ["", "x".repeat(31), "y".repeat(32), "\u00e9".repeat(200), "z".repeat(70000)],
    b: [Buffer.alloc(0), Buffer.alloc(255, 1), Buffer.alloc(256, 2), Buffer.alloc(70000, 3)],
    a: [Array.from({ length: 15 }, (_, i) => i), Array.from({ length: 16 }, (_, i) => i), Array(70000).fill(null)],
    m: Object.fromEntries(Array.from({ length: 70000 }, (_, i) => [`k${i}`, i % 2 === 0])) };
    for (const frame of [...FRAMES, big]) {
      const body = encodeFrame(frame).subarray(4);
      assert.deepEqual(decodeMsgpack(body), new Decoder().decode(body));
    }
    for (const cut of [Buffer.from([0x92, 1]), Buffer.from([0xdd, 0xff, 0xff, 0xff, 0xff]), Buffer.from([0xc1]),
      Buffer.from([1, 2]), Buffer.from([0x81, 0x90, 1]), Buffer.from([0xd4, 0, 0])]) {
      assert.throws(() => decodeMsgpack(cut), undefined, cut.toString("hex"));
    }
  });

  for (const [what, body] of [
    ["not msgpack", Buffer.from([0xc1])],
    ["not a map", Buffer.from([0x93, 1, 2, 3])],
    ["trailing bytes", Buffer.concat([encodeFrame({ op: "ping" }).subarray(4), Buffer.from([0])])],
    ["no op", encodeFrame({ rid: 1 }).subarray(4)],
  ]) {
    it(`refuses a frame that is ${what} with BAD_FRAME`, () => {
      const header = Buffer.alloc(4);
      header.writeUInt32BE(body.length);
      const decoder = new FrameDecoder();
      decoder.feed(Buffer.concat([header, body]));
      assert.throws(() => decoder.next(), { code: "BAD_FRAME" });
    });
  }
});

describe("send frame encoder", () => {
  // The producer's hand-written `send` frames must be the bytes the generic encoder gives.
  const cases = [
    [],
    [{ payload: Buffer.alloc(0) }],
    [{ payload: Buffer.alloc(100, 1), key: "k", attrs: { a: "b" } }],
    [{ payload: Buffer.alloc(300, 2), key: "\u00e9".repeat(20), attrs: {} },
      { payload: Buffer.alloc(70000, 3), key: "x".repeat(40000),
        attrs: Object.fromEntries(Array.from({ length: 20 }, (_, i) => [`n${i}`, "\u{1F680}".repeat(i * 5)])) }],
    Array.from({ length: 20 }, (_, i) => ({ payload: Buffer.alloc(i), key: i % 2 ? "k" : undefined })),
    Array.from({ length: 70000 }, () => ({ payload: Buffer.alloc(1) })),
  ];
  it("gives the generic encoder's bytes for every size class", () => {
    for (const [i, msgs] of cases.entries()) {
      for (const id of [0, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1]) {
        const fast = encodeSendFrame(id, id, msgs);
        const generic = encodeFrame({ op: "send", rid: id, producer: id, msgs });
        assert.ok(fast.equals(generic), `case ${i}, rid ${id}`);
      }
    }
  });

  // v2: {"op", "rid", "producer", "payloads", "keys"?, "attrs"?}; keys left out when no message
  // has one (nil for those without when some have), attrs when none has any ({} for those without).
  function columns(rid, producer, msgs) {
    const frame = { op: "send", rid, producer, payloads: msgs.map((m) => m.payload) };
    if (msgs.some((m) => m.key !== undefined && m.key !== null)) frame.keys = msgs.map((m) => m.key ?? null);
    if (msgs.some((m) => m.attrs && Object.keys(m.attrs).length)) frame.attrs = msgs.map((m) => m.attrs ?? {});
    return frame;
  }

  it("v2: gives the generic encoder's bytes of the columns for every size class", () => {
    const more = [
      [{ payload: Buffer.from("a"), key: null, attrs: {} }, { payload: Buffer.from("b"), attrs: {} }],
      [{ payload: Buffer.from("a"), key: "" }, { payload: Buffer.from("b") }],
      [{ payload: Buffer.from("a") }, { payload: Buffer.from("b"), attrs: { x: "" } }],
      Array.from({ length: 70000 }, (_, i) => ({ payload: Buffer.alloc(1), key: i === 69999 ? "k" : undefined })),
    ];
    for (const [i, msgs] of [...cases, ...more].entries()) {
      if (!msgs.length) continue; // (a v2 send has at least one message)
      for (const id of [0, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1]) {
        const fast = encodeSendFrameV2(id, id, msgs);
        const generic = encodeFrame(columns(id, id, msgs));
        assert.ok(fast.equals(generic), `case ${i}, rid ${id}`);
      }
    }
  });

  it("v2: leaves out keys and attrs when no message has them", () => {
    const frame = new FrameDecoder();
    frame.feed(encodeSendFrameV2(1, 2, [{ payload: Buffer.from("a"), attrs: {} }, { payload: Buffer.from("b"), key: null }]));
    assert.deepEqual(frame.next(), { op: "send", rid: 1, producer: 2, payloads: [Buffer.from("a"), Buffer.from("b")] });
  });
});
