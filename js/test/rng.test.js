import assert from "node:assert/strict";
import { test } from "node:test";
import { PortableRNG, drawPlan, philox4x64_10 } from "../src/rng.js";
import { arrays, maxAbsDiff, needFixtures, spec } from "../test-support/fixtures.js";

/** @param {bigint[]} words 64-bit words -> [hi, lo] uint32 pairs */
const limbs = (words) => Uint32Array.from(words.flatMap((w) => [Number(w >> 32n), Number(w & 0xffffffffn)]));
const hex = (out) => Array.from({ length: 4 }, (_, i) => ((BigInt(out[2 * i]) << 32n) | BigInt(out[2 * i + 1])).toString(16).padStart(16, "0"));

test("Philox4x64-10 reproduces Random123's known-answer vectors", () => {
  const out = new Uint32Array(8);
  philox4x64_10(limbs([0n, 0n, 0n, 0n]), limbs([0n, 0n]), out);
  assert.deepEqual(hex(out), ["16554d9eca36314c", "db20fe9d672d0fdc", "d7e772cee186176b", "7e68b68aec7ba23b"]);
  const pi = [0x243f6a8885a308d3n, 0x13198a2e03707344n, 0xa4093822299f31d0n, 0x082efa98ec4e6c89n];
  philox4x64_10(limbs(pi), limbs([0x452821e638d01377n, 0xbe5466cf34e90c6cn]), out);
  assert.deepEqual(hex(out), ["a528f45403e61d95", "38c72dbd566e9788", "a5a1610e72fd18b5", "57bd43b5e52b7fe6"]);
});

test("seeds outside [0, 2**64-1] are refused", () => {
  for (const bad of [-1, 2 ** 64, 1.5, "x", 2n ** 64n]) assert.throws(() => new PortableRNG(/** @type {any} */ (bad)), RangeError);
});

test("the draw order is the contract's: per stage sample then gumbel, then the diffusion noise", () => {
  const plan = drawPlan([1, 2, 4], 10, 3, 2, true);
  assert.deepEqual(plan.map((d) => d.name), ["stage0.sample", "stage0.gumbel", "stage1.sample", "stage1.gumbel",
    "stage2.sample", "stage2.gumbel", "diffusion.init", "diffusion.step0", "diffusion.step1"]);
  assert.deepEqual(plan[2].shape, [1, 4, 10]);
  assert.deepEqual(plan[6].shape, [1, 16, 3]);
  assert.deepEqual(drawPlan([1, 2], 10, 3, 1, false).map((d) => d.name), ["stage0.sample", "stage1.sample", "diffusion.init", "diffusion.step0"]);
});

test("raw words, uniforms, Exp(1) and N(0,1) draws equal the Python RNG's", { skip: needFixtures }, () => {
  for (const c of spec.rng) {
    const raw = new PortableRNG(BigInt(c.seed)).raw(c.raw.length).map((w) => w.toString(16).padStart(16, "0"));
    assert.deepEqual(raw, c.raw, `seed ${c.seed}`);
    const rng = new PortableRNG(BigInt(c.seed));
    rng.raw(3);
    const exp = rng.exponential(35), normal = rng.normal(9), uniform = rng.uniform(9);
    assert.deepEqual(Array.from(exp), Array.from(arrays[`${c.key}.exponential`].data), `exponential, seed ${c.seed}`);
    // cos/sin/log1p of two libms may differ by an ulp of a double: compare at float32 resolution
    assert.ok(maxAbsDiff(normal, arrays[`${c.key}.normal`].data) <= 1e-6, `normal, seed ${c.seed}`);
    assert.deepEqual(Array.from(uniform), Array.from(arrays[`${c.key}.uniform`].data), `uniform, seed ${c.seed}`);
  }
});
