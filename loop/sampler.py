"""The staged sampling loop, once, in numpy over graphs run by name (imports no torch).

:class:`StagedLoop` is HART's ``autoregressive_infer_cfg`` cut at the graphs of
``hartkit.model.graphs``: every network call is ``run(graph, feeds) -> [outputs]``, so the same
loop drives eager torch (export recording, calibration, ``Pipeline.from_checkpoint``) and every
exported runtime. Sampling, CFG mixing and the diffusion scheduler stay here in fp32, fed by the
portable RNG in the contract's order (:mod:`hartkit.loop.rng`); ``hartkit.model.sampler`` is the
eager torch twin kept as a test oracle.

Observation goes through ``callback_on_stage_end(stage, state)`` (diffusers-style): called after
each stage has sampled, with ``state`` holding that stage's ``logits`` (CFG-mixed ``[1, n, V]``),
``tokens`` ``[1, n]``, ``latents`` ``[1, n, Cvae]``, ``f_hat`` (the sum before this stage) and
``h`` (the blocks' output). A returned dict may replace ``tokens`` and/or ``latents`` (tokens alone:
their codebook rows become the latents), which the rest of the loop then uses: teacher forcing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from hartkit.errors import HartkitError, UsageError
from hartkit.loop.plan import MAX_CFG, LoopInfo, stage_plan
from hartkit.loop.prompt import PromptTokenizer
from hartkit.loop.rng import PortableRNG, draw_plan, iter_draws
from hartkit.loop.rope import context_positions, rope_cos_sin_1d, rope_cos_sin_2d, stage_positions
from hartkit.loop.sampling import cfg_mix, sample_stage
from hartkit.loop.schedule import VAE_SCALE, IDDPMSchedule

GraphRunner = Callable[[str, Mapping[str, np.ndarray]], list]
StageCallback = Callable[[int, dict], "Mapping[str, Any] | None"]


@dataclass
class Trace:
    tokens: list[np.ndarray] = field(default_factory=list)  # per stage: sampled (or forced) indices [1, n]
    latents: list[np.ndarray] = field(default_factory=list)  # per stage: latents fed on [1, n, Cvae]
    f_hat: np.ndarray | None = None
    residual: np.ndarray | None = None
    z: np.ndarray | None = None  # diffusion condition [2, n_last, C]


class StagedLoop:
    """``generate(prompt, seed) -> (uint8 [H, W, 3], Trace)`` over a graph runner."""

    def __init__(self, loop: LoopInfo, run: GraphRunner, tokenizer: PromptTokenizer, codebook: np.ndarray) -> None:
        self.loop = loop
        self.run = run
        self.tokenizer = tokenizer
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)

    def encode_prompt(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """-> context ``[1,T,D]`` fp32 and context mask ``[1,T]`` bool (warns on truncation)."""
        loop = self.loop
        batch = self.tokenizer.encode([prompt], loop.context_token)
        if batch.system_length != loop.system_length:
            raise HartkitError(
                f"the tokenizer gives a {batch.system_length}-token system prompt, the exported text encoder "
                f"expects {loop.system_length}: tokenizer files and graphs come from different models")
        message = batch.truncation_message()
        if message:
            warnings.warn(message, UserWarning, stacklevel=4)
        ids, mask = batch.text_model_inputs()
        (context,) = self.run("text_encoder", {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})
        return context.astype(np.float32), batch.mask.astype(bool)

    def generate(self, prompt: str, seed: int = 0, cfg: float | None = None, more_smooth: bool = True,
                 top_p: float = 0.0, progress: Callable[[str], None] | None = None,
                 prompt_embeds: tuple[np.ndarray, np.ndarray] | None = None,
                 callback_on_stage_end: StageCallback | None = None) -> tuple[np.ndarray, Trace]:
        """One image: uint8 ``[H, W, 3]`` and the trace (tokens per stage, ...).

        ``cfg`` None: the guidance the model recommends (``loop.default_cfg``). ``prompt_embeds``:
        ``(context, mask)`` from :meth:`encode_prompt`, to skip the text encoder when a caller runs
        the same prompt many times (validation). ``callback_on_stage_end``: see the module docstring.
        """
        if not isinstance(prompt, str):
            raise UsageError(f"prompt must be a string, got {type(prompt).__name__}")
        loop = self.loop
        if cfg is None:
            cfg = loop.default_cfg
        if not (0.0 <= cfg <= MAX_CFG):
            raise UsageError(f"cfg must be in [0, {MAX_CFG}], got {cfg}")
        if not (0.0 <= top_p < 1.0):
            raise UsageError(f"top_p must be in [0, 1), got {top_p}")
        pns = loop.patch_nums
        last, Cz = pns[-1], loop.latent_dim
        schedule = IDDPMSchedule.create(loop.num_sampling_steps)
        plan = stage_plan(pns, loop.context_token, loop.vocab_size, cfg, loop.num_phis)
        draws = iter_draws(PortableRNG(seed), draw_plan(1, pns, loop.vocab_size, Cz, schedule.num_steps,
                                                          more_smooth=more_smooth))

        def next_draw() -> np.ndarray:
            return next(draws)[1]

        ctx, mask = prompt_embeds if prompt_embeds is not None else self.encode_prompt(prompt)
        positions = context_positions(mask)  # [2, T]
        offsets = positions[:, -1]
        mask_2b = np.concatenate([mask, np.zeros_like(mask)]).astype(np.float32)
        mask_2b[1:, 0] = 1.0  # upstream: uncond rows count their first token
        block_mods, head_mod, x = self.run("condition", {"context": ctx, "context_mask_2b": mask_2b})
        use_rope = loop.attn_type == "llama"

        trace = Trace()
        past_k = past_v = None
        f_hat = np.zeros((1, Cz, last, last), np.float32)
        for stage in plan:
            if progress is not None:
                progress(f"stage {stage.si + 1}/{len(plan)}")
            feeds: dict[str, np.ndarray] = {"x": x, "block_mods": block_mods}
            if use_rope:
                if stage.si == 0:
                    cos, sin = rope_cos_sin_1d(positions, loop.head_dim)
                else:
                    cos, sin = rope_cos_sin_2d(stage_positions(pns, stage.si, offsets), loop.head_dim)
                feeds.update(cos=cos, sin=sin)
            if stage.si == 0:
                h, k, v = self.run("ar_context", feeds)
            else:
                h, k, v = self.run("ar_stage", {**feeds, "past_k": past_k, "past_v": past_v})
            if not stage.is_final:
                # Host-side append (see export/graphs.py for why the graphs return only new keys).
                past_k = k if past_k is None else np.concatenate([past_k, k], axis=3)
                past_v = v if past_v is None else np.concatenate([past_v, v], axis=3)
            h_sampled = h[:, -1:] if stage.si == 0 else h
            (logits,) = self.run("ar_head", {"h": np.ascontiguousarray(h_sampled), "head_mod": head_mod})
            t = stage.cfg_scale
            mixed = cfg_mix(logits, t)
            exp_sample = next_draw()
            exp_gumbel = next_draw() if more_smooth else None
            idx, latents = sample_stage(mixed, stage, self.codebook, exp_sample, exp_gumbel, top_p)
            if callback_on_stage_end is not None:
                idx, latents = self._observe(callback_on_stage_end, stage.si, mixed, idx, latents, f_hat, h)
            trace.tokens.append(idx)
            trace.latents.append(latents)
            if not stage.is_final:
                f_hat, x = self.run(f"residual_{stage.si}", {"f_hat": f_hat, "latents": latents})
                continue
            (z,) = self.run("diffusion_condition", {"h": h, "latents": self.codebook[idx]})
            trace.z = z
            residual = self._diffusion(schedule, z.reshape(-1, z.shape[-1]), t, next_draw, last * last)
            trace.residual = residual[None]
            f_hat = f_hat + (latents + residual[None]).transpose(0, 2, 1).reshape(1, Cz, last, last)
        trace.f_hat = f_hat
        (image,) = self.run("vae_decode", {"f_hat": f_hat.astype(np.float32)})
        # The graph returns (clamp(decoder) + 1) / 2; upstream saves uint8(img * 255) by truncation.
        pixels = (np.transpose(image[0], (1, 2, 0)) * 255).astype(np.uint8)
        return pixels, trace

    def _observe(self, callback: StageCallback, si: int, logits, idx, latents, f_hat, h):
        """Hand the stage to the callback; take back the tokens/latents it replaces."""
        state = {"logits": logits, "tokens": idx, "latents": latents, "f_hat": f_hat, "h": h}
        changed = callback(si, state) or {}
        if "tokens" in changed:
            idx = np.asarray(changed["tokens"]).reshape(idx.shape).astype(idx.dtype)
            if "latents" not in changed:  # forced tokens alone: their codebook rows (the sampler's F.embedding)
                latents = self.codebook[idx]
        if "latents" in changed:
            latents = np.asarray(changed["latents"], np.float32).reshape(latents.shape)
        return idx, latents

    def _diffusion(self, sched: IDDPMSchedule, z: np.ndarray, t: float, next_draw: Callable[[], np.ndarray],
                   n: int) -> np.ndarray:
        """The residual head's IDDPM loop (numpy scheduler, graph denoiser); mirrors DiffLoss.sample."""
        Cz = self.loop.latent_dim
        guided = not t == 1.0  # upstream's exact test: cfg == 1.0 skips guidance altogether
        cond_rows = z if guided else z[:n]
        (cond_emb,) = self.run("diffusion_cond_embed", {"z": np.ascontiguousarray(cond_rows)})
        x = next_draw().reshape(n, Cz)
        steps = [next_draw().reshape(n, Cz) for _ in range(sched.num_steps)]
        for i, j in enumerate(reversed(range(sched.num_steps))):
            x_in = np.concatenate([x, x]) if guided else x
            tt = np.array([float(sched.timesteps[j])], np.float32)
            (out,) = self.run("denoise", {"x": x_in.astype(np.float32), "t": tt, "cond_embedding": cond_emb})
            eps, v = out[:n, :Cz], out[:n, Cz:]
            if guided:
                eps = eps * np.float32(1 + t) - np.float32(t) * out[n:, :Cz]
            x = sched.step(j, x, eps, v, steps[i])
        return (x * np.float32(VAE_SCALE)).astype(np.float32)
