"""Resampling of HART's latent maps as fixed matrices, and the phi schedule (torch-free).

HART's residual accumulation (spec §3.5) moves token maps between scales with two interpolations:

* ``F.interpolate(h, size=(64, 64), mode="bicubic")`` to bring a ``pn x pn`` map up to the last scale,
* ``F.interpolate(f_hat, size=(pn, pn), mode="area")`` to bring ``f_hat`` down to the next scale.

Both are separable linear maps with sizes fixed per stage, so each is ``M @ x @ M.T`` for one small
matrix ``M [out, in]``. Exporters need that form: Core ML has no bicubic resize, and ONNX cannot
express "area" (adaptive average pooling) when the sizes do not divide. The matrices here follow
PyTorch's CPU kernels (``upsample_bicubic2d`` without antialias, ``adaptive_avg_pool2d``), including
their index arithmetic, so they match ``F.interpolate`` to rounding.

The phi schedule lives here too: which of the K phi convs a stage uses is a float64 argmin that the
numpy runtime and the exporters must bake per stage exactly as upstream computes it (spec §8).
"""

from __future__ import annotations

import math

import numpy as np

# Keys' cubic-convolution constant used by PyTorch (and OpenCV) for mode="bicubic".
BICUBIC_A = -0.75


def _cubic_weights(t: float, a: float = BICUBIC_A) -> tuple[float, float, float, float]:
    """Weights of the 4 taps at offsets -1, 0, +1, +2 from floor(x), for fraction t in [0, 1].

    Written in the same nested form as PyTorch's ``get_cubic_upsample_coefficients`` so that the
    float64 values agree bit for bit (an expanded polynomial would differ in the last ulp).
    """
    x1 = t + 1.0
    w0 = ((a * x1 - 5.0 * a) * x1 + 8.0 * a) * x1 - 4.0 * a
    w1 = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    x2 = 1.0 - t
    w2 = ((a + 2.0) * x2 - (a + 3.0)) * x2 * x2 + 1.0
    x3 = x2 + 1.0
    w3 = ((a * x3 - 5.0 * a) * x3 + 8.0 * a) * x3 - 4.0 * a
    return w0, w1, w2, w3


def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """Row-stochastic ``[out_size, in_size]`` float64 matrix of torch's bicubic resize along one axis.

    Matches ``F.interpolate(mode="bicubic", align_corners=False, antialias=False)`` given ``size=``:
    half-pixel centres ``src = (in/out)·(i + 0.5) − 0.5``, A = −0.75, taps outside the input are
    clamped to the border (so their weight folds onto the edge pixel). Downsampling uses the same
    4 taps (no antialias), exactly as torch does. A 1-pixel input gives a column of ones (constant
    map); ``in == out`` gives the identity.
    """
    _check_sizes(out_size, in_size)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    scale = in_size / out_size  # torch: scales=None when size= is given -> in/out
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5  # not clamped at 0 for cubic (torch's cubic=True path)
        # torch's guard_index_and_lambda: floor, capped at the last pixel; fraction kept in [0, 1].
        base = min(math.floor(src), in_size - 1)
        t = min(max(src - base, 0.0), 1.0)
        for offset, w in zip((-1, 0, 1, 2), _cubic_weights(t)):
            j = min(max(base + offset, 0), in_size - 1)
            m[i, j] += w
    return m


def area_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``[out_size, in_size]`` float64 weights of adaptive average pooling along one axis.

    ``F.interpolate(mode="area")`` is ``adaptive_avg_pool2d``: output cell i averages the input
    range ``[floor(i·in/out), ceil((i+1)·in/out))``. The ranges overlap when the sizes do not divide
    (e.g. 64 -> 27), which is why this is not a plain strided pooling. Integer arithmetic, as torch.
    """
    _check_sizes(out_size, in_size)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = ((i + 1) * in_size + out_size - 1) // out_size
        m[i, start:end] = 1.0 / (end - start)
    return m


def resample_2d(x: np.ndarray, m: np.ndarray, m_w: np.ndarray | None = None) -> np.ndarray:
    """Apply a separable resize over the last two axes: ``M · x · Mᵀ`` (height, then width).

    ``m`` is ``[out_h, in_h]``; ``m_w`` (``[out_w, in_w]``) defaults to ``m`` for square maps.
    The result has x's dtype when x is floating point (matrices are cast down, not x up).
    """
    m_w = m if m_w is None else m_w
    if x.ndim < 2 or x.shape[-2] != m.shape[1] or x.shape[-1] != m_w.shape[1]:
        raise ValueError(
            f"resample_2d: map of shape {x.shape} does not fit matrices {m.shape} and {m_w.shape}"
        )
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    mh = m.astype(dtype, copy=False)
    mw = m_w.astype(dtype, copy=False)
    return np.matmul(np.matmul(mh, x.astype(dtype, copy=False)), mw.T)


def _check_sizes(out_size: int, in_size: int) -> None:
    if int(out_size) != out_size or int(in_size) != in_size or out_size < 1 or in_size < 1:
        raise ValueError(f"sizes must be positive integers, got out={out_size!r}, in={in_size!r}")


# ----------------------------------------------------------------------------------------------
# phi schedule


def phi_ticks(num_phis: int) -> np.ndarray:
    """Upstream's tick positions of K phi convs on [0, 1] (``PhiPartiallyShared``/``PhiNonShared``).

    Quirk kept: K == 4 uses margins 1/(3K), any other K uses 1/(2K). Built with ``np.linspace`` and
    the same arguments, because the float64 values decide ties (spec §8).
    """
    k = int(num_phis)
    if k < 1:
        raise ValueError(f"num_phis must be >= 1, got {num_phis!r}")
    if k == 4:
        return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
    return np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


def phi_index(si: int, num_stages: int, num_phis: int) -> int:
    """Which of ``num_phis`` phi convs stage ``si`` (of ``num_stages`` scales) uses.

    Upstream: ``argmin(|ticks − si/(SN−1)|)`` in float64, first minimum on ties. Some stages sit
    exactly between two ticks in real arithmetic (5 scales stage 2; 10 scales stages 2 and 7), so
    only this exact expression picks the phi the weights were trained with. ``num_phis == 1`` is
    the fully shared variant (always 0).
    """
    if num_stages < 2:
        raise ValueError(f"num_stages must be >= 2 (upstream divides by SN-1), got {num_stages}")
    if not 0 <= si < num_stages:
        raise ValueError(f"stage {si} out of range for {num_stages} stages")
    if num_phis == 1:
        return 0
    at = si / (num_stages - 1)  # Python float division, as upstream's quant_resi[si / (SN - 1)]
    return int(np.argmin(np.abs(phi_ticks(num_phis) - at)).item())


__all__ = [
    "BICUBIC_A",
    "bicubic_matrix",
    "area_matrix",
    "resample_2d",
    "phi_ticks",
    "phi_index",
]
