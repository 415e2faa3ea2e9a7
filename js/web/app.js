// The demo page: load a bundle over HTTP, generate on onnxruntime-web, draw the image, show each stage.
// Query parameters fill the form (?bundle=&prompt=&seed=&guidance=&ep=); ?run=1 generates at once and
// ?report=1 then POSTs the result to /result (what the headless browser test reads).

import { Pipeline, ort } from "../src/web.js";

const $ = (id) => /** @type {HTMLInputElement} */ (document.getElementById(id));
const status = (text) => { $("status").textContent = text; };
const params = new URLSearchParams(location.search);
for (const key of ["bundle", "prompt", "seed", "guidance", "ep"]) if (params.has(key)) $(key).value = params.get(key) ?? "";
if (!("gpu" in navigator)) {
  const option = /** @type {HTMLOptionElement} */ ($("ep").querySelector("option[value=webgpu]"));
  option.disabled = true;
  option.textContent += " (not available in this browser)";
}
ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

/** @type {Map<string, Promise<any>>} one pipeline per (bundle, backend) */
const pipelines = new Map();

async function pipelineFor(url, ep) {
  const key = `${url} ${ep}`;
  if (!pipelines.has(key)) {
    pipelines.set(key, Pipeline.fromBundle(url, { executionProviders: [ep], onProgress: status }));
    pipelines.get(key).catch(() => pipelines.delete(key));
  }
  return pipelines.get(key);
}

async function generate() {
  $("go").disabled = true;
  try {
    const pipe = await pipelineFor($("bundle").value, $("ep").value);
    const stages = pipe.manifest.loop.patch_nums.length;
    $("stages").replaceChildren(...Array.from({ length: stages }, () => document.createElement("span")));
    const guidance = $("guidance").value === "" ? undefined : Number($("guidance").value);
    const started = performance.now();
    const result = await pipe.generate($("prompt").value, {
      seed: BigInt($("seed").value || "0"), guidance,
      onStage: ({ stage }) => {
        $("stages").children[stage].classList.add("done");
        status(`stage ${stage + 1}/${stages}`);
      },
    });
    const ms = performance.now() - started;
    const canvas = /** @type {HTMLCanvasElement} */ ($("image"));
    canvas.width = result.width;
    canvas.height = result.height;
    canvas.getContext("2d")?.putImageData(new ImageData(result.rgba, result.width, result.height), 0, 0);
    status(`done in ${(ms / 1000).toFixed(2)} s (${$("ep").value})`);
    document.body.dataset.state = "done";
    if (params.get("report") === "1") await report(ms, canvas, result.tokens);
  } catch (err) {
    status(`error: ${err.message}`);
    document.body.dataset.state = "error";
    if (params.get("report") === "1") await fetch("/result", { method: "POST", body: JSON.stringify({ error: String(err.message) }) });
  } finally {
    $("go").disabled = false;
  }
}

/** POST what the canvas shows (its RGB) and the tokens to /result. */
async function report(ms, canvas, tokens) {
  const { width, height } = canvas;
  const rgba = /** @type {CanvasRenderingContext2D} */ (canvas.getContext("2d")).getImageData(0, 0, width, height).data;
  let binary = "";
  for (let i = 0; i < rgba.length; i += 4) binary += String.fromCharCode(rgba[i], rgba[i + 1], rgba[i + 2]);
  await fetch("/result", {
    method: "POST",
    body: JSON.stringify({ ms, width, height, rgb: btoa(binary), tokens: tokens.map((t) => Array.from(t)) }),
  });
}

$("form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
status("ready");
if (params.get("run") === "1") generate();
