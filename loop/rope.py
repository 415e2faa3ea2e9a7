"""Rotary position tables of HART's llama-style attention, computed on the host (NumPy, no torch).

The exported graphs take ``cos``/``sin`` as inputs of shape ``[2B, l, head_dim]`` (float32), and the
transformer applies, to q and k of every head (after the optional L2 norm, before caching k)::

    q' = q * cos + rotate_half(q) * sin,    rotate_half(v) = cat(-v[d/2:], v[:d/2])

where ``rotate_half`` acts on the **full** head dim ``d``. Upstream (``basic_hart.py``, naive path,
``LlamaRotaryEmbedding1D`` / ``LlamaRotaryEmbedding`` / ``get_position_ids``; the fused kernels are
commented out) builds the tables as follows.

Positions
    * Stage 0 (the ``T`` context tokens): 1-D positions ``context_position_ids``. For the
      conditional rows they are ``cumsum(mask) - 1`` (pads after the prompt repeat ``n - 1``; with
      left padding the pads get ``-1``), for the unconditional rows they are all 0
      (``hart_transformer_t2i.py``: ``cat((pos, full_like(pos, 0)))``).
    * Stage ``si >= 1``, **including the final stage** (same code path, ``si = len(patch_nums) - 1``):
      token ``n = i * pn + j`` of the ``pn x pn`` map (raster order, i = row) sits at the 2-D
      coordinate ``(i / pn * last + P, j / pn * last + P)`` with ``last = patch_nums[-1]`` and
      ``P = context_position_ids[:, -1]`` per row (``n - 1`` for conditional rows, 0 for
      unconditional ones). Coordinates are fractional when ``pn`` does not divide ``last``
      (pn=3, last=64: 0, 21.333334, 42.666668). Upstream computes them in float32 exactly in this
      order (``int / pn`` then ``* last``, then ``+ P``), and so do we.

Angles (all float32 as upstream, which disables autocast here)
    * 1-D: ``w_f = 1 / theta ** (2f / d)``, f < d/2, and ``angle[n, k] = pos_n * w_{k mod d/2}``
      (``emb = cat(freqs, freqs)``).
    * 2-D: ``w_f = 1 / theta ** (4f / d)``, f < d/4 (stride 4, still normalised by d), and
      ``angle[n, k] = coord[n, c] * w_{k mod d/4}`` with ``c = k // (d/2)`` (c=0: row, c=1: column).
      Quirk, reproduced on purpose: with the full-dim ``rotate_half`` the pair (k, k + d/2) mixes a
      row angle with a column angle of the same frequency, so the map is not a rotation.

Precision: each float32 step of upstream (exponent, power, reciprocal, product, cos/sin) is done
here in float64 and rounded to float32, i.e. correctly rounded; torch's float32 ``pow``/``cos``
agree to within one float32 ulp.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hartkit.errors import UsageError

__all__ = [
    "ROPE_THETA",
    "describe_rope",
    "context_positions",
    "stage_positions",
    "inv_freq",
    "rope_cos_sin_1d",
    "rope_cos_sin_2d",
]


ROPE_THETA = 10000.0  # upstream's LlamaRotaryEmbedding base for the AR transformer (HART never changes it)


def describe_rope(theta: float = ROPE_THETA) -> dict:
    """The rule above as data, for bundle manifests (``loop.rope``): what a port needs to build cos/sin."""
    return {
        "theta": float(theta),
        "apply": "q' = q*cos + rotate_half(q)*sin on q and k of every head, rotate_half(v) = cat(-v[d/2:], v[:d/2]) "
                 "over the full head_dim d; cos/sin inputs are float32 [2, l, d] (rows: cond, uncond)",
        "positions_stage0": "cond row: cumsum(mask) - 1 over the T context tokens; uncond row: all 0",
        "positions_stage": "stage si >= 1 (final included): token n = i*pn + j at (row, col) = "
                           "(float32(float32(i/pn) * last) + P, float32(float32(j/pn) * last) + P), "
                           "last = patch_nums[-1], P = that row's last stage-0 position (float32)",
        "inv_freq": "w_f = float32(1 / float32(theta ** float32(f*stride/d))) for f < d/stride; stride 2 (1-D), 4 (2-D)",
        "angles_1d": "angle[k] = float32(pos * w_(k mod d/2)), channels [w, w]",
        "angles_2d": "channels [row*w, row*w, col*w, col*w], each d/4 wide, each product float32",
        "tables": "cos = float32(cos(angle)), sin = float32(sin(angle)) with angle taken as a double",
    }


def context_positions(context_mask: np.ndarray) -> np.ndarray:
    """Stage-0 position ids for both CFG halves: ``[B, T]`` mask -> int64 ``[2B, T]``.

    Rows ``[:B]`` (conditional) are ``cumsum(mask) - 1``; rows ``[B:]`` (unconditional) are 0.
    """
    mask = np.asarray(context_mask)
    if mask.ndim != 2:
        raise UsageError(f"context_mask must be [B, T], got shape {mask.shape}")
    cond = np.cumsum(mask.astype(bool), axis=1, dtype=np.int64) - 1
    return np.concatenate([cond, np.zeros_like(cond)], axis=0)


def stage_positions(patch_nums: Sequence[int], si: int, offsets: np.ndarray) -> np.ndarray:
    """2-D coordinates of the tokens fed at stage ``si`` (1 <= si <= len(patch_nums) - 1).

    Returns float32 ``[2B, pn*pn, 2]`` with ``[..., 0] = i / pn * last + P`` (row) and
    ``[..., 1] = j / pn * last + P`` (column), ``P = offsets`` (one per row, normally
    ``context_positions(mask)[:, -1]``).
    """
    patch_nums = tuple(int(p) for p in patch_nums)
    if not 1 <= si < len(patch_nums):
        raise UsageError(f"stage {si} has no 2-D positions (valid: 1..{len(patch_nums) - 1})")
    offsets = np.asarray(offsets)
    if offsets.ndim != 1:
        raise UsageError(f"offsets must be 1-D [2B], got shape {offsets.shape}")
    pn, last = patch_nums[si], patch_nums[-1]
    # float32 like torch's `int_tensor / pn * last` (true division promotes to float32).
    axis = (np.arange(pn, dtype=np.float32) / np.float32(pn)) * np.float32(last)
    rows, cols = np.meshgrid(axis, axis, indexing="ij")
    coords = np.stack([rows, cols], axis=-1).reshape(pn * pn, 2)
    return (coords[None] + offsets.astype(np.float32)[:, None, None]).astype(np.float32)


def inv_freq(head_dim: int, stride: int, theta: float = ROPE_THETA) -> np.ndarray:
    """``1 / theta ** (arange(0, d, stride) / d)`` in float32, each step rounded as upstream."""
    if head_dim % stride:
        raise UsageError(f"head_dim {head_dim} must be a multiple of {stride}")
    exponent = np.arange(0, head_dim, stride, dtype=np.float32) / np.float32(head_dim)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return (1.0 / power.astype(np.float64)).astype(np.float32)


def _cos_sin(angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = angle.astype(np.float64)
    return np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)


def rope_cos_sin_1d(
    positions: np.ndarray, head_dim: int, theta: float = ROPE_THETA
) -> tuple[np.ndarray, np.ndarray]:
    """1-D tables for ``[N, l]`` positions -> float32 ``cos, sin`` of shape ``[N, l, head_dim]``."""
    pos = np.asarray(positions)
    if pos.ndim != 2:
        raise UsageError(f"positions must be [N, l], got shape {pos.shape}")
    freqs = inv_freq(head_dim, 2, theta)  # [d/2]
    # One float32 product per entry, as upstream's K=1 matmul.
    half = pos.astype(np.float32)[..., None] * freqs  # [N, l, d/2]
    return _cos_sin(np.concatenate([half, half], axis=-1))


def rope_cos_sin_2d(
    coords: np.ndarray, head_dim: int, theta: float = ROPE_THETA
) -> tuple[np.ndarray, np.ndarray]:
    """2-D tables for ``[N, l, 2]`` coordinates -> float32 ``cos, sin`` of shape ``[N, l, head_dim]``."""
    xy = np.asarray(coords)
    if xy.ndim != 3 or xy.shape[-1] != 2:
        raise UsageError(f"coords must be [N, l, 2], got shape {xy.shape}")
    freqs = inv_freq(head_dim, 4, theta)  # [d/4]
    xy = xy.astype(np.float32)
    # Channel layout: [row-angles, row-angles, col-angles, col-angles], each block d/4 wide.
    row = xy[..., 0:1] * freqs
    col = xy[..., 1:2] * freqs
    return _cos_sin(np.concatenate([row, row, col, col], axis=-1))
