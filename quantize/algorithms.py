"""Weight algorithms that choose a layer's integer weights better than rounding each one to nearest.

:func:`gptq` is GPTQ (Frantar et al., 2022) on a *fixed* grid: every group's scale is the one the
format's own rounding would pick for the original weights (MatMulNBits: the group's largest weight
maps to -8), GPTQ then rounds column by column and feeds each column's rounding error into the
columns not yet rounded, weighted by the inverse Hessian ``H = X^T X`` of the layer's recorded
inputs. The element that sets a group's scale is kept at -8, so the format's own rounding of the
result gives the result back unchanged: the output is a float32 weight that the ordinary pass
(``MatMulNBitsQuantizer``, the eager fake-quant rule) stores bit for bit.

Written here because onnxruntime's bundled GPTQ re-rounds its output on a second grid (see
``schemes.ALGORITHM_SUPPORT``), and no library in this project's pins runs GPTQ on MatMulNBits' grid.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

DEFAULT_DAMP = 0.01  # of the mean Hessian diagonal, as in the GPTQ paper
COLUMN_BLOCK = 128  # columns updated together (lazy batch updates; the result does not depend on it)


class Hessian:
    """Running ``sum x^T x`` over the rows of every input a layer sees (float64)."""

    def __init__(self, k: int) -> None:
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.rows = 0

    def add(self, x: np.ndarray | torch.Tensor) -> None:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        if x.shape[-1] != self.h.shape[0]:
            raise ValueError(f"input of width {x.shape[-1]} for a layer with {self.h.shape[0]} input channels")
        self.h += x.T @ x
        self.rows += x.shape[0]

    def matrix(self) -> torch.Tensor:
        return self.h / max(self.rows, 1)


def ort_grid(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MatMulNBits' symmetric grid for a ``[out, in]`` weight: per-element scale (float32 values) and
    the mask of each group's scale-setting element (its largest magnitude, the first if tied)."""
    n, k = w.shape
    g = w.detach().double().reshape(n, k // group, group)
    idx = g.abs().argmax(dim=-1, keepdim=True)
    scale = (torch.gather(g, -1, idx) / -(2 ** (bits - 1))).float().double()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    pin = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return scale.expand_as(g).reshape(n, k), pin.reshape(n, k)


def gptq(w: torch.Tensor | np.ndarray, hessian: torch.Tensor, bits: int = 4, group: int = 32,
         damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """GPTQ on MatMulNBits' symmetric grid; ``w`` is ``[out, in]``, ``hessian`` ``[in, in]``.

    Returns the dequantized weight (float32, on the grid) that the format's rounding keeps as it is.
    """
    w = torch.as_tensor(w).detach().to(torch.float64).clone()
    n, k = w.shape
    if k % group:
        raise ValueError(f"{k} input channels are not a multiple of the group size {group}")
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} for a weight with {k} input channels")
    scale, pin = ort_grid(w, bits, group)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0  # channels that never see input: any value is as good, round them plainly
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row j holds the weights of column j's error in the later columns.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = torch.zeros_like(w)
    for i1 in range(0, k, COLUMN_BLOCK):
        i2 = min(i1 + COLUMN_BLOCK, k)
        wb = w[:, i1:i2].clone()
        err = torch.zeros_like(wb)
        hb = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col, s = wb[:, j], scale[:, i1 + j]
            q = torch.clamp(torch.round(col / s), qmin, qmax)
            q = torch.where(pin[:, i1 + j], torch.full_like(q, qmin), q)  # keeps every group's scale
            deq = q * s
            q_all[:, i1 + j] = deq
            e = (col - deq) / hb[j, j]
            wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
            err[:, j] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q_all.float()


def output_error(w: torch.Tensor | np.ndarray, w_q: torch.Tensor | np.ndarray, xs: Iterable[np.ndarray]) -> float:
    """NMSE of ``x @ w_q^T`` against ``x @ w^T`` over the inputs ``xs``: the objective GPTQ lowers."""
    w = torch.as_tensor(np.asarray(w), dtype=torch.float64)
    w_q = torch.as_tensor(np.asarray(w_q), dtype=torch.float64)
    num = den = 0.0
    for x in xs:
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64).reshape(-1, w.shape[1])
        ref = x @ w.T
        num += float(((x @ w_q.T - ref) ** 2).sum())
        den += float((ref ** 2).sum())
    return num / den if den else 0.0


def hqq(w: torch.Tensor | np.ndarray, bits: int = 4, group: int = 32) -> torch.Tensor:
    """onnxruntime's HQQ (``HQQWeightOnlyQuantizer.quantize_internal``) on a ``[out, in]`` weight,
    dequantized: what the MatMulNBits node it writes computes with."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    w = torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w).detach().float()
    n, k = w.shape
    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=group, bits=bits))
    q, scale, zero = quantizer.quantize_internal(w, bits=bits, group_size=group)
    q = q.float().reshape(n, -1, group)
    deq = (q - zero.reshape(n, -1, 1)) * scale.reshape(n, -1, 1)
    return deq.reshape(n, -1)[:, :k].contiguous()


def layer_hessians(modules, spec_inputs, calib, layers: dict[int, str], graphs=None) -> dict[str, Hessian]:
    """layer -> Hessian of its inputs over every calibration call of every graph that uses it, recorded
    in eager torch (``layers``: id(weight) -> layer name, of ``modules``' model)."""
    from torch.overrides import TorchFunctionMode

    from hartkit.quantize.calibration import replay_fns
    from hartkit.quantize.layers import LAYER_FUNCS

    hs: dict[str, Hessian] = {}

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if LAYER_FUNCS.get(func) == "linear":
                name = layers.get(id(args[1] if len(args) > 1 else kwargs.get("weight")))
                if name is not None:
                    x = args[0].detach()
                    hs.setdefault(name, Hessian(x.shape[-1])).add(x)
            return func(*args, **kwargs)

    replay = replay_fns(modules, spec_inputs)
    for graph in graphs or calib.graphs():
        if graph not in modules:
            continue
        names = spec_inputs[graph]
        for feeds in calib.feeds(graph, replay):
            with torch.no_grad(), Watch():
                modules[graph](*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names])
    return hs


def calibrated_weights(model, encoder, system_length: int, plan, calib) -> dict[str, np.ndarray]:
    """layer -> the dequantized ``[out, in]`` weight its algorithm chooses, for every linear layer of
    ``plan`` whose scheme names one (gptq: Hessians of the layer's inputs over ``calib``, recorded on
    the fp32 graphs; hqq: from the weight alone). On onnx these are the weights
    ``quantize_onnx_graph`` writes (up to the float rounding of the recorded inputs)."""
    from hartkit.model.graphs import hart_graph_specs
    from hartkit.quantize.layers import layer_modules

    if plan.fmt != "onnx":
        raise ValueError(f"weight algorithms are on the onnx grid only, not {plan.fmt}")
    mods = layer_modules(model, encoder)
    wanted = {n: a.scheme for n, a in plan.assignments.items()
              if a.scheme.algorithm != "rtn" and a.layer.kind == "linear"}
    out: dict[str, np.ndarray] = {}
    need = {n for n, s in wanted.items() if s.calibrated}
    hs: dict[str, Hessian] = {}
    if need:
        if calib is None:
            raise ValueError(f"gptq needs calibration inputs for {', '.join(sorted(need))}")
        specs = hart_graph_specs(model, encoder, system_length)
        modules = {s.name: s.build().eval() for s in specs}
        graphs = sorted({g for n in need for g in plan.assignments[n].layer.graphs})
        hs = layer_hessians(modules, {s.name: [i.name for i in s.inputs] for s in specs}, calib,
                            {id(mods[n].weight): n for n in need}, graphs)
    for name, scheme in wanted.items():
        w = mods[name].weight.detach()
        if scheme.algorithm == "gptq":
            out[name] = gptq(w, hs[name].matrix(), bits=scheme.bits, group=int(scheme.group_size)).numpy()
        elif scheme.algorithm == "hqq":
            out[name] = hqq(w, bits=scheme.bits, group=int(scheme.group_size)).numpy()
    return out


__all__ = ["Hessian", "calibrated_weights", "gptq", "hqq", "layer_hessians", "ort_grid", "output_error"]
