// tls:// addresses against a broker serving its client port over TLS (and mutual TLS).
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";

import { connect, freshTopic, runPython, startBroker, take } from "./broker.js";

function haveOpenssl() {
  try {
    execFileSync("openssl", ["version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

// The certificates of the Python TLS tests (tests/certs.py), made with openssl.
const MAKE_CERTS = `
import dataclasses, json, sys
from tests.certs import make_certs
print(json.dumps(dataclasses.asdict(make_certs(json.load(sys.stdin)["dir"]))))
`;

describe("TLS", { skip: !haveOpenssl() && "openssl is not installed" }, () => {
  let certs;
  let dir;
  const read = (name) => fs.readFileSync(certs[name]);
  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "actorbroker-node-certs-"));
    certs = await runPython(MAKE_CERTS, { dir });
  });
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  describe("server certificate", () => {
    let broker;
    before(async () => {
      broker = await startBroker("--tls-cert", certs.server_cert, "--tls-key", certs.server_key);
    });
    after(() => broker?.stop());

    it("produces and consumes over tls://, with a token", async () => {
      const client = await connect(`tls://${broker.address}`, { tls: { ca: read("ca") }, token: "any" });
      const topic = freshTopic("tls");
      const consumer = await client.subscribe({ topic, subscription: "s", consumer: "c" });
      const producer = await client.producer(topic);
      await producer.send(Buffer.alloc(200000, 1));
      const [msg] = await take(consumer, 1);
      assert.ok(msg.payload.equals(Buffer.alloc(200000, 1)));
      await client.close();
    });

    it("refuses a broker whose certificate it cannot trust", async () => {
      await assert.rejects(connect(`tls://${broker.address}`, { tls: { ca: read("rogue_ca") } }), { code: "CONNECT_FAILED" });
    });

    it("checks the name in the certificate", async () => {
      await assert.rejects(connect(`tls://${broker.address}`, { tls: { ca: read("ca"), servername: "elsewhere.example" } }),
        { code: "CONNECT_FAILED" });
      const client = await connect(`tls://localhost:${broker.port}`, { tls: { ca: read("ca") } });
      await client.ping();
      await client.close();
    });
  });

  describe("mutual TLS", () => {
    let broker;
    before(async () => {
      broker = await startBroker("--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
        "--tls-client-ca", certs.client_ca);
    });
    after(() => broker?.stop());

    it("connects with a client certificate the broker trusts", async () => {
      const client = await connect(`tls://${broker.address}`,
        { tls: { ca: read("ca"), cert: read("client_cert"), key: read("client_key") } });
      await client.ping();
      await client.close();
    });

    it("is refused without one, or with one the broker does not trust", async () => {
      const refused = ["CONNECT_FAILED", "CONNECTION_LOST"]; // TLS 1.3: the refusal may come after the handshake
      for (const extra of [{}, { cert: read("rogue_client_cert"), key: read("rogue_client_key") }]) {
        const error = await connect(`tls://${broker.address}`, { tls: { ca: read("ca"), ...extra } }).then(
          (c) => c.close().then(() => assert.fail("connected")), (e) => e);
        assert.ok(refused.includes(error.code), `${error.code}: ${error.message}`);
      }
    });
  });
});
