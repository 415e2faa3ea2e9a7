"""The load-time self-check: a bundle's integer graphs replay their golden vectors on this CPU.

Integer kernels take different code paths on different CPUs (onnxruntime's MLAS, XNNPACK), and a
path that computes differently shows up only on the machine that runs it, never on the one that
exported. So a runtime that loads a quantized bundle runs the golden inputs of the graphs listed in
``golden.self_check`` (per format; older bundles: every graph with a quantized golden) on the backend
that will run them, and refuses the bundle with one line naming the graph, the backend and the dB.
fp32 bundles have nothing to check: float kernels differ by rounding only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from hartkit.backends import BACKEND_FORMAT
from hartkit.bundle.cpu import cpu_isa
from hartkit.bundle.format import BundleError
from hartkit.bundle.verify import VerifyReport, verify_golden


class SelfCheckError(BundleError):
    """A quantized graph computes differently on this CPU than where it was exported."""


def self_check_graphs(manifest: Mapping, fmt: str) -> list[str]:
    """The graphs of ``fmt`` whose golden vectors a runtime runs at load."""
    golden = manifest.get("golden") or {}
    by_format = (golden.get("graphs") or {}).get("by_format")
    if not by_format:
        return []
    listed = (golden.get("self_check") or {}).get(fmt)
    return sorted(listed if listed is not None else by_format.get(fmt, {}))


def run_self_check(folder: Path, manifest: Mapping, runner) -> VerifyReport:
    """Run the self-check graphs on the backends ``runner`` routes them to (a MixedBackend or one backend)."""
    by_backend: dict[int, tuple[object, list[str]]] = {}
    for graph in (g["name"] for g in manifest["graphs"]):
        sub = runner.backend_for(graph) if hasattr(runner, "backend_for") else runner
        fmt = BACKEND_FORMAT.get(sub.name)
        if fmt is not None and graph in self_check_graphs(manifest, fmt):
            by_backend.setdefault(id(sub), (sub, []))[1].append(graph)
    report = VerifyReport()
    for sub, graphs in by_backend.values():
        verify_golden(folder, dict(manifest), sub, report, BACKEND_FORMAT[sub.name], graphs=graphs)
    return report


def check_or_raise(folder: Path, manifest: Mapping, runner) -> VerifyReport:
    """:func:`run_self_check`, raising :class:`SelfCheckError` with one line on the first failed graph."""
    report = run_self_check(folder, manifest, runner)
    bad = [g for g in report.golden if not g["ok"]]
    if report.ok and not bad:
        return report
    exported = (manifest.get("exported_on") or {}).get("isa", "an unrecorded CPU")
    if bad:
        g = bad[0]
        what = (f"graph {g['graph']} on {g['backend']} is {g['snr_db']:.1f} dB from the output recorded at export "
                f"(max abs error {g['max_abs_err']:.3g})")
    else:
        what = report.problems[0]
    raise SelfCheckError(
        f"{folder}: self-check failed on this CPU ({cpu_isa()}; exported on {exported}): {what}. Its integer "
        "kernels compute differently here; re-export with a recipe whose schemes are exact on every CPU "
        "(`hartkit quantize --list`), or skip the check with --no-self-check / self_check=False")
