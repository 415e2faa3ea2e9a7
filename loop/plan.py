"""Per-stage constants of HART's staged sampling loop, derived from the checkpoint's config.

``autoregressive_infer_cfg`` (hart_transformer_t2i.py) computes these inline; here they are one table
that the reference sampler, the exporters, the manifest and the runtime all read. Faithful quirks:

* ``ratio = si / (SN - 1)`` for the discrete stages; the **final stage reuses the stale ratio of the
  stage before it** (upstream's loop variable is not updated), so guidance, Gumbel temperature and
  logit multiplier at the final stage all use ``(SN - 2) / (SN - 1)``.
* top-k is hard-coded upstream to 600 for si < 7 and 300 after; it crashes when V < k, we clamp to V.
* The phi index of each discrete stage uses upstream's float64 argmin expression (ties matter;
  :func:`hartkit.loop.resample.phi_index`).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Mapping, Sequence

from hartkit.errors import HartkitError
from hartkit.loop.resample import phi_index  # upstream float64 tick expression (ties matter)

TOP_K_EARLY, TOP_K_LATE, TOP_K_SWITCH_STAGE = 600, 300, 7

# HART's guidance scale (its sample script's default). A checkpoint may recommend its own in
# llm/generation_config.json (``guidance_scale``: the name and file transformers' GenerationConfig
# uses); every command, export and runtime falls back to this one without it.
HART_DEFAULT_CFG = 4.5
MAX_CFG = 50.0  # the largest guidance any command, checkpoint or runtime accepts


@dataclass(frozen=True)
class Stage:
    si: int
    pn: int  # side of the token map sampled at this stage
    num_inputs: int  # rows fed to the blocks per CFG branch (context tokens at stage 0)
    num_sampled: int  # token positions sampled (1 at stage 0: the last context position)
    keys_before: int  # cached keys before this stage (per branch)
    keys_after: int
    ratio: float  # si/(SN-1); stale at the final stage
    cfg_scale: float  # t = cfg * ratio
    top_k: int
    gumbel_tau: float
    logit_scale: float  # Gumbel path multiplies the masked logits by (1 + ratio)
    phi: int | None  # phi conv index; None at the final stage (no phi there)
    is_final: bool

    def to_dict(self) -> dict:
        return asdict(self)


def stage_plan(
    patch_nums: Sequence[int],
    context_tokens: int,
    vocab_size: int,
    cfg: float,
    num_phi: int,
) -> list[Stage]:
    """The loop's per-stage constants for a config and a CFG value."""
    patch_nums = tuple(int(p) for p in patch_nums)
    num_stages = len(patch_nums)
    stages: list[Stage] = []
    keys = 0
    ratio = 0.0
    for si, pn in enumerate(patch_nums):
        final = si == num_stages - 1
        if not final:
            ratio = si / (num_stages - 1)
        # else: keep the stale ratio of the previous stage (upstream quirk)
        n_in = context_tokens if si == 0 else pn * pn
        k = TOP_K_EARLY if si < TOP_K_SWITCH_STAGE else TOP_K_LATE
        stages.append(
            Stage(
                si=si,
                pn=pn,
                num_inputs=n_in,
                num_sampled=1 if si == 0 else pn * pn,
                keys_before=keys,
                keys_after=keys + n_in,
                ratio=ratio,
                cfg_scale=cfg * ratio,
                top_k=min(k, vocab_size),
                gumbel_tau=max(0.27 * (1 - ratio * 0.95), 0.005),
                logit_scale=1.0 + ratio,
                phi=None if final else phi_index(si, num_stages, num_phi),
                is_final=final,
            )
        )
        keys += n_in
    return stages


def kv_cache_len(patch_nums: Sequence[int], context_tokens: int) -> int:
    """Keys cached after the last discrete stage (the final stage's keys are never cached)."""
    return context_tokens + sum(p * p for p in patch_nums[1:-1])


@dataclass(frozen=True)
class LoopInfo:
    """The numbers the staged loop runs on; a bundle stores them as its manifest's ``loop`` section."""

    patch_nums: tuple[int, ...]
    context_token: int
    vocab_size: int
    latent_dim: int
    head_dim: int
    attn_type: str
    num_phis: int
    num_sampling_steps: str
    system_length: int
    default_cfg: float = HART_DEFAULT_CFG  # guidance when a caller gives none (the checkpoint's recommendation)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoopInfo":
        try:
            return cls(**{f.name: _AS_TYPE[f.type](data[f.name]) for f in fields(cls)
                          if f.default is MISSING or f.name in data})  # default_cfg: absent in older bundles
        except (KeyError, TypeError, ValueError) as exc:
            raise HartkitError(f"export info: the 'loop' section is incomplete or malformed ({exc!r})") from exc

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "patch_nums": list(self.patch_nums)}


# How from_dict converts each field, by its annotation (a string under ``from __future__ import annotations``).
_AS_TYPE = {"tuple[int, ...]": lambda v: tuple(int(p) for p in v), "int": int, "str": str, "float": float}


def past_shape(manifest: Mapping[str, Any]) -> tuple[int, int, int, int] | None:
    """(depth, rows, heads, head_dim) of ar_stage's ``past_k`` [depth, rows, heads, past, head_dim]."""
    for graph in manifest.get("graphs", []):
        if graph.get("name") != "ar_stage":
            continue
        for spec in graph.get("inputs", []):
            shape = spec.get("shape", [])
            if spec.get("name") == "past_k" and len(shape) == 5:
                fixed = [shape[i] for i in (0, 1, 2, 4)]
                if all(isinstance(d, int) for d in fixed):
                    return tuple(fixed)  # type: ignore[return-value]
    return None
