"""The IDDPM noise schedule of HART's residual diffusion head, and one sampler step, in NumPy.

Upstream (``hart/modules/diffusion/{__init__,gaussian_diffusion,respace}.py``, from LTH14/mar, from
OpenAI's improved-diffusion) builds a 1000-step cosine schedule, keeps a few of its steps
("respacing", ``space_timesteps``) and recomputes every derived array from the kept steps in
float64. Sampling is IDDPM ancestral sampling with an epsilon-predicting net, a learned-range
variance and ``clip_denoised=True``.

The tables are float64 (as upstream builds them); :meth:`IDDPMSchedule.step` does its arithmetic in
float32, because upstream's ``_extract_into_tensor`` casts each per-step constant to float32 before
it meets the float32 latent. The PyTorch reference (``hartkit.model.diffusion``) reads the same
float32 constants through :meth:`IDDPMSchedule.step_scalars`, so the two agree to rounding of ``exp``.

No torch here: the numpy runtime uses this module as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from hartkit.errors import UsageError

NUM_TRAIN_STEPS = 1000
MAX_BETA = 0.999  # upstream betas_for_alpha_bar's default cap
VAE_SCALE = 0.6  # upstream DiffLoss.vae_scale: the head works on latents / 0.6; a sample is scaled back by it


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """The original timesteps a respaced sampler keeps, sorted ascending (upstream returns a set).

    ``section_counts`` is a comma-separated string of per-section step counts ("8", "10,15,20"), or
    ``"ddimN"`` for the DDIM paper's fixed integer stride. An int n means one section of n steps, and
    "" means no respacing (upstream's ``create_diffusion`` maps "" to ``[num_timesteps]``).
    """
    if isinstance(section_counts, str):
        if section_counts == "":
            section_counts = [num_timesteps]
        elif section_counts.startswith("ddim"):
            desired_count = _parse_int(section_counts[len("ddim"):], section_counts)
            # Upstream scans strides from 1 and takes the first one giving exactly N steps.
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return list(range(0, num_timesteps, stride))
            raise UsageError(f"cannot create exactly {desired_count} steps out of {num_timesteps} with an integer stride")
        else:
            section_counts = [_parse_int(part, section_counts) for part in section_counts.split(",")]
    elif isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise UsageError(f"sampling step counts must be positive integers, got {counts}")

    size_per, extra = divmod(num_timesteps, len(counts))
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise UsageError(f"cannot divide a section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Quirk kept on purpose: upstream accumulates the float stride and rounds with Python's
        # round() (half to even); i * stride or floor(x + 0.5) can pick a different step.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return sorted(set(all_steps))


def _parse_int(text: str, whole: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"invalid num_sampling_steps {whole!r}: expected e.g. '8', '10,15,20' or 'ddim8'") from None


def cosine_betas(num_train_steps: int = NUM_TRAIN_STEPS, max_beta: float = MAX_BETA) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, discretised as upstream ``betas_for_alpha_bar`` does."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_train_steps) / alpha_bar(i / num_train_steps), max_beta)
            for i in range(num_train_steps)
        ],
        dtype=np.float64,
    )


class StepScalars(NamedTuple):
    """The float32 constants one sampler step needs (what upstream's ``_extract_into_tensor`` yields)."""

    sqrt_recip_alphas_cumprod: np.float32
    sqrt_recipm1_alphas_cumprod: np.float32
    posterior_mean_coef1: np.float32
    posterior_mean_coef2: np.float32
    min_log: np.float32  # posterior_log_variance_clipped
    max_log: np.float32  # log(beta)


# Columns of the table, in the order as_table() writes them.
_TABLE_COLUMNS = (
    "betas",
    "alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_log_variance_clipped",
    "log_betas",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


@dataclass(frozen=True, eq=False)
class IDDPMSchedule:
    """A respaced IDDPM schedule; index j = 0..S-1 is the respaced step (j = S-1 is pure noise)."""

    timesteps: np.ndarray  # original timestep of each respaced step, int64 [S]; the net is fed these
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    log_betas: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @classmethod
    def create(cls, num_sampling_steps: str | int = "8", num_train_steps: int = NUM_TRAIN_STEPS) -> "IDDPMSchedule":
        """Upstream ``create_diffusion(timestep_respacing=num_sampling_steps, noise_schedule="cosine")``."""
        kept = space_timesteps(num_train_steps, num_sampling_steps)
        if len(kept) < 2:
            # Upstream builds an empty posterior_log_variance_clipped for one step and then fails
            # while sampling; say so up front.
            raise UsageError(f"num_sampling_steps {num_sampling_steps!r} keeps {len(kept)} step; at least 2 are needed")

        base_alphas_cumprod = np.cumprod(1.0 - cosine_betas(num_train_steps), axis=0)
        # SpacedDiffusion: the new betas are the ones that reproduce alpha-bar at the kept steps.
        new_betas = []
        last = 1.0
        for t in kept:
            new_betas.append(1.0 - base_alphas_cumprod[t] / last)
            last = base_alphas_cumprod[t]
        betas = np.array(new_betas, dtype=np.float64)

        # GaussianDiffusion.__init__ on the new betas, float64 throughout.
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # Quirk: the posterior variance is 0 at j = 0, so its log is "clipped" by repeating j = 1's.
        posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        arrays = dict(
            timesteps=np.array(kept, dtype=np.int64),
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            log_betas=np.log(betas),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        )
        for value in arrays.values():
            value.setflags(write=False)  # the dataclass is frozen; keep its arrays so too
        return cls(**arrays)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def step_scalars(self, j: int) -> StepScalars:
        """Step j's constants, rounded to float32 like upstream's ``_extract_into_tensor(...).float()``."""
        if not 0 <= j < self.num_steps:
            raise IndexError(f"step {j} out of range for a {self.num_steps}-step schedule")
        return StepScalars(
            np.float32(self.sqrt_recip_alphas_cumprod[j]),
            np.float32(self.sqrt_recipm1_alphas_cumprod[j]),
            np.float32(self.posterior_mean_coef1[j]),
            np.float32(self.posterior_mean_coef2[j]),
            np.float32(self.posterior_log_variance_clipped[j]),
            np.float32(self.log_betas[j]),
        )

    def step(
        self,
        j: int,
        x: np.ndarray,
        eps: np.ndarray,
        v: np.ndarray,
        noise: np.ndarray,
        temperature: float = 1.0,
    ) -> np.ndarray:
        """One ``p_sample`` update from respaced step j, in float32; returns the new x (float32).

        ``eps`` is the (already guided) predicted noise, ``v`` in [-1, 1] the net's variance
        interpolator, ``noise`` a standard normal draw (ignored at j == 0, where upstream multiplies
        it by zero).
        """
        s = self.step_scalars(j)
        x = np.asarray(x, dtype=np.float32)
        eps = np.asarray(eps, dtype=np.float32)
        v = np.asarray(v, dtype=np.float32)
        # Same operation order as upstream, so float32 rounding matches the torch reference.
        x0 = np.clip(s.sqrt_recip_alphas_cumprod * x - s.sqrt_recipm1_alphas_cumprod * eps, -1.0, 1.0)
        mean = s.posterior_mean_coef1 * x0 + s.posterior_mean_coef2 * x
        if j == 0:
            return mean.astype(np.float32, copy=False)
        frac = (v + np.float32(1)) / np.float32(2)
        log_variance = frac * s.max_log + (np.float32(1) - frac) * s.min_log
        noise = np.asarray(noise, dtype=np.float32)
        sample = mean + np.exp(np.float32(0.5) * log_variance) * noise * np.float32(temperature)
        return sample.astype(np.float32, copy=False)

    def as_table(self) -> dict[str, list[float] | list[int]]:
        """The schedule as plain lists, for an export manifest (float64 values, unrounded)."""
        table: dict[str, list[float] | list[int]] = {"timesteps": [int(t) for t in self.timesteps]}
        for name in _TABLE_COLUMNS:
            table[name] = [float(value) for value in getattr(self, name)]
        return table


__all__ = ["IDDPMSchedule", "StepScalars", "space_timesteps", "cosine_betas", "NUM_TRAIN_STEPS", "MAX_BETA"]
