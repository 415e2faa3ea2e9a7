"""Core ML quantization: ``coremltools.optimize.coreml`` on the converted packages, checked without a Mac.

Export: each graph is converted by :func:`.lower.convert_graph` (fp16 compute; iOS18
as soon as the plan has an ``int4`` layer anywhere, because per-block int4 —
``constexpr_blockwise_shift_scale`` — exists only from iOS18), then its layer weights are compressed:

* ``int8``: ``OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")``
* ``int4``: ``OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
  block_size=group)``
* ``palettize4/6/8``: ``OpPalettizerConfig(mode="kmeans", nbits=n)`` (one table per tensor)

Only the layers' weight constants are named in ``op_name_configs`` (found by value: the converter
stores ``W`` as an fp16 const), with ``weight_threshold=1``: a global config would also compress the
RoPE tables, the causal masks and the biases. The iOS18 multifunction packages are rebuilt from the
compressed per-graph packages.

Check (Core ML cannot predict on Linux): per graph, (1) every compressed weight, decompressed by
``coremltools.optimize.coreml.decompress_weights``, equals the eager fake-quantized weight
(:func:`hartkit.quantize.fakequant.coreml_linear`: the same formula in the same fp16 arithmetic)
within fp16 rounding, or for palettization has at most ``2^n`` distinct values; the package's
weights then replace the eager reference's (k-means is not reproduced bit for bit); (2) the decompressed program is
re-computed by the numpy MIL interpreter (:mod:`.mil`, fp16 after every op) on
the recorded inputs and compared with the eager-quantized torch graph with the Core ML exporter's
fp16 bars.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from hartkit.errors import HartkitError
from hartkit.export.parity import GraphParity, OutputParity, compare_outputs
from hartkit.export.targets.coreml.lower import FP16_ATOL, FP16_MIN_SNR_DB, FP16_RTOL, MINIMUM_TARGET
from hartkit.export.targets.coreml.mil import check_interface, load_package, quiet_coremltools
from hartkit.loop.metrics import snr_db
from hartkit.quantize.layers import layer_modules
from hartkit.quantize.schemes import Scheme

# decompressed weight vs eager fake-quant weight: both fp16, so equal up to one fp16 rounding of
# the scale product (relative 2^-10) plus a rounding flip at exact ties
WEIGHT_RTOL = 2e-3
MAX_FLIPPED = 0.0  # elements allowed one quantization step away (none: fakequant.coreml_linear is exact)


def _key16(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float16)
    return hashlib.sha1(a.tobytes()).hexdigest() + str(a.shape)


def needs_ios18(plan) -> bool:
    return any(a.scheme.name == "int4" for a in plan.assignments.values())


def _const_ops(mlmodel):
    """(name, numpy value) of every const op in the in-memory MIL program."""
    prog = getattr(mlmodel, "_mil_program", None)
    if prog is None:
        raise HartkitError("Core ML quantization needs the converted in-memory program (ct.convert output)")
    out = []

    def walk(block):
        for op in block.operations:
            if op.op_type == "const" and op.val is not None and isinstance(op.val.val, np.ndarray):
                out.append((op.name, op.val.val))
            for b in getattr(op, "blocks", []):
                walk(b)

    for fn in prog.functions.values():
        walk(fn)
    return out


def weight_consts(mlmodel, layers, weights: Mapping[str, np.ndarray]) -> dict[str, str]:
    """const op name -> layer, matching the fp16 const value with the layer's fp16 weight."""
    index = {}
    for layer in layers:
        index.setdefault(_key16(weights[layer.name]), []).append(layer.name)
    out = {}
    for name, value in _const_ops(mlmodel):
        if value.dtype not in (np.float16, np.float32) or value.ndim < 2:
            continue
        hits = index.get(_key16(value))
        if hits:
            out[name] = hits[0]
    return out


def op_config(scheme: Scheme):
    import coremltools.optimize.coreml as cto

    if scheme.name == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                           weight_threshold=1)
    if scheme.name == "int4":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                           block_size=int(scheme.group_size), weight_threshold=1)
    if scheme.name.startswith("palettize"):
        return cto.OpPalettizerConfig(mode="kmeans", nbits=scheme.bits, weight_threshold=1)
    return None


def compress(mlmodel, consts: Mapping[str, str], scheme_of) -> tuple[object, dict[str, str]]:
    """Apply the plan's schemes to the named consts; -> (new model, const -> scheme label)."""
    import coremltools.optimize.coreml as cto

    linear, palette, applied = {}, {}, {}
    for const, layer in consts.items():
        s = scheme_of(layer)
        cfg = op_config(s)
        if cfg is None:
            continue
        (palette if s.name.startswith("palettize") else linear)[const] = cfg
        applied[const] = s.label
    with quiet_coremltools():
        if linear:
            mlmodel = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=linear))
        if palette:
            mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=palette))
    return mlmodel, applied


def deployment_target(plan) -> str:
    """iOS18 as soon as the plan has an ``int4`` layer anywhere (per-block int4 exists only from iOS18)."""
    return "iOS18" if plan.quantized and needs_ios18(plan.plan) else MINIMUM_TARGET


def compressor(plan) -> Callable | None:
    """``transform(spec, mlmodel) -> mlmodel`` compressing the layer weights of one converted graph as
    ``plan`` (a :class:`~hartkit.export.quantization.FormatPlan`) says; None for an fp32 plan. Records
    which const holds which layer in ``plan.work["consts"]`` (the check reads them back)."""
    if not plan.quantized:
        return None
    by_graph = plan.work.setdefault("consts", {})

    def compress_graph(spec, mlmodel):
        layers = plan.layers.of_graph(spec.name)
        consts = weight_consts(mlmodel, layers, plan.layer_weights(spec.name))
        wanted = {l.name for l in layers if op_config(plan.scheme_of(l.name)) is not None}
        missing = wanted - set(consts.values())
        if missing:
            raise HartkitError(f"coreml {spec.name}: no weight constant found for layers {sorted(missing)}; "
                               "refusing to leave them uncompressed")
        mlmodel, applied = compress(mlmodel, consts, plan.scheme_of)
        by_graph[spec.name] = {c: consts[c] for c in applied}
        return mlmodel

    return compress_graph


def _decompressed(path: Path, work: Path):
    """The package with every compressed weight expanded, read back by the MIL interpreter."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    with quiet_coremltools():
        model = ct.models.MLModel(str(path), skip_model_load=True)
        dense = cto.decompress_weights(model)
        dst = work / path.name
        dense.save(str(dst))
    return load_package(dst)


def check_coreml_quantized(fplan, folder: Path, info: dict, recorded, output_names, input_names):
    """-> (parity rows, per-graph report, notes). See the module docstring for what is checked.

    ``fplan``: the Core ML :class:`~hartkit.export.quantization.FormatPlan` the packages were compressed
    with; its eager reference is adjusted to the packages' weights, and receives the golden outputs."""
    from hartkit.model.graphs import run_graph

    real = fplan.reference()
    plan = fplan.plan
    files = info.get("files", {}).get("coreml", {})
    graphs = {g["name"]: g for g in info["graphs"]}
    qmods = layer_modules(real.model, real.encoder)
    rows, report, notes = [], {}, []
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        programs = {}
        weight_report: dict[str, dict] = {}
        # (1) weights, and the palettized tables into the eager reference
        for graph, rel in files.items():
            programs[graph] = prog = _decompressed(Path(folder) / rel, work)
            fn = prog.function(None)
            consts = {op.name: op.value for op in fn.ops if op.type == "const"}
            for const, layer in fplan.work.get("consts", {}).get(graph, {}).items():
                # the compressor renames the weight (suffix _quantized / _palettized); decompression keeps it
                mod = qmods[layer]
                hits = [n for n in consts if (n == const or n.startswith(const + "_"))
                        and np.size(consts[n]) == mod.weight.numel()]
                if len(hits) != 1:
                    raise HartkitError(f"coreml {graph}: cannot find the decompressed weight of {layer} "
                                       f"(const {const}; candidates {hits})")
                got = np.asarray(consts[hits[0]], dtype=np.float32)
                s = plan.scheme_of(layer)
                if s.name.startswith("palettize"):
                    distinct = int(np.unique(got).size)
                    ok = distinct <= 2 ** s.bits
                    with torch.no_grad():
                        mod.weight.copy_(torch.from_numpy(got.reshape(tuple(mod.weight.shape))))
                    weight_report[layer] = {"scheme": s.label, "distinct_values": distinct, "ok": ok}
                else:
                    want = mod.weight.detach().numpy().reshape(got.shape)
                    tol = WEIGHT_RTOL * float(np.abs(want).max(initial=0)) + 1e-7
                    diff = np.abs(got - want)
                    # fakequant.coreml_linear reproduces coremltools' fp16 arithmetic, so no element may
                    # differ by more than fp16 rounding (MAX_FLIPPED is the knob should a version drift)
                    step = float(np.abs(want).max(initial=0)) / (127 if s.name == "int8" else 7)
                    flipped = float(np.mean(diff > tol))
                    ok = float(diff.max(initial=0)) <= step * 1.01 + tol and flipped <= MAX_FLIPPED
                    weight_report[layer] = {"scheme": s.label, "max_abs_diff": float(diff.max(initial=0)),
                                            "fraction_one_step_off": flipped, "ok": ok}
                if ok and not s.name.startswith("palettize"):
                    # from here on the eager reference computes with the package's own weights, so the
                    # program check below measures the program (fp16 compute), not rounding ties
                    with torch.no_grad():
                        mod.weight.copy_(torch.from_numpy(got.reshape(tuple(mod.weight.shape))))
                if not ok:
                    raise HartkitError(f"coreml {graph}: compressed weight of {layer} ({s.label}) disagrees with the "
                                       f"eager quantization: {weight_report[layer]}")
        # (2) the decompressed programs vs the eager-quantized graphs
        for graph, prog in programs.items():
            fn = prog.function(None)
            gp = GraphParity(graph, "coreml")
            problems = check_interface(fn, graphs[graph])
            if problems:
                gp.outputs.append(OutputParity("interface: " + "; ".join(problems), [], math.inf, 0.0, -math.inf, False))
                rows.append(gp)
                continue
            missing = fn.unsupported_ops()
            if missing:
                notes.append(f"coreml {graph}: NOT numerically verified: the MIL interpreter lacks "
                             f"{', '.join(sorted(missing))}")
                continue
            worst_fp32, worst_eager = math.inf, math.inf
            for feeds, ref32 in recorded.get(graph, []):
                ref_q = run_graph(real.modules[graph], [feeds[n] for n in input_names[graph]])
                fplan.eager_outputs.setdefault(graph, []).append((feeds, ref_q))
                got = fn.run(feeds)
                outs = [got[n] for n in output_names[graph]]
                gp.outputs.extend(compare_outputs(output_names[graph], ref_q, outs, atol=FP16_ATOL, rtol=FP16_RTOL,
                                                  min_snr_db=FP16_MIN_SNR_DB))
                gp.calls += 1
                worst_eager = min([worst_eager] + [snr_db(r, o) for r, o in zip(ref_q, outs)])
                worst_fp32 = min([worst_fp32] + [snr_db(r, o) for r, o in zip(ref32, outs)])
            rows.append(gp)
            report[graph] = {"bar": "fp16 (MIL interpreter)", "min_snr_vs_eager_db": worst_eager,
                             "min_snr_vs_fp32_db": worst_fp32,
                             "schemes": sorted(s.label for s in plan.graph_schemes(graph))}
        report["weights"] = weight_report
    notes.append("coreml (quantized): compressed weights decompressed with coremltools and compared with the eager "
                 "quantization; each decompressed program re-computed by the numpy MIL interpreter (fp16) on recorded "
                 "inputs against the eager-quantized torch graph. Not verified: Core ML's kernels and devices (macOS).")
    return rows, report, notes
