"""Image helpers shared by the reference sampler's CLI and the runtime (numpy + Pillow, no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 [H, W, 3] image atomically (temp file + rename)."""
    from PIL import Image

    path = Path(path)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images of the same shape (inf when equal)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)
