"""The portable seeded RNG contract: every random number of a generation comes from here.

Upstream HART draws from a CUDA ``torch.Generator`` (multinomial, Gumbel) and from two *unseeded* global
generators (diffusion noise), so its images cannot be reproduced outside one GPU build. hartkit moves
every draw out of the graphs to the host, from one counter-based generator a Swift or Kotlin port can
re-implement in a few lines:

* **Bits**: Philox4x64-10 (Salmon et al. 2011) with key ``(seed, 0)``. Block ``n = 1, 2, 3, ...`` is
  the Philox function of counter ``(n, 0, 0, 0)``; each block yields its four 64-bit words in order.
  (This is exactly numpy's ``np.random.Philox(key=seed)`` raw stream, which we use as the fast path.)
* **Uniform**: ``u = (w >> 11) * 2**-53`` in [0, 1), float64 (numpy's ``next_double``).
* **Exp(1)**: ``e = -log1p(-u)``, cast to float32.
* **N(0,1)**: Box-Muller on consecutive pairs ``(u1, u2)``: ``r = sqrt(-2 log1p(-u1))``,
  ``z0 = r cos(2 pi u2)``, ``z1 = r sin(2 pi u2)``, laid out z0, z1, z0, z1, ...; an odd count discards
  the last z1. Cast to float32.

Arrays are filled in C order. The *draw order* of one generation is fixed by :func:`draw_plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

RNG_ALGORITHM = "philox4x64-10"
RNG_CONTRACT_VERSION = 1
MAX_SEED = 2**64 - 1


class PortableRNG:
    """Counter-based generator of the contract above; one instance per generation."""

    def __init__(self, seed: int) -> None:
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**64-1], got {seed!r}")
        self.seed = int(seed)
        self._bits = np.random.Philox(key=self.seed)
        self.words_drawn = 0

    def raw(self, count: int) -> np.ndarray:
        """The next ``count`` 64-bit words of the stream."""
        self.words_drawn += count
        return np.asarray(self._bits.random_raw(count), dtype=np.uint64)

    def uniform(self, shape: Sequence[int]) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        words = self.raw(count)
        return ((words >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)).reshape(shape)

    def exponential(self, shape: Sequence[int]) -> np.ndarray:
        return (-np.log1p(-self.uniform(shape))).astype(np.float32)

    def normal(self, shape: Sequence[int]) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        pairs = (count + 1) // 2
        u = self.uniform((pairs, 2))
        r = np.sqrt(-2.0 * np.log1p(-u[:, 0]))
        angle = 2.0 * math.pi * u[:, 1]
        z = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1).reshape(-1)[:count]
        return z.astype(np.float32).reshape(shape)


@dataclass(frozen=True)
class Draw:
    """One entry of the draw order: what is drawn, its distribution and shape."""

    name: str  # e.g. "stage3.sample", "stage3.gumbel", "diffusion.init", "diffusion.step2"
    kind: str  # "exponential" | "normal"
    shape: tuple[int, ...]


def draw_plan(
    batch: int,
    patch_nums: Sequence[int],
    vocab_size: int,
    latent_dim: int,
    num_diffusion_steps: int,
    more_smooth: bool = True,
) -> list[Draw]:
    """The fixed order of every draw of one generation of ``batch`` prompts.

    Per AR stage si (the last one included): the multinomial's Exp(1) ``[B, n, V]`` (sampling is
    ``argmax(p / E)``, upstream's multinomial fast path), then, with ``more_smooth``, the Gumbel
    Exp(1) ``[B, n, V]`` (``G = -log E``); ``n`` is 1 at stage 0 (only the last context position is
    sampled) and ``pn**2`` after. Then the diffusion head's initial noise ``[B, n_last, Cvae]`` and
    one ``[B, n_last, Cvae]`` per sampler step, highest timestep first (the last one is drawn but
    multiplied by zero, as upstream). Only the conditional half's noise is drawn: the unconditional
    half of the diffusion rows never reaches the output.
    """
    draws: list[Draw] = []
    for si, pn in enumerate(patch_nums):
        n = 1 if si == 0 else pn * pn
        draws.append(Draw(f"stage{si}.sample", "exponential", (batch, n, vocab_size)))
        if more_smooth:
            draws.append(Draw(f"stage{si}.gumbel", "exponential", (batch, n, vocab_size)))
    n_last = patch_nums[-1] ** 2
    draws.append(Draw("diffusion.init", "normal", (batch, n_last, latent_dim)))
    for step in range(num_diffusion_steps):
        draws.append(Draw(f"diffusion.step{step}", "normal", (batch, n_last, latent_dim)))
    return draws


def iter_draws(rng: PortableRNG, plan: Sequence[Draw]) -> Iterator[tuple[Draw, np.ndarray]]:
    """Draw lazily in plan order (the largest draws are hundreds of MB at 1024 px)."""
    for draw in plan:
        sample = rng.exponential(draw.shape) if draw.kind == "exponential" else rng.normal(draw.shape)
        yield draw, sample


def describe_contract() -> dict:
    """The RNG contract as data, for bundle manifests."""
    return {
        "version": RNG_CONTRACT_VERSION,
        "bits": f"{RNG_ALGORITHM}, key=(seed, 0), block n=1,2,... from counter (n,0,0,0), 4 uint64 words per block",
        "uniform": "u = (w >> 11) * 2**-53 (float64)",
        "exponential": "-log1p(-u), cast to float32",
        "normal": "Box-Muller on consecutive pairs: r=sqrt(-2*log1p(-u1)); z0=r*cos(2*pi*u2), z1=r*sin(2*pi*u2); C order; odd count drops last z1",
        "order": "per stage: sample Exp[B,n,V], then gumbel Exp[B,n,V] if more_smooth; then diffusion init N[B,n_last,Cvae], then one N per step (highest t first)",
    }
