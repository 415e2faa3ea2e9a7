// A local static server for the demo page: js/ at / (the page at /web/), a bundle folder at /bundle/, cross-origin isolated
// (COOP/COEP) so onnxruntime-web may use threads. POST /result hands the page's result to `onResult`.
//   node web/serve.js --bundle DIR [--port 8080]

import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import { createServer } from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";

const JS_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".json": "application/json",
  ".wasm": "application/wasm", ".onnx": "application/octet-stream", ".bin": "application/octet-stream" };

/** A path under `root` for a URL path, or null when it would leave it. */
function inside(root, urlPath) {
  const full = path.resolve(root, "." + decodeURIComponent(urlPath));
  return full === root || full.startsWith(root + path.sep) ? full : null;
}

/**
 * @param {{ bundle: string, onResult?: (result: any) => void }} options
 * @returns {import("node:http").Server}
 */
export function createBundleServer({ bundle, onResult = () => {} }) {
  const bundleRoot = path.resolve(bundle);
  return createServer(async (req, res) => {
    const url = new URL(req.url ?? "/", "http://localhost");
    res.setHeader("Cross-Origin-Opener-Policy", "same-origin");
    res.setHeader("Cross-Origin-Embedder-Policy", "require-corp");
    if (req.method === "POST" && url.pathname === "/result") {
      let body = "";
      for await (const chunk of req) body += chunk;
      res.end("ok");
      onResult(JSON.parse(body));
      return;
    }
    if (url.pathname === "/") {
      res.writeHead(302, { Location: `/web/${url.search}` });
      res.end();
      return;
    }
    const file = url.pathname.startsWith("/bundle/") ? inside(bundleRoot, url.pathname.slice("/bundle".length))
      : inside(JS_ROOT, url.pathname.endsWith("/") ? `${url.pathname}index.html` : url.pathname);
    const info = file ? await stat(file).catch(() => null) : null;
    if (!file || !info?.isFile()) {
      res.statusCode = 404;
      res.end("not found");
      return;
    }
    res.setHeader("Content-Type", TYPES[path.extname(file)] ?? "application/octet-stream");
    res.setHeader("Content-Length", info.size);
    createReadStream(file).pipe(res);
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const arg = (name, fallback) => {
    const i = process.argv.indexOf(name);
    return i > 0 ? process.argv[i + 1] : fallback;
  };
  const bundle = arg("--bundle");
  if (!bundle) {
    console.error("usage: node web/serve.js --bundle DIR [--port 8080]");
    process.exit(2);
  }
  const port = Number(arg("--port", "8080"));
  createBundleServer({ bundle, onResult: (r) => console.log("result:", r.error ?? `${r.width}x${r.height} in ${r.ms} ms`) })
    .listen(port, "127.0.0.1", () => console.log(`http://127.0.0.1:${port}/  (bundle: ${path.resolve(bundle)})`));
}
