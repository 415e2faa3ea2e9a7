import assert from "node:assert/strict";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { BundleError, Pipeline, SelfCheckError, parseNpz } from "../src/node.js";
import { arrays, maxAbsDiff, needFixtures, spec } from "../test-support/fixtures.js";

/** @type {Map<string, any>} */
const loaded = new Map();
const load = async (dir) => {
  if (!loaded.has(dir)) loaded.set(dir, await Pipeline.fromBundle(dir));
  return loaded.get(dir);
};
after(async () => { for (const p of loaded.values()) await p.release(); });

/** JS options from the Python call's keyword arguments. */
const jsOptions = (o) => ({ guidance: o.cfg, moreSmooth: o.more_smooth, topP: o.top_p });

/** @param {any} result @param {string} key @param {number} stages */
function assertSame(result, key, stages, what) {
  assert.equal(result.tokens.length, stages, `${what}: stages`);
  result.tokens.forEach((tokens, si) => {
    assert.deepEqual(Array.from(tokens), Array.from(arrays[`${key}.tokens.${si}`].data), `${what}: tokens of stage ${si}`);
  });
  const image = arrays[`${key}.image`];
  assert.deepEqual([result.height, result.width, 3], image.shape);
  assert.ok(maxAbsDiff(result.rgb, image.data) <= 1, `${what}: image differs by ${maxAbsDiff(result.rgb, image.data)} levels`);
}

test("the bundle's golden loop: same tokens at every stage, image within one level", { skip: needFixtures }, async () => {
  for (const dir of [spec.demo_bundle, spec.tiny_bundle]) {
    const pipe = await load(dir);
    const g = pipe.manifest.golden.loop;
    const golden = parseNpz(new Uint8Array(readFileSync(path.join(dir, g.file))), g.file);
    const stages = [];
    const result = await pipe.generate(g.prompt, { seed: BigInt(g.seed), guidance: g.cfg, moreSmooth: g.more_smooth,
      onStage: (e) => { stages.push(e.stage); } });
    assert.deepEqual(stages, pipe.manifest.loop.patch_nums.map((_, i) => i), "one progress event per stage");
    result.tokens.forEach((tokens, si) => {
      assert.deepEqual(Array.from(tokens), Array.from(golden[`tokens.${si}`].data, Number), `${dir}: golden tokens of stage ${si}`);
    });
    assert.ok(maxAbsDiff(result.rgb, golden.image.data) <= 1, `${dir}: golden image`);
  }
});

test("the demo model on several prompts, seeds and guidances equals the Python runtime", { skip: needFixtures }, async () => {
  const pipe = await load(spec.demo_bundle);
  for (const c of spec.demo) {
    const result = await pipe.generate(c.prompt, { seed: BigInt(c.seed), ...jsOptions(c.options) });
    assertSame(result, c.key, c.stages, `${c.prompt.slice(0, 40)} seed ${c.seed} ${JSON.stringify(c.options)}`);
    assert.equal(result.rgba.length, result.width * result.height * 4);
  }
});

test("a second model (the tiny random checkpoint) equals the Python runtime", { skip: needFixtures }, async () => {
  const pipe = await load(spec.tiny_bundle);
  for (const c of spec.tiny) {
    assertSame(await pipe.generate(c.prompt, { seed: BigInt(c.seed), ...jsOptions(c.options) }), c.key, c.stages, c.prompt);
  }
});

test("generations on one pipeline queue and each equals the one run alone", { skip: needFixtures }, async () => {
  const pipe = await load(spec.demo_bundle);
  const [a, b] = spec.demo;
  const results = await Promise.all([a, b].map((c) => pipe.generate(c.prompt, { seed: BigInt(c.seed), ...jsOptions(c.options) })));
  assertSame(results[0], a.key, a.stages, "concurrent a");
  assertSame(results[1], b.key, b.stages, "concurrent b");
});

test("bad input: guidance and seed out of range are one clear error each", { skip: needFixtures }, async () => {
  const pipe = await load(spec.demo_bundle);
  await assert.rejects(pipe.generate("x", { guidance: 51 }), /guidance must be in \[0, 50\]/);
  await assert.rejects(pipe.generate("x", { seed: -1 }), /seed must be an integer/);
  await assert.rejects(pipe.generate(/** @type {any} */ (3)), /prompt must be a string/);
});

/** A copy of the demo bundle changed by `change(dir, manifest)`; returns the folder. */
function brokenCopy(change) {
  const dir = mkdtempSync(path.join(tmpdir(), "hartkit-js-"));
  try {
    cpSync(spec.demo_bundle, dir, { recursive: true });
    const file = path.join(dir, "manifest.json");
    const manifest = JSON.parse(readFileSync(file, "utf8").replace(/-?Infinity|NaN/g, "null"));
    const next = change(dir, manifest);
    writeFileSync(file, JSON.stringify(next ?? manifest));
    return dir;
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

const broken = [
  ["a newer schema", (d, m) => { m.schema_version = 99; }, /schema_version 99 is newer/],
  ["a tampered graph", (d) => { writeFileSync(path.join(d, "onnx/ar_head.onnx"), "tampered"); }, /onnx\/ar_head\.onnx: sha256 .* does not match/],
  ["tampered weights", (d) => {
    const f = path.join(d, "onnx/weights.bin");
    const bytes = readFileSync(f);
    bytes[100] ^= 1;
    writeFileSync(f, bytes);
  }, /weights\.bin: sha256/],
  ["a missing tokenizer", (d) => { rmSync(path.join(d, "tokenizer/tokenizer.json")); }, /tokenizer\/tokenizer\.json: missing or unreadable/],
  ["a non-ONNX bundle", (d, m) => { m.files = { executorch: { text_encoder: "executorch/model.pte" } }; }, /not an ONNX bundle/],
  ["a path out of the bundle", (d, m) => { m.constants = "../constants.npz"; }, /escapes the bundle/],
  ["a missing manifest", (d) => { rmSync(path.join(d, "manifest.json")); return undefined; }, /not a hartkit bundle/],
];

for (const [what, change, message] of broken) {
  test(`bad bundle: ${what} is one BundleError`, { skip: needFixtures }, async () => {
    const dir = brokenCopy((d, m) => (what === "a missing manifest" ? m : change(d, m)));
    if (what === "a missing manifest") change(dir);
    try {
      await assert.rejects(Pipeline.fromBundle(dir), (err) => err instanceof BundleError && message.test(err.message));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

/** The demo bundle with its fp32 golden vectors listed for the load-time self-check at a tolerance. */
const selfChecked = (atol) => brokenCopy((d, m) => {
  m.golden.self_check = { onnx: ["ar_context", "ar_head", "condition"] };
  m.golden.graphs.by_format = { onnx: Object.fromEntries(m.golden.self_check.onnx.map((g) => [g, { file: `golden/${g}.npz`, atol, rtol: 0 }])) };
});

test("the load-time self-check replays the listed graphs' golden vectors and refuses a miss", { skip: needFixtures }, async () => {
  const ok = selfChecked(1e-3);
  const bad = selfChecked(-1); // no output can be within a negative tolerance
  try {
    const checked = [];
    const pipe = await Pipeline.fromBundle(ok, { onProgress: (m) => { if (m.startsWith("self-check")) checked.push(m); } });
    await pipe.release();
    assert.deepEqual(checked, ["self-check ar_context", "self-check ar_head", "self-check condition"]);
    await assert.rejects(Pipeline.fromBundle(bad), (err) => err instanceof SelfCheckError && /graph ar_context output h/.test(err.message));
    const skipped = await Pipeline.fromBundle(bad, { selfCheck: false });
    await skipped.release();
  } finally {
    rmSync(ok, { recursive: true, force: true });
    rmSync(bad, { recursive: true, force: true });
  }
});
