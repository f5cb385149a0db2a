// bench/worker.js, used by `actorbroker bench --client node`, gives the same JSON results as the
// Python bench worker (scripts/bench_worker.py), with either client on the other end.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, before, it } from "node:test";

import { freshTopic, PYTHON, startBroker } from "./broker.js";

const run = promisify(execFile);
const WORKER = path.join(path.dirname(fileURLToPath(import.meta.url)), "../bench/worker.js");
const PROGRAMS = {
  node: [process.execPath, WORKER],
  python: [PYTHON, "-m", "actorbroker.scripts.bench_worker"],
};

let broker;
let dir;
before(async () => {
  broker = await startBroker();
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "actorbroker-node-bench-"));
});
after(async () => {
  await broker?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function worker(client, role, ...options) {
  const [program, ...args] = PROGRAMS[client];
  const { stdout } = await run(program, [...args, role, "--url", broker.address, ...options], { timeout: 60000 });
  return JSON.parse(stdout.trim().split("\n").pop());
}

// Resolves when `file` exists (the worker renames it into place once it is subscribed).
function fileAppears(file) {
  return new Promise((resolve) => {
    const watcher = fs.watch(path.dirname(file), () => {
      if (fs.existsSync(file)) {
        watcher.close();
        resolve();
      }
    });
    if (fs.existsSync(file)) {
      watcher.close();
      resolve();
    }
  });
}

async function pair(producerClient, consumerClient) {
  const topic = freshTopic("bench");
  const ready = path.join(dir, `ready-${producerClient}-${consumerClient}`);
  const isReady = fileAppears(ready);
  const consuming = worker(consumerClient, "consume", "--topic", topic, "--n", "300", "--latency", "--ready", ready);
  await Promise.race([isReady, consuming]); // a consumer that dies before it is ready fails the test
  const produced = await worker(producerClient, "produce", "--topic", topic, "--n", "300", "--rate", "3000", "--max-batch", "1");
  return { produced, consumed: await consuming };
}

it("node worker -> python worker and python -> node: same results, same fields", async () => {
  const toPython = await pair("node", "python");
  const toNode = await pair("python", "node");
  for (const { produced, consumed } of [toPython, toNode]) {
    assert.equal(produced.sent, 300);
    assert.equal(produced.failed, 0);
    assert.equal(consumed.received, 300);
    assert.equal(consumed.stopped, null);
    assert.ok(consumed.latency.p50_us > 0 && consumed.latency.p50_us < 5e6, JSON.stringify(consumed.latency));
  }
  assert.deepEqual(Object.keys(toPython.produced).sort(), Object.keys(toNode.produced).sort());
  assert.deepEqual(Object.keys(toPython.consumed).sort(), Object.keys(toNode.consumed).sort());
  assert.deepEqual(Object.keys(toPython.consumed.latency).sort(), Object.keys(toNode.consumed.latency).sort());
});

it("actorbroker bench --client node measures 1->1 throughput and latency with Node processes", async () => {
  const json = path.join(dir, "bench.json");
  await run(PYTHON, ["-m", "actorbroker.scripts.cli", "bench", "--quick", "--scenarios", "throughput,latency",
    "--messages", "500", "--latency-seconds", "0.5", "--client", "node", "--json", json],
  { cwd: path.resolve(path.dirname(WORKER), "../../.."), timeout: 90000 });
  const results = JSON.parse(fs.readFileSync(json, "utf8"));
  assert.deepEqual(results.failures, []);
  const variants = [...new Set(results.rows.map((r) => `${r.scenario}: ${r.variant}`))];
  assert.deepEqual(variants, ["throughput: non_reliable, node client", "latency: non_reliable @1000/s, node client"]);
  const throughput = results.rows.find((r) => r.scenario === "throughput");
  assert.equal(throughput.lost, 0);
  assert.ok(throughput.median > 0);
});
