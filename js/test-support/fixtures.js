// What the Python side (tests/test_js.py) wrote for these tests: bundles and the Python runtime's
// outputs. Without HARTKIT_JS_FIXTURES the tests that need them skip, naming the reason.

import { readFileSync } from "node:fs";
import { parseNpz } from "../src/npz.js";

const file = process.env.HARTKIT_JS_FIXTURES;
/** @type {any} */
export const spec = file ? JSON.parse(readFileSync(file, "utf8")) : null;
/** @type {Record<string, import("../src/npz.js").NdArray>} */
export const arrays = spec ? parseNpz(new Uint8Array(readFileSync(spec.arrays)), spec.arrays) : {};
export const needFixtures = spec ? false : "HARTKIT_JS_FIXTURES is not set (pytest tests/test_js.py builds them)";

/** Largest absolute difference of two equal-length arrays. */
export function maxAbsDiff(a, b) {
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(Number(a[i]) - Number(b[i])));
  return worst;
}
