// Reading numpy .npz files (a zip of .npy arrays) without trusting their headers: the constants file
// (the VQ codebook) and golden vectors of a bundle. Unzipping is fflate's; the .npy header is parsed
// here because it is a few lines of text (numpy's format spec, version 1 to 3).

import { unzipSync } from "fflate";

/** @typedef {Float32Array | Float64Array | Int32Array | BigInt64Array | Uint8Array | Int8Array | Uint16Array | Int16Array | Uint32Array | BigUint64Array} TypedArray */
/** @typedef {{ dtype: string, shape: number[], data: TypedArray }} NdArray */

const DTYPES = /** @type {Record<string, [string, any]>} */ ({
  f4: ["float32", Float32Array], f8: ["float64", Float64Array], i4: ["int32", Int32Array],
  i8: ["int64", BigInt64Array], u1: ["uint8", Uint8Array], i1: ["int8", Int8Array], b1: ["bool", Uint8Array],
  i2: ["int16", Int16Array], u2: ["uint16", Uint16Array], u4: ["uint32", Uint32Array], u8: ["uint64", BigUint64Array],
});

/**
 * Parse one .npy file's bytes.
 * @param {Uint8Array} bytes @param {string} what name for error messages
 * @returns {NdArray}
 */
export function parseNpy(bytes, what = "array") {
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59];
  if (bytes.length < 10 || magic.some((b, i) => bytes[i] !== b)) throw new Error(`${what}: not a .npy array`);
  const major = bytes[6];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + headerLen));
  const descr = /'descr':\s*'([^']*)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (descr === undefined || fortran === undefined || shapeText === undefined) {
    throw new Error(`${what}: unreadable .npy header ${JSON.stringify(header.slice(0, 80))}`);
  }
  const shape = shapeText.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  if (shape.some((d) => !Number.isSafeInteger(d) || d < 0)) throw new Error(`${what}: bad shape (${shapeText})`);
  const byteorder = descr[0];
  const code = descr.slice(1);
  const known = DTYPES[code];
  if (!known || (byteorder === ">" && !code.endsWith("1"))) {
    throw new Error(`${what}: dtype ${descr} is not supported (little-endian numbers only)`);
  }
  if (fortran === "True" && shape.length > 1) throw new Error(`${what}: Fortran-ordered arrays are not supported`);
  const [dtype, Ctor] = known;
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLen;
  if (offset + count * Ctor.BYTES_PER_ELEMENT > bytes.length) {
    throw new Error(`${what}: declares shape [${shape}] of ${dtype}, more than its ${bytes.length - offset} bytes`);
  }
  // Copy into an aligned buffer: the array's offset inside the zip need not be a multiple of its size.
  const copy = bytes.slice(offset, offset + count * Ctor.BYTES_PER_ELEMENT);
  return { dtype, shape, data: new Ctor(copy.buffer, 0, count) };
}

/**
 * Every array of an .npz file, by name (without ".npy").
 * @param {Uint8Array} bytes @param {string} what file name for error messages
 * @returns {Record<string, NdArray>}
 */
export function parseNpz(bytes, what = "npz") {
  let files;
  try {
    files = unzipSync(bytes);
  } catch (err) {
    throw new Error(`${what}: not a readable .npz file (${/** @type {Error} */ (err).message})`);
  }
  /** @type {Record<string, NdArray>} */
  const out = {};
  for (const [name, data] of Object.entries(files)) {
    const key = name.endsWith(".npy") ? name.slice(0, -4) : name;
    out[key] = parseNpy(data, `${what}: ${name}`);
  }
  return out;
}
