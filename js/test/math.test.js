import assert from "node:assert/strict";
import { test } from "node:test";
import { cfgMix, contextPositions, filterTopKTopP, iddpmStep, ropeCosSin1d, ropeCosSin2d } from "../src/math.js";
import { arrays, maxAbsDiff, needFixtures, spec } from "../test-support/fixtures.js";

test("CFG mixing is (1 + t) * cond - t * uncond in float32", () => {
  const out = cfgMix(Float32Array.of(1, 2, 0.5, 4), 0.5);
  assert.deepEqual(Array.from(out), [1.5 * 1 - 0.5 * 0.5, 1.5 * 2 - 0.5 * 4]);
});

test("top-k keeps every logit tied with the k-th largest", () => {
  const out = filterTopKTopP(Float32Array.of(3, 1, 2, 2, 0), 2, 0);
  assert.deepEqual(Array.from(out), [3, -Infinity, 2, 2, -Infinity]);
});

test("the last IDDPM step returns the posterior mean and ignores the noise", () => {
  const s = { sqrtRecip: 2, sqrtRecipM1: 1, coef1: 0.5, coef2: 0.25, minLog: -2, maxLog: -1 };
  const x = Float32Array.of(0.2, 0.9), eps = Float32Array.of(0.1, -0.5), v = Float32Array.of(0, 0);
  const a = iddpmStep(s, 0, x, eps, v, Float32Array.of(5, 5));
  const b = iddpmStep(s, 0, x, eps, v, Float32Array.of(-5, 9));
  assert.deepEqual(a, b);
  assert.equal(a[1], Math.fround(0.5 * 1 + Math.fround(0.25 * 0.9))); // x0 clipped to 1
  assert.notDeepEqual(iddpmStep(s, 1, x, eps, v, Float32Array.of(5, 5)), a);
});

test("RoPE tables equal the Python runtime's (1-D context, 2-D stages)", { skip: needFixtures }, () => {
  for (const c of spec.rope) {
    const pos = contextPositions(Uint8Array.from(c.mask));
    const t1 = ropeCosSin1d(pos, c.head_dim, 10000);
    assert.ok(maxAbsDiff(t1.cos, arrays[`${c.key}.cos1d`].data) <= 1e-7, `${c.key} cos 1-D`);
    assert.ok(maxAbsDiff(t1.sin, arrays[`${c.key}.sin1d`].data) <= 1e-7, `${c.key} sin 1-D`);
    const T = c.mask.length;
    for (let si = 1; si < c.patch_nums.length; si++) {
      const t2 = ropeCosSin2d(c.patch_nums, si, [pos[T - 1], pos[2 * T - 1]], c.head_dim, 10000);
      assert.equal(t2.cos.length, arrays[`${c.key}.cos2d.${si}`].data.length);
      assert.ok(maxAbsDiff(t2.cos, arrays[`${c.key}.cos2d.${si}`].data) <= 1e-6, `${c.key} cos stage ${si}`);
      assert.ok(maxAbsDiff(t2.sin, arrays[`${c.key}.sin2d.${si}`].data) <= 1e-6, `${c.key} sin stage ${si}`);
    }
  }
});
