"""Quantized exports: a recipe applied per format, checked against the same quantization in eager torch.

:class:`QuantizedExport` is what ``export_checkpoint(..., recipe=...)`` calls (the hooks in
``export/exporter.py``):

1. ``prepare``: load the recipe, find the layers the graphs use, resolve the recipe for every
   requested format (all refusals happen here, before anything is written), record calibration
   inputs if a static scheme needs them, and build each format's *eager reference*: deep copies of
   the models with that format's quantization applied in torch (:mod:`hartkit.quantize.fakequant`
   for ONNX and Core ML, torchao itself for ExecuTorch).
2. ``export``: ONNX — the fp32 graphs, then :func:`~hartkit.quantize.onnx_quant.quantize_onnx_graph`
   per file; ExecuTorch — the torchao-quantized (and fp16-stored) modules through the ExecuTorch
   exporter; Core ML — the packages, then ``coremltools.optimize.coreml`` per package.
3. ``check``: every recorded call of every graph on the exported file vs the eager reference, with a
   bar that fits the scheme (see :func:`graph_bar`); the SNR against fp32 is reported alongside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from hartkit.errors import UsageError
from hartkit.export.parity import GraphParity, OutputParity, release_done
from hartkit.loop.metrics import max_abs_err, snr_db
from hartkit.model.qkv_bias import fold_qkv_bias
from hartkit.quantize import fakequant as fq
from hartkit.quantize.layers import LayerTable, discover, layer_modules
from hartkit.quantize.recipe import RECIPE_FILE, Plan, Recipe, resolve
from hartkit.quantize.schemes import SUPPORT, Scheme
from hartkit.quantize.sizes import MB, plan_bytes

# Bars of a quantized graph against its eager reference.
EXACT_MIN_SNR_DB = 60.0  # same arithmetic up to float rounding (weight-only cells, fp16 storage)
# Activation quantization rounds at data-dependent points: a 1e-6 difference in an input flips a
# rounding, and deep graphs (the VAE, a 28-layer text encoder) compound the flips until the export and
# the eager reference are two draws of the same quantization noise. So the relative bar asks two things:
#  * the export is no farther from fp32 than the eager reference is, within RELATIVE_MARGIN_DB;
#  * it is at least as close to the eager reference as that is to fp32 (never below the floor): the
#    same computation, not just any output that is as noisy.
# The margin is per call, and one call's noise power is a noisy estimate once roundings drift apart;
# 1.5 dB still fails an export with 40 % more noise (README, "Parity bars of quantized exports").
RELATIVE_MARGIN_DB = 1.5
RELATIVE_FLOOR_DB = 15.0


def relative_bar(quant_err_db: float) -> float:
    """Least SNR of the export against the eager reference, given the eager reference's SNR vs fp32."""
    return max(RELATIVE_FLOOR_DB, min(EXACT_MIN_SNR_DB, quant_err_db))


def relative_ok(vs_eager_db: float, vs_fp32_db: float, quant_err_db: float) -> bool:
    return (vs_eager_db >= relative_bar(quant_err_db)
            and vs_fp32_db >= min(EXACT_MIN_SNR_DB, quant_err_db) - RELATIVE_MARGIN_DB)


# ----------------------------------------------------------------------------- eager references


class ToFloat(nn.Module):
    """Parametrization: the weight is stored in float16 and read as float32 (fp16 on ExecuTorch)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.float()


def store_fp16(module: nn.Module) -> None:
    import torch.nn.utils.parametrize as P

    half = module.weight.detach().half()
    P.register_parametrization(module, "weight", ToFloat(), unsafe=True)
    module.parametrizations.weight.original = nn.Parameter(half, requires_grad=False)


def torchao_config(scheme: Scheme):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if scheme.name == "8da8w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    if scheme.name == "8da4w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                     weight_granularity=PerGroup(int(scheme.group_size)))
    raise ValueError(f"no torchao config for {scheme.label}")


@dataclass
class Realization:
    """One format's eager reference: model copies with the format's quantization applied."""

    fmt: str
    plan: Plan
    model: Any
    encoder: Any
    specs: list
    modules: dict[str, nn.Module]  # graph -> eager reference module (what the export must agree with)


def realize(model, encoder, system_length: int, plan: Plan,
            ranges: Mapping[str, Mapping[str, tuple[float, float]]] | None = None) -> Realization:
    """Model copies with ``plan`` applied as ``plan.fmt`` computes it."""
    from hartkit.model.graphs import hart_graph_specs

    fmt = plan.fmt
    qmodel, qenc = fq.copy_models(model, encoder)
    schemes = {n: a.scheme for n, a in plan.assignments.items()}
    rules: dict = {}
    if fmt in ("onnx", "coreml"):
        fq.apply_weights(qmodel, qenc, {n: s for n, s in schemes.items() if s.name != "fp32"}, fmt,
                         {n: a.layer.kind for n, a in plan.assignments.items()})
        rules = fq.activation_rules(qmodel, qenc, schemes, fmt, ranges)
    elif fmt == "executorch":
        _torchao(qmodel, qenc, schemes)
    else:  # pragma: no cover - resolve() refuses other formats
        raise UsageError(f"unknown format {fmt}")
    specs = hart_graph_specs(qmodel, qenc, system_length)
    modules = {}
    for s in specs:
        m = s.build().eval()
        modules[s.name] = fq.EmulatedGraph(m, rules, s.name).eval() if rules else m
    return Realization(fmt, plan, qmodel, qenc, specs, modules)


def _torchao(qmodel, qenc, schemes: Mapping[str, Scheme]) -> None:
    from torchao.quantization import quantize_

    mods = layer_modules(qmodel, qenc)
    by_cfg: dict[str, set[int]] = {}
    for name, s in schemes.items():
        if s.name in ("8da8w", "8da4w"):
            by_cfg.setdefault(s.label, set()).add(id(mods[name]))
        elif s.name == "fp16":
            store_fp16(mods[name])
    roots = [r for r in (qenc, qmodel.transformer, qmodel.vae) if r is not None]
    if by_cfg:
        fold_qkv_bias(qmodel.transformer)
    for label, ids in by_cfg.items():
        cfg = torchao_config(Scheme.parse(label))
        for root in roots:
            quantize_(root, cfg, filter_fn=lambda mod, _fqn, ids=ids: id(mod) in ids)


# ----------------------------------------------------------------------------- bars


def graph_bar(plan: Plan, graph: str) -> tuple[str, float]:
    """("exact", min SNR) or ("relative", margin) for a graph, from the cells of its layers."""
    cells = [SUPPORT[(s.name, plan.fmt)] for s in plan.graph_schemes(graph)]
    if all(c.exact for c in cells):
        return "exact", EXACT_MIN_SNR_DB
    return "relative", RELATIVE_MARGIN_DB


def check_quantized(backend, realization: Realization, recorded: Mapping[str, list[tuple[dict, list[np.ndarray]]]],
                    output_names: Mapping[str, list[str]], input_names: Mapping[str, list[str]],
                    label: str | None = None, eager_outputs: dict | None = None) -> tuple[list[GraphParity], dict[str, dict]]:
    """Every recorded call on ``backend`` vs the eager reference; -> parity rows and a per-graph report.

    ``eager_outputs``, if given, receives graph -> [(feeds, eager-quantized outputs)] (golden vectors)."""
    from hartkit.model.graphs import run_graph

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


# ----------------------------------------------------------------------------- the export hook


@dataclass
class QuantizedExport:
    recipe: Recipe
    model: Any
    encoder: Any
    system_length: int
    layers: LayerTable
    plans: dict[str, Plan]
    calibration: Any = None
    ranges: dict = field(default_factory=dict)
    realizations: dict[str, Realization] = field(default_factory=dict)
    reports: dict[str, dict] = field(default_factory=dict)
    eager_outputs: dict[str, dict] = field(default_factory=dict)  # fmt -> graph -> [(feeds, outputs)]
    onnx_reports: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _say: Callable[[str], None] = field(default=lambda _m: None, repr=False)
    _fp32_modules: dict = field(default_factory=dict, repr=False)  # for replaying calibration feeds
    _spec_inputs: dict = field(default_factory=dict, repr=False)

    @classmethod
    def prepare(cls, recipe, model, encoder, system_length: int, specs: Sequence, formats: Sequence[str],
                recorded: Mapping[str, list] | None = None, progress: Callable[[str], None] | None = None,
                calibration=None) -> "QuantizedExport":
        say = progress or (lambda _m: None)
        recipe = Recipe.load(recipe)
        say(f"quantize: recipe '{recipe.name}'")
        inputs = {}
        for s in specs:
            calls = (recorded or {}).get(s.name)
            if calls:
                inputs[s.name] = [calls[0][0][i.name] for i in s.inputs]
        layers = discover(model, encoder, specs, inputs)
        plans = {fmt: resolve(recipe, layers, fmt) for fmt in formats}
        qx = cls(recipe, model, encoder, system_length, layers, plans)
        for fmt, plan in plans.items():
            qx.notes += [f"quantize {fmt}: {line}" for line in plan.fallback_summary()]
        for fmt, plan in plans.items():
            if fmt == "coreml" and any(a.scheme.name == "fp32" for a in plan.assignments.values()):
                qx.notes.append("quantize coreml: fp32 layers are stored and computed in float16 (the Core ML "
                                "exporter converts with compute_precision=FLOAT16)")
        if recipe.uses_calibration(formats):
            qx.calibration = qx._calibration(calibration, specs, say)
        qx._say = say
        return qx

    def realization(self, fmt: str) -> Realization:
        """The format's eager reference, built on first use (a deep copy of the models: the exporter
        drops it once the format is checked, so large models are not held once per format)."""
        if fmt not in self.realizations:
            self._say(f"quantize: eager reference for {fmt}")
            self.realizations[fmt] = realize(self.model, self.encoder, self.system_length, self.plans[fmt],
                                             self.ranges)
        return self.realizations[fmt]

    def _calibration(self, calibration, specs, say):
        from hartkit.quantize.calibration import CalibrationSet, activation_ranges, record

        if calibration is None:
            say("quantize: recording calibration inputs (built-in prompts)")
            calib = record(self.model, self.encoder, self.system_length, progress=say)
        elif isinstance(calibration, CalibrationSet):
            calib = calibration
        elif isinstance(calibration, (str, Path)) and str(calibration).endswith(".npz"):
            calib = CalibrationSet.load(calibration)
        elif isinstance(calibration, (list, tuple)):
            calib = record(self.model, self.encoder, self.system_length, list(calibration), progress=say)
        else:
            from hartkit.quantize.calibration import load_prompts

            calib = record(self.model, self.encoder, self.system_length, load_prompts(calibration), progress=say)
        static = {n for p in self.plans.values() for n, a in p.assignments.items() if a.scheme.info.activations == "static"}
        fp32_modules = {s.name: s.build().eval() for s in specs}
        names = layer_modules(self.model, self.encoder)
        self.ranges = activation_ranges(fp32_modules, {s.name: [i.name for i in s.inputs] for s in specs}, calib,
                                        {id(names[n].weight): n for n in static})
        self._fp32_modules = fp32_modules
        self._spec_inputs = {s.name: [i.name for i in s.inputs] for s in specs}
        return calib

    # ------------------------------------------------------------------ export
    def export(self, fmt: str, specs: list, modules: Mapping[str, nn.Module], folder: Path,
               say: Callable[[str], None]) -> dict[str, str]:
        if fmt == "onnx":
            return self._export_onnx(specs, modules, folder, say)
        if fmt == "executorch":
            from hartkit.export.executorch_export import export_executorch

            real = self.realization(fmt)
            return export_executorch(real.specs, real.modules, folder, progress=say)
        if fmt == "coreml":
            from hartkit.quantize.coreml_quant import export_coreml_quantized

            return export_coreml_quantized(self, specs, modules, folder, say)
        raise UsageError(f"unknown format {fmt}")

    def _export_onnx(self, specs, modules, folder: Path, say) -> dict[str, str]:
        from hartkit.export.onnx_export import export_onnx
        from hartkit.quantize.calibration import replay_fns
        from hartkit.quantize.onnx_quant import quantize_onnx_graph

        files = export_onnx(specs, modules, folder, progress=say)
        plan = self.plans["onnx"]
        mods = layer_modules(self.model, self.encoder)
        for spec in specs:
            layers = self.layers.of_graph(spec.name)
            if all(plan.scheme_of(l.name).name == "fp32" for l in layers):
                continue
            say(f"quantize onnx: {spec.name}")
            weights = {l.name: (l.kind, mods[l.name].weight.detach().float().numpy()) for l in layers}
            calib = None
            if any(plan.scheme_of(l.name).info.activations == "static" for l in layers):
                replay = replay_fns(self._fp32_modules, self._spec_inputs)
                calib = (lambda g=spec.name, r=replay: self.calibration.feeds(g, r))
            rep = quantize_onnx_graph(folder / files[spec.name], spec.name, weights, plan.scheme_of, calib)
            self.onnx_reports[spec.name] = rep.to_json()
        return files

    # ------------------------------------------------------------------ parity
    def check(self, fmt: str, folder: Path, info: dict, recorded, output_names, result) -> list[GraphParity]:
        input_names = {g["name"]: [i["name"] for i in g["inputs"]] for g in info["graphs"]}
        if fmt == "onnx":
            from hartkit.backends import OnnxRuntimeBackend

            backend = OnnxRuntimeBackend(folder, info)
        elif fmt == "executorch":
            from hartkit.backends import ExecuTorchBackend

            backend = ExecuTorchBackend(folder, info)
        elif fmt == "coreml":
            from hartkit.quantize.coreml_quant import check_coreml_quantized

            rows, report, notes = check_coreml_quantized(self, folder, info, recorded, output_names, input_names)
            self.reports[fmt] = report
            result.notes.extend(notes)
            self.realizations.pop(fmt, None)
            return rows
        else:  # pragma: no cover
            raise UsageError(f"unknown format {fmt}")
        rows, report = check_quantized(backend, self.realization(fmt), recorded, output_names, input_names,
                                       eager_outputs=self.eager_outputs.setdefault(fmt, {}))
        self.reports[fmt] = report
        self.realizations.pop(fmt, None)
        return rows

    def golden_calls(self, fmt: str) -> dict[str, list[tuple[dict, list[np.ndarray]]]]:
        """The recorded inputs with the *eager-quantized* outputs of ``fmt`` (after ``check``): what a
        quantized bundle's golden vectors for that format should hold (the fp32 ones do not apply)."""
        if fmt not in self.eager_outputs:
            raise UsageError(f"no eager-quantized outputs for {fmt}: check() it first")
        return self.eager_outputs[fmt]

    def integer_graphs(self, fmt: str) -> list[str]:
        """The graphs of ``fmt`` with a layer that computes in integers (activations quantized): their
        results depend on the CPU's integer kernels, so a bundle self-checks them where it is loaded."""
        plan = self.plans[fmt]
        return sorted({g for a in plan.assignments.values() if a.scheme.info.activations != "float"
                       for g in a.layer.graphs})

    # ------------------------------------------------------------------ records
    def to_json(self) -> dict:
        out: dict[str, Any] = {"recipe": self.recipe.to_dict(), "recipe_file": RECIPE_FILE, "formats": {}}
        for fmt, plan in self.plans.items():
            sizes = plan_bytes(plan)
            out["formats"][fmt] = {
                **plan.to_json(),
                "estimated_mb": {c: round(b / MB, 4) for c, b in sizes.items()},
                "parity": self.reports.get(fmt, {}),
                **({"onnx_files": self.onnx_reports} if fmt == "onnx" else {}),
            }
        if self.calibration is not None:
            out["calibration"] = {"prompts": len(self.calibration.prompts), "calls": len(self.calibration.calls)}
        out["notes"] = self.notes
        return out

    def write(self, folder: Path, info: dict) -> None:
        """``recipe.json`` next to the export and the ``quantization`` section of export.json."""
        self.recipe.save(Path(folder) / RECIPE_FILE)
        info["quantization"] = self.to_json()
