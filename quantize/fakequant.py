"""Eager-torch quantization: the same arithmetic as each format, applied to the torch modules.

The exported quantized graphs are checked against these (tests and the export's parity check), and
the sensitivity analysis uses them to quantize one layer at a time without exporting anything.

Weights are fake-quantized (quantize -> dequantize, kept in float32) with each format's exact rule:

* onnx ``int8`` / ``int4`` (and ``8da8w`` / ``8da4w``, the same weights): MatMulNBits, blockwise along
  the input dim, symmetric with the block's signed extreme mapped to ``-2^(b-1)`` (``scale =
  w[argmax|w|] / -2^(b-1)``, ``q`` in ``[-2^(b-1), 2^(b-1)-1]``) — read from onnxruntime's quantizer
  and checked against it in the tests.
* onnx ``w8a8`` / ``w8a8_static``: 7-bit weights stored in int8 (onnxruntime's ``reduce_range``), per
  output channel, ``scale = max|w| / 64``, ``q`` in ``[-64, 64]`` (w8a8 Conv: per tensor —
  quantize_dynamic's ConvInteger path ignores per_channel). 7 bits so that the uint8 x int8 kernels
  sum exactly on every CPU (:func:`u8s8_dot` models the kernel that would not).
* coreml ``int8`` / ``int4``: linear_symmetric on the fp16 weight, ``scale = max|w| / (2^(b-1) - 1)``
  per channel / block, the division in float16 (see :func:`coreml_linear`).
* ``fp16``: weights rounded to float16.

Activations (``w8a8``: onnxruntime's DynamicQuantizeLinear, uint8 per tensor over the whole input;
``w8a8_static``: fixed calibrated uint8 scale/zero point; onnx ``8da8w`` / ``8da4w``: MatMulNBits with
``accuracy_level=4``, int8 per row and weight block) are fake-quantized by a torch function
mode around the graph's forward, because one AR weight is used through ``F.linear`` without calling
its module (module hooks would miss it).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from hartkit.quantize.layers import LAYER_FUNCS, layer_modules
from hartkit.quantize.schemes import Scheme

# ----------------------------------------------------------------------------- weight rules


# onnxruntime's blockwise quantizer (MLAS, 1.32) takes blocks of 16..256 only: "Only block sizes 16, 32,
# 64, 128, 256 are supported" (found exporting the 0.7B shape, K = 1536 and 1024).
INT8_MAX_BLOCK = 256


def int8_block(k: int) -> int:
    """MatMulNBits block for onnx ``int8``: one block per output channel when K is a power of two up to
    256; else the largest power-of-two divisor of K, at most 256 (e.g. 1536 -> 6 blocks of 256), so no
    padding is stored. MatMulNBits needs a power of two >= 16: K with a smaller divisor pads to the next one."""
    block = min(k & -k, INT8_MAX_BLOCK)  # largest power of two dividing k
    if block < 16:
        block = max(16, 1 << (k - 1).bit_length())
    return block


def ort_block_size(layer_k: int, scheme: Scheme) -> int:
    return int8_block(layer_k) if scheme.name in ("int8", "8da8w") else int(scheme.group_size)


def nbits_ort(w: Tensor, bits: int, block: int) -> Tensor:
    """onnxruntime MatMulNBits symmetric rule on a Linear weight ``[out, in]`` (blocks along ``in``)."""
    out_f, k = w.shape
    pad = (-k) % block
    wf = w.detach().double()
    if pad:
        wf = F.pad(wf, (0, pad))
    g = wf.reshape(out_f, -1, block)
    idx = g.abs().argmax(dim=-1, keepdim=True)
    extreme = torch.gather(g, -1, idx)
    qmax = 2 ** (bits - 1)
    scale = (extreme / -qmax).float().double()  # stored as float32
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(g / safe), -qmax, qmax - 1)
    deq = torch.where(scale == 0, torch.zeros_like(g), q * scale)
    return deq.reshape(out_f, -1)[:, :k].float()


# onnxruntime's reduce_range for symmetric int8 weights: q in [-64, 64], scale = max|w| / 64.
W8A8_QMAX = 64


def symmetric_per_channel(w: Tensor, qmax: int) -> Tensor:
    """``scale = max|w| / qmax`` per output channel (dim 0), ``q`` in ``[-qmax, qmax]``."""
    flat = w.detach().double().reshape(w.shape[0], -1)
    scale = (flat.abs().amax(dim=1, keepdim=True) / qmax).float().double()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(flat / safe), -qmax, qmax)
    return (q * scale).reshape(w.shape).float()


def symmetric_per_tensor(w: Tensor, qmax: int) -> Tensor:
    return symmetric_per_channel(w.reshape(1, -1), qmax).reshape(w.shape)


def fake_weight(w: Tensor, kind: str, scheme: Scheme, fmt: str) -> Tensor:
    """The dequantized weight the format computes with (float32, same shape)."""
    name = scheme.name
    if name == "fp32":
        return w.detach().clone()
    if name == "fp16":
        return w.detach().half().float()
    if fmt == "onnx":
        if name in ("int8", "int4", "8da8w", "8da4w"):
            return nbits_ort(w, scheme.bits, ort_block_size(w.shape[1], scheme))
        if name == "w8a8" and kind == "conv":
            # quantize_dynamic quantizes Conv weights per tensor (ConvInteger), even with per_channel
            return symmetric_per_tensor(w, W8A8_QMAX)
        if name in ("w8a8", "w8a8_static"):
            return symmetric_per_channel(w, W8A8_QMAX)
    if fmt == "coreml":
        # the converter stores fp16 constants (compute_precision FLOAT16) and coremltools quantizes those
        if name == "int8":
            return coreml_linear(w, 127)
        if name == "int4":
            return coreml_linear(w, 7, int(scheme.group_size))
        if name.startswith("palettize"):
            return kmeans_palettize(w.detach().half().float(), scheme.bits)
    raise ValueError(f"no eager weight rule for {scheme.label} on {fmt}")


def coreml_linear(w: Tensor, qmax: int, block: int | None = None) -> Tensor:
    """coremltools ``linear_symmetric``: on the fp16 weight the converter stored, ``scale =
    fp16(max|w| / qmax)`` per output channel (or per ``block`` input channels), ``q = round(w / scale)``
    with the division done in float16, and the dequantized value rounded to float16 (matched
    bit for bit against decompressed packages in the tests)."""
    w16 = w.detach().half()
    out_c = w16.shape[0]
    g = w16.reshape(out_c, -1) if block is None else w16.reshape(out_c, w16.shape[1] // block, block, -1)
    dims = (1,) if block is None else (2, 3)
    scale = (g.float().abs().amax(dim=dims, keepdim=True) / qmax).half()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(g / safe), -qmax - 1, qmax)
    return (q * scale).reshape(w.shape).float()


def kmeans_palettize(w: Tensor, bits: int, iters: int = 30) -> Tensor:
    """A per-tensor k-means lookup table (what Core ML's palettizer computes, up to its k-means
    initialisation): used for sensitivity estimates; the Core ML check reads the real table."""
    x = w.detach().double().reshape(-1)
    k = min(2**bits, x.numel())
    # init on quantiles: deterministic, and close to a converged Lloyd solution for smooth weights
    centers = torch.quantile(x, torch.linspace(0, 1, k, dtype=torch.float64))
    for _ in range(iters):
        assign = (x[:, None] - centers[None]).abs().argmin(dim=1)
        sums = torch.zeros(k, dtype=torch.float64).index_add(0, assign, x)
        counts = torch.zeros(k, dtype=torch.float64).index_add(0, assign, torch.ones_like(x))
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    assign = (x[:, None] - centers[None]).abs().argmin(dim=1)
    return centers.half().double()[assign].reshape(w.shape).float()


# ----------------------------------------------------------------------------- integer kernels

INT16_MAX = 32767


def u8s8_dot(a: np.ndarray, b: np.ndarray, isa: str = "vnni") -> np.ndarray:
    """``a @ b`` for uint8 ``a [M, K]`` and int8 ``b [K, N]`` as MLAS's u8 x s8 kernels compute it.

    ``"vnni"`` (AVX512-VNNI / AVX-VNNI VPDPBUSD, ARM64 dot products): exact int32 sums.
    ``"avx2"`` (AVX2, and AVX-512 without VNNI): VPMADDUBSW multiplies neighbouring pairs along K and
    adds each pair with *signed int16 saturation* before VPMADDWD widens to int32 (K zero-padded to
    a multiple of 4). No library exposes this arithmetic, so it is written out here to show which
    weights are safe: with |b| <= 64 no pair can exceed 2 * 255 * 64 = 32640.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if isa == "vnni":
        return (a @ b).astype(np.int64)
    if isa != "avx2":
        raise ValueError(f"isa must be 'vnni' or 'avx2', got {isa!r}")
    k = a.shape[1]
    pad = (-k) % 4
    a = np.pad(a, ((0, 0), (0, pad)))
    b = np.pad(b, ((0, pad), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]  # [M, K/2, N]
    return np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(axis=1)


def u8s8_can_saturate(qmax: int, a_max: int = 255) -> bool:
    """Whether a pair of uint8 x int8 products (|b| <= qmax) can leave int16 on AVX2."""
    return 2 * a_max * qmax > INT16_MAX


# ----------------------------------------------------------------------------- activation rules


def dynamic_uint8(x: Tensor) -> Tensor:
    """onnxruntime DynamicQuantizeLinear then dequantize: uint8, one scale over the whole tensor,
    range widened to include 0, ties to even."""
    xf = x.float()
    lo = torch.clamp(xf.min(), max=0.0)
    hi = torch.clamp(xf.max(), min=0.0)
    scale = (hi - lo) / 255.0
    if float(scale) == 0.0:
        return xf
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(xf / scale) + zp, 0, 255)
    return (q - zp) * scale


def blockwise_int8(block: int) -> Callable[[Tensor], Tensor]:
    """MatMulNBits ``accuracy_level=4`` (MLAS "CompInt8"): the activation is quantized per row and per
    block of ``block`` input channels (the weight's block), symmetric int8, ``scale = max|x| / 127``,
    ties to even; the input dim is zero-padded to the block. Checked against onnxruntime in the tests
    (about 90 dB apart: only the summation order differs)."""

    def rule(x: Tensor) -> Tensor:
        xf = x.float()
        k = xf.shape[-1]
        pad = (-k) % block
        if pad:
            xf = F.pad(xf, (0, pad))
        g = xf.reshape(*xf.shape[:-1], -1, block)
        scale = g.abs().amax(dim=-1, keepdim=True) / 127.0
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(g / safe), -127, 127)
        return (q * scale).reshape(xf.shape)[..., :k]

    return rule


def dynamic_rule(scheme: Scheme, weight: Tensor) -> Callable[[Tensor], Tensor]:
    """The onnx activation rule of a dynamic scheme for a layer with this weight ``[out, in, ...]``."""
    if scheme.name == "w8a8":
        return dynamic_uint8
    return blockwise_int8(ort_block_size(int(weight.shape[1]), scheme))


def static_uint8(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """QuantizeLinear -> DequantizeLinear with a calibrated uint8 scale and zero point."""
    xf = x.float()
    q = torch.clamp(torch.round(xf / scale) + zero_point, 0, 255)
    return (q - zero_point) * scale


def uint8_qparams(lo: float, hi: float) -> tuple[float, int]:
    """onnxruntime's asymmetric uint8 parameters for a calibrated range (``compute_scale_zp``):
    the range widened to include 0, ``scale = (hi - lo) / 255`` in float64, ``zp = round(-lo /
    scale)`` from that float64 scale, the scale then stored as float32. (The range itself comes from
    torch here and from onnxruntime's own run there, so the two can differ in the last bit.)"""
    lo64, hi64 = min(float(np.float32(lo)), 0.0), max(float(np.float32(hi)), 0.0)
    scale = (hi64 - lo64) / 255.0
    if scale < np.finfo(np.float32).tiny:
        return 1.0, 0
    zp = int(np.clip(np.round(0.0 - lo64 / scale), 0, 255))
    return float(np.float32(scale)), zp


class ActivationQuant(TorchFunctionMode):
    """Fake-quantizes the input of F.linear / F.conv2d for the weights it is told about.

    ``rules`` maps ``id(weight)`` -> ``fn(x) -> x_q``. Static rules may differ per graph (each ONNX
    graph is calibrated on its own inputs), so a rule can be a mapping graph -> fn; ``graph`` picks.
    """

    def __init__(self, rules: Mapping[int, Callable | Mapping[str, Callable]], graph: str = "") -> None:
        super().__init__()
        self.rules = rules
        self.graph = graph

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LAYER_FUNCS and LAYER_FUNCS[func] != "embedding":
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            rule = self.rules.get(id(weight))
            if isinstance(rule, Mapping):
                rule = rule.get(self.graph)
            if rule is not None:
                args = (rule(args[0]), *args[1:])
        return func(*args, **kwargs)


class EmulatedGraph(nn.Module):
    """A graph wrapper run under its activation-quantization mode."""

    def __init__(self, inner: nn.Module, rules: Mapping, graph: str) -> None:
        super().__init__()
        self.inner = inner
        self.rules = rules
        self.graph = graph

    def forward(self, *args):
        with ActivationQuant(self.rules, self.graph):
            return self.inner(*args)


# ----------------------------------------------------------------------------- whole models


def copy_models(model, encoder):
    """Deep copies that share nothing mutable with the originals (the tokenizer is shared)."""
    memo = {}
    if encoder is not None and getattr(encoder, "tokenizer", None) is not None:
        memo[id(encoder.tokenizer)] = encoder.tokenizer
    return copy.deepcopy(model, memo), (copy.deepcopy(encoder, memo) if encoder is not None else None)


def apply_weights(model, encoder, schemes: Mapping[str, Scheme], fmt: str,
                  kinds: Mapping[str, str] | None = None, given: Mapping[str, np.ndarray] | None = None) -> None:
    """In place: every named layer's weight replaced by its fake-quantized value.

    ``given``: layer -> the dequantized weight an algorithm chose (``OnnxQuantReport.calibrated``), used
    as it is instead of rounding the layer's own weight."""
    mods = layer_modules(model, encoder)
    with torch.no_grad():
        for name, w in (given or {}).items():
            if tuple(w.shape) != tuple(mods[name].weight.shape):
                raise ValueError(f"{name}: given weight of shape {tuple(w.shape)}, the layer's is "
                                 f"{tuple(mods[name].weight.shape)}")
            mods[name].weight.copy_(torch.as_tensor(np.asarray(w), dtype=mods[name].weight.dtype))
        for name, scheme in schemes.items():
            if scheme.name == "fp32" or name in (given or {}):
                continue
            mod = mods[name]
            kind = (kinds or {}).get(name) or ("conv" if isinstance(mod, nn.Conv2d) else
                                               "embedding" if isinstance(mod, nn.Embedding) else "linear")
            mod.weight.copy_(fake_weight(mod.weight, kind, scheme, fmt))


def activation_rules(model, encoder, schemes: Mapping[str, Scheme], fmt: str,
                     ranges: Mapping[str, Mapping[str, tuple[float, float]]] | None = None) -> dict:
    """id(weight) -> rule for the layers whose scheme quantizes activations (onnx w8a8 / w8a8_static).

    ``ranges``: layer -> graph -> (min, max) of its input over the calibration set (static only).
    """
    mods = layer_modules(model, encoder)
    rules: dict[int, Callable | dict[str, Callable]] = {}
    for name, scheme in schemes.items():
        act = scheme.info.activations
        if fmt != "onnx" or act == "float":
            continue
        w = mods[name].weight
        if act == "dynamic":
            rules[id(w)] = dynamic_rule(scheme, w)
        elif act == "static":
            per_graph = {}
            for graph, (lo, hi) in (ranges or {}).get(name, {}).items():
                s, zp = uint8_qparams(lo, hi)
                per_graph[graph] = (lambda x, s=s, zp=zp: static_uint8(x, s, zp))
            rules[id(w)] = per_graph
    return rules


@contextmanager
def swapped_weight(module: nn.Module, value: Tensor) -> Iterator[None]:
    """Temporarily replace a layer's weight (sensitivity analysis: one layer at a time)."""
    old = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            module.weight.copy_(old)
