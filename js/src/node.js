// Node entry: bundles from a folder on disk, graphs on onnxruntime-node (sessions from file paths, so
// onnxruntime reads the shared external weights itself, >2 GB included).

import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { readFile, realpath } from "node:fs/promises";
import path from "node:path";
import * as ort from "onnxruntime-node";
import { BundleError, Pipeline as CorePipeline } from "./pipeline.js";

export * from "./index.js";

/**
 * A bundle folder as a BundleSource; every path must resolve inside the folder (no link out).
 * @param {string} dir
 * @param {{ threads?: number }} [options]
 * @returns {import("./pipeline.js").BundleSource}
 */
export function folderSource(dir, options = {}) {
  const root = path.resolve(dir);
  const resolve = async (rel) => {
    const full = path.join(root, ...rel.split("/"));
    const real = await realpath(full);
    const realRoot = await realpath(root);
    if (real !== realRoot && !real.startsWith(realRoot + path.sep)) {
      throw new BundleError(`${root}/${rel}: resolves outside the bundle; refused`);
    }
    return real;
  };
  return {
    label: root,
    readBytes: async (rel) => new Uint8Array(await readFile(await resolve(rel))),
    sha256: async (rel) => {
      const file = await resolve(rel);
      const hash = createHash("sha256");
      for await (const chunk of createReadStream(file)) hash.update(chunk);
      return hash.digest("hex");
    },
    createSession: async (rel) => ort.InferenceSession.create(await resolve(rel), {
      executionProviders: ["cpu"],
      intraOpNumThreads: options.threads ?? 0,
      enableCpuMemArena: false, // as the Python runtime: a graph's buffers are freed when it ends
      logSeverityLevel: 3,
    }),
  };
}

/** Pipeline bound to onnxruntime-node and the file system. */
export class Pipeline extends CorePipeline {
  /**
   * @param {string} dir bundle folder
   * @param {{ verify?: boolean, threads?: number, onProgress?: (message: string) => void }} [options]
   * @returns {Promise<CorePipeline>}
   */
  static async fromBundle(dir, options = {}) {
    return CorePipeline.load(folderSource(dir, options), ort, options);
  }
}
