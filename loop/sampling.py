"""Host-side sampling math in numpy (fp32), the staged loop's twin of ``hartkit.model.sampler``.

Same operations in the same order as the torch reference: CFG mix, top-k (ties survive) and optional
top-p masking, ``argmax(softmax / E)`` for the hard index, and the Gumbel-softmax mixture of codebook
rows over the masked logits for ``more_smooth``. Kept in numpy, not in a graph, because it consumes
the portable RNG's draws and because -inf masks and large TopK are fragile in fp16 graph backends.
"""

from __future__ import annotations

import numpy as np

from hartkit.loop.plan import Stage


def cfg_mix(logits: np.ndarray, t: float) -> np.ndarray:
    """``[2B, n, V]`` rows [cond; uncond] -> ``(1 + t) * cond - t * uncond``."""
    b = logits.shape[0] // 2
    return ((1 + t) * logits[:b] - t * logits[b:]).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return (e / np.sum(e, axis=-1, keepdims=True)).astype(np.float32)


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Entries below the k-th largest logit (and, with top_p > 0, in the low tail) become -inf."""
    out = logits.astype(np.float32, copy=True)
    V = out.shape[-1]
    if 0 < top_k < V:
        kth = np.partition(out, V - top_k, axis=-1)[..., V - top_k : V - top_k + 1]
        out[out < kth] = -np.inf
    if top_p > 0:
        order = np.argsort(out, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(out, order, axis=-1)
        remove_sorted = np.cumsum(softmax(sorted_logits), axis=-1) <= (1 - top_p)
        remove_sorted[..., -1] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        out[remove] = -np.inf
    return out


def sample_stage(
    logits: np.ndarray,
    stage: Stage,
    codebook: np.ndarray,
    exp_sample: np.ndarray,
    exp_gumbel: np.ndarray | None,
    top_p: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """CFG-mixed logits ``[B,n,V]`` -> (hard indices ``[B,n]``, latents ``[B,n,Cvae]``)."""
    masked = filter_top_k_top_p(logits, stage.top_k, top_p)
    probs = softmax(masked)
    idx = np.argmax(probs / exp_sample, axis=-1)
    if exp_gumbel is None:
        return idx, codebook[idx]
    gumbel = -np.log(exp_gumbel)
    y = softmax((masked * np.float32(stage.logit_scale) + gumbel) / np.float32(stage.gumbel_tau))
    return idx, (y @ codebook).astype(np.float32)
