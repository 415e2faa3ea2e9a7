// Browser entry: bundles over HTTP (fetch), graphs on onnxruntime-web (WASM, WebGPU where present).
// ONNX files are given as bytes and the shared external weights through the `externalData` option,
// fetched and checked once and handed to every session.

import * as ort from "onnxruntime-web";
import { BundleError, Pipeline as CorePipeline } from "./pipeline.js";

export * from "./index.js";
export { ort };

/** @param {Uint8Array} bytes */
async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * A bundle served over HTTP as a BundleSource. Files are fetched once and kept until the sessions exist.
 * @param {string} baseUrl the bundle folder's URL
 * @param {{ executionProviders?: string[] }} [options]
 * @returns {import("./pipeline.js").BundleSource}
 */
export function urlSource(baseUrl, options = {}) {
  const base = new URL(baseUrl.endsWith("/") ? baseUrl : `${baseUrl}/`, globalThis.location?.href);
  /** @type {Map<string, Promise<Uint8Array>>} */
  const cache = new Map();
  const readBytes = (rel) => {
    if (!cache.has(rel)) {
      cache.set(rel, (async () => {
        const response = await fetch(new URL(rel, base));
        if (!response.ok) throw new BundleError(`${base}${rel}: HTTP ${response.status}`);
        return new Uint8Array(await response.arrayBuffer());
      })());
    }
    return /** @type {Promise<Uint8Array>} */ (cache.get(rel));
  };
  return {
    label: base.href.replace(/\/$/, ""),
    readBytes,
    sha256: async (rel) => sha256Hex(await readBytes(rel)),
    createSession: async (rel, weights) => {
      const dir = rel.includes("/") ? rel.slice(0, rel.lastIndexOf("/") + 1) : "";
      const externalData = await Promise.all(weights.map(async (w) => ({
        path: w.startsWith(dir) ? w.slice(dir.length) : w, data: await readBytes(w),
      })));
      return ort.InferenceSession.create(await readBytes(rel), {
        executionProviders: options.executionProviders ?? ["wasm"],
        externalData,
        logSeverityLevel: 3,
      });
    },
  };
}

/** Pipeline bound to onnxruntime-web and fetch. */
export class Pipeline extends CorePipeline {
  /**
   * @param {string} url bundle folder URL
   * @param {{ verify?: boolean, executionProviders?: string[], onProgress?: (message: string) => void }} [options]
   * @returns {Promise<CorePipeline>}
   */
  static async fromBundle(url, options = {}) {
    return CorePipeline.load(urlSource(url, options), ort, options);
  }
}
