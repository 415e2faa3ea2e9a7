"""Compute and size arithmetic from a config (hart-reference.md section 7), no torch.

MAC = multiply-add; FLOPs = 2 * MAC. Per layer and CFG row, a stage of ``l`` tokens attending to
``K`` keys costs ``l * (4 C^2 + m C H_mlp)`` MACs in the linear layers (qkv 3C^2 + proj C^2, and the MLP:
m = 3 matrices for llama's SwiGLU, 2 for gpt2) plus ``2 l K C`` in attention (QK^T and AV).
The AdaLN projections depend only on the prompt and belong to the ``condition`` graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from hartkit.loop.plan import stage_plan


@dataclass(frozen=True)
class StageCost:
    si: int
    tokens: int
    keys: int
    linear_macs: int
    attention_macs: int
    head_macs: int

    @property
    def macs(self) -> int:
        return self.linear_macs + self.attention_macs + self.head_macs

    @property
    def blocks_flops(self) -> int:
        return 2 * (self.linear_macs + self.attention_macs)


def ar_stage_costs(patch_nums: Sequence[int], context_tokens: int, embed_dim: int, depth: int, mlp_hidden: int,
                   vocab_size: int, mlp_type: str = "llama", rows: int = 2) -> list[StageCost]:
    """MACs of every AR stage for ``rows`` CFG rows (2 = one image with guidance)."""
    C = embed_dim
    mlp_mats = 3 if mlp_type == "llama" else 2
    out = []
    for st in stage_plan(patch_nums, context_tokens, vocab_size, cfg=1.0, num_phi=1):
        l, K = st.num_inputs, st.keys_after
        linear = rows * depth * l * (4 * C * C + mlp_mats * C * mlp_hidden)
        attention = rows * depth * 2 * l * K * C
        head = rows * st.num_sampled * C * vocab_size  # stage 0 runs the head on its last row only
        out.append(StageCost(st.si, l, K, linear, attention, head))
    return out


def ar_costs_from_config(cfg, vocab_size: int, rows: int = 2) -> list[StageCost]:
    return ar_stage_costs(cfg.patch_nums, cfg.context_token, cfg.embed_dim, cfg.depth, cfg.mlp_hidden, vocab_size,
                          cfg.mlp_type, rows)


def bit_limit_bytes(num_params: int, bits: float) -> float:
    """The information-theoretic floor of storing ``num_params`` weights at ``bits`` each."""
    return num_params * bits / 8.0


def kv_cache_bytes(patch_nums: Sequence[int], context_tokens: int, embed_dim: int, depth: int, bytes_per: int = 4,
                   rows: int = 2) -> int:
    """Peak KV cache: keys + values of every cached position (the final stage's are not kept)."""
    cached = context_tokens + sum(p * p for p in patch_nums[1:-1])
    return rows * depth * 2 * cached * embed_dim * bytes_per
