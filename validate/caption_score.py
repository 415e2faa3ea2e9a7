"""Does an image show what its caption says? A pixel-level judge for :mod:`hartkit.validate.scenes`.

Our stand-in for a CLIP score on the demo model's world. It reads the image directly:

1. every pixel gets the nearest palette colour, or "unsure" when it is farther than
   :data:`COLOR_TOLERANCE` from all of them (blended edges, noise);
2. the **background** is the most common colour of the 2-pixel border;
3. every other colour covering at least :data:`MIN_AREA` pixels (after a 3x3 opening that drops
   specks) is an **object**; its largest 4-connected component is the object itself;
4. its **shape** is the template (circle, square, apex-up triangle, drawn in the component's
   bounding box) with the best IoU;
5. a **relation** holds when the centroids are displaced the right way along the relation's axis,
   by more than :data:`MIN_OFFSET` pixels and by more than across it.

Per image and caption it checks: ``background``; ``color`` (every named colour is there); ``shape``
(each named colour has the named shape); ``relation`` (two-shape captions only); ``count`` (no
colour blob beyond the named ones). The caption is right when every check passes. Numpy only.

Chance level: a caption is right for an image exactly when the two describe the same layout, so
for image and caption drawn independently from the generator it is ``sum_k p(k)^2`` over layouts
k (:func:`chance_level`): 0.29 % for the default mix. :func:`chance_level` also gives each check's
chance rate, computed symbolically from the same rules on random (caption, scene) pairs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from hartkit.validate import scenes
from hartkit.validate.scenes import PALETTE, SceneSpec, parse_caption, shape_mask

COLOR_TOLERANCE = 70.0  # max RGB distance to a palette colour (closest palette pair: 150 apart)
MIN_AREA = 30  # pixels; the smallest true shape (a triangle of size 18) covers ~160
MIN_OFFSET = 4.0  # pixels along the relation's axis
BORDER = 2
ATTRIBUTES = ("background", "color", "shape", "relation", "count")

_NAMES = list(PALETTE)
_RGB = np.asarray([PALETTE[c] for c in _NAMES], dtype=np.float32)


@dataclass
class DetectedObject:
    color: str
    area: int  # pixels of the colour (after the opening)
    centroid: tuple[float, float]  # (x, y) of the largest component
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive) of the largest component
    shape: str
    shape_iou: dict[str, float]


@dataclass
class Detection:
    background: str | None
    objects: dict[str, DetectedObject] = field(default_factory=dict)


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Palette index per pixel, -1 where no palette colour is within :data:`COLOR_TOLERANCE`."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
    dist = np.sqrt(((img[:, :, None, :] - _RGB[None, None]) ** 2).sum(-1))  # [H, W, K]
    label = dist.argmin(-1)
    return np.where(dist.min(-1) <= COLOR_TOLERANCE, label, -1)


def _shift_and(mask: np.ndarray) -> np.ndarray:
    """3x3 erosion (outside the image counts as set, so shapes touching the edge survive)."""
    p = np.pad(mask, 1, constant_values=True)
    out = np.ones_like(mask)
    h, w = mask.shape
    for dy in range(3):
        for dx in range(3):
            out &= p[dy : dy + h, dx : dx + w]
    return out


def _shift_or(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation."""
    p = np.pad(mask, 1, constant_values=False)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(3):
        for dx in range(3):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (flood fill; masks are small)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, comp = [(int(y0), int(x0))], []
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def classify_shape(component: np.ndarray) -> tuple[str, dict[str, float]]:
    """Best-IoU template among the scene shapes, each drawn to fill the component's bounding box."""
    ys, xs = np.nonzero(component)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    center = ((x0 + x1 + 1) / 2.0, (y0 + y1 + 1) / 2.0)
    size = ((x1 - x0 + 1) + (y1 - y0 + 1)) / 2.0
    h = component.shape[0]
    ious = {}
    for shape in scenes.SHAPES:
        template = shape_mask(shape, center, size, image_size=h) >= 0.5
        inter = np.logical_and(template, component).sum()
        union = np.logical_or(template, component).sum()
        ious[shape] = float(inter / union) if union else 0.0
    return max(ious, key=ious.get), ious


def detect(image: np.ndarray) -> Detection:
    """Background colour and coloured objects of an image (uint8 [H, W, 3], square)."""
    labels = classify_pixels(image)
    h, w = labels.shape
    if h != w:
        raise ValueError(f"expected a square image, got {h}x{w}")
    ring = np.ones((h, w), dtype=bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    border = labels[ring]
    border = border[border >= 0]
    if border.size == 0:
        return Detection(None)
    bg_index = Counter(border.tolist()).most_common(1)[0][0]
    det = Detection(_NAMES[bg_index])
    for k, name in enumerate(_NAMES):
        if k == bg_index:
            continue
        mask = _shift_or(_shift_and(labels == k))
        area = int(mask.sum())
        if area < MIN_AREA:
            continue
        comp = largest_component(mask)
        ys, xs = np.nonzero(comp)
        shape, ious = classify_shape(comp)
        det.objects[name] = DetectedObject(
            color=name, area=area, centroid=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
            bbox=(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), shape=shape, shape_iou=ious,
        )
    return det


def relation_holds(relation: str, first: tuple[float, float], second: tuple[float, float]) -> bool:
    """``first`` (x, y) is ``relation`` ``second``: right direction, beyond MIN_OFFSET, and more
    along the axis than across it."""
    dx, dy = second[0] - first[0], second[1] - first[1]  # image y grows downwards
    along, across = {
        "above": (dy, dx), "below": (-dy, dx), "to the left of": (dx, dy), "to the right of": (-dx, dy),
    }[relation]
    return along > MIN_OFFSET and along > abs(across)


def score_detection(det: Detection, spec: SceneSpec) -> dict[str, bool | None]:
    """The checks of one caption against one detection; ``relation`` is None for one-shape captions."""
    named = [c for c, _ in spec.objects]
    present = [c in det.objects for c in named]
    result: dict[str, bool | None] = {
        "background": det.background == spec.background,
        "color": all(present),
        "shape": all(c in det.objects and det.objects[c].shape == s for c, s in spec.objects),
        "relation": None,
        "count": len(det.objects) == len(spec.objects),
    }
    if spec.relation is not None:
        (c1, _), (c2, _) = spec.objects
        result["relation"] = all(present) and relation_holds(
            spec.relation, det.objects[c1].centroid, det.objects[c2].centroid
        )
    result["caption"] = all(v for v in result.values() if v is not None)
    return result


def score(image: np.ndarray, caption: str | SceneSpec) -> dict[str, bool | None]:
    """Check one image against one caption (see the module docstring for the checks)."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    return score_detection(detect(image), spec)


@dataclass
class CaptionReport:
    n: int
    accuracy: float  # share of images whose caption is fully right
    per_attribute: dict[str, float]  # share right, over the images the check applies to
    chance: float  # the generator's chance level for the caption accuracy
    chance_per_attribute: dict[str, float]
    items: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"caption accuracy {100 * self.accuracy:.1f}% (chance {100 * self.chance:.2f}%) on {self.n} images"]
        for name in ATTRIBUTES:
            if name in self.per_attribute:
                parts.append(f"{name} {100 * self.per_attribute[name]:.1f}% "
                             f"(chance {100 * self.chance_per_attribute[name]:.1f}%)")
        return "; ".join(parts)


def evaluate(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> CaptionReport:
    """Caption accuracy and per-check accuracies of images against their captions."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if len(captions) == 0:
        raise ValueError("nothing to evaluate")
    items = []
    for image, caption in zip(images, captions):
        items.append({"caption": caption, **score(image, caption)})
    per_attribute = {}
    for name in ATTRIBUTES:
        values = [it[name] for it in items if it[name] is not None]
        if values:
            per_attribute[name] = float(np.mean(values))
    chance = chance_level()
    return CaptionReport(
        n=len(items), accuracy=float(np.mean([it["caption"] for it in items])), per_attribute=per_attribute,
        chance=chance["caption"], chance_per_attribute=chance, items=items,
    )


# ----------------------------------------------------------------------------- chance level


def _spec_probabilities(two_shape_prob: float) -> dict[SceneSpec, float]:
    """Probability of every caption under :func:`scenes.random_spec` with no split."""
    specs = scenes.all_specs()
    n_single = sum(len(s.objects) == 1 for s in specs)
    n_double = len(specs) - n_single
    return {s: ((1 - two_shape_prob) / n_single if len(s.objects) == 1 else two_shape_prob / n_double)
            for s in specs}


def symbolic_score(caption: SceneSpec, scene: SceneSpec) -> dict[str, bool | None]:
    """What :func:`score` gives, by the same rules, for a perfect rendering of ``scene``."""
    objects = {c: s for c, s in scene.objects}
    named = [c for c, _ in caption.objects]
    present = [c in objects for c in named]
    result: dict[str, bool | None] = {
        "background": caption.background == scene.background,
        "color": all(present),
        "shape": all(objects.get(c) == s for c, s in caption.objects),
        "relation": None,
        "count": len(scene.objects) == len(caption.objects),
    }
    if caption.relation is not None:
        ok = False
        if all(present) and scene.relation is not None:
            # scene.objects[0] is scene.relation of scene.objects[1]
            (sa, _), (sb, _) = scene.objects
            mirrored = {"above": "below", "below": "above", "to the left of": "to the right of",
                        "to the right of": "to the left of"}
            (c1, _), (c2, _) = caption.objects
            if (c1, c2) == (sa, sb):
                ok = caption.relation == scene.relation
            elif (c1, c2) == (sb, sa):
                ok = caption.relation == mirrored[scene.relation]
        result["relation"] = ok
    result["caption"] = all(v for v in result.values() if v is not None)
    return result


_CHANCE_CACHE: dict[float, dict[str, float]] = {}


def chance_level(two_shape_prob: float = scenes.TWO_SHAPE_PROB) -> dict[str, float]:
    """Chance rate of each check and of the whole caption, for caption and scene drawn independently
    from the generator (no split). Caption: exact, ``sum_k p(k)^2`` over layouts; checks: exact
    expectation over caption kinds x a fixed sample of 20000 scenes."""
    if two_shape_prob in _CHANCE_CACHE:
        return dict(_CHANCE_CACHE[two_shape_prob])
    probs = _spec_probabilities(two_shape_prob)
    layout_p: dict[str, float] = {}
    for spec, p in probs.items():
        layout_p[spec.layout_key()] = layout_p.get(spec.layout_key(), 0.0) + p
    out = {"caption": float(sum(p * p for p in layout_p.values()))}
    rng = np.random.default_rng(12345)
    specs = list(probs)
    weights = np.asarray([probs[s] for s in specs])
    cap_idx = rng.choice(len(specs), size=20000, p=weights)
    scene_idx = rng.choice(len(specs), size=20000, p=weights)
    sums: dict[str, list[float]] = {name: [] for name in ATTRIBUTES}
    for i, j in zip(cap_idx, scene_idx):
        r = symbolic_score(specs[i], specs[j])
        for name in ATTRIBUTES:
            if r[name] is not None:
                sums[name].append(float(r[name]))
    for name in ATTRIBUTES:
        out[name] = float(np.mean(sums[name]))
    _CHANCE_CACHE[two_shape_prob] = out
    return dict(out)


__all__ = [
    "COLOR_TOLERANCE", "MIN_AREA", "MIN_OFFSET", "ATTRIBUTES", "DetectedObject", "Detection", "classify_pixels",
    "largest_component", "classify_shape", "detect", "relation_holds", "score_detection", "score",
    "CaptionReport", "evaluate", "symbolic_score", "chance_level",
]
