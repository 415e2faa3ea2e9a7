// Host-side math of the staged loop in float32: CFG mixing, top-k/top-p, sampling, RoPE tables and
// the IDDPM step. Every float32 operation of the Python runtime (numpy float32 arrays) is one double
// operation rounded with Math.fround; for +, -, *, / and sqrt that is the correctly rounded float32
// result (double rounding is innocuous at 53 >= 2 * 24 + 2 bits), so the two agree to the bit except
// where a library's exp/log/cos differ by an ulp.

const f32 = Math.fround;

/**
 * `(1 + t) * cond - t * uncond` over rows [cond; uncond] of `[2, n, V]` logits -> `[n * V]`.
 * @param {Float32Array} logits @param {number} t
 */
export function cfgMix(logits, t) {
  const half = logits.length / 2;
  const a = f32(1 + t), b = f32(t);
  const out = new Float32Array(half);
  for (let i = 0; i < half; i++) out[i] = f32(a * logits[i]) - f32(b * logits[half + i]);
  return out;
}

/** Softmax of one row in float32 (max subtracted; -Infinity entries get 0). @param {Float32Array} x */
export function softmaxRow(x) {
  let m = -Infinity;
  for (let i = 0; i < x.length; i++) if (x[i] > m) m = x[i];
  const e = new Float32Array(x.length);
  let sum = 0;
  for (let i = 0; i < x.length; i++) {
    e[i] = Math.exp(f32(x[i] - m));
    sum += e[i];
  }
  const s = f32(sum);
  for (let i = 0; i < x.length; i++) e[i] = e[i] / s;
  return e;
}

/**
 * Entries below the k-th largest logit become -Infinity (ties survive); with topP > 0 the low tail
 * whose cumulative probability is at most 1 - topP too (the last entry always survives).
 * @param {Float32Array} row @param {number} topK @param {number} topP
 */
export function filterTopKTopP(row, topK, topP) {
  const out = Float32Array.from(row);
  const V = out.length;
  if (topK > 0 && topK < V) {
    const kth = Float32Array.from(out).sort()[V - topK];
    for (let i = 0; i < V; i++) if (out[i] < kth) out[i] = -Infinity;
  }
  if (topP > 0) {
    // stable ascending order, as numpy's argsort(kind="stable")
    const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => out[a] - out[b] || a - b);
    const probs = softmaxRow(Float32Array.from(order, (i) => out[i]));
    let cum = 0;
    const remove = [];
    for (let r = 0; r < V; r++) {
      cum = f32(cum + probs[r]);
      if (cum <= 1 - topP && r < V - 1) remove.push(order[r]);
    }
    for (const i of remove) out[i] = -Infinity;
  }
  return out;
}

/**
 * @typedef {{ si: number, pn: number, ratio: number, cfgScale: number, topK: number, gumbelTau: number,
 *   logitScale: number, isFinal: boolean }} Stage
 */

/**
 * Sample one stage: hard indices `argmax(softmax(masked) / E)` and, with Gumbel draws, the latents
 * `softmax((masked * logitScale - log G) / tau) @ codebook` (else the codebook rows of the indices).
 * @param {Float32Array} mixed `[n, V]` CFG-mixed logits
 * @param {Stage} stage
 * @param {Float32Array} codebook `[V, C]`
 * @param {number} V vocabulary size
 * @param {Float32Array} expSample `[n, V]` Exp(1) draws
 * @param {Float32Array | null} expGumbel `[n, V]` Exp(1) draws or null
 * @param {number} topP
 * @returns {{ idx: Int32Array, latents: Float32Array }}
 */
export function sampleStage(mixed, stage, codebook, V, expSample, expGumbel, topP = 0) {
  const n = mixed.length / V;
  const C = codebook.length / V;
  const idx = new Int32Array(n);
  const latents = new Float32Array(n * C);
  const scale = f32(stage.logitScale), tau = f32(stage.gumbelTau);
  for (let r = 0; r < n; r++) {
    const masked = filterTopKTopP(mixed.subarray(r * V, (r + 1) * V), stage.topK, topP);
    const probs = softmaxRow(masked);
    let best = 0, bestValue = -Infinity;
    for (let i = 0; i < V; i++) {
      const q = f32(probs[i] / expSample[r * V + i]);
      if (q > bestValue) { bestValue = q; best = i; }
    }
    idx[r] = best;
    const lat = latents.subarray(r * C, (r + 1) * C);
    if (expGumbel === null) {
      lat.set(codebook.subarray(best * C, (best + 1) * C));
      continue;
    }
    const z = new Float32Array(V);
    for (let i = 0; i < V; i++) {
      const gumbel = -f32(Math.log(expGumbel[r * V + i]));
      z[i] = f32(f32(masked[i] * scale) + gumbel) / tau;
    }
    const y = softmaxRow(z);
    // y @ codebook, accumulated in double (BLAS accumulates in float32: the two differ by rounding)
    const acc = new Float64Array(C);
    for (let i = 0; i < V; i++) {
      const w = y[i];
      if (w === 0) continue;
      const row = i * C;
      for (let c = 0; c < C; c++) acc[c] += w * codebook[row + c];
    }
    lat.set(acc);
  }
  return { idx, latents };
}

// ------------------------------------------------------------------------------------------- RoPE

/**
 * `1 / theta ** (arange(0, d, stride) / d)` in float32, each step rounded as the manifest's rope rule says.
 * @param {number} headDim @param {number} stride @param {number} theta
 */
export function invFreq(headDim, stride, theta) {
  const out = new Float32Array(headDim / stride);
  for (let f = 0; f < out.length; f++) {
    const exponent = f32((f * stride) / headDim);
    out[f] = 1 / f32(Math.pow(theta, exponent));
  }
  return out;
}

/**
 * Stage-0 positions for both CFG halves: conditional `cumsum(mask) - 1`, unconditional 0. -> `[2, T]`.
 * @param {Uint8Array} mask `[T]` 1 where the token is not padding
 */
export function contextPositions(mask) {
  const T = mask.length;
  const pos = new Float64Array(2 * T);
  let c = -1;
  for (let i = 0; i < T; i++) {
    c += mask[i] ? 1 : 0;
    pos[i] = c;
  }
  return pos;
}

/**
 * 1-D tables for `[N, l]` positions -> float32 cos, sin `[N, l, d]` (angles `[half, half]`).
 * @param {Float64Array} positions @param {number} headDim @param {number} theta
 */
export function ropeCosSin1d(positions, headDim, theta) {
  const freqs = invFreq(headDim, 2, theta);
  const h = headDim / 2;
  const cos = new Float32Array(positions.length * headDim), sin = new Float32Array(positions.length * headDim);
  for (let p = 0; p < positions.length; p++) {
    const pos = f32(positions[p]);
    for (let f = 0; f < h; f++) {
      const angle = f32(pos * freqs[f]);
      const c = Math.cos(angle), s = Math.sin(angle);
      cos[p * headDim + f] = c; cos[p * headDim + h + f] = c;
      sin[p * headDim + f] = s; sin[p * headDim + h + f] = s;
    }
  }
  return { cos, sin };
}

/**
 * 2-D tables of the tokens fed at stage si: token `i * pn + j` at `(i / pn * last + P, j / pn * last + P)`
 * per CFG row (P = that row's last context position); channels `[row, row, col, col]`, each d/4 wide.
 * @param {number[]} patchNums @param {number} si @param {number[]} offsets one per CFG row
 * @param {number} headDim @param {number} theta
 */
export function ropeCosSin2d(patchNums, si, offsets, headDim, theta) {
  const pn = patchNums[si], last = patchNums[patchNums.length - 1];
  const freqs = invFreq(headDim, 4, theta);
  const q = headDim / 4;
  const l = pn * pn;
  const cos = new Float32Array(offsets.length * l * headDim), sin = new Float32Array(offsets.length * l * headDim);
  const axis = Float32Array.from({ length: pn }, (_, i) => f32(f32(i / pn) * last));
  offsets.forEach((offset, row) => {
    const P = f32(offset);
    for (let i = 0; i < pn; i++) {
      for (let j = 0; j < pn; j++) {
        const y = f32(axis[i] + P), x = f32(axis[j] + P);
        const base = (row * l + i * pn + j) * headDim;
        for (let f = 0; f < q; f++) {
          const a = f32(y * freqs[f]), b = f32(x * freqs[f]);
          const ca = Math.cos(a), sa = Math.sin(a), cb = Math.cos(b), sb = Math.sin(b);
          cos[base + f] = ca; cos[base + q + f] = ca; cos[base + 2 * q + f] = cb; cos[base + 3 * q + f] = cb;
          sin[base + f] = sa; sin[base + q + f] = sa; sin[base + 2 * q + f] = sb; sin[base + 3 * q + f] = sb;
        }
      }
    }
  });
  return { cos, sin };
}

// ------------------------------------------------------------------------------------- diffusion

/**
 * @typedef {{ sqrtRecip: number, sqrtRecipM1: number, coef1: number, coef2: number, minLog: number,
 *   maxLog: number }} StepScalars
 */

/**
 * One IDDPM ancestral step from respaced step j in float32 (clip_denoised); returns the new x.
 * @param {StepScalars} s float32 constants of step j
 * @param {number} j @param {Float32Array} x @param {Float32Array} eps @param {Float32Array} v
 * @param {Float32Array} noise
 */
export function iddpmStep(s, j, x, eps, v, noise) {
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) {
    let x0 = f32(f32(s.sqrtRecip * x[i]) - f32(s.sqrtRecipM1 * eps[i]));
    x0 = x0 < -1 ? -1 : x0 > 1 ? 1 : x0;
    const mean = f32(f32(s.coef1 * x0) + f32(s.coef2 * x[i]));
    if (j === 0) {
      out[i] = mean;
      continue;
    }
    const frac = f32(f32(v[i] + 1) / 2);
    const logVariance = f32(f32(frac * s.maxLog) + f32(f32(1 - frac) * s.minLog));
    const std = f32(Math.exp(f32(0.5 * logVariance)));
    out[i] = f32(mean + f32(std * noise[i]));
  }
  return out;
}
