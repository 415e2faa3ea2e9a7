import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { test } from "node:test";
import { createBundleServer } from "../web/serve.js";
import { arrays, maxAbsDiff, needFixtures, spec } from "../test-support/fixtures.js";

const CHROMIUM = ["chromium", "chromium-browser", "google-chrome"].find(
  (name) => spawnSync(name, ["--version"], { stdio: "ignore" }).status === 0);

test("the browser page (headless Chromium, onnxruntime-web WASM) draws the Python runtime's image",
  { skip: needFixtures || (!CHROMIUM && "no chromium on PATH"), timeout: 180_000 }, async () => {
    const c = spec.demo[0];
    assert.deepEqual(c.options, {}, "the first demo case runs at the model's default guidance");
    let resolve;
    const arrived = new Promise((r) => { resolve = r; });
    const server = createBundleServer({ bundle: spec.demo_bundle, onResult: resolve });
    await new Promise((r) => server.listen(0, "127.0.0.1", r));
    const { port } = /** @type {import("node:net").AddressInfo} */ (server.address());
    const query = new URLSearchParams({ prompt: c.prompt, seed: c.seed, run: "1", report: "1" });
    const profile = mkdtempSync(path.join(tmpdir(), "hartkit-chromium-"));
    const browser = spawn(/** @type {string} */ (CHROMIUM), ["--headless", "--no-sandbox", "--disable-gpu",
      `--user-data-dir=${profile}`, "--remote-debugging-port=0", `http://127.0.0.1:${port}/?${query}`],
    { stdio: "ignore", detached: true });
    let timer;
    try {
      const result = await Promise.race([arrived,
        new Promise((_, reject) => { timer = setTimeout(() => reject(new Error("the page sent no result in 150 s")), 150_000); })]);
      assert.equal(result.error, undefined, `the page failed: ${result.error}`);
      result.tokens.forEach((tokens, si) => {
        assert.deepEqual(tokens, Array.from(arrays[`${c.key}.tokens.${si}`].data), `browser tokens of stage ${si}`);
      });
      const rgb = Buffer.from(result.rgb, "base64");
      const image = arrays[`${c.key}.image`];
      assert.deepEqual([result.height, result.width, 3], image.shape);
      assert.ok(maxAbsDiff(rgb, image.data) <= 1, `the canvas differs from the Python image by ${maxAbsDiff(rgb, image.data)} levels`);
    } finally {
      clearTimeout(timer);
      const exited = browser.exitCode !== null ? Promise.resolve() : new Promise((r) => browser.once("exit", r));
      try { process.kill(-/** @type {number} */ (browser.pid), "SIGTERM"); } catch { /* already gone */ }
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000).unref())]);
      server.close();
      rmSync(profile, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 });
    }
  });
