// `Pipeline.fromBundle(...)` then `generate(prompt, { seed, guidance })`: a hartkit bundle's ONNX graphs
// under the staged sampling loop, driven only by the manifest (its `loop`, `rng`, `prompt` and
// `diffusion` sections) and the bundle's data files. Environment-neutral: the onnxruntime module and
// the way files are read come from node.js (onnxruntime-node, the file system) or web.js
// (onnxruntime-web, fetch).

import { parseNpz } from "./npz.js";
import { PromptEncoder } from "./prompt.js";
import { PortableRNG, drawPlan, iterDraws } from "./rng.js";
import { cfgMix, contextPositions, iddpmStep, ropeCosSin1d, ropeCosSin2d, sampleStage } from "./math.js";

/** The newest manifest schema this package reads (hartkit's bundle/format.py SCHEMA_VERSION). */
export const SCHEMA_VERSION = 1;
/** The RNG contract version this package implements. */
export const RNG_CONTRACT_VERSION = 1;
const MAX_CFG = 50;

/** A bundle that is malformed, tampered with, from a newer hartkit, or not an ONNX bundle. */
export class BundleError extends Error {
  name = "BundleError";
}

/** A quantized graph computes differently on this machine than where the bundle was exported. */
export class SelfCheckError extends BundleError {
  name = "SelfCheckError";
}

/**
 * How a pipeline reads a bundle: its files by relative path, and how a graph becomes a session.
 * @typedef {object} BundleSource
 * @property {string} label where the bundle is (for messages)
 * @property {(rel: string) => Promise<Uint8Array>} readBytes a file's bytes
 * @property {(rel: string) => Promise<string>} sha256 a file's sha256 (hex)
 * @property {(rel: string, weights: string[]) => Promise<any>} createSession an onnxruntime session for
 *   the ONNX file `rel`, whose external data files (relative to the bundle) are `weights`
 */

/**
 * @typedef {object} StageEvent
 * @property {number} stage index of the stage just sampled
 * @property {number} stages number of stages
 * @property {Int32Array} tokens its sampled token indices
 */

/**
 * @typedef {object} GenerateOptions
 * @property {number | bigint} [seed] default 0
 * @property {number} [guidance] CFG scale; default the manifest's `loop.default_cfg`
 * @property {boolean} [moreSmooth] Gumbel-softmax latents (default true, as the Python runtime)
 * @property {number} [topP] 0 (off) by default
 * @property {(event: StageEvent) => void | Promise<void>} [onStage] called after each stage
 */

/**
 * @typedef {object} GenerateResult
 * @property {Uint8ClampedArray} rgba `[H, W, 4]` pixels (alpha 255), ready for ImageData
 * @property {Uint8Array} rgb `[H, W, 3]` pixels
 * @property {number} width
 * @property {number} height
 * @property {Int32Array[]} tokens sampled token indices per stage
 */

const isObject = (v) => typeof v === "object" && v !== null && !Array.isArray(v);

/**
 * Check what this package reads from a manifest; one BundleError naming the first problem.
 * @param {any} m parsed manifest @param {string} where
 */
export function checkManifest(m, where) {
  const fail = (msg) => { throw new BundleError(`${where}: ${msg}`); };
  if (!isObject(m)) fail("manifest is not a JSON object");
  if (!Number.isInteger(m.schema_version)) fail("manifest has no integer schema_version");
  if (m.schema_version > SCHEMA_VERSION) {
    fail(`schema_version ${m.schema_version} is newer than this package understands (${SCHEMA_VERSION}); upgrade @hartkit/runtime`);
  }
  for (const key of ["loop", "files", "prompt", "diffusion", "rng"]) if (!isObject(m[key])) fail(`manifest has no '${key}' section`);
  if (!Array.isArray(m.artifacts)) fail("manifest has no 'artifacts' list");
  if (!Array.isArray(m.graphs)) fail("manifest has no 'graphs' list");
  if (!isObject(m.files.onnx) || Object.keys(m.files.onnx).length === 0) {
    fail(`not an ONNX bundle (formats: ${Object.keys(m.files).join(", ") || "none"}); export with --format onnx`);
  }
  if (m.rng.version !== RNG_CONTRACT_VERSION) fail(`rng contract version ${m.rng.version}, this package implements ${RNG_CONTRACT_VERSION}`);
  const loop = m.loop;
  const ints = ["context_token", "vocab_size", "latent_dim", "head_dim", "system_length"];
  for (const key of ints) if (!Number.isInteger(loop[key]) || loop[key] < 0) fail(`loop.${key} must be a non-negative integer`);
  if (!Array.isArray(loop.patch_nums) || loop.patch_nums.length < 2 || !loop.patch_nums.every(Number.isInteger)) {
    fail("loop.patch_nums must be a list of at least two integers");
  }
  if (!Array.isArray(loop.stages_at_default_cfg) || loop.stages_at_default_cfg.length !== loop.patch_nums.length) {
    fail("loop.stages_at_default_cfg must list one entry per stage");
  }
  if (!["llama", "gpt2"].includes(loop.attn_type)) fail(`loop.attn_type ${JSON.stringify(loop.attn_type)} is not llama or gpt2`);
  if (loop.attn_type === "llama" && loop.rope !== undefined && !(loop.rope.theta > 0)) fail("loop.rope.theta must be a positive number");
  if (!Array.isArray(m.diffusion.timesteps) || !isObject(m.diffusion.tables)) fail("diffusion needs timesteps and tables");
  if (!Number.isInteger(m.prompt.pad_token_id) || !Number.isInteger(m.prompt.max_tokens)) fail("prompt needs pad_token_id and max_tokens");
  const paths = [m.constants ?? "constants.npz", ...Object.values(m.files.onnx), `${m.tokenizer ?? "tokenizer"}/tokenizer.json`];
  for (const rel of paths) checkRelPath(rel, where);
}

/**
 * JSON.parse of a manifest. Python's json writes the non-finite numbers of the sections no runtime reads
 * (parity: an exact match's SNR is Infinity) as bare Infinity / NaN, which JSON.parse refuses; they
 * become null here (the sections this package reads are checked finite by hartkit's reader).
 * @param {string} text
 */
export function parseManifestText(text) {
  return JSON.parse(text.replace(/"(?:[^"\\]|\\.)*"|-?Infinity|NaN/g, (token) => (token[0] === '"' ? token : "null")));
}

/** A path the manifest names must stay inside the bundle. @param {string} rel @param {string} where */
export function checkRelPath(rel, where) {
  if (typeof rel !== "string" || rel === "" || rel.startsWith("/") || rel.includes("\\") ||
      rel.split("/").some((p) => p === ".." || p === "." || p === "")) {
    throw new BundleError(`${where}: path ${JSON.stringify(rel)} escapes the bundle or is not a plain relative path`);
  }
}

/** Row-major tensor helper. */
class Tensor32 {
  /** @param {Float32Array} data @param {number[]} dims */
  constructor(data, dims) { this.data = data; this.dims = dims; }
}

/** Concatenate `[d0, d1, d2, n, d4]` tensors along axis 3. @param {Tensor32} a @param {Tensor32} b */
function concatAxis3(a, b) {
  const [d0, d1, d2, na, d4] = a.dims;
  const nb = b.dims[3];
  const out = new Float32Array(d0 * d1 * d2 * (na + nb) * d4);
  const outer = d0 * d1 * d2;
  for (let o = 0; o < outer; o++) {
    out.set(a.data.subarray(o * na * d4, (o + 1) * na * d4), o * (na + nb) * d4);
    out.set(b.data.subarray(o * nb * d4, (o + 1) * nb * d4), o * (na + nb) * d4 + na * d4);
  }
  return new Tensor32(out, [d0, d1, d2, na + nb, d4]);
}

export class Pipeline {
  /**
   * Use {@link Pipeline.fromBundle} (node.js / web.js bind the source and onnxruntime).
   * @param {object} parts
   */
  constructor(parts) {
    Object.assign(this, parts);
    /** @type {any} */ this.manifest;
    /** @type {any} */ this.ort;
    /** @type {Record<string, any>} */ this.sessions;
    /** @type {PromptEncoder} */ this.prompt;
    /** @type {Float32Array} */ this.codebook;
    this._busy = Promise.resolve();
  }

  /**
   * Load a bundle: manifest checked, every artifact's sha256 checked (unless `verify: false`), then the
   * tokenizer, codebook and one onnxruntime session per graph. Nothing is kept when a step fails.
   * @param {BundleSource} source @param {any} ort the onnxruntime module (node or web)
   * @param {{ verify?: boolean, selfCheck?: boolean, onProgress?: (message: string) => void }} [options]
   */
  static async load(source, ort, options = {}) {
    const { verify = true, onProgress = () => {} } = options;
    const where = `${source.label}/manifest.json`;
    let manifest;
    try {
      manifest = parseManifestText(new TextDecoder().decode(await source.readBytes("manifest.json")));
    } catch (err) {
      if (err instanceof SyntaxError) throw new BundleError(`${where}: not valid JSON (${err.message})`);
      throw new BundleError(`${source.label}: not a hartkit bundle (cannot read manifest.json: ${err.message})`);
    }
    checkManifest(manifest, where);
    const listed = new Map(manifest.artifacts.map((a) => [a.path, a]));
    const onnxFiles = Object.values(manifest.files.onnx);
    const weightFiles = manifest.onnx_weights?.file ? [dirOf(onnxFiles[0]) + manifest.onnx_weights.file] : [];
    const needed = [manifest.constants ?? "constants.npz", ...new Set(onnxFiles), ...weightFiles,
      ...["tokenizer.json", "tokenizer_config.json"].map((f) => `${manifest.tokenizer ?? "tokenizer"}/${f}`)];
    for (const rel of needed) {
      checkRelPath(rel, where);
      if (!listed.has(rel)) throw new BundleError(`${where}: ${rel} is not listed in artifacts (no checksum)`);
    }
    if (verify) {
      for (const rel of needed) {
        onProgress(`checking ${rel}`);
        let digest;
        try {
          digest = await source.sha256(rel);
        } catch (err) {
          throw new BundleError(`${source.label}/${rel}: missing or unreadable (${err.message})`);
        }
        if (digest !== listed.get(rel).sha256) {
          throw new BundleError(`${source.label}/${rel}: sha256 ${digest.slice(0, 12)}... does not match the manifest's ${listed.get(rel).sha256.slice(0, 12)}...: the file was changed or damaged`);
        }
      }
    }
    const loop = manifest.loop;
    const tokDir = manifest.tokenizer ?? "tokenizer";
    const readJson = async (rel) => JSON.parse(new TextDecoder().decode(await source.readBytes(rel)));
    const prompt = new PromptEncoder(await readJson(`${tokDir}/tokenizer.json`), await readJson(`${tokDir}/tokenizer_config.json`), manifest.prompt);
    const constantsRel = manifest.constants ?? "constants.npz";
    const codebook = parseNpz(await source.readBytes(constantsRel), constantsRel).codebook;
    if (!codebook || codebook.dtype !== "float32" || codebook.shape.join() !== [loop.vocab_size, loop.latent_dim].join()) {
      throw new BundleError(`${source.label}/${constantsRel}: expected a float32 codebook of shape [${loop.vocab_size}, ${loop.latent_dim}], found ${codebook ? `${codebook.dtype}[${codebook.shape}]` : "none"}`);
    }
    const parts = { manifest, ort, prompt, codebook: /** @type {Float32Array} */ (codebook.data), sessions: {} };
    const pipe = new Pipeline(parts);
    if (prompt.systemIds.length !== loop.system_length) {
      throw new BundleError(`${where}: the tokenizer gives a ${prompt.systemIds.length}-token system prompt, the text encoder expects ${loop.system_length}`);
    }
    // Stage 0 runs on the ar_stage graph with an empty past (as the Python onnxruntime backend does):
    // one session then holds the AR transformer's weights.
    const graphs = Object.keys(manifest.files.onnx).filter((g) => !(g === "ar_context" && manifest.files.onnx.ar_stage));
    try {
      for (const graph of graphs) {
        onProgress(`loading graph ${graph}`);
        pipe.sessions[graph] = await source.createSession(manifest.files.onnx[graph], weightFiles);
      }
    } catch (err) {
      await pipe.release();
      throw new BundleError(`${source.label}: onnxruntime cannot load a graph (${String(err.message ?? err).split("\n")[0]})`);
    }
    if (options.selfCheck ?? true) {
      try {
        await pipe.selfCheck(source, onProgress);
      } catch (err) {
        await pipe.release();
        throw err;
      }
    }
    return pipe;
  }

  /**
   * The graphs that compute in integers replay their golden vectors here (manifest `golden.self_check`,
   * files in `golden.graphs.by_format.onnx`): integer kernels differ between CPUs, so a graph whose
   * worst error exceeds atol + rtol * max|golden| refuses the bundle. fp32 bundles list none.
   * @param {BundleSource} source @param {(message: string) => void} onProgress
   */
  async selfCheck(source, onProgress = () => {}) {
    const golden = this.manifest.golden ?? {};
    const entries = golden.graphs?.by_format?.onnx ?? {};
    const graphs = golden.self_check?.onnx ?? Object.keys(entries);
    const listed = new Map(this.manifest.artifacts.map((a) => [a.path, a.sha256]));
    for (const graph of graphs) {
      const entry = entries[graph];
      if (!entry) throw new BundleError(`${source.label}: golden.self_check names ${graph}, which has no golden vector`);
      checkRelPath(entry.file, source.label);
      if ((await source.sha256(entry.file)) !== listed.get(entry.file)) {
        throw new BundleError(`${source.label}/${entry.file}: sha256 does not match the manifest`);
      }
      onProgress(`self-check ${graph}`);
      const data = parseNpz(await source.readBytes(entry.file), entry.file);
      /** @type {Record<string, any>} */
      const feeds = {};
      for (const [key, value] of Object.entries(data)) {
        if (!key.startsWith("in.")) continue;
        feeds[key.slice(3)] = value.dtype === "int64" ? { int64: Array.from(value.data, Number), dims: value.shape }
          : new Tensor32(Float32Array.from(value.data), value.shape);
      }
      const spec = this.manifest.graphs.find((g) => g.name === graph);
      const outputs = await this.run(graph, feeds);
      spec.outputs.forEach((/** @type {any} */ o, i) => {
        const ref = data[`out.${o.name}`]?.data;
        if (!ref) return;
        let err = 0, peak = 0;
        for (let k = 0; k < ref.length; k++) {
          err = Math.max(err, Math.abs(outputs[i].data[k] - Number(ref[k])));
          peak = Math.max(peak, Math.abs(Number(ref[k])));
        }
        if (!(err <= entry.atol + entry.rtol * peak)) {
          throw new SelfCheckError(`${source.label}: self-check failed on this CPU: graph ${graph} output ${o.name} is ${err.toExponential(3)} from the output recorded at export (tolerance atol ${entry.atol}, rtol ${entry.rtol}); its integer kernels compute differently here, re-export with a recipe exact on every CPU or load with selfCheck: false`);
        }
      });
    }
  }

  /** Free every session. */
  async release() {
    for (const s of Object.values(this.sessions)) await s.release?.();
    this.sessions = {};
  }

  /**
   * Prompt ids padded / truncated to max_tokens and the context mask.
   * @param {string} prompt
   */
  tokenize(prompt) {
    return this.prompt.encode(prompt);
  }

  /**
   * Run one graph by name; feeds are Tensor32 (float32) or {int64: number[] | Int32Array, dims}.
   * @param {string} graph @param {Record<string, any>} feeds
   * @returns {Promise<Tensor32[]>}
   */
  async run(graph, feeds) {
    const ort = this.ort;
    let name = graph;
    let all = feeds;
    if (graph === "ar_context" && !this.sessions.ar_context) {
      const past = this._pastShape();
      const empty = new Tensor32(new Float32Array(0), [past[0], past[1], past[2], 0, past[3]]);
      name = "ar_stage";
      all = { ...feeds, past_k: empty, past_v: empty };
    }
    const session = this.sessions[name];
    if (!session) throw new BundleError(`no ONNX session for graph '${name}'`);
    /** @type {Record<string, any>} */
    const inputs = {};
    for (const input of session.inputNames) {
      const f = all[input];
      if (f === undefined) throw new Error(`graph ${name}: missing input ${input}`);
      inputs[input] = f instanceof Tensor32
        ? new ort.Tensor("float32", f.data, f.dims)
        : new ort.Tensor("int64", BigInt64Array.from(f.int64, (v) => BigInt(v)), f.dims);
    }
    const out = await session.run(inputs);
    return session.outputNames.map((o) => new Tensor32(/** @type {Float32Array} */ (out[o].data), [...out[o].dims]));
  }

  /** [depth, rows, heads, head_dim] of ar_stage's past_k. */
  _pastShape() {
    const spec = this.manifest.graphs.find((g) => g.name === "ar_stage")?.inputs.find((i) => i.name === "past_k");
    const dims = spec?.shape;
    if (!dims || dims.length !== 5) throw new BundleError("manifest: ar_stage has no 5-D past_k input");
    return [dims[0], dims[1], dims[2], dims[4]];
  }

  /**
   * One image. Generations on one pipeline run one at a time, in call order.
   * @param {string} prompt @param {GenerateOptions} [options]
   * @returns {Promise<GenerateResult>}
   */
  generate(prompt, options = {}) {
    const next = this._busy.then(() => this._generate(prompt, options));
    this._busy = next.catch(() => {});
    return next;
  }

  /** @param {string} prompt @param {GenerateOptions} options */
  async _generate(prompt, options) {
    const m = this.manifest, loop = m.loop;
    const { seed = 0, moreSmooth = true, topP = 0, onStage } = options;
    const cfg = options.guidance ?? loop.default_cfg ?? 4.5;
    if (!(cfg >= 0 && cfg <= MAX_CFG)) throw new RangeError(`guidance must be in [0, ${MAX_CFG}], got ${cfg}`);
    if (!(topP >= 0 && topP < 1)) throw new RangeError(`topP must be in [0, 1), got ${topP}`);
    const pns = loop.patch_nums, last = pns[pns.length - 1], Cz = loop.latent_dim, V = loop.vocab_size;
    const theta = loop.rope?.theta ?? 10000;
    const timesteps = m.diffusion.timesteps;
    const draws = iterDraws(new PortableRNG(seed), drawPlan(pns, V, Cz, timesteps.length, moreSmooth));
    const nextDraw = () => draws.next().value[1];

    // Text encoder on [system; prompt] ids with mask [ones; ids != pad].
    const { ids, mask } = this.tokenize(prompt);
    const system = this.prompt.systemIds;
    const S = system.length, T = ids.length;
    const textIds = [...system, ...ids];
    const attention = [...new Array(S).fill(1), ...mask];
    const [context] = await this.run("text_encoder", {
      input_ids: { int64: textIds, dims: [1, S + T] }, attention_mask: { int64: attention, dims: [1, S + T] },
    });
    const mask2b = new Float32Array(2 * T);
    mask2b.set(mask);
    mask2b[T] = 1; // the unconditional row counts its first token (upstream)
    let [blockMods, headMod, x] = await this.run("condition", { context, context_mask_2b: new Tensor32(mask2b, [2, T]) });
    const positions = contextPositions(mask);
    const offsets = [positions[T - 1], positions[2 * T - 1]];
    const useRope = loop.attn_type === "llama";

    /** @type {Int32Array[]} */
    const tokens = [];
    let pastK = null, pastV = null;
    let fHat = new Tensor32(new Float32Array(Cz * last * last), [1, Cz, last, last]);
    for (let si = 0; si < pns.length; si++) {
      const stage = this._stage(si, cfg);
      /** @type {Record<string, any>} */
      const feeds = { x, block_mods: blockMods };
      if (useRope) {
        const n = si === 0 ? T : pns[si] ** 2;
        const { cos, sin } = si === 0 ? ropeCosSin1d(positions, loop.head_dim, theta)
          : ropeCosSin2d(pns, si, offsets, loop.head_dim, theta);
        feeds.cos = new Tensor32(cos, [2, n, loop.head_dim]);
        feeds.sin = new Tensor32(sin, [2, n, loop.head_dim]);
      }
      const [h, k, v] = si === 0 ? await this.run("ar_context", feeds)
        : await this.run("ar_stage", { ...feeds, past_k: pastK, past_v: pastV });
      if (!stage.isFinal) {
        pastK = pastK === null ? k : concatAxis3(pastK, k);
        pastV = pastV === null ? v : concatAxis3(pastV, v);
      }
      const hSampled = si === 0 ? lastRow(h) : h;
      const [logits] = await this.run("ar_head", { h: hSampled, head_mod: headMod });
      const mixed = cfgMix(logits.data, stage.cfgScale);
      const expSample = nextDraw();
      const expGumbel = moreSmooth ? nextDraw() : null;
      const { idx, latents } = sampleStage(mixed, stage, this.codebook, V, expSample, expGumbel, topP);
      tokens.push(idx);
      const n = idx.length;
      if (!stage.isFinal) {
        [fHat, x] = await this.run(`residual_${si}`, { f_hat: fHat, latents: new Tensor32(latents, [1, n, Cz]) });
        await onStage?.({ stage: si, stages: pns.length, tokens: idx });
        continue;
      }
      const rows = new Float32Array(n * Cz);
      idx.forEach((t, r) => rows.set(this.codebook.subarray(t * Cz, (t + 1) * Cz), r * Cz));
      const [z] = await this.run("diffusion_condition", { h, latents: new Tensor32(rows, [1, n, Cz]) });
      const residual = await this._diffusion(z, stage.cfgScale, nextDraw, n);
      const f = fHat.data.slice();
      for (let i = 0; i < n; i++) {
        for (let c = 0; c < Cz; c++) f[c * n + i] += Math.fround(latents[i * Cz + c] + residual[i * Cz + c]);
      }
      fHat = new Tensor32(f, fHat.dims);
      await onStage?.({ stage: si, stages: pns.length, tokens: idx });
    }
    const [image] = await this.run("vae_decode", { f_hat: fHat });
    return toPixels(image, tokens);
  }

  /** The stage's constants: the manifest's per-stage table (independent of guidance) and t = cfg * ratio. */
  _stage(si, cfg) {
    const s = this.manifest.loop.stages_at_default_cfg[si];
    return {
      si, pn: s.pn, ratio: s.ratio, cfgScale: cfg * s.ratio, topK: s.top_k, gumbelTau: s.gumbel_tau,
      logitScale: s.logit_scale, isFinal: s.is_final,
    };
  }

  /** The residual head's IDDPM loop; returns `[n, Cz]` residual latents (times vae_scale). */
  async _diffusion(z, t, nextDraw, n) {
    const d = this.manifest.diffusion, Cz = this.manifest.loop.latent_dim;
    const guided = t !== 1.0; // the manifest's cfg_rule: no guidance when t == 1.0 exactly
    const width = z.dims[z.dims.length - 1];
    const condRows = guided ? z.data : z.data.subarray(0, n * width);
    const [condEmb] = await this.run("diffusion_cond_embed", { z: new Tensor32(condRows, [guided ? 2 * n : n, width]) });
    let x = nextDraw();
    const noises = d.timesteps.map(() => nextDraw());
    const tab = d.tables, f32 = Math.fround;
    const a = f32(1 + t), b = f32(t);
    for (let i = 0; i < d.timesteps.length; i++) {
      const j = d.timesteps.length - 1 - i;
      let xIn = x;
      if (guided) {
        xIn = new Float32Array(2 * x.length);
        xIn.set(x);
        xIn.set(x, x.length);
      }
      const [out] = await this.run("denoise", {
        x: new Tensor32(xIn, [guided ? 2 * n : n, Cz]), t: new Tensor32(Float32Array.of(d.timesteps[j]), [1]),
        cond_embedding: condEmb,
      });
      const eps = new Float32Array(n * Cz), v = new Float32Array(n * Cz);
      for (let r = 0; r < n; r++) {
        for (let c = 0; c < Cz; c++) {
          const e = out.data[r * 2 * Cz + c];
          eps[r * Cz + c] = guided ? f32(a * e) - f32(b * out.data[(n + r) * 2 * Cz + c]) : e;
          v[r * Cz + c] = out.data[r * 2 * Cz + Cz + c];
        }
      }
      const s = {
        sqrtRecip: f32(tab.sqrt_recip_alphas_cumprod[j]), sqrtRecipM1: f32(tab.sqrt_recipm1_alphas_cumprod[j]),
        coef1: f32(tab.posterior_mean_coef1[j]), coef2: f32(tab.posterior_mean_coef2[j]),
        minLog: f32(tab.posterior_log_variance_clipped[j]), maxLog: f32(tab.log_betas[j]),
      };
      x = iddpmStep(s, j, x, eps, v, noises[i]);
    }
    const scale = f32(d.vae_scale);
    return x.map((value) => value * scale);
  }
}

/** Row -1 of every batch row of `[B, T, C]`. @param {Tensor32} h */
function lastRow(h) {
  const [B, T, C] = h.dims;
  const out = new Float32Array(B * C);
  for (let b = 0; b < B; b++) out.set(h.data.subarray((b * T + T - 1) * C, (b * T + T) * C), b * C);
  return new Tensor32(out, [B, 1, C]);
}

/** dirname with a trailing slash ("" for a top-level file). @param {string} rel */
function dirOf(rel) {
  const i = rel.lastIndexOf("/");
  return i < 0 ? "" : rel.slice(0, i + 1);
}

/**
 * `[1, 3, H, W]` image in [0, 1] -> uint8 by truncation of `x * 255` (as upstream saves it).
 * @param {Tensor32} image @param {Int32Array[]} tokens
 * @returns {GenerateResult}
 */
function toPixels(image, tokens) {
  const [, , height, width] = image.dims;
  const plane = height * width;
  const rgb = new Uint8Array(plane * 3);
  const rgba = new Uint8ClampedArray(plane * 4);
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) {
      const value = Math.trunc(Math.fround(image.data[c * plane + p] * 255));
      const byte = value < 0 ? 0 : value > 255 ? 255 : value;
      rgb[p * 3 + c] = byte;
      rgba[p * 4 + c] = byte;
    }
    rgba[p * 4 + 3] = 255;
  }
  return { rgb, rgba, width, height, tokens };
}
