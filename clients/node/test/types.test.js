// The shipped types (src/index.d.ts) compile, and describe the API as the README uses it.
import { execFile } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { it } from "node:test";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const TSC = path.join(HERE, "../node_modules/typescript/bin/tsc");

it("src/index.d.ts type-checks a program using the whole API (tsc --strict)", async () => {
  await promisify(execFile)(process.execPath, [TSC, "-p", path.join(HERE, "types")], { timeout: 60000 })
    .catch((err) => {
      throw new Error(`tsc found errors:\n${err.stdout}${err.stderr}`);
    });
});
