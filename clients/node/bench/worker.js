#!/usr/bin/env node
// The Node client's roles for `actorbroker bench --client node`: the same options and the same
// JSON result line as the Python worker's produce and consume roles (scripts/bench_worker.py).
//
//   node bench/worker.js produce|consume --url HOST:PORT [options]
//
// --protocol-version 1|2: the version the client asks for (default: $ACTORBROKER_NODE_PROTOCOL,
// else 2, the client's default; `actorbroker bench` passes no such flag, so that variable is how
// a bench of the Node client's v1 is run).
//
// Payloads start with the send time (ns since the epoch, 8 bytes big-endian) and a sequence
// number (8 bytes), padded with zeros to --payload bytes.
import fs from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";

import { connect } from "../src/index.js";

const OPTIONS = {
  url: { type: "string" },
  topic: { type: "string", default: "/bench/t" },
  subscription: { type: "string", default: "bench" },
  type: { type: "string", default: "exclusive" },
  name: { type: "string" },
  dispatch: { type: "string" },
  n: { type: "string", default: "1000" },
  payload: { type: "string", default: "100" },
  rate: { type: "string", default: "0" },
  "linger-ms": { type: "string", default: "2" },
  "max-batch": { type: "string", default: "500" },
  "receiver-queue": { type: "string", default: "1000" },
  ack: { type: "boolean", default: false },
  "no-ack": { type: "boolean", default: false },
  latency: { type: "boolean", default: false },
  distinct: { type: "boolean", default: false },
  ready: { type: "string" },
  idle: { type: "string", default: "3" },
  "first-timeout": { type: "string", default: "30" },
  deadline: { type: "string", default: "120" },
  "protocol-version": { type: "string", default: process.env.ACTORBROKER_NODE_PROTOCOL || "2" },
};

/** Wall-clock time in ns since the epoch (as Python's time.time_ns), as a Number. */
function nowNs() {
  return (performance.timeOrigin + performance.now()) * 1e6;
}

// Two big-endian 64-bit fields from Numbers (exact below 2^53; the time is good to 256 ns).
function writeU64(buf, value, at) {
  const high = Math.floor(value / 2 ** 32);
  buf.writeUInt32BE(high, at);
  buf.writeUInt32BE(value - high * 2 ** 32, at + 4);
}

function makePayload(seq, size) {
  const payload = Buffer.allocUnsafe(Math.max(size, 16));
  writeU64(payload, Math.round(nowNs()), 0);
  writeU64(payload, seq, 8);
  payload.fill(0, 16);
  return size >= 16 ? payload : payload.subarray(0, Math.max(size, 8));
}

function readU64(buf, at) {
  return buf.readUInt32BE(at) * 2 ** 32 + buf.readUInt32BE(at + 4);
}

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

function touch(file) {
  if (!file) return;
  fs.writeFileSync(`${file}.tmp`, String(process.pid));
  fs.renameSync(`${file}.tmp`, file);
}

function percentiles(values) {
  if (!values.length) return {};
  const v = Float64Array.from(values).sort();
  const q = (p) => v[Math.min(v.length - 1, Math.round((p / 100) * (v.length - 1)))];
  const mean = v.reduce((a, b) => a + b, 0) / v.length;
  return { p50_us: q(50), p99_us: q(99), p999_us: q(99.9), max_us: v[v.length - 1], mean_us: mean, count: v.length };
}

async function produce(o) {
  const client = await connect(o.url, { name: "bench-producer", protocolVersion: o.protocolVersion });
  const producer = await client.producer(o.topic, { dispatch: o.dispatch, lingerMs: o.lingerMs, maxBatch: o.maxBatch });
  const start = performance.now();
  const deadline = start + o.deadline * 1000;
  const interval = o.rate ? 1000 / o.rate : 0;
  let sent = 0;
  let failed = 0;
  const countFailure = () => failed++;
  for (let seq = 0; seq < o.n; seq++) {
    if (interval) {
      const delay = start + seq * interval - performance.now();
      if (delay > 0) await sleep(delay);
    } else if (seq % o.maxBatch === 0) {
      await new Promise((resolve) => setImmediate(resolve)); // let receipts in between batches
    }
    if (performance.now() > deadline) break;
    producer.send(makePayload(seq, o.payload)).catch(countFailure);
    sent++;
  }
  const sendS = (performance.now() - start) / 1000;
  let error = null;
  try {
    await producer.flush({ timeoutMs: Math.max(1000, deadline - performance.now()) });
  } catch (err) {
    error = `${err.name}: ${err.message}`;
  }
  const elapsed = (performance.now() - start) / 1000;
  await client.close({ timeoutMs: 2000 });
  emit({ role: "produce", sent, failed, send_s: sendS, elapsed_s: elapsed, msg_s: elapsed > 0 ? sent / elapsed : 0, error });
}

async function consume(o) {
  const client = await connect(o.url, { name: "bench-consumer", protocolVersion: o.protocolVersion });
  const consumer = await client.subscribe({ topic: o.topic, subscription: o.subscription, type: o.type,
    consumer: o.name, dispatch: o.dispatch, receiverQueue: o.receiverQueue });
  const granted = [o.receiverQueue]; // credits given to the broker (flow frames); the first went with subscribe
  const flow = consumer.flow.bind(consumer);
  consumer.flow = (credits) => {
    flow(credits);
    granted.push(credits);
  };
  touch(o.ready);
  const deadline = performance.now() + o.deadline * 1000;
  let received = 0;
  let firstNs = null;
  let lastNs = null;
  let stopped = null;
  const seen = o.distinct ? new Set() : null;
  const lat = o.latency ? [] : null;
  let toAck = [];
  while (received < o.n) {
    const left = deadline - performance.now();
    if (left <= 0) {
      stopped = "deadline";
      break;
    }
    const wait = firstNs !== null ? o.idle : Math.min(o.firstTimeout, left / 1000);
    let msg;
    try {
      msg = await consumer.receive({ timeoutMs: Math.max(10, wait * 1000) });
    } catch (err) {
      stopped = err.code === "TIMEOUT" ? (firstNs !== null ? "idle" : "nothing received") : `${err.name}: ${err.message}`;
      break;
    }
    const t = nowNs();
    if (firstNs === null) firstNs = t;
    lastNs = t;
    received++;
    if (lat) lat.push((t - readU64(msg.payload, 0)) / 1000);
    if (seen) seen.add(msg.id);
    if (o.ack) {
      toAck.push(msg.id);
      if (toAck.length >= 100) {
        consumer.ack(toAck);
        toAck = [];
      }
    }
  }
  if (toAck.length) await consumer.ack(toAck).catch(() => {});
  const span = firstNs !== null && lastNs !== firstNs ? (lastNs - firstNs) / 1e9 : 0;
  const result = { role: "consume", received, first_ns: firstNs, last_ns: lastNs, span_s: span,
    msg_s: span > 0 ? (received - 1) / span : 0, stopped, credits_granted: granted.reduce((a, b) => a + b, 0),
    flows: granted.length };
  if (seen) result.distinct = seen.size;
  if (lat) result.latency = percentiles(lat);
  await client.close({ timeoutMs: 2000 });
  emit(result);
}

const ROLES = { produce, consume };

const { values, positionals } = parseArgs({ options: OPTIONS, allowPositionals: true });
const role = ROLES[positionals[0]];
if (!role || !values.url) {
  process.stderr.write(`usage: worker.js ${Object.keys(ROLES).join("|")} --url HOST:PORT [options]\n`);
  process.exit(2);
}
await role({
  url: values.url, topic: values.topic, subscription: values.subscription, type: values.type,
  name: values.name, dispatch: values.dispatch, n: Number(values.n), payload: Number(values.payload),
  rate: Number(values.rate), lingerMs: Number(values["linger-ms"]), maxBatch: Number(values["max-batch"]),
  receiverQueue: Number(values["receiver-queue"]), ack: values.ack && !values["no-ack"],
  latency: values.latency, distinct: values.distinct, ready: values.ready, idle: Number(values.idle),
  firstTimeout: Number(values["first-timeout"]), deadline: Number(values.deadline),
  protocolVersion: Number(values["protocol-version"]),
});
