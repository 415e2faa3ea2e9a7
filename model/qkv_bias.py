"""The AR attention's qkv bias as one constant parameter, for exporters and quantizers that need it so.

Upstream's attention builds its qkv bias in forward, ``torch.cat((q_bias, zero_k_bias, v_bias))`` (no
k bias); folding computes it once and keeps the same values.
"""

from __future__ import annotations

import types
from typing import Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class _ConstantQKVBias(TorchFunctionMode):
    """Inside one AR attention's forward: ``torch.cat((q_bias, zero_k_bias, v_bias))`` -> a parameter.

    XNNPACK delegates a linear only when its bias is a constant; the AR attention builds its qkv
    bias with a ``cat`` in forward (upstream's layout: no k bias), which would leave every qkv
    projection outside the delegate: in fp32 a slow portable addmm per block; quantized, torchao's
    quantize ops with no out-variants (the program does not load). Same values, computed once."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        a = self.attn
        if func is torch.cat and args and isinstance(args[0], (list, tuple)) and len(args[0]) == 3 \
                and args[0][0] is a.q_bias and args[0][1] is a.zero_k_bias and args[0][2] is a.v_bias:
            return a.qkv_bias_folded
        return func(*args, **kwargs)


def _folded_forward(self, *args, **kwargs):
    with _ConstantQKVBias(self):
        return type(self).forward(self, *args, **kwargs)


def fold_qkv_bias(root: nn.Module) -> list[nn.Module]:
    """Give every AR attention under ``root`` a precomputed qkv bias parameter (see
    :class:`_ConstantQKVBias`); attentions already folded are left alone. Returns those it folded.

    The new forward is a method bound to its module (not a closure over it), so a deep copy of a
    folded model computes with the copy's own weights."""
    folded = []
    for mod in root.modules():
        if not all(hasattr(mod, n) for n in ("q_bias", "zero_k_bias", "v_bias")) or hasattr(mod, "qkv_bias_folded"):
            continue
        with torch.no_grad():
            bias = torch.cat((mod.q_bias, mod.zero_k_bias, mod.v_bias)).detach().clone()
        mod.qkv_bias_folded = nn.Parameter(bias, requires_grad=False)
        mod.forward = types.MethodType(_folded_forward, mod)
        folded.append(mod)
    return folded


def unfold_qkv_bias(folded: Sequence[nn.Module]) -> None:
    """Undo :func:`fold_qkv_bias` (the exporter folds the caller's model only while it traces)."""
    for mod in folded:
        del mod.qkv_bias_folded
        del mod.forward
