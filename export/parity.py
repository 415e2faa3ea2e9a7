"""Parity of exported graphs against the torch modules, on real inputs recorded from the reference loop.

fp32 files against the recorded fp32 outputs (:func:`check_backend`, fixed bars); quantized files
against their eager reference (:func:`check_quantized`, the bar of each graph's schemes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np

from hartkit.errors import HartkitError
from hartkit.loop.metrics import max_abs_err, snr_db


class ParityError(HartkitError):
    """An exported graph missed its accuracy bar; the export is discarded."""

    exit_code = 3


# fp32 exports: |err| <= ATOL + RTOL * max|ref| and SNR >= MIN_SNR_DB, per output.
ATOL, RTOL, MIN_SNR_DB = 1e-4, 1e-4, 60.0

# The decoded image in [0, 1] is only ever seen as 8-bit pixels, so its max-abs term is in units of one
# 8-bit step: 1e-4 absolute stops scaling at 1024 px (2.7e-4 worst pixel of 3.1M at 82 dB for fp32
# onnxruntime), while a tenth of a step can still never move a stored pixel by more than one level.
IMAGE_OUTPUTS = frozenset({"image"})
IMAGE_ATOL = 0.1 / 255.0


@dataclass
class OutputParity:
    name: str
    shape: list[int]
    max_abs_err: float
    max_abs_ref: float
    snr_db: float
    ok: bool


@dataclass
class GraphParity:
    graph: str
    fmt: str
    calls: int = 0
    outputs: list[OutputParity] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def worst(self) -> OutputParity | None:
        return max(self.outputs, key=lambda o: o.max_abs_err, default=None)

    def to_json(self) -> dict:
        worst = self.worst()
        return {"graph": self.graph, "format": self.fmt, "calls": self.calls, "ok": self.ok,
                "max_abs_err": worst.max_abs_err if worst else 0.0,
                "min_snr_db": min((o.snr_db for o in self.outputs), default=math.inf),
                "outputs": [asdict(o) for o in self.outputs]}


def compare_outputs(names: list[str], ref: list[np.ndarray], got: list[np.ndarray],
                    atol: float = ATOL, rtol: float = RTOL, min_snr_db: float = MIN_SNR_DB) -> list[OutputParity]:
    if len(ref) != len(got):
        raise ParityError(f"expected {len(ref)} outputs, got {len(got)}")
    out = []
    for name, r, g in zip(names, ref, got):
        g = np.asarray(g)
        if tuple(r.shape) != tuple(g.shape):
            out.append(OutputParity(name, list(g.shape), math.inf, float(np.abs(r).max(initial=0)), -math.inf, False))
            continue
        err = max_abs_err(r, g)
        peak = float(np.abs(r).max(initial=0))
        snr = snr_db(r, g)
        bound = max(atol, IMAGE_ATOL) if name in IMAGE_OUTPUTS else atol
        out.append(OutputParity(name, list(r.shape), err, peak, snr, err <= bound + rtol * peak and snr >= min_snr_db))
    return out


def check_backend(backend, fmt: str, recorded: Mapping[str, list[tuple[dict, list[np.ndarray]]]],
                  output_names: Mapping[str, list[str]], **bars: float) -> list[GraphParity]:
    """Run every recorded call of every graph on ``backend`` and compare with the torch outputs."""
    results = []
    graphs = list(recorded)
    for i, graph in enumerate(graphs):
        gp = GraphParity(graph, fmt)
        for feeds, ref in recorded[graph]:
            got = backend.run(graph, feeds)
            gp.outputs.extend(compare_outputs(output_names[graph], ref, got, **bars))
            gp.calls += 1
        results.append(gp)
        release_done(backend, graphs[i + 1:])
    return results


def release_done(backend, pending) -> None:
    """Let a backend that loads per graph (ExecuTorch) drop what the pending graphs do not need."""
    release = getattr(backend, "release_except", None)
    if release is not None:
        release(frozenset(pending))


def check_quantized(backend, realization, recorded: Mapping[str, list[tuple[dict, list[np.ndarray]]]],
                    output_names: Mapping[str, list[str]], input_names: Mapping[str, list[str]],
                    label: str | None = None, eager_outputs: dict | None = None) -> tuple[list[GraphParity], dict[str, dict]]:
    """Every recorded call on ``backend`` vs the eager reference; -> parity rows and a per-graph report.

    ``eager_outputs``, if given, receives graph -> [(feeds, eager-quantized outputs)] (golden vectors)."""
    from hartkit.model.graphs import run_graph
    from hartkit.quantize.apply import graph_bar, relative_ok

    fmt = label or realization.fmt
    rows, report = [], {}
    graphs = list(recorded)
    for gi, (graph, calls) in enumerate(recorded.items()):
        mode, value = graph_bar(realization.plan, graph)
        gp = GraphParity(graph, fmt)
        worst_eager, worst_fp32, worst_quant = math.inf, math.inf, math.inf
        for feeds, ref_fp32 in calls:
            ref_q = run_graph(realization.modules[graph], [feeds[n] for n in input_names[graph]])
            if eager_outputs is not None:
                eager_outputs.setdefault(graph, []).append((feeds, ref_q))
            got = backend.run(graph, feeds)
            for name, r32, rq, g in zip(output_names[graph], ref_fp32, ref_q, got):
                g = np.asarray(g)
                quant_err = snr_db(r32, rq)
                vs_eager = snr_db(rq, g) if rq.shape == g.shape else -math.inf
                vs_fp32 = snr_db(r32, g) if r32.shape == g.shape else -math.inf
                ok = vs_eager >= value if mode == "exact" else relative_ok(vs_eager, vs_fp32, quant_err)
                err = max_abs_err(rq, g) if rq.shape == g.shape else math.inf
                gp.outputs.append(OutputParity(name, list(rq.shape), err, float(np.abs(rq).max(initial=0)),
                                               vs_eager, bool(ok)))
                worst_eager, worst_fp32 = min(worst_eager, vs_eager), min(worst_fp32, vs_fp32)
                worst_quant = min(worst_quant, quant_err)
            gp.calls += 1
        rows.append(gp)
        release_done(backend, graphs[gi + 1:])
        report[graph] = {"bar": mode, "min_snr_vs_eager_db": _num(worst_eager), "min_snr_vs_fp32_db": _num(worst_fp32),
                         "eager_min_snr_vs_fp32_db": _num(worst_quant),
                         "schemes": sorted(s.label for s in realization.plan.graph_schemes(graph))}
    return rows, report


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def format_table(results: list[GraphParity]) -> str:
    lines = [f"{'graph':24} {'format':11} {'calls':>5} {'max abs err':>12} {'min SNR dB':>10}  ok"]
    for r in results:
        j = r.to_json()
        lines.append(f"{r.graph:24} {r.fmt:11} {r.calls:5d} {j['max_abs_err']:12.3e} {j['min_snr_db']:10.1f}  "
                     f"{'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
