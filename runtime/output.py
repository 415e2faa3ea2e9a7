"""What the diffusers-style call (``Pipeline.from_pretrained(...)(prompts, ...)``) shares: its output
object and how each image's seed is derived. Imports no torch.

Seeds: the images of one call are numbered ``k = 0, 1, ...`` prompt by prompt (all images of the first
prompt, then the second's, ...); image ``k`` is generated with seed ``base + k`` under the portable RNG
contract (:mod:`hartkit.loop.rng`), exactly as ``pipe(prompt, seed=base + k)`` alone would make it.
``base`` is ``seed`` (default 0), or taken from ``generator``: an int, a ``numpy.random.Generator``
(one draw), or anything with ``initial_seed()`` (a ``torch.Generator``). A list of ints or generators
gives each image its own seed instead. ``output.seeds[k]`` records what image ``k`` used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from hartkit.errors import UsageError
from hartkit.loop.rng import MAX_SEED

OUTPUT_TYPES = ("pil", "np")


@dataclass
class PipelineOutput:
    """As diffusers' ``ImagePipelineOutput``: ``images`` is a list of ``PIL.Image`` (``output_type="pil"``)
    or one float32 array ``[N, H, W, 3]`` in [0, 1] (``"np"``); ``seeds[k]`` and ``prompts[k]`` made image k."""

    images: Any
    seeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    def __getitem__(self, index: int):  # diffusers outputs index like tuples: output[0] is the images
        return (self.images,)[index]


def _seed_of(item: Any, what: str) -> int:
    if isinstance(item, (bool, np.bool_)):
        raise UsageError(f"{what} must be an integer seed or a generator, got {item!r}")
    if isinstance(item, (int, np.integer)):
        value = int(item)
    elif isinstance(item, np.random.Generator):
        value = int(item.integers(0, 2**63))  # one draw: the generator advances, as a diffusers generator does
    elif callable(getattr(item, "initial_seed", None)):
        value = int(item.initial_seed())  # torch.Generator: its seed, not its (torch-specific) stream
    else:
        raise UsageError(f"{what} must be an int, a numpy.random.Generator or a torch.Generator, "
                         f"got {type(item).__name__}")
    if not 0 <= value <= MAX_SEED:
        raise UsageError(f"{what} must be in [0, 2**64), got {value}")
    return value


def image_seeds(count: int, seed: int | None, generator: Any) -> list[int]:
    """The seed of each of ``count`` images (see the module docstring)."""
    if seed is not None and generator is not None:
        raise UsageError("give seed or generator, not both")
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise UsageError(f"generator: a list of {len(generator)} for {count} images; give one per image "
                             "(prompts x num_images_per_prompt) or a single one")
        return [_seed_of(g, f"generator[{i}]") for i, g in enumerate(generator)]
    base = _seed_of(generator if generator is not None else (0 if seed is None else seed),
                    "generator" if generator is not None else "seed")
    if base + count - 1 > MAX_SEED:
        raise UsageError(f"seed {base} + {count} images runs past 2**64 - 1; choose a smaller seed")
    return [base + k for k in range(count)]


def prompt_list(prompt: str | Sequence[str]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise UsageError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}"
                     + (" (empty)" if isinstance(prompt, (list, tuple)) and not prompt else ""))


def to_output(images: list[np.ndarray], output_type: str):
    """uint8 ``[H, W, 3]`` images as diffusers returns them: PIL images, or float32 ``[N, H, W, 3]`` in [0, 1]."""
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(img) for img in images]
    return np.stack(images).astype(np.float32) / np.float32(255)
