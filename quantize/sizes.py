"""Bytes a layer takes in each format under each scheme (weights + scales; biases stay float32).

These are the storage layouts of the libraries, so a budget computed here is what the files weigh
(the tests compare them with the real files):

* onnx MatMulNBits: ``N * ceil(K / block) * block * bits / 8`` packed (K padded to the block) plus
  one float32 scale per block; quantize_dynamic/static: int8 weights, float32 scale + int8 zero
  point per channel (per tensor for dynamic Conv); fp16: 2 bytes per weight.
* coreml: int8/int4 with float16 scales per channel / block; palettization ``bits`` per weight plus
  a float16 lookup table of ``2^bits`` entries.
* executorch (torchao 8da*): int8 storage per weight (int4 values are packed two per byte by the
  XNNPACK delegate), float32 scale + zero point per group / channel.
"""

from __future__ import annotations

import math
from typing import Mapping

from hartkit.quantize.fakequant import ort_block_size
from hartkit.quantize.layers import Layer
from hartkit.quantize.schemes import Scheme

MB = 1_000_000


def weight_bytes(layer: Layer, scheme: Scheme, fmt: str) -> int:
    n, k = layer.out_features, layer.reduction
    numel = layer.numel
    name = scheme.name
    if name == "fp32":
        return 4 * numel
    if name == "fp16":
        return 2 * numel
    if fmt == "onnx":
        if name in ("int8", "int4", "8da8w", "8da4w"):
            block = ort_block_size(layer.in_features, scheme)
            blocks = math.ceil(k / block)
            zero_points = 4 * n * blocks if scheme.algorithm == "hqq" else 0  # HQQ stores float32 zero points
            return n * blocks * block * scheme.bits // 8 + 4 * n * blocks + zero_points
        if name == "w8a8" and layer.kind == "conv":
            return numel + 4 + 1
        if name in ("w8a8", "w8a8_static"):
            return numel + 5 * n
    if fmt == "coreml":
        if name == "int8":
            return numel + 2 * n
        if name == "int4":
            return numel // 2 + 2 * n * math.ceil(layer.in_features / scheme.group_size)
        if name.startswith("palettize"):
            return math.ceil(numel * scheme.bits / 8) + 2 * 2**scheme.bits
    if fmt == "executorch":
        if name == "8da8w":
            return numel + 5 * n
        if name == "8da4w":
            return numel // 2 + 5 * n * math.ceil(layer.in_features / scheme.group_size)
    # A cell outside the table never gets here (resolve refuses it); be loud if it does.
    raise ValueError(f"no size rule for {scheme.label} on {fmt}")


def layer_bytes(layer: Layer, scheme: Scheme, fmt: str) -> int:
    bias = 4 * layer.out_features if layer.has_bias else 0
    return weight_bytes(layer, scheme, fmt) + bias


def plan_bytes(plan) -> dict[str, int]:
    """component -> bytes of its layers under the plan, plus its other parameters in float32."""
    out: dict[str, int] = {}
    for a in plan.assignments.values():
        out[a.layer.component] = out.get(a.layer.component, 0) + layer_bytes(a.layer, a.scheme, plan.fmt)
    for comp, count in plan.other.items():
        if comp in out:
            out[comp] += 4 * count
    return out


def average_bits(assignments: Mapping[str, Scheme], layers: Mapping[str, Layer], fmt: str) -> float:
    """Stored bits per weight over the given layers (scales included, biases not)."""
    total_bits = sum(8 * weight_bytes(layers[n], s, fmt) for n, s in assignments.items())
    total_w = sum(layers[n].numel for n in assignments)
    return total_bits / max(total_w, 1)
