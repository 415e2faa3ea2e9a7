"""The reference sampler: HART's staged loop (``autoregressive_infer_cfg``) in eager PyTorch, fp32.

It follows upstream step for step, with two deliberate changes:

* every random number comes from :mod:`hartkit.loop.rng` (one portable seeded generator, fixed draw
  order) and enters as a tensor, so the exported-graph runtime reproduces the same tokens;
* the KV cache is explicit (tensors passed in and out of ``blocks_forward``) instead of module
  attributes, which is the cut the exported graphs use.

Kept quirks (what the weights were trained/tuned with): the stale ratio at the final stage
(:mod:`hartkit.loop.plan`), unmasked attention over padded context tokens, top-k applied in place
before the Gumbel path, the hard multinomial index as the diffusion condition, no phi at the last
scale, ``uint8(img * 255)`` by truncation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hartkit.errors import UsageError
from hartkit.loop.plan import MAX_CFG, Stage, stage_plan
from hartkit.loop.rng import PortableRNG, draw_plan, iter_draws
from hartkit.loop.rope import context_positions, rope_cos_sin_1d, rope_cos_sin_2d, stage_positions
from hartkit.model.checkpoint import HART
from hartkit.model.vae import next_autoregressive_input


@dataclass
class SamplerOptions:
    cfg: float | None = None  # None: the checkpoint's default guidance (HART.default_cfg)
    more_smooth: bool = True
    top_p: float = 0.0

    def validate(self) -> None:
        if self.cfg is not None and (not (0.0 <= self.cfg <= MAX_CFG) or self.cfg != self.cfg):
            raise UsageError(f"cfg must be in [0, {MAX_CFG}], got {self.cfg}")
        if not (0.0 <= self.top_p < 1.0):
            raise UsageError(f"top_p must be in [0, 1), got {self.top_p}")


@dataclass
class Trace:
    """What one generation went through, for tests, validation and golden vectors."""

    tokens: list[np.ndarray] = field(default_factory=list)  # per stage: sampled indices [B, n]
    stage_logits: list[np.ndarray] = field(default_factory=list)  # per stage: CFG-mixed logits [B, n, V] (if kept)
    f_hat: np.ndarray | None = None  # [B, Cvae, H, W] before the VAE
    residual: np.ndarray | None = None  # diffusion head output [B, n_last, Cvae]


def num_diffusion_steps(model: HART) -> int:
    return model.transformer.diffloss.schedule.num_steps


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Upstream's ``sample_with_top_k_top_p_`` masking, out of place: removed entries become -inf.

    Top-k keeps every logit >= the k-th largest (ties survive); top-p (off by default) removes the
    low tail whose cumulative probability is <= 1 - top_p, always keeping the top entry.
    """
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(sorted_idx.ndim - 1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, -torch.inf)
    return logits


def sample_stage(
    logits: torch.Tensor,
    stage: Stage,
    codebook: torch.Tensor,
    exp_sample: torch.Tensor,
    exp_gumbel: torch.Tensor | None,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG-mixed logits [B,n,V] -> (hard indices [B,n], latents [B,n,Cvae]).

    ``multinomial(softmax(l))`` is ``argmax(p / E)`` with E ~ Exp(1) (torch's own fast path); the
    ``more_smooth`` latents are a Gumbel-softmax mixture of codebook rows over the *masked* logits.
    """
    masked = filter_top_k_top_p(logits, stage.top_k, top_p)
    probs = masked.softmax(dim=-1)
    idx = torch.argmax(probs / exp_sample, dim=-1)
    if exp_gumbel is None:
        return idx, F.embedding(idx, codebook)
    gumbel = -torch.log(exp_gumbel)
    y = ((masked * stage.logit_scale + gumbel) / stage.gumbel_tau).softmax(dim=-1)
    return idx, y @ codebook


@torch.no_grad()
def generate(
    model: HART,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    *,
    seed: int,
    options: SamplerOptions | None = None,
    keep_logits: bool = False,
    progress: Callable[[str], None] | None = None,
    forced_tokens: Sequence[torch.Tensor] | None = None,
) -> tuple[np.ndarray, Trace]:
    """Generate images for B encoded prompts.

    ``context`` [B,T,context_dim] fp32 and ``context_mask`` bool [B,T] come from the text encoder.
    Returns uint8 images [B,H,W,3] and the :class:`Trace`.

    ``forced_tokens`` (a diagnostic: where does a model go wrong?) holds token indices [B, pn*pn] for
    the first stages, e.g. a real image's from ``vae.quantize_residual``: those stages take these
    indices and their hard codebook entries instead of sampling; the RNG draws are still consumed,
    so the later stages see the same random stream as without forcing.
    """
    options = options or SamplerOptions()
    options.validate()
    cfg, tr, vae = model.cfg, model.transformer, model.vae
    B, T, _ = context.shape
    if T != cfg.context_token:
        raise UsageError(f"context has {T} tokens, the model expects context_token={cfg.context_token}")
    patch_nums = tuple(cfg.patch_nums)
    last = patch_nums[-1]
    V, Cvae = model.vocab_size, model.latent_dim
    guidance = model.default_cfg if options.cfg is None else options.cfg
    plan = stage_plan(patch_nums, cfg.context_token, V, guidance, _num_phi(model))
    draws = iter_draws(
        PortableRNG(seed),
        draw_plan(B, patch_nums, V, Cvae, num_diffusion_steps(model), more_smooth=options.more_smooth),
    )

    def next_draw() -> torch.Tensor:
        return torch.from_numpy(next(draws)[1])

    # Prompt-level conditioning, computed once: 2B rows ordered [cond; uncond].
    mask_np = context_mask.cpu().numpy().astype(bool)
    positions = context_positions(mask_np)  # [2B,T]
    offsets = positions[:, -1]
    mask_2B = torch.cat([context_mask.bool(), torch.zeros_like(context_mask, dtype=torch.bool)])
    mask_2B[B:, 0] = True  # upstream: uncond rows count their first token in the masked mean
    cond_BD = tr.condition_tokens(context.float())
    block_mods, head_mod = tr.modulations(cond_BD, mask_2B)
    codebook = vae.quantize.embedding.weight.float()
    use_rope = cfg.attn_type == "llama"

    trace = Trace()
    x = tr.context_stage_input(cond_BD)
    past_k = past_v = None
    f_hat = torch.zeros(B, Cvae, last, last)
    for stage in plan:
        if progress is not None:
            progress(f"stage {stage.si + 1}/{len(plan)}")
        cos = sin = None
        if use_rope:
            if stage.si == 0:
                cos_np, sin_np = rope_cos_sin_1d(positions, cfg.head_dim)
            else:
                cos_np, sin_np = rope_cos_sin_2d(stage_positions(patch_nums, stage.si, offsets), cfg.head_dim)
            cos, sin = torch.from_numpy(cos_np), torch.from_numpy(sin_np)
        h, k, v = tr.blocks_forward(x, block_mods, cos, sin, past_k, past_v)
        if not stage.is_final:  # the final stage's keys are never needed again
            past_k = k if past_k is None else torch.cat([past_k, k], dim=3)
            past_v = v if past_v is None else torch.cat([past_v, v], dim=3)
        h_sampled = h[:, -1:] if stage.si == 0 else h  # stage 0 samples from the last context position
        logits = tr.logits(h_sampled, head_mod).float()
        t = stage.cfg_scale
        logits = (1 + t) * logits[:B] - t * logits[B:]
        if keep_logits:
            trace.stage_logits.append(logits.numpy().copy())
        exp_sample = next_draw()
        exp_gumbel = next_draw() if options.more_smooth else None
        idx, latents = sample_stage(logits, stage, codebook, exp_sample, exp_gumbel, options.top_p)
        if forced_tokens is not None and stage.si < len(forced_tokens):
            idx = forced_tokens[stage.si].reshape(idx.shape).to(idx.dtype)
            latents = F.embedding(idx, codebook)
        trace.tokens.append(idx.numpy().copy())
        if not stage.is_final:
            h_map = latents.transpose(1, 2).reshape(B, Cvae, stage.pn, stage.pn)
            f_hat, next_map = next_autoregressive_input(vae, stage.si, patch_nums, f_hat, h_map)
            x = tr.token_stage_input(next_map.flatten(2).transpose(1, 2), stage.si + 1)
            continue
        # Final stage: the residual diffusion head refines the soft latents, conditioned on the
        # hard index's codebook entry (upstream's last_stage_discrete_cond).
        z = tr.diffusion_condition(h, F.embedding(idx, codebook))
        n = last * last
        noise_init = next_draw().reshape(B * n, Cvae)
        step_noise = torch.stack([next_draw().reshape(B * n, Cvae) for _ in range(num_diffusion_steps(model))])
        residual = tr.diffloss.sample(z.reshape(2 * B * n, -1), cfg=t, noise_init=noise_init, step_noise=step_noise)
        residual = residual.reshape(B, n, Cvae)
        trace.residual = residual.numpy().copy()
        f_hat = f_hat + (latents + residual).transpose(1, 2).reshape(B, Cvae, last, last)
    trace.f_hat = f_hat.numpy().copy()
    img = vae.decode(f_hat)  # clamped to [-1, 1]
    img = (img + 1) * 0.5
    images = (img.permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy()  # truncation, as upstream's scripts
    return images, trace


def _num_phi(model: HART) -> int:
    return int(model.vae.num_phis)


def generate_from_prompts(
    model: HART,
    text_encoder,
    prompts: Sequence[str],
    *,
    seed: int,
    options: SamplerOptions | None = None,
    keep_logits: bool = False,
    progress: Callable[[str], None] | None = None,
    forced_tokens: Sequence[torch.Tensor] | None = None,
) -> tuple[np.ndarray, Trace]:
    """Encode prompts with the Qwen2 text encoder, then :func:`generate`."""
    if not prompts:
        raise UsageError("no prompt given")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        context, mask, _ = text_encoder.encode(list(prompts), max_length=model.cfg.context_token)
    return generate(model, context, mask, seed=seed, options=options, keep_logits=keep_logits, progress=progress,
                    forced_tokens=forced_tokens)
