// The portable seeded RNG of a hartkit bundle (manifest `rng`): Philox4x64-10, key (seed, 0), block
// n = 1, 2, ... from counter (n, 0, 0, 0), four 64-bit words per block; uniforms, Exp(1) and N(0, 1)
// derived from the words exactly as the contract says. Written by hand because no JavaScript library
// produces this exact stream (numpy's Philox raw stream); 64-bit words are kept as two uint32 limbs.

const TWO_POW_M53 = 1 / 9007199254740992;
const TWO_POW_21 = 2097152;

// Philox4x64 multipliers and Weyl key increments (Salmon et al. 2011, Random123), as uint32 halves.
const M0 = [0xd2e7470e, 0xe14c6c93];
const M1 = [0xca5a8263, 0x95121157];
const W0 = [0x9e3779b9, 0x7f4a7c15];
const W1 = [0xbb67ae85, 0x84caa73b];

/** Scratch for mulhilo: the 128-bit product as four uint32 words, least significant first. */
const prod = new Uint32Array(4);

/**
 * Full 64x64 -> 128-bit product of (aHi:aLo) and (bHi:bLo) into `prod`, by 16-bit limbs: each partial
 * product is below 2**32 and is split into its 16-bit halves, so every sum stays a small integer.
 * @param {number} aHi @param {number} aLo @param {number} bHi @param {number} bLo
 */
function mulhilo(aHi, aLo, bHi, bLo) {
  const a = limbA, b = limbB;
  a[0] = aLo & 0xffff; a[1] = aLo >>> 16; a[2] = aHi & 0xffff; a[3] = aHi >>> 16;
  b[0] = bLo & 0xffff; b[1] = bLo >>> 16; b[2] = bHi & 0xffff; b[3] = bHi >>> 16;
  lowCols.fill(0);
  highCols.fill(0);
  for (let i = 0; i < 4; i++) {
    for (let j = 0; j < 4; j++) {
      const p = a[i] * b[j]; // < 2**32, exact
      lowCols[i + j] += p & 0xffff;
      highCols[i + j + 1] += p >>> 16;
    }
  }
  let carry = 0;
  for (let k = 0; k < 8; k += 2) {
    const t0 = lowCols[k] + highCols[k] + carry;
    const t1 = lowCols[k + 1] + highCols[k + 1] + (t0 >>> 16);
    prod[k >> 1] = ((t0 & 0xffff) | ((t1 & 0xffff) << 16)) >>> 0;
    carry = t1 >>> 16;
  }
}
const limbA = new Uint32Array(4);
const limbB = new Uint32Array(4);
const lowCols = new Uint32Array(9);
const highCols = new Uint32Array(9);

/** 64-bit add of (bHi:bLo) into words [i, i+1] (hi, lo) of a Uint32Array. */
function add64(arr, i, bHi, bLo) {
  const lo = arr[i + 1] + bLo;
  arr[i + 1] = lo;
  arr[i] = arr[i] + bHi + (lo > 0xffffffff ? 1 : 0);
}

const stateC = new Uint32Array(8); // scratch: no allocation per block
const stateK = new Uint32Array(4);

/**
 * One Philox4x64-10 block: counter (4 words) and key (2 words), each word as [hi, lo] pairs in a
 * Uint32Array (ctr: 8 entries, key: 4 entries). Writes the 4 output words into `out` (8 entries).
 * @param {Uint32Array} ctrIn @param {Uint32Array} keyIn @param {Uint32Array} out
 */
export function philox4x64_10(ctrIn, keyIn, out) {
  const c = stateC, k = stateK;
  c.set(ctrIn);
  k.set(keyIn);
  for (let round = 0; round < 10; round++) {
    if (round > 0) {
      add64(k, 0, W0[0], W0[1]);
      add64(k, 2, W1[0], W1[1]);
    }
    mulhilo(M0[0], M0[1], c[0], c[1]);
    const hi0h = prod[3], hi0l = prod[2], lo0h = prod[1], lo0l = prod[0];
    mulhilo(M1[0], M1[1], c[4], c[5]);
    const hi1h = prod[3], hi1l = prod[2], lo1h = prod[1], lo1l = prod[0];
    const c1h = c[2], c1l = c[3], c3h = c[6], c3l = c[7];
    c[0] = (hi1h ^ c1h ^ k[0]) >>> 0;
    c[1] = (hi1l ^ c1l ^ k[1]) >>> 0;
    c[2] = lo1h;
    c[3] = lo1l;
    c[4] = (hi0h ^ c3h ^ k[2]) >>> 0;
    c[5] = (hi0l ^ c3l ^ k[3]) >>> 0;
    c[6] = lo0h;
    c[7] = lo0l;
  }
  out.set(c);
}

export const MAX_SEED = (1n << 64n) - 1n;

/** The contract's generator: one instance per generation, words drawn in order across calls. */
export class PortableRNG {
  /** @param {number | bigint} seed an integer in [0, 2**64 - 1] */
  constructor(seed) {
    let s;
    try {
      s = BigInt(seed);
    } catch {
      throw new RangeError(`seed must be an integer in [0, 2**64-1], got ${String(seed)}`);
    }
    if (s < 0n || s > MAX_SEED || (typeof seed === "number" && !Number.isSafeInteger(seed))) {
      throw new RangeError(`seed must be an integer in [0, 2**64-1], got ${String(seed)}`);
    }
    this.seed = s;
    this.key = new Uint32Array([Number(s >> 32n), Number(s & 0xffffffffn), 0, 0]);
    this.counter = new Uint32Array(8); // (n, 0, 0, 0), bumped before each block
    this.block = new Uint32Array(8);
    this.pos = 4; // words of `block` used
    this.wordsDrawn = 0;
  }

  /** Next word as [hi, lo] written into `pair` (avoids allocating per word). @param {Uint32Array} pair */
  nextWord(pair) {
    if (this.pos === 4) {
      add64(this.counter, 0, 0, 1);
      philox4x64_10(this.counter, this.key, this.block);
      this.pos = 0;
    }
    pair[0] = this.block[2 * this.pos];
    pair[1] = this.block[2 * this.pos + 1];
    this.pos++;
    this.wordsDrawn++;
  }

  /** The next `count` raw words as BigInts (tests and debugging). @param {number} count */
  raw(count) {
    const pair = new Uint32Array(2);
    const out = new Array(count);
    for (let i = 0; i < count; i++) {
      this.nextWord(pair);
      out[i] = (BigInt(pair[0]) << 32n) | BigInt(pair[1]);
    }
    return out;
  }

  /** `count` uniforms in [0, 1), float64: u = (w >> 11) * 2**-53. @param {number} count */
  uniform(count) {
    const pair = new Uint32Array(2);
    const out = new Float64Array(count);
    for (let i = 0; i < count; i++) {
      this.nextWord(pair);
      out[i] = (pair[0] * TWO_POW_21 + (pair[1] >>> 11)) * TWO_POW_M53;
    }
    return out;
  }

  /** `count` Exp(1) draws: -log1p(-u), rounded to float32. @param {number} count */
  exponential(count) {
    const u = this.uniform(count);
    const out = new Float32Array(count);
    for (let i = 0; i < count; i++) out[i] = -Math.log1p(-u[i]);
    return out;
  }

  /** `count` N(0, 1) draws: Box-Muller on consecutive pairs, z0, z1, ...; an odd count drops the last z1. */
  normal(count) {
    const pairs = Math.ceil(count / 2);
    const u = this.uniform(2 * pairs);
    const out = new Float32Array(count);
    for (let p = 0; p < pairs; p++) {
      const r = Math.sqrt(-2 * Math.log1p(-u[2 * p]));
      const angle = 2 * Math.PI * u[2 * p + 1];
      out[2 * p] = r * Math.cos(angle);
      if (2 * p + 1 < count) out[2 * p + 1] = r * Math.sin(angle);
    }
    return out;
  }
}

/**
 * @typedef {{ name: string, kind: "exponential" | "normal", shape: number[] }} Draw
 */

/**
 * The fixed order of every draw of one generation (manifest `rng.order`).
 * @param {number[]} patchNums @param {number} vocab @param {number} latentDim @param {number} steps
 * @param {boolean} moreSmooth
 * @returns {Draw[]}
 */
export function drawPlan(patchNums, vocab, latentDim, steps, moreSmooth = true) {
  /** @type {Draw[]} */
  const draws = [];
  patchNums.forEach((pn, si) => {
    const n = si === 0 ? 1 : pn * pn;
    draws.push({ name: `stage${si}.sample`, kind: "exponential", shape: [1, n, vocab] });
    if (moreSmooth) draws.push({ name: `stage${si}.gumbel`, kind: "exponential", shape: [1, n, vocab] });
  });
  const nLast = patchNums[patchNums.length - 1] ** 2;
  draws.push({ name: "diffusion.init", kind: "normal", shape: [1, nLast, latentDim] });
  for (let s = 0; s < steps; s++) draws.push({ name: `diffusion.step${s}`, kind: "normal", shape: [1, nLast, latentDim] });
  return draws;
}

/**
 * Draw lazily in plan order.
 * @param {PortableRNG} rng @param {Draw[]} plan
 * @returns {Generator<[Draw, Float32Array]>}
 */
export function* iterDraws(rng, plan) {
  for (const draw of plan) {
    const count = draw.shape.reduce((a, b) => a * b, 1);
    yield [draw, draw.kind === "exponential" ? rng.exponential(count) : rng.normal(count)];
  }
}
