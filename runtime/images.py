"""Image helpers shared by the reference sampler's CLI and the runtime (numpy + Pillow, no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 [H, W, 3] image atomically (temp file + rename)."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    return _write_png(Image.fromarray(image), path)


def _write_png(image, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG atomically (temp file + rename; a device or FIFO is written through)."""
    from hartkit.fsutil import atomic_file

    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def caption_grid(images: np.ndarray, captions: list[str], path: str | os.PathLike, cols: int = 5, scale: int = 2) -> Path:
    """A PNG grid: each image enlarged ``scale``x (nearest) above its wrapped caption."""
    import textwrap

    from PIL import Image, ImageDraw

    h, w = images.shape[1:3]
    wrapped = ["\n".join(textwrap.wrap(cap, 26)) for cap in captions]
    cell_w = max(w * scale, 150)
    text_h = 12 * max(t.count("\n") + 1 for t in wrapped) + 8
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell_w, rows * (h * scale + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, text) in enumerate(zip(images, wrapped)):
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w, r * (h * scale + text_h)
        big = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(big, (x0 + (cell_w - w * scale) // 2, y0))
        draw.multiline_text((x0 + 3, y0 + h * scale + 2), text, fill=(0, 0, 0), spacing=1)
    return _write_png(grid, path)
