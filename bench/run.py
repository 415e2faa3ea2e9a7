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


def median_time(fn: Callable[[], object], warmup: int = 1, runs: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_flops(n: int = 1024, runs: int = 5) -> float:
    """This machine's fp32 GEMM throughput (FLOP/s) through torch (MKL/oneDNN), all threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: torch.mm(a, b), warmup=2, runs=runs)
    return 2.0 * n**3 / t


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

    def to_json(self) -> dict:
        return {"machine": self.machine, "graphs": self.graphs, "end_to_end": self.end_to_end,
                "ar_stages": self.ar_stages, "sizes": self.sizes, "memory": self.memory}


def machine_info() -> dict:
    import platform

    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gemm_fp32_flops": gemm_flops()}


def _golden_inputs(bundle: Path, manifest: dict) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for graph, entry in manifest.get("golden", {}).get("graphs", {}).items():
        if graph == "by_format":  # quantized bundles: per-format outputs; the inputs are the same
            continue
        with np.load(bundle / entry["file"], allow_pickle=False) as data:
            out[graph] = {k[3:]: data[k] for k in data.files if k.startswith("in.")}
    return out


def bench_graphs(bundle: Path, manifest: dict, backends: Mapping[str, object], torch_backend,
                 runs: int) -> list[dict]:
    rows = []
    for graph, feeds in sorted(_golden_inputs(bundle, manifest).items()):
        base = median_time(lambda: torch_backend.run(graph, feeds), runs=runs)
        row = {"graph": graph, "torch_eager_s": base}
        for name, backend in backends.items():
            t = median_time(lambda b=backend: b.run(graph, feeds), runs=runs)
            row[f"{name}_s"] = t
            row[f"{name}_speedup"] = base / t if t > 0 else None
        rows.append(row)
    return rows


def bench_end_to_end(pipelines: Mapping[str, object], reference: Callable[[], object], runs: int,
                     seed: int = 0) -> list[dict]:
    base = median_time(reference, warmup=1, runs=runs)
    rows = [{"pipeline": "torch eager fp32 (reference sampler)", "seconds": base, "speedup": 1.0}]
    for name, pipe in pipelines.items():
        timing = TimingBackend(pipe.backend)
        pipe.backend = timing
        t = median_time(lambda: pipe.generate(PROMPT, seed=seed), warmup=1, runs=runs)
        last_calls = timing.calls[-len(timing.calls) // (runs + 1):]
        pipe.backend = timing.inner
        rows.append({"pipeline": name, "seconds": t, "speedup": base / t, "breakdown": breakdown(last_calls, t)})
    return rows


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
    code = ("import resource, sys\nfrom hartkit.runtime.pipeline import Pipeline\n"
            f"p = Pipeline.from_exported({str(bundle)!r}, backend={backend!r})\n"
            f"p.generate({PROMPT!r}, seed=0)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"generation subprocess failed: {res.stderr.strip().splitlines()[-1:]}")
    return int(res.stdout.strip().splitlines()[-1]) * 1024  # Linux reports KiB


def component_sizes(bundle: Path, manifest: dict, model) -> list[dict]:
    """Bytes on disk per (format, component) against parameters x bits / 8."""
    from hartkit.bench.flops import bit_limit_bytes

    params = {
        "ar_transformer": model.transformer.num_parameters(include_diffusion=False),
        "diffusion_head": sum(p.numel() for p in model.transformer.diffloss.parameters()),
        "vae": sum(p.numel() for n, p in model.vae.named_parameters() if not n.startswith(("encoder.", "quant_conv."))),
    }
    recipe = manifest.get("recipe") or {}
    graph_component = {g["name"]: g.get("weights", "") for g in manifest["graphs"]}
    rows = []
    for fmt, files in manifest.get("files", {}).items():
        per: dict[str, int] = {}
        seen = set()
        for graph, rel in files.items():
            if rel in seen:
                continue
            seen.add(rel)
            size = sum(p.stat().st_size for p in (bundle / rel).rglob("*") if p.is_file()) if (bundle / rel).is_dir() \
                else (bundle / rel).stat().st_size
            per[graph_component.get(graph, "")] = per.get(graph_component.get(graph, ""), 0) + size
        for comp, size in sorted(per.items()):
            if comp not in params:
                continue
            bits = float(recipe.get("bits", {}).get(comp, 32)) if isinstance(recipe.get("bits"), dict) else 32.0
            limit = bit_limit_bytes(params[comp], bits)
            rows.append({"format": fmt, "component": comp, "bytes": size, "bits": bits, "bit_limit_bytes": limit,
                         "ratio_to_limit": size / limit})
    return rows


def format_report(result: BenchResult) -> str:
    lines = [f"fp32 GEMM throughput: {result.machine.get('gemm_fp32_flops', 0) / 1e9:.1f} GFLOP/s "
             f"({result.machine.get('torch_threads')} threads)"]
    if result.graphs:
        keys = [k[:-2] for k in result.graphs[0] if k.endswith("_s") and k != "torch_eager_s"]
        lines.append(f"{'graph':24} {'torch ms':>9} " + " ".join(f"{k + ' ms':>14} {'x':>5}" for k in keys))
        for row in result.graphs:
            cells = " ".join(f"{row[k + '_s'] * 1e3:14.2f} {row[k + '_speedup']:5.2f}" for k in keys)
            lines.append(f"{row['graph']:24} {row['torch_eager_s'] * 1e3:9.2f} {cells}")
    for row in result.end_to_end:
        extra = ""
        if "breakdown" in row:
            b = row["breakdown"]
            extra = "  (" + ", ".join(f"{k} {v:.2f}s" for k, v in b.items() if k != "total") + ")"
        lines.append(f"end to end: {row['pipeline']:40} {row['seconds']:.3f}s  x{row['speedup']:.2f}{extra}")
    for row in result.ar_stages:
        lines.append(f"AR stage {row['si']:2d}: {row['gflop']:9.3f} GFLOP in {row['seconds'] * 1e3:8.2f} ms = "
                     f"{row['fraction_of_gemm_peak'] * 100:5.1f}% of GEMM peak")
    for row in result.sizes:
        lines.append(f"size {row['format']:10} {row['component']:15} {row['bytes'] / 1e6:9.2f} MB = "
                     f"{row['ratio_to_limit']:.2f}x the {row['bits']:g}-bit limit")
    for row in result.memory:
        lines.append(f"peak RSS ({row['backend']}): {row['peak_rss_bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)


def run_bench(checkpoint: str | Path, bundle: str | Path, backends: Sequence[str] = ("onnxruntime",),
              runs: int = 3, out: str | Path | None = None, measure_memory: bool = True) -> BenchResult:
    from hartkit.model.checkpoint import load_hart
    from hartkit.model.sampler import generate_from_prompts
    from hartkit.model.text_encoder import TextEncoder
    from hartkit.runtime.backends import TorchBackend, open_backend
    from hartkit.runtime.bundle import read_manifest
    from hartkit.runtime.pipeline import Pipeline

    checkpoint, bundle = Path(checkpoint), Path(bundle)
    manifest = read_manifest(bundle)
    model = load_hart(checkpoint)
    encoder = TextEncoder.from_pretrained(checkpoint / "text_model")
    torch_backend, _ = TorchBackend.from_model(model, encoder, manifest["loop"]["system_length"])
    result = BenchResult(machine=machine_info())
    opened = {name: open_backend(bundle, manifest, name, {}) for name in backends}
    result.graphs = bench_graphs(bundle, manifest, opened, torch_backend, runs)
    pipes = {name: Pipeline.from_exported(bundle, backend=name) for name in backends}
    result.end_to_end = bench_end_to_end(
        pipes, lambda: generate_from_prompts(model, encoder, [PROMPT], seed=0), runs)
    timing = TimingBackend(next(iter(pipes.values())).backend) if pipes else None
    if timing is not None:
        pipe = next(iter(pipes.values()))
        pipe.backend = timing
        pipe.generate(PROMPT, seed=0)
        result.ar_stages = ar_stage_efficiency(model.cfg, model.vocab_size, timing.calls,
                                               result.machine["gemm_fp32_flops"])
    result.sizes = component_sizes(bundle, manifest, model)
    if measure_memory:
        for name in backends:
            result.memory.append({"backend": name, "peak_rss_bytes": peak_rss_of_generation(bundle, name)})
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(result.to_json(), indent=2))
        _plot(result, out / "bench.png")
    return result


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
                         [r[f"{k}_speedup"] for r in result.graphs], height=0.8 / max(1, len(keys)), label=k)
        axes[0].set_yticks(range(len(names)), names, fontsize=7)
        axes[0].axvline(1.0, color="k", lw=0.8)
        axes[0].set_xlabel("speed-up over torch eager fp32")
        axes[0].legend(fontsize=7)
    if result.ar_stages:
        axes[1].plot([r["si"] for r in result.ar_stages], [100 * r["fraction_of_gemm_peak"] for r in result.ar_stages], "o-")
        axes[1].set_xlabel("AR stage")
        axes[1].set_ylabel("% of measured fp32 GEMM peak")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
