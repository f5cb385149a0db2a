// Test helpers: a real `actorbroker serve` on free ports, and small Python client scripts.
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { connect as connectClient } from "../src/index.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "../../..");
const READY = /listening on ([\d.]+):(\d+) \(admin port (\d+), admin pid (\d+)/;

/** The Python with actorbroker installed: $ACTORBROKER_PYTHON, else the repo's .venv, else python3. */
export const PYTHON = process.env.ACTORBROKER_PYTHON
  ?? (fs.existsSync(path.join(REPO, ".venv/bin/python")) ? path.join(REPO, ".venv/bin/python") : "python3");

/**
 * The protocol version the tests' clients ask for: $ACTORBROKER_NODE_PROTOCOL (1 or 2), else the
 * client's default (2). `npm test` runs the files that talk to a broker once more with 1.
 */
export const PROTOCOL = process.env.ACTORBROKER_NODE_PROTOCOL ? Number(process.env.ACTORBROKER_NODE_PROTOCOL) : undefined;

/** connect() asking for PROTOCOL (a test's own protocolVersion wins). */
export function connect(address, options = {}) {
  return connectClient(address, { protocolVersion: PROTOCOL, ...options });
}

const running = new Set();
process.on("exit", () => {
  for (const proc of running) proc.kill("SIGKILL"); // a crashed test run leaves no serve behind
});

/** Starts `actorbroker serve --port 0` with extra options; resolves with {address, host, port, stop()}. */
export async function startBroker(...options) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "actorbroker-node-"));
  const stderr = fs.openSync(path.join(dataDir, "serve.stderr"), "w");
  const proc = spawn(PYTHON, ["-m", "actorbroker.scripts.cli", "serve", "--port", "0", "--data-dir", dataDir, ...options],
    { cwd: REPO, stdio: ["ignore", "pipe", stderr] });
  fs.closeSync(stderr);
  running.add(proc);
  const exited = new Promise((resolve) => proc.once("exit", resolve));
  const line = await firstLine(proc);
  const match = READY.exec(line);
  if (!match) {
    proc.kill("SIGKILL");
    await exited;
    running.delete(proc);
    throw new Error(`broker did not start: ${line}\n${fs.readFileSync(path.join(dataDir, "serve.stderr"), "utf8")}`);
  }
  proc.stdout.resume(); // keep draining what serve prints later
  const host = match[1];
  const port = Number(match[2]);
  return {
    host, port, dataDir, pid: proc.pid,
    address: `${host}:${port}`,
    /** SIGTERM to serve, then wait for it to exit (it stops its actor system). */
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
      const timer = setTimeout(() => proc.kill("SIGKILL"), 30000);
      await exited;
      clearTimeout(timer);
      running.delete(proc);
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

function firstLine(proc) {
  return new Promise((resolve) => {
    let text = "";
    const onData = (chunk) => {
      text += chunk.toString();
      const nl = text.indexOf("\n");
      if (nl >= 0) {
        proc.stdout.off("data", onData);
        proc.stdout.pause();
        resolve(text.slice(0, nl));
      }
    };
    proc.stdout.on("data", onData);
    proc.once("exit", () => resolve(text));
  });
}

/**
 * Runs a Python script (with actorbroker importable) with `input` as JSON on stdin; resolves
 * with its stdout parsed as JSON. `onLine(line)` sees each stdout line as it comes.
 */
export function runPython(script, input, { onLine } = {}) {
  return new Promise((resolve, reject) => {
    const proc = spawn(PYTHON, ["-c", script], { cwd: REPO, stdio: ["pipe", "pipe", "pipe"] });
    running.add(proc);
    let out = "";
    let err = "";
    let seen = 0;
    proc.stdout.on("data", (chunk) => {
      out += chunk;
      if (!onLine) return;
      let nl;
      while ((nl = out.indexOf("\n", seen)) >= 0) {
        onLine(out.slice(seen, nl));
        seen = nl + 1;
      }
    });
    proc.stderr.on("data", (chunk) => (err += chunk));
    proc.once("exit", (code) => {
      running.delete(proc);
      if (code !== 0) return reject(new Error(`python exited ${code}: ${err}`));
      const last = out.trim().split("\n").pop();
      resolve(last ? JSON.parse(last) : null);
    });
    proc.stdin.end(JSON.stringify(input));
  });
}

/** Retries `check` (an async function returning truthy when done) until it passes or timeoutMs. */
export async function eventually(check, { timeoutMs = 10000, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`${what} not reached within ${timeoutMs} ms`);
    await new Promise((resolve) => setImmediate(resolve));
  }
}

/** The next `count` messages of a consumer. */
export async function take(consumer, count, { timeoutMs = 10000 } = {}) {
  const msgs = [];
  while (msgs.length < count) msgs.push(await consumer.receive({ timeoutMs }));
  return msgs;
}

let topicCounter = 0;
/** A topic name of its own for each test. */
export function freshTopic(prefix = "t") {
  topicCounter++;
  return `/node/${prefix}-${process.pid}-${topicCounter}`;
}

/** A broker and a client connected to it, for a test file's before(). */
export async function brokerWithClient(name, ...options) {
  const broker = await startBroker(...options);
  const client = await connect(broker.address, { name });
  return { broker, client };
}

/** after() of brokerWithClient: the client closed, then the broker stopped. */
export async function stopBoth(broker, client) {
  await client?.close();
  await broker?.stop();
}
