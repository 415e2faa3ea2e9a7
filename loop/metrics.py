"""Every error metric hartkit reports, in numpy (float64 accumulation; no torch).

Export parity, quantization, bundle verification, the runtime's self-check, ``hartkit validate``,
``hartkit bench`` and the demo model's training all compare arrays; they import the formulas from
here so that a number means the same thing wherever it is printed.

Tensors:  ``max_abs_err``, ``cosine`` (of the flattened arrays), ``snr_db`` (signal = reference),
          ``nmse`` (noise over signal power, pooled over several arrays).
Logits:   ``kl_divergence`` KL(P_ref || P_cand) of the softmaxes, ``top1_agreement``, ``topk_overlap``.
Tokens:   ``token_agreement`` (share of equal indices), ``first_divergent_stage``.
Images:   ``psnr`` (peak 255), ``pooled_psnr`` (over runs), ``ssim`` (Wang et al. 2004, gaussian window).
JSON:     ``finite_or_none`` spells the infinities these return.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["max_abs_err", "cosine", "snr_db", "nmse", "log_softmax", "kl_divergence", "top1_agreement",
           "topk_overlap", "topk_overlaps", "token_agreement", "first_divergent_stage", "psnr", "psnr_from_mse",
           "pooled_psnr", "ssim", "finite_or_none"]

# SSIM constants of Wang, Bovik, Sheikh & Simoncelli (2004), as in scikit-image's
# ``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): the window skimage's gaussian filter truncates to (11 taps)
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_shapes(ref: np.ndarray, got: np.ndarray) -> None:
    if ref.shape != got.shape:
        raise ValueError(f"shape mismatch: {ref.shape} vs {got.shape}")


# ----------------------------------------------------------------------------- tensors


def max_abs_err(ref: np.ndarray, got: np.ndarray) -> float:
    _check_shapes(ref, got)
    return float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max(initial=0.0))


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays; 1.0 when both are all zeros, 0.0 when only one is."""
    _check_shapes(ref, got)
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-noise ratio of ``got`` against ``ref`` in dB (inf when equal, -inf for a zero signal)."""
    ref64, got64 = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    noise = float(np.sum((ref64 - got64) ** 2))
    signal = float(np.sum(ref64**2))
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def nmse(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """Noise power over signal power, each summed over every pair of arrays (0 when equal, inf for a
    zero signal): one number for a graph's outputs over several calls, comparable across graphs."""
    noise = sum(float(np.sum((r.astype(np.float64) - g.astype(np.float64)) ** 2)) for r, g in zip(ref, got))
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    return noise / signal if signal > 0 else (0.0 if noise == 0 else math.inf)


# ----------------------------------------------------------------------------- logits and tokens


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, got_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) in nats over the last axis, one value per position."""
    _check_shapes(ref_logits, got_logits)
    lp, lq = log_softmax(ref_logits), log_softmax(got_logits)
    # Clip tiny negatives from rounding: KL is >= 0 by definition.
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def top1_agreement(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    _check_shapes(ref_logits, got_logits)
    return float(np.mean(np.argmax(ref_logits, axis=-1) == np.argmax(got_logits, axis=-1)))


def topk_overlaps(ref_logits: np.ndarray, got_logits: np.ndarray, k: int) -> np.ndarray:
    """``|topk(ref) ∩ topk(got)| / k`` per position, flattened (k is capped at the vocabulary size)."""
    _check_shapes(ref_logits, got_logits)
    V = ref_logits.shape[-1]
    k = max(1, min(int(k), V))
    a = np.argpartition(-ref_logits.reshape(-1, V), k - 1, axis=-1)[:, :k]
    b = np.argpartition(-got_logits.reshape(-1, V), k - 1, axis=-1)[:, :k]
    return np.array([len(np.intersect1d(x, y, assume_unique=True)) / k for x, y in zip(a, b)], dtype=np.float64)


def topk_overlap(ref_logits: np.ndarray, got_logits: np.ndarray, k: int) -> float:
    """Mean over positions of ``|topk(ref) ∩ topk(got)| / k``."""
    return float(topk_overlaps(ref_logits, got_logits, k).mean())


def token_agreement(ref_tokens: np.ndarray, got_tokens: np.ndarray) -> float:
    _check_shapes(np.asarray(ref_tokens), np.asarray(got_tokens))
    return float(np.mean(np.asarray(ref_tokens) == np.asarray(got_tokens)))


def first_divergent_stage(ref_tokens: Sequence[np.ndarray], got_tokens: Sequence[np.ndarray]) -> int | None:
    """Index of the first stage whose sampled tokens differ anywhere; None when all stages agree."""
    for si, (a, b) in enumerate(zip(ref_tokens, got_tokens)):
        if not np.array_equal(a, b):
            return si
    return None


# ----------------------------------------------------------------------------- images


def psnr_from_mse(mse: float, peak: float = 255.0) -> float:
    """PSNR in dB of a mean squared error at ``peak`` (inf for no error). The training loop feeds it
    a torch MSE, so the formula exists once for arrays and tensors alike."""
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images of the same shape (inf when equal)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return psnr_from_mse(float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)), peak)


def pooled_psnr(values: Sequence[float | None]) -> float | None:
    """PSNR of the mean squared error over runs, from per-run PSNRs (the peak cancels). A plain mean
    of PSNRs is inf as soon as one image is identical (inf dB), hiding the runs that differ; this is
    inf only when every image is identical."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    mse = float(np.mean([0.0 if math.isinf(v) else 10.0 ** (-v / 10.0) for v in vals]))
    return math.inf if mse == 0.0 else -10.0 * math.log10(mse)


def _gaussian_taps(radius: int, sigma: float) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a [H, W] array: only windows that lie inside the image."""
    r = len(taps) - 1
    rows = sum(taps[i] * img[i : img.shape[0] - r + i, :] for i in range(len(taps)))
    return sum(taps[j] * rows[:, j : rows.shape[1] - r + j] for j in range(len(taps)))


def ssim(ref: np.ndarray, got: np.ndarray, data_range: float = 255.0) -> float:
    """Mean structural similarity of two images ``[H, W]`` or ``[H, W, C]`` (channels averaged).

    The standard gaussian SSIM (sigma 1.5, 11x11 window, K1 0.01, K2 0.03, population covariances),
    averaged over the windows that fit inside the image — the numbers scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=255, channel_axis=-1)`` gives. Written here in numpy because scikit-image is not a
    dependency of hartkit (nor installed in its environment), and 40 lines do not justify one.
    Images smaller than the window use the largest odd window that fits.
    """
    _check_shapes(ref, got)
    a, b = ref.astype(np.float64), got.astype(np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image [H, W] or [H, W, C], got shape {ref.shape}")
    radius = min(SSIM_RADIUS, (min(a.shape[0], a.shape[1]) - 1) // 2)
    taps = _gaussian_taps(radius, SSIM_SIGMA)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    scores = []
    for c in range(a.shape[2]):
        x, y = a[..., c], b[..., c]
        mx, my = _filter_valid(x, taps), _filter_valid(y, taps)
        vx = _filter_valid(x * x, taps) - mx * mx
        vy = _filter_valid(y * y, taps) - my * my
        cxy = _filter_valid(x * y, taps) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        scores.append(float(s.mean()))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- JSON


def finite_or_none(value: float | None) -> float | str | None:
    """JSON has no inf/nan: keep finite floats, spell the others as strings ("inf", "-inf", "nan")."""
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
