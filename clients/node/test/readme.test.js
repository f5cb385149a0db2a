// The README's example runs as written against a real broker and prints what the README says.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, before, it } from "node:test";

import { startBroker } from "./broker.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PACKAGE = path.resolve(HERE, "..");

let broker;
before(async () => {
  broker = await startBroker();
});
after(() => broker?.stop());

it("the README's produce/consume example works as written", async () => {
  const readme = fs.readFileSync(path.join(PACKAGE, "README.md"), "utf8");
  const example = /```js\n([\s\S]*?)```/.exec(readme)[1];
  assert.match(example, /"127\.0\.0\.1:6650"/);
  // Inside the package folder, so that `import ... from "actorbroker-client"` resolves to it.
  const file = path.join(PACKAGE, `.readme-example-${process.pid}.mjs`);
  fs.writeFileSync(file, example.replace('"127.0.0.1:6650"', JSON.stringify(broker.address)));
  try {
    const { stdout } = await promisify(execFile)(process.execPath, [file], { timeout: 30000 });
    assert.deepEqual(stdout.trim().split("\n"), [
      "sent 0", "sent 1", "sent 2",
      "got 0 customer-0 order 0 EUR", "got 1 customer-1 order 1 EUR", "got 2 customer-0 order 2 EUR",
    ]);
  } finally {
    fs.rmSync(file, { force: true });
  }
});
