"""``hartkit bench``: latency, achieved FLOP/s, memory and size, measured side by side in one run.

Everything is a ratio against a baseline measured in the same process: each graph on each backend
against the same graph in torch eager fp32; the end-to-end runtime against the torch reference
sampler; the AR stages' FLOP/s against this machine's fp32 GEMM throughput; bundle bytes against the
bit limit (parameters x bits / 8). No target is asserted here: the numbers are reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from hartkit.bench.flops import ar_costs_from_config

PROMPT = "a red circle above a blue square on a yellow background"


# A call slower than this is timed once, its warm-up being the measurement: warming up changes
# nothing for a call that takes minutes (ExecuTorch's AR graphs), and repeating it costs an hour.
SLOW_CALL_S = 30.0


def median_time(fn: Callable[[], object], warmup: int = 1, runs: int = 5) -> float:
    first = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    if warmup and first > SLOW_CALL_S:
        return first
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_flops(n: int = 2048, runs: int = 5) -> dict[str, float]:
    """This machine's fp32 GEMM throughput (FLOP/s, all threads) through each library at hand: torch
    (MKL/oneDNN), numpy (OpenBLAS) and onnxruntime (MLAS). The best one is the bound the AR graphs are
    held to: libraries differ a lot by CPU (MKL runs AVX2 code on AMD, MLAS AVX-512)."""
    import torch

    out = {}
    a, b = torch.randn(n, n), torch.randn(n, n)
    out["torch"] = 2.0 * n**3 / median_time(lambda: torch.mm(a, b), warmup=2, runs=runs)
    x, y = a.numpy(), b.numpy()
    out["numpy"] = 2.0 * n**3 / median_time(lambda: x @ y, warmup=2, runs=runs)
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("MatMul", ["x", "y"], ["z"])], "gemm",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n]),
                                   helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
                                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, [n, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {"x": x, "y": y}
        out["onnxruntime"] = 2.0 * n**3 / median_time(lambda: sess.run(None, feeds), warmup=2, runs=runs)
    except ImportError:  # the onnx extra is optional
        pass
    return out


class TimingBackend:
    """Wraps a backend and accumulates wall time per graph call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[tuple[str, float, tuple]] = []

    def run(self, graph, feeds):
        t0 = time.perf_counter()
        out = self.inner.run(graph, feeds)
        self.calls.append((graph, time.perf_counter() - t0, tuple(np.shape(feeds.get("x", ())))))
        return out


def _category(graph: str) -> str:
    if graph == "text_encoder":
        return "text_encoder"
    if graph in ("condition", "ar_context", "ar_stage", "ar_head") or graph.startswith("residual_"):
        return "ar"
    if graph in ("diffusion_condition", "diffusion_cond_embed", "denoise"):
        return "diffusion_head"
    return "vae"


def breakdown(calls: Sequence[tuple[str, float, tuple]], total: float) -> dict[str, float]:
    out = {"text_encoder": 0.0, "ar": 0.0, "diffusion_head": 0.0, "vae": 0.0}
    for graph, t, _ in calls:
        out[_category(graph)] += t
    out["host"] = max(0.0, total - sum(out.values()))  # tokenizer, RNG, sampling, scheduler, KV append
    out["total"] = total
    return out


@dataclass
class BenchResult:
    machine: dict = field(default_factory=dict)
    graphs: list[dict] = field(default_factory=list)
    end_to_end: list[dict] = field(default_factory=list)
    ar_stages: list[dict] = field(default_factory=list)
    sizes: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    exports: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"machine": self.machine, "exports": self.exports, "graphs": self.graphs, "end_to_end": self.end_to_end,
                "ar_stages": self.ar_stages, "sizes": self.sizes, "memory": self.memory, "notes": self.notes}


def machine_info() -> dict:
    import platform

    import torch

    gemm = gemm_flops()
    return {"platform": platform.platform(), "processor": _cpu_name() or platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gemm_fp32_flops": max(gemm.values()), "gemm_fp32_flops_by_library": gemm}


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _format_backend() -> dict[str, str]:
    from hartkit.backends import BACKEND_FORMAT

    return {fmt: backend for backend, fmt in BACKEND_FORMAT.items() if backend != "torch"}


@dataclass
class Target:
    """One bundle run on one backend: a column of the tables (``label`` = backend/recipe)."""

    bundle: Path
    manifest: dict
    backend: str

    @property
    def recipe(self) -> str:
        return (self.manifest.get("recipe") or {}).get("name", "fp32")

    @property
    def format(self) -> str:
        from hartkit.backends import BACKEND_FORMAT

        return BACKEND_FORMAT[self.backend]

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.recipe}"


def targets_of(bundles: Sequence[Path], backends: Sequence[str] | None) -> tuple[list[Target], list[str]]:
    """Every (bundle, backend) pair to measure, and notes on what was skipped."""
    from hartkit.bundle import read_manifest

    format_backend = _format_backend()
    targets, notes = [], []
    for bundle in bundles:
        manifest = read_manifest(Path(bundle))
        for fmt in manifest.get("files", {}):
            backend = format_backend.get(fmt)
            if backend is None or (backends and backend not in backends):
                continue
            if backend == "coreml" and sys.platform != "darwin":
                notes.append(f"{bundle}: coreml skipped (Core ML runs predictions only on macOS)")
                continue
            targets.append(Target(Path(bundle), manifest, backend))
    if not targets:
        from hartkit.errors import UsageError

        raise UsageError(f"nothing to measure: no bundle holds a format for the backends {list(backends or [])}")
    images = {t.manifest["loop"].get("image_size") for t in targets}
    if len(images) > 1:
        from hartkit.errors import UsageError

        raise UsageError(f"the bundles were exported at different resolutions ({sorted(images)}): bench one at a time")
    return targets, notes


def _golden_inputs(bundle: Path, manifest: dict) -> dict[str, dict[str, np.ndarray]]:
    from hartkit.bundle import load_golden

    out = {}
    for graph, entry in manifest.get("golden", {}).get("graphs", {}).items():
        if graph == "by_format":  # quantized bundles: per-format outputs; the inputs are the same
            continue
        out[graph], _ = load_golden(bundle, entry["file"], f"golden {graph}")
    return out


def time_graphs(feeds_by_graph: Mapping[str, Mapping[str, np.ndarray]], backend, runs: int) -> dict[str, float]:
    """Median seconds per graph call on its recorded (golden) inputs."""
    return {graph: median_time(lambda g=graph, f=feeds: backend.run(g, f), runs=runs)
            for graph, feeds in sorted(feeds_by_graph.items())}


def graph_rows(baseline: Mapping[str, float], measured: Mapping[str, Mapping[str, float]]) -> list[dict]:
    rows = []
    for graph, base in sorted(baseline.items()):
        row = {"graph": graph, "torch_eager_s": base}
        for label, times in measured.items():
            t = times.get(graph)
            if t is None:
                continue
            row[f"{label}_s"] = t
            row[f"{label}_speedup"] = base / t if t > 0 else None
        rows.append(row)
    return rows


def time_generation(pipe, runs: int, seed: int = 0) -> tuple[float, dict, np.ndarray, object, list]:
    """Median seconds of ``pipe.generate`` with the per-part breakdown of the last run, the image and
    trace of that run, and its timed graph calls."""
    timing = TimingBackend(pipe.backend)
    pipe.backend = timing
    try:
        times, image, trace = [], None, None
        for i in range(runs + 1):  # the first is the warm-up (and the only run if slow: SLOW_CALL_S)
            timing.calls.clear()
            t0 = time.perf_counter()
            image, trace = pipe.generate(PROMPT, seed=seed)
            elapsed = time.perf_counter() - t0
            if i or elapsed > SLOW_CALL_S:
                times.append(elapsed)
            if not i and elapsed > SLOW_CALL_S:
                break
        t = statistics.median(times)
        return t, breakdown(timing.calls, times[-1]), image, trace, list(timing.calls)
    finally:
        pipe.backend = timing.inner


def fidelity(image: np.ndarray, tokens: Sequence[np.ndarray], ref_image: np.ndarray,
             ref_tokens: Sequence[np.ndarray]) -> dict:
    """Image PSNR against the fp32 reference (same seed) and the first stage whose tokens differ."""
    from hartkit.loop.metrics import psnr

    first = next((si for si, (a, b) in enumerate(zip(tokens, ref_tokens))
                  if not np.array_equal(np.asarray(a).reshape(-1), np.asarray(b)[:1].reshape(-1))), None)
    return {"psnr_vs_fp32_db": psnr(image, ref_image), "first_divergent_stage": first,
            "tokens_identical": first is None}


def ar_stage_efficiency(model_cfg, vocab_size: int, calls: Sequence[tuple[str, float, tuple]], peak: float) -> list[dict]:
    """Achieved FLOP/s of the block graphs per stage over the measured GEMM peak."""
    costs = ar_costs_from_config(model_cfg, vocab_size)
    stage_calls = [(g, t) for g, t, _ in calls if g in ("ar_context", "ar_stage")]
    rows = []
    for cost, (graph, t) in zip(costs, stage_calls[-len(costs):]):
        achieved = cost.blocks_flops / t if t > 0 else 0.0
        rows.append({"si": cost.si, "tokens": cost.tokens, "keys": cost.keys, "gflop": cost.blocks_flops / 1e9,
                     "seconds": t, "achieved_flops": achieved, "fraction_of_gemm_peak": achieved / peak})
    return rows


def peak_rss_of_generation(bundle: Path, backend: str) -> int:
    """Peak resident memory (bytes) of a fresh process that loads the bundle and generates one image."""
    code = ("from hartkit.runtime.pipeline import Pipeline\n"
            "from hartkit.bench.run import own_peak_rss\n"
            f"p = Pipeline.from_exported({str(bundle)!r}, backend={backend!r})\n"
            f"p.generate({PROMPT!r}, seed=0)\n"
            "print(own_peak_rss())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"generation subprocess failed: {res.stderr.strip().splitlines()[-1:]}")
    return int(res.stdout.strip().splitlines()[-1])


def own_peak_rss() -> int:
    """Peak resident bytes of this process's own address space.

    Linux keeps ``ru_maxrss`` across fork + exec, so a child started by a 20 GB parent reports at
    least 20 GB; ``VmHWM`` belongs to the current memory map and starts afresh at exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _path_bytes(path: Path) -> int:
    if path.is_dir():  # a Core ML package
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def format_bytes(manifest: dict, fmt: str) -> int:
    """Bytes of one format's files: everything the manifest lists under ``<fmt>/`` (graph files, packages,
    shared weight files) but the reports beside them (``<fmt>/*.json``)."""
    return sum(a["size"] for a in manifest.get("artifacts", [])
               if a["path"].startswith(f"{fmt}/") and not (a["path"].endswith(".json") and a["path"].count("/") == 1))


def component_bits(manifest: dict, fmt: str) -> dict[str, float]:
    """Nominal bits per weight of each component in this format (the recipe's component scheme;
    per-layer overrides such as an int8 head in an int4 recipe are not counted)."""
    from hartkit.quantize.schemes import COMPONENTS

    recipe = manifest.get("recipe")
    if not recipe:
        return {c: 32.0 for c in COMPONENTS}
    from hartkit.quantize.recipe import Recipe

    default, components, _ = Recipe.load(recipe).for_format(fmt)
    return {c: float((components.get(c) or default).bits) if (components.get(c) or default) else 32.0
            for c in COMPONENTS}


def component_params(model, encoder) -> dict[str, int]:
    return {
        "text_encoder": sum(p.numel() for p in encoder.parameters()),
        "ar_transformer": model.transformer.num_parameters(include_diffusion=False),
        "diffusion_head": sum(p.numel() for p in model.transformer.diffloss.parameters()),
        "vae": sum(p.numel() for n, p in model.vae.named_parameters() if not n.startswith(("encoder.", "quant_conv."))),
    }


def component_sizes(bundle: Path, manifest: dict, params: Mapping[str, int]) -> list[dict]:
    """Bytes on disk per (format, component) against parameters x bits / 8 (a file holding several
    components is reported as ``all`` against the sum of their limits)."""
    from hartkit.bench.flops import bit_limit_bytes

    recipe = (manifest.get("recipe") or {}).get("name", "fp32")
    graph_component = {g["name"]: g.get("weights", "") for g in manifest["graphs"]}
    rows = []
    for fmt in manifest.get("files", {}):
        bits = component_bits(manifest, fmt)
        per: dict[str, int] = {}
        shared = manifest.get("onnx_weights", {}).get("component_bytes") if fmt == "onnx" else None
        if shared:  # ONNX graphs read one shared weights file: the exporter counted each component's ranges
            per = {c: int(b) for c, b in shared.items()}
        else:  # one file (or package) per program: its graphs' component, or "all" when they differ
            owners: dict[str, set[str]] = {}
            for graph, rel in manifest["files"][fmt].items():
                owners.setdefault(rel, set()).add(graph_component.get(graph, ""))
            for rel, comps in owners.items():
                comp = next(iter(comps)) if len(comps) == 1 else "all"
                # + an ONNX graph's own external data (<graph>.onnx.data, bundles from before weights.bin)
                per[comp] = per.get(comp, 0) + _path_bytes(bundle / rel) + _path_bytes(bundle / f"{rel}.data")
        for comp, size in sorted(per.items()):
            if comp == "all":
                limit = sum(bit_limit_bytes(params[c], bits[c]) for c in params)
                b = 8 * limit / sum(params.values())
            elif comp in params:
                b = bits[comp]
                limit = bit_limit_bytes(params[comp], b)
            else:
                continue
            rows.append({"recipe": recipe, "format": fmt, "component": comp, "bytes": size, "bits": b,
                         "bit_limit_bytes": limit, "ratio_to_limit": size / limit})
    return rows


def format_report(result: BenchResult) -> str:
    by_lib = result.machine.get("gemm_fp32_flops_by_library", {})
    lines = [f"fp32 GEMM throughput: {result.machine.get('gemm_fp32_flops', 0) / 1e9:.1f} GFLOP/s "
             f"({result.machine.get('torch_threads')} threads; "
             + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in by_lib.items()) + ")"]
    for row in result.exports:
        lines.append(f"export {row['recipe']:8} {','.join(row['formats']):18} {row['seconds']:8.1f} s  "
                     f"peak RSS {row['peak_rss_bytes'] / 1e9:6.2f} GB" + ("  (reused)" if row.get("reused") else "")
                     + (f"  FAILED: {row['failed']}" if row.get("failed") else ""))
    if result.graphs:
        keys = [k[:-2] for k in result.graphs[0] if k.endswith("_s") and k != "torch_eager_s"]
        lines.append(f"{'graph':22} {'torch ms':>10} " + " ".join(f"{k:>22}" for k in keys))
        for row in result.graphs:
            cells = " ".join(f"{row[k + '_s'] * 1e3:12.2f} ms x{row[k + '_speedup']:5.2f}" if k + "_s" in row
                             else f"{'-':>22}" for k in keys)
            lines.append(f"{row['graph']:22} {row['torch_eager_s'] * 1e3:10.2f} {cells}")
    for row in result.end_to_end:
        extra = ""
        if "breakdown" in row:
            b = row["breakdown"]
            extra = "  (" + ", ".join(f"{k} {v:.2f}s" for k, v in b.items() if k != "total") + ")"
        if "psnr_vs_fp32_db" in row:
            extra += (f"  PSNR vs fp32 {row['psnr_vs_fp32_db']:.1f} dB, tokens "
                      + ("identical" if row["tokens_identical"] else f"differ from stage {row['first_divergent_stage']}"))
        lines.append(f"end to end: {row['pipeline']:38} {row['seconds']:8.3f}s  x{row['speedup']:.2f}{extra}")
    for row in result.ar_stages:
        lines.append(f"AR stage {row['si']:2d} ({row['pipeline']}): {row['gflop']:9.3f} GFLOP in "
                     f"{row['seconds'] * 1e3:9.2f} ms = {row['fraction_of_gemm_peak'] * 100:5.1f}% of GEMM peak")
    for row in result.sizes:
        lines.append(f"size {row['recipe']:8} {row['format']:10} {row['component']:15} {row['bytes'] / 1e6:10.2f} MB = "
                     f"{row['ratio_to_limit']:.2f}x the {row['bits']:g}-bit limit")
    for row in result.memory:
        lines.append(f"peak RSS {row['pipeline']:30} {row['peak_rss_bytes'] / 1e6:10.1f} MB = "
                     f"{row['ratio_to_limit']:.2f}x (bundle {row['bundle_bytes'] / 1e6:.1f} MB + KV cache "
                     f"{row['kv_cache_bytes'] / 1e6:.1f} MB)")
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def run_bench(checkpoint: str | Path, bundles: str | Path | Sequence[str | Path],
              backends: Sequence[str] | None = None, runs: int = 3, out: str | Path | None = None,
              measure_memory: bool = True, exports: Sequence[dict] = (),
              progress: Callable[[str], None] | None = None,
              text_model: str | Path | None = None) -> BenchResult:
    """Measure every (bundle, backend) against torch eager fp32 of ``checkpoint`` in one process.

    Bundles are opened one at a time (so a 0.7B model's sessions are never all resident at once);
    the torch baselines are measured once, first."""
    import gc

    from hartkit.bench.flops import kv_cache_bytes
    from hartkit.model.torch_runner import TorchBackend
    from hartkit.loop.plan import LoopInfo
    from hartkit.model.checkpoint import load_hart
    from hartkit.model.text_encoder import TextEncoder
    from hartkit.runtime.pipeline import Pipeline

    say = progress or (lambda _m: None)
    from hartkit.model.hub import resolve_checkpoint, resolve_text_model

    checkpoint = resolve_checkpoint(checkpoint)  # a folder, .../llm or a cached repo id
    if isinstance(bundles, (str, Path)):
        bundles = [bundles]
    targets, notes = targets_of([Path(b) for b in bundles], backends)
    first = targets[0].manifest
    model = load_hart(checkpoint, resolution=first["loop"].get("image_size"))
    encoder = TextEncoder.from_pretrained(resolve_text_model(text_model, checkpoint))
    torch_backend, info = TorchBackend.from_model(model, encoder, first["loop"]["system_length"])
    # The reference is the one loop over the eager graphs (Pipeline.from_checkpoint's, on weights already loaded).
    reference = Pipeline(LoopInfo.from_dict(info["loop"]), torch_backend, encoder.tokenizer, torch_backend.codebook)
    result = BenchResult(machine=machine_info(), exports=list(exports), notes=notes)

    say("torch eager fp32: graphs")
    baseline = time_graphs(_golden_inputs(targets[0].bundle, first), torch_backend, runs)
    say("torch eager fp32: end to end")
    ref_time = median_time(lambda: reference.generate(PROMPT, seed=0), warmup=1, runs=runs)
    ref_image, ref_trace = reference.generate(PROMPT, seed=0)
    result.end_to_end.append({"pipeline": "torch eager fp32 (reference sampler)", "seconds": ref_time, "speedup": 1.0})
    params = component_params(model, encoder)
    cfg, vocab = model.cfg, model.vocab_size
    kv_bytes = kv_cache_bytes(cfg.patch_nums, cfg.context_token, cfg.embed_dim, cfg.depth)
    del torch_backend, reference
    gc.collect()

    seen = set()
    for target in targets:
        if target.bundle not in seen:
            seen.add(target.bundle)
            result.sizes.extend(component_sizes(target.bundle, target.manifest, params))

    def save() -> None:  # after every target: a long run that is stopped keeps what it measured
        if out is None:
            return
        from hartkit.fsutil import make_dir, write_text

        folder = make_dir(out)
        result.graphs = graph_rows(baseline, measured)
        write_text(folder / "bench.json", json.dumps(result.to_json(), indent=2))
        write_text(folder / "bench.md", markdown_table(result))

    measured: dict[str, dict[str, float]] = {}
    for target in targets:
        say(f"{target.label}: graphs")
        pipe = Pipeline.from_exported(target.bundle, backend=target.backend)
        measured[target.label] = time_graphs(_golden_inputs(target.bundle, target.manifest), pipe.backend, runs)
        say(f"{target.label}: end to end")
        t, parts, image, trace, calls = time_generation(pipe, runs)
        result.end_to_end.append({"pipeline": target.label, "seconds": t, "speedup": ref_time / t, "breakdown": parts,
                                  **fidelity(image, trace.tokens, ref_image, ref_trace.tokens)})
        for row in ar_stage_efficiency(cfg, vocab, calls, result.machine["gemm_fp32_flops"]):
            result.ar_stages.append({"pipeline": target.label, **row})
        del pipe
        gc.collect()
        if measure_memory:
            say(f"{target.label}: peak RSS")
            rss = peak_rss_of_generation(target.bundle, target.backend)
            bundle_bytes = format_bytes(target.manifest, target.format)
            result.memory.append({"pipeline": target.label, "backend": target.backend, "peak_rss_bytes": rss,
                                  "bundle_bytes": bundle_bytes, "kv_cache_bytes": kv_bytes,
                                  "ratio_to_limit": rss / (bundle_bytes + kv_bytes)})
        save()
    result.graphs = graph_rows(baseline, measured)
    if out is not None:
        save()
        _plot(result, Path(out) / "bench.png")
    return result


def markdown_table(result: BenchResult) -> str:
    """The table a person reads (and the README's): end to end, sizes, memory."""
    m = result.machine
    libs = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in m.get("gemm_fp32_flops_by_library", {}).items())
    lines = [f"Machine: {m.get('processor', '?')}, {m.get('cpus', '?')} CPUs, torch threads {m.get('torch_threads')}, "
             f"fp32 GEMM {m.get('gemm_fp32_flops', 0) / 1e9:.0f} GFLOP/s ({libs}).", "",
             "| pipeline | seconds | speed-up vs torch fp32 | text enc. | AR | diffusion head | VAE | host | "
             "PSNR vs fp32 | tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result.end_to_end:
        b = row.get("breakdown", {})
        parts = " | ".join(f"{b[k]:.2f}" if k in b else "-" for k in ("text_encoder", "ar", "diffusion_head", "vae", "host"))
        fid = (f"{row['psnr_vs_fp32_db']:.1f} dB | " + ("identical" if row["tokens_identical"]
                                                         else f"differ from stage {row['first_divergent_stage']}")
               if "psnr_vs_fp32_db" in row else "- | -")
        lines.append(f"| {row['pipeline']} | {row['seconds']:.2f} | {row['speedup']:.2f}x | {parts} | {fid} |")
    if result.ar_stages:
        rows = []
        for label in dict.fromkeys(r["pipeline"] for r in result.ar_stages):
            mine = [r for r in result.ar_stages if r["pipeline"] == label]
            for r in [mine[0]] + sorted(mine[1:], key=lambda r: -r["gflop"])[:2]:  # the context and the 2 largest
                rows.append([label, f"{r['si']} ({r['tokens']})", f"{r['gflop']:.1f}", f"{r['seconds'] * 1e3:.0f}",
                             f"{100 * r['fraction_of_gemm_peak']:.0f} %"])
        lines += _md_table(["pipeline", "AR stage (tokens)", "GFLOP", "ms", "% of fp32 GEMM peak"], rows)
    lines += _md_table(["recipe", "format", "component", "MB", "bits", "x bit limit"],
                       [[r["recipe"], r["format"], r["component"], f"{r['bytes'] / 1e6:.1f}", f"{r['bits']:g}",
                         f"{r['ratio_to_limit']:.2f}"] for r in result.sizes])
    lines += _md_table(["pipeline", "peak RSS (MB)", "bundle + KV cache (MB)", "ratio"],
                       [[r["pipeline"], f"{r['peak_rss_bytes'] / 1e6:.0f}",
                         f"{(r['bundle_bytes'] + r['kv_cache_bytes']) / 1e6:.0f}", f"{r['ratio_to_limit']:.2f}"]
                        for r in result.memory])
    lines += _md_table(["export", "format", "seconds", "peak RSS (GB)", "result"],
                       [[r["recipe"], ", ".join(r["formats"]), f"{r['seconds']:.0f}", f"{r['peak_rss_bytes'] / 1e9:.2f}",
                         f"failed: {r['failed']}" if r.get("failed") else ("reused" if r.get("reused") else "ok")]
                        for r in result.exports])
    return "\n".join(lines) + "\n"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a markdown table after a blank line; nothing for no rows."""
    if not rows:
        return []
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _plot(result: BenchResult, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report extra is optional
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if result.graphs:
        keys = [k[:-8] for k in result.graphs[0] if k.endswith("_speedup")]
        names = [r["graph"] for r in result.graphs]
        for i, k in enumerate(keys):
            axes[0].barh([y + 0.8 * i / max(1, len(keys)) for y in range(len(names))],
                         [r.get(f"{k}_speedup") or 0.0 for r in result.graphs], height=0.8 / max(1, len(keys)), label=k)
        axes[0].set_yticks(range(len(names)), names, fontsize=7)
        axes[0].axvline(1.0, color="k", lw=0.8)
        axes[0].set_xlabel("speed-up over torch eager fp32")
        axes[0].legend(fontsize=7)
    if result.ar_stages:
        for label in dict.fromkeys(r["pipeline"] for r in result.ar_stages):
            rows = [r for r in result.ar_stages if r["pipeline"] == label]
            axes[1].plot([r["si"] for r in rows], [100 * r["fraction_of_gemm_peak"] for r in rows], "o-", label=label)
        axes[1].legend(fontsize=7)
        axes[1].set_xlabel("AR stage")
        axes[1].set_ylabel("% of measured fp32 GEMM peak")
    fig.tight_layout()
    from hartkit.fsutil import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
