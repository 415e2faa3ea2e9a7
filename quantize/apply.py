"""Eager references of quantized exports: the models with a plan applied in torch, and the bars.

A quantized export is checked against the same quantization computed in eager torch: :func:`realize`
copies the models and applies a resolved :class:`~hartkit.quantize.recipe.Plan` as the target format
computes it (the target passes its arithmetic in: :mod:`hartkit.quantize.fakequant` for ONNX and
Core ML, torchao itself for ExecuTorch, :func:`torchao_quantize`). :func:`graph_bar` says which bar a
graph's files are held to against that reference (see :func:`relative_ok`). The export side (which
files, which checks) is :mod:`hartkit.export.quantization` and the targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from hartkit.model.qkv_bias import fold_qkv_bias
from hartkit.quantize import fakequant as fq
from hartkit.quantize.layers import layer_modules
from hartkit.quantize.recipe import Plan
from hartkit.quantize.schemes import SUPPORT, Scheme

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
    plan: Plan | None  # None: the fp32 graphs themselves
    model: Any
    encoder: Any
    specs: list
    modules: dict[str, nn.Module]  # graph -> eager reference module (what the export must agree with)


QuantizeEager = Callable[[Any, Any, Plan, "Mapping | None"], dict]


def realize(model, encoder, system_length: int, plan: Plan,
            ranges: Mapping[str, Mapping[str, tuple[float, float]]] | None, quantize_eager: QuantizeEager,
            given: Mapping[str, np.ndarray] | None = None) -> Realization:
    """Model copies with ``plan`` applied by ``quantize_eager(models..., plan, ranges) -> activation rules``:
    the target format's arithmetic (``Target.quantize_eager``). ``given``: layer -> the dequantized weight
    an algorithm chose (gptq, hqq), which the reference takes as it is (passed on as
    ``quantize_eager(..., given=given)``, so only to a target whose format has such algorithms)."""
    from hartkit.model.graphs import hart_graph_specs

    qmodel, qenc = fq.copy_models(model, encoder)
    rules = quantize_eager(qmodel, qenc, plan, ranges, **({"given": dict(given)} if given else {}))
    specs = hart_graph_specs(qmodel, qenc, system_length)
    modules = {}
    for s in specs:
        m = s.build().eval()
        modules[s.name] = fq.EmulatedGraph(m, rules, s.name).eval() if rules else m
    return Realization(plan.fmt, plan, qmodel, qenc, specs, modules)


def torchao_quantize(qmodel, qenc, schemes: Mapping[str, Scheme]) -> None:
    """torchao's ``quantize_`` on the 8da8w/8da4w layers, fp16 storage on the fp16 ones (in place)."""
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
