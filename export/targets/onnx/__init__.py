"""The ONNX target: ``onnx/<graph>.onnx`` (torch.onnx dynamo exporter, opset 18), run by onnxruntime.

Quantization comes after lowering: each fp32 file is rewritten by
:func:`hartkit.quantize.onnx_quant.quantize_onnx_graph` (onnxruntime.quantization), and its eager
reference is :mod:`hartkit.quantize.fakequant` computing as onnxruntime's kernels do. Then every
large initializer is stored once in ``onnx/weights.bin`` (:mod:`.share`).

Modules: ``lower`` (export of one graph and of all), ``share`` (weights shared between graphs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from hartkit.export.targets.base import Exported, Target


class OnnxTarget(Target):
    name = "onnx"
    libraries = ("onnx", "onnxscript", "onnxruntime")
    extra = "onnx"
    backend = "onnxruntime"

    def quantize_eager(self, model, encoder, plan, ranges, given: Mapping | None = None) -> dict:
        """``given``: layer -> the weight an algorithm chose (gptq, hqq), as the files store it."""
        from hartkit.quantize import fakequant as fq

        schemes = {n: a.scheme for n, a in plan.assignments.items()}
        fq.apply_weights(model, encoder, {n: s for n, s in schemes.items() if s.name != "fp32"}, self.name,
                         {n: a.layer.kind for n, a in plan.assignments.items()}, given=given)
        return fq.activation_rules(model, encoder, schemes, self.name, ranges)

    def export(self, specs: Sequence, modules: Mapping, folder: Path, plan, say: Callable[[str], None]) -> Exported:
        from hartkit.export.targets.onnx.lower import export_onnx
        from hartkit.quantize.onnx_quant import quantize_onnx_graph

        files = export_onnx(specs, modules, folder, progress=say)
        reports = {}
        # gptq's Hessians span every graph that uses a layer, so an AR weight is the same in each graph
        chosen = plan.algorithm_weights() if plan.quantized else {}
        for spec in specs:
            layers = plan.layers.of_graph(spec.name)
            if all(plan.scheme_of(l.name).name == "fp32" for l in layers):
                continue  # an fp32 plan has no layers: every graph stays as lowered
            say(f"quantize onnx: {spec.name}")
            weights = plan.layer_weights(spec.name)
            needs_feeds = any(plan.scheme_of(l.name).info.activations == "static"
                              or (plan.scheme_of(l.name).calibrated and l.name not in chosen) for l in layers)
            calib = plan.calibration_feeds(spec.name) if needs_feeds else None
            kinds = {l.name: l.kind for l in layers}
            rep = quantize_onnx_graph(folder / files[spec.name], spec.name,
                                      {n: (kinds[n], w) for n, w in weights.items()}, plan.scheme_of, calib,
                                      calibrated={n: w for n, w in chosen.items() if n in weights} or None)
            # what the file stores (hqq as onnxruntime rounded it) is what the eager reference computes
            plan.given.update(rep.calibrated)
            reports[spec.name] = rep.to_json()
        if plan.quantized:
            plan.extra["onnx_files"] = reports
        shared, note = self._share_weights(folder, files, specs, say)
        return Exported(files, {"onnx_weights": shared}, [note])

    @staticmethod
    def _share_weights(folder: Path, files: Mapping[str, str], specs: Sequence, say) -> tuple[dict, str]:
        """Store every large initializer once, in ``onnx/weights.bin``; -> the manifest's ``onnx_weights``
        (with ``component_bytes``: the bytes on disk of each weight component's graphs, the shared ranges
        they read counted once) and a note."""
        from hartkit.export.targets.onnx.share import share_onnx_weights, stored_bytes

        say("onnx: sharing weights between graphs")
        stats = share_onnx_weights(folder / "onnx")
        stats.pop("by_graph", None)
        by_component: dict[str, list[str]] = {}
        for spec in specs:
            if spec.weights and spec.name in files:
                by_component.setdefault(spec.weights, []).append(spec.name)
        stats["component_bytes"] = {c: stored_bytes(folder / files[g] for g in graphs)
                                    for c, graphs in by_component.items()}
        note = (f"onnx: {stats['tensors']} initializers stored in onnx/{stats['file']} as {stats['unique_tensors']} "
                f"unique tensors ({stats['shared_tensors']} copies shared); ONNX files "
                f"{stats['bytes_before'] / 1e6:.2f} MB -> {stats['bytes_after'] / 1e6:.2f} MB")
        return stats, note
