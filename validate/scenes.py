"""A procedural text-image dataset: coloured shapes on a coloured background, with captions.

The demo model (``assets/demo``) is trained on it, and :mod:`hartkit.validate.caption_score` checks
generated images against their captions with the same geometry. Everything here is deterministic
for a seed, needs no download and imports without torch (numpy only).

A scene is a 64x64 background of one colour with one shape, or two shapes in a spatial relation::

    "a red circle on a yellow background"
    "a red circle above a blue square on a yellow background"

Vocabulary (kept small so that a tiny model learns it on a CPU): 6 colours, 3 shapes, 4 relations;
the background and the shapes always have pairwise different colours. That gives 90 one-shape and
4320 two-shape captions (4410 in all).

Held-out split: a scene's *layout* (background, and the shapes in reading order along the relation's
axis: "A above B" and "B below A" are one layout) is hashed with CRC-32; one layout in
:data:`TEST_FRACTION_DENOMINATOR` goes to ``split="test"``. Training never sees a test caption, not
even as its mirrored wording.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

IMAGE_SIZE = 64

# Six well separated colours (RGB). Names are the caption words.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")
SPLITS = ("train", "test")
TEST_FRACTION_DENOMINATOR = 8  # one layout in 8 is held out
TWO_SHAPE_PROB = 0.5  # share of two-shape scenes in sampled datasets

_CAPTION_RE = re.compile(
    r"^a (?P<c1>\w+) (?P<s1>\w+)"
    r"(?: (?P<rel>above|below|to the left of|to the right of) a (?P<c2>\w+) (?P<s2>\w+))?"
    r" on a (?P<bg>\w+) background$"
)


@dataclass(frozen=True)
class SceneSpec:
    """What a caption says: background colour, 1 or 2 (colour, shape) objects, and a relation."""

    background: str
    objects: tuple[tuple[str, str], ...]  # ((colour, shape), ...) in caption order
    relation: str | None = None  # relation of objects[0] to objects[1]

    def caption(self) -> str:
        (c1, s1), *rest = self.objects
        if not rest:
            return f"a {c1} {s1} on a {self.background} background"
        c2, s2 = rest[0]
        return f"a {c1} {s1} {self.relation} a {c2} {s2} on a {self.background} background"

    def layout_key(self) -> str:
        """The caption's meaning, independent of wording: mirrored relations give the same key."""
        if len(self.objects) == 1:
            (c1, s1), = self.objects
            return f"{self.background}|{c1} {s1}"
        first, second = self.objects
        if self.relation in ("below", "to the right of"):  # B below A == A above B
            first, second = second, first
        axis = "vertical" if self.relation in ("above", "below") else "horizontal"
        return f"{self.background}|{axis}|{first[0]} {first[1]}|{second[0]} {second[1]}"

    @property
    def split(self) -> str:
        crc = zlib.crc32(self.layout_key().encode("utf-8"))
        return "test" if crc % TEST_FRACTION_DENOMINATOR == 0 else "train"

    def validate(self) -> None:
        colours = [self.background] + [c for c, _ in self.objects]
        if any(c not in PALETTE for c in colours):
            raise ValueError(f"unknown colour in {colours}; choose from {COLORS}")
        if len(set(colours)) != len(colours):
            raise ValueError(f"background and shapes must have different colours, got {colours}")
        if any(s not in SHAPES for _, s in self.objects):
            raise ValueError(f"unknown shape in {self.objects}; choose from {SHAPES}")
        if len(self.objects) not in (1, 2):
            raise ValueError("a scene has one or two shapes")
        if (len(self.objects) == 2) != (self.relation is not None) or (
            self.relation is not None and self.relation not in RELATIONS
        ):
            raise ValueError(f"two shapes need one relation from {RELATIONS}, got {self.relation!r}")


def parse_caption(caption: str) -> SceneSpec:
    """Caption -> :class:`SceneSpec`; ``ValueError`` if it is not in the generator's grammar."""
    m = _CAPTION_RE.match(caption.strip().lower())
    if m is None:
        raise ValueError(f"not a scene caption: {caption!r}")
    objects = [(m["c1"], m["s1"])]
    if m["rel"]:
        objects.append((m["c2"], m["s2"]))
    spec = SceneSpec(m["bg"], tuple(objects), m["rel"])
    spec.validate()
    return spec


def all_specs() -> list[SceneSpec]:
    """Every caption of the grammar, in a fixed order."""
    specs = []
    for bg in COLORS:
        for c1 in COLORS:
            if c1 == bg:
                continue
            for s1 in SHAPES:
                specs.append(SceneSpec(bg, ((c1, s1),)))
    for bg in COLORS:
        for c1 in COLORS:
            for c2 in COLORS:
                if len({bg, c1, c2}) < 3:
                    continue
                for s1 in SHAPES:
                    for s2 in SHAPES:
                        for rel in RELATIONS:
                            specs.append(SceneSpec(bg, ((c1, s1), (c2, s2)), rel))
    return specs


def specs_of_split(split: str) -> list[SceneSpec]:
    _check_split(split)
    return [s for s in all_specs() if s.split == split]


# ----------------------------------------------------------------------------- geometry


def shape_mask(shape: str, center: tuple[float, float], size: float, image_size: int = IMAGE_SIZE,
               supersample: int = 1) -> np.ndarray:
    """Coverage in [0, 1] of a shape over the pixels (float32 [H, W]); ``supersample`` > 1 antialiases.

    ``center`` is (x, y) in pixels, ``size`` the side of the shape's bounding box. The triangle is
    isosceles, apex up, its base the bottom of the box; the circle's diameter is ``size``.
    """
    n = image_size * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords, indexing="xy")
    cx, cy = center
    half = size / 2.0
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        top, bottom = cy - half, cy + half
        frac = (y - top) / size  # 0 at the apex, 1 at the base
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= frac * half)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cover = inside.astype(np.float32)
    if supersample > 1:
        cover = cover.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))
    return cover


def render(background: str, objects: Sequence[tuple[str, str, tuple[float, float], float]],
           image_size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """Paint ``objects`` = [(colour, shape, (cx, cy), size), ...] in order; uint8 [H, W, 3]."""
    img = np.empty((image_size, image_size, 3), dtype=np.float32)
    img[:] = PALETTE[background]
    for colour, shape, center, size in objects:
        cover = shape_mask(shape, center, size, image_size, supersample)[..., None]
        img = img * (1.0 - cover) + np.asarray(PALETTE[colour], dtype=np.float32) * cover
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _layout(spec: SceneSpec, rng: np.random.Generator, image_size: int) -> list[tuple[str, str, tuple[float, float], float]]:
    """Random positions and sizes that make the caption true (sizes and offsets scale with the image)."""
    k = image_size / 64.0
    if len(spec.objects) == 1:
        (colour, shape), = spec.objects
        size = rng.uniform(26, 34) * k
        center = (32 * k + rng.uniform(-6, 6) * k, 32 * k + rng.uniform(-6, 6) * k)
        return [(colour, shape, center, size)]
    (c1, s1), (c2, s2) = spec.objects
    sizes = rng.uniform(18, 24, size=2) * k
    near, far = 18 * k, 46 * k  # the two halves' centres along the relation's axis
    along = rng.uniform(-3, 3, size=2) * k
    across = 32 * k + rng.uniform(-8, 8, size=2) * k
    first_along = near if spec.relation in ("above", "to the left of") else far
    second_along = far if first_along == near else near
    pos1 = (first_along + along[0], across[0])
    pos2 = (second_along + along[1], across[1])
    if spec.relation in ("above", "below"):  # along = y
        centers = [(pos1[1], pos1[0]), (pos2[1], pos2[0])]
    else:  # along = x
        centers = [pos1, pos2]
    return [(c1, s1, centers[0], sizes[0]), (c2, s2, centers[1], sizes[1])]


# ----------------------------------------------------------------------------- sampling


def _rng(rng_or_seed: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")


def random_spec(rng: np.random.Generator, split: str | None = None,
                two_shape_prob: float = TWO_SHAPE_PROB) -> SceneSpec:
    """A random caption, drawn until it falls into ``split`` (None: any)."""
    _check_split(split)
    while True:
        colours = [COLORS[i] for i in rng.permutation(len(COLORS))[:3]]
        two = rng.random() < two_shape_prob
        shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=2)]
        if two:
            relation = RELATIONS[int(rng.integers(0, len(RELATIONS)))]
            spec = SceneSpec(colours[0], ((colours[1], shapes[0]), (colours[2], shapes[1])), relation)
        else:
            spec = SceneSpec(colours[0], ((colours[1], shapes[0]),))
        if split is None or spec.split == split:
            return spec


def make_scene(rng_or_seed: np.random.Generator | int | None = None, *, split: str | None = "train",
               spec: SceneSpec | str | None = None, image_size: int = IMAGE_SIZE,
               two_shape_prob: float = TWO_SHAPE_PROB) -> tuple[np.ndarray, str, dict]:
    """One scene: ``(image uint8 [H, W, 3], caption, attributes)``.

    ``spec`` (a :class:`SceneSpec` or a caption) fixes what is drawn; otherwise a random caption of
    ``split`` is drawn. Positions and sizes are random either way. ``attributes`` holds the
    background, the objects (colour, shape, centre (x, y), size) and the relation.
    """
    rng = _rng(rng_or_seed)
    if spec is None:
        spec = random_spec(rng, split, two_shape_prob)
    elif isinstance(spec, str):
        spec = parse_caption(spec)
    spec.validate()
    objects = _layout(spec, rng, image_size)
    image = render(spec.background, objects, image_size)
    attributes = {
        "background": spec.background,
        "objects": [
            {"color": c, "shape": s, "center": (float(cx), float(cy)), "size": float(size)}
            for c, s, (cx, cy), size in objects
        ],
        "relation": spec.relation,
        "split": spec.split,
    }
    return image, spec.caption(), attributes


def iter_scenes(seed: int, split: str | None = "train", **kwargs) -> Iterator[tuple[np.ndarray, str, dict]]:
    """An endless deterministic stream of scenes."""
    rng = np.random.default_rng(seed)
    while True:
        yield make_scene(rng, split=split, **kwargs)


def dataset(n: int, seed: int, split: str | None = "train", *, image_size: int = IMAGE_SIZE,
            two_shape_prob: float = TWO_SHAPE_PROB) -> tuple[np.ndarray, list[str], list[dict]]:
    """``n`` scenes: images uint8 [n, H, W, 3], captions, attribute dicts. Same seed, same data."""
    stream = iter_scenes(seed, split, image_size=image_size, two_shape_prob=two_shape_prob)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    captions: list[str] = []
    attrs: list[dict] = []
    for i in range(n):
        images[i], caption, a = next(stream)
        captions.append(caption)
        attrs.append(a)
    return images, captions, attrs


def heldout_prompts(n: int = 100, seed: int = 0) -> list[str]:
    """``n`` distinct captions of the test split (never seen in training), in a fixed order.

    Every one-shape test caption is included (there are few), the rest are two-shape captions drawn
    with ``seed``.
    """
    test = specs_of_split("test")
    singles = [s.caption() for s in test if len(s.objects) == 1]
    doubles = [s.caption() for s in test if len(s.objects) == 2]
    rng = np.random.default_rng(seed)
    n_single = min(len(singles), n // 2)
    picked = singles[:n_single] + [doubles[i] for i in rng.permutation(len(doubles))[: n - n_single]]
    if len(picked) < n:
        raise ValueError(f"only {len(picked)} held-out captions exist, asked for {n}")
    return picked


def caption_vocabulary() -> list[str]:
    """Every word a caption can contain (for the text model's tokenizer)."""
    words = set(COLORS) | set(SHAPES) | {"a", "on", "background"}
    for rel in RELATIONS:
        words.update(rel.split())
    return sorted(words)


__all__ = [
    "IMAGE_SIZE", "PALETTE", "COLORS", "SHAPES", "RELATIONS", "SceneSpec", "parse_caption", "all_specs",
    "specs_of_split", "shape_mask", "render", "random_spec", "make_scene", "iter_scenes", "dataset",
    "heldout_prompts", "caption_vocabulary",
]
