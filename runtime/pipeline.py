"""The staged sampling loop in numpy over exported graphs: ``Pipeline(prompt, seed=0) -> PIL.Image``.

It mirrors :func:`hartkit.model.sampler.generate` step for step (same plan, same RNG draws in the
same order, same sampling math in :mod:`hartkit.runtime.sampling`), but every network call goes
through a :class:`~hartkit.runtime.backends.Backend` by graph name, so any graph can run on
onnxruntime, ExecuTorch, Core ML or eager torch. This module imports no torch.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from hartkit.bundle import (BundleError, LoopInfo, check_or_raise, load_codebook, past_shape, read_manifest,
                            tokenizer_dir, verify_bundle)
from hartkit.errors import HartkitError, UsageError
from hartkit.loop.plan import MAX_CFG, stage_plan
from hartkit.loop.prompt import PromptTokenizer
from hartkit.loop.rng import PortableRNG, draw_plan, iter_draws
from hartkit.loop.rope import context_positions, rope_cos_sin_1d, rope_cos_sin_2d, stage_positions
from hartkit.loop.schedule import VAE_SCALE, IDDPMSchedule
from hartkit.runtime.sampling import cfg_mix, sample_stage


@dataclass
class RuntimeTrace:
    tokens: list[np.ndarray] = field(default_factory=list)  # per stage: sampled indices [1, n]
    latents: list[np.ndarray] = field(default_factory=list)  # per stage: latents fed on [1, n, Cvae]
    stage_logits: list[np.ndarray] = field(default_factory=list)  # per stage: CFG-mixed logits (keep_logits)
    f_hat: np.ndarray | None = None
    residual: np.ndarray | None = None
    z: np.ndarray | None = None  # diffusion condition [2, n_last, C]


_LOCK_GUARD = threading.Lock()


def _one_at_a_time(method):
    """Run a method of a shared Pipeline under the pipeline's lock (reentrant: generate calls encode_prompt)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        lock = self.__dict__.get("_generation_lock")
        if lock is None:  # made on first use, so every way of building a Pipeline gets one
            with _LOCK_GUARD:
                lock = self.__dict__.setdefault("_generation_lock", threading.RLock())
        with lock:
            return method(self, *args, **kwargs)

    return locked


class Pipeline:
    """Text-to-image generation on exported graphs.

    >>> pipe = Pipeline.from_exported("out/", backend="onnxruntime")   # doctest: +SKIP
    >>> image = pipe("a red circle above a blue square", seed=0)       # doctest: +SKIP

    Threads: one pipeline may be shared by any number of threads (a server's request handlers, see
    ``examples/serve.py``). Generations then run one at a time, each as if alone (a lock per pipeline):
    neither the tokenizer nor an ExecuTorch method may run twice at once, and onnxruntime already uses
    every core for one image. Concurrent callers queue; for images in parallel, load one pipeline per
    worker (each holds its own copy of the weights).
    """

    def __init__(self, loop: LoopInfo, backend, tokenizer: PromptTokenizer, codebook: np.ndarray,
                 past_shape: tuple[int, int, int, int] | None = None) -> None:
        self.loop = loop
        self._past_shape = past_shape  # (depth, rows, heads, head_dim) of ar_stage's past_k
        # Whether the backend of ar_stage also runs stage 0, with an empty past (see backends.py).
        stage_runner = backend.backend_for("ar_stage") if hasattr(backend, "backend_for") else backend
        self._context_on_stage_graph = past_shape is not None and bool(
            getattr(stage_runner, "context_on_stage_graph", False))
        self.backend = backend
        self.tokenizer = tokenizer
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.schedule = IDDPMSchedule.create(loop.num_sampling_steps)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_exported(cls, export_dir: str | Path, backend: str = "onnxruntime",
                      graph_backends: Mapping[str, str] | None = None) -> "Pipeline":
        """Load an export folder written by ``hartkit export``; ``graph_backends`` overrides per graph."""
        from hartkit.runtime.backends import open_backend

        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        loop = LoopInfo.from_dict(manifest["loop"])
        runner = open_backend(export_dir, manifest, backend, graph_backends or {})
        # Every path the manifest names stays inside the folder (the bundle reader refuses the rest).
        codebook = load_codebook(export_dir, manifest, loop)
        tokenizer = PromptTokenizer.from_dir(tokenizer_dir(export_dir, manifest))
        return cls(loop, runner, tokenizer, codebook, past_shape=past_shape(manifest))

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, backend: str = "onnxruntime",
                    graph_backends: Mapping[str, str] | None = None, verify: bool = True,
                    self_check: bool = True) -> "Pipeline":
        """Load a bundle.

        ``verify`` (default): every file's sha256 is checked against the manifest first.
        ``self_check`` (default): the graphs that compute in integers run their golden vectors on this
        CPU first (:mod:`hartkit.bundle.selfcheck`; a few hundred ms on the demo model, nothing for
        fp32 bundles); a graph that computes differently here raises ``SelfCheckError`` naming it.
        """
        if verify:
            report = verify_bundle(bundle_dir)
            if not report.ok:
                raise BundleError(f"{bundle_dir}: bundle does not verify: " + "; ".join(report.problems[:5]))
        pipe = cls.from_exported(bundle_dir, backend=backend, graph_backends=graph_backends)
        if self_check:
            check_or_raise(Path(bundle_dir), read_manifest(bundle_dir), pipe.backend)
        return pipe

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, text_model: str | Path | None = None) -> "Pipeline":
        """The torch backend straight from a checkpoint folder (reference and debugging; needs torch)."""
        from hartkit.runtime.backends import TorchBackend

        backend, info = TorchBackend.from_checkpoint(checkpoint, text_model)
        return cls(LoopInfo.from_dict(info["loop"]), backend, backend.tokenizer, backend.codebook)

    # ------------------------------------------------------------------ generation
    def __call__(self, prompt: str, seed: int = 0, cfg: float | None = None, more_smooth: bool = True,
                 top_p: float = 0.0, progress: Callable[[str], None] | None = None):
        from PIL import Image

        image, _ = self.generate(prompt, seed=seed, cfg=cfg, more_smooth=more_smooth, top_p=top_p, progress=progress)
        return Image.fromarray(image)

    @_one_at_a_time
    def encode_prompt(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """-> context ``[1,T,D]`` fp32 and context mask ``[1,T]`` bool (warns on truncation)."""
        import warnings

        loop = self.loop
        batch = self.tokenizer.encode([prompt], loop.context_token)
        if batch.system_length != loop.system_length:
            raise HartkitError(
                f"the tokenizer gives a {batch.system_length}-token system prompt, the exported text encoder "
                f"expects {loop.system_length}: tokenizer files and graphs come from different models")
        message = batch.truncation_message()
        if message:
            warnings.warn(message, UserWarning, stacklevel=3)
        ids, mask = batch.text_model_inputs()
        (context,) = self._run("text_encoder", {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})
        return context.astype(np.float32), batch.mask.astype(bool)

    @_one_at_a_time
    def generate(self, prompt: str, seed: int = 0, cfg: float | None = None, more_smooth: bool = True, top_p: float = 0.0,
                 progress: Callable[[str], None] | None = None, keep_logits: bool = False,
                 context: tuple[np.ndarray, np.ndarray] | None = None,
                 teacher: RuntimeTrace | None = None) -> tuple[np.ndarray, RuntimeTrace]:
        """One image: uint8 ``[H, W, 3]`` and the trace (tokens per stage, ...).

        ``cfg`` None: the guidance the model recommends (manifest ``loop.default_cfg``; HART's 4.5
        unless the checkpoint's ``llm/generation_config.json`` says otherwise).

        ``teacher`` (a trace of another run, e.g. the fp32 reference) forces its sampled tokens and
        latents at every stage, so each stage sees the teacher's inputs: teacher-forced validation.
        """
        if not isinstance(prompt, str):
            raise UsageError(f"prompt must be a string, got {type(prompt).__name__}")
        if cfg is None:
            cfg = self.loop.default_cfg
        if not (0.0 <= cfg <= MAX_CFG):
            raise UsageError(f"cfg must be in [0, {MAX_CFG}], got {cfg}")
        if not (0.0 <= top_p < 1.0):
            raise UsageError(f"top_p must be in [0, 1), got {top_p}")
        loop = self.loop
        pns = loop.patch_nums
        last, Cz = pns[-1], loop.latent_dim
        plan = stage_plan(pns, loop.context_token, loop.vocab_size, cfg, loop.num_phis)
        draws = iter_draws(PortableRNG(seed), draw_plan(1, pns, loop.vocab_size, Cz, self.schedule.num_steps,
                                                          more_smooth=more_smooth))

        def next_draw() -> np.ndarray:
            return next(draws)[1]

        ctx, mask = context if context is not None else self.encode_prompt(prompt)
        positions = context_positions(mask)  # [2, T]
        offsets = positions[:, -1]
        mask_2b = np.concatenate([mask, np.zeros_like(mask)]).astype(np.float32)
        mask_2b[1:, 0] = 1.0  # upstream: uncond rows count their first token
        block_mods, head_mod, x = self._run("condition", {"context": ctx, "context_mask_2b": mask_2b})
        use_rope = loop.attn_type == "llama"

        trace = RuntimeTrace()
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
            if stage.si == 0 and self._context_on_stage_graph:
                empty = np.zeros((*self._past_shape[:3], 0, self._past_shape[3]), np.float32)
                h, k, v = self._run("ar_stage", {**feeds, "past_k": empty, "past_v": empty})
            elif stage.si == 0:
                h, k, v = self._run("ar_context", feeds)
            else:
                h, k, v = self._run("ar_stage", {**feeds, "past_k": past_k, "past_v": past_v})
            if not stage.is_final:
                # Host-side append (see export/graphs.py for why the graphs return only new keys).
                past_k = k if past_k is None else np.concatenate([past_k, k], axis=3)
                past_v = v if past_v is None else np.concatenate([past_v, v], axis=3)
            h_sampled = h[:, -1:] if stage.si == 0 else h
            (logits,) = self._run("ar_head", {"h": np.ascontiguousarray(h_sampled), "head_mod": head_mod})
            t = stage.cfg_scale
            mixed = cfg_mix(logits, t)
            if keep_logits:
                trace.stage_logits.append(mixed)
            exp_sample = next_draw()
            exp_gumbel = next_draw() if more_smooth else None
            idx, latents = sample_stage(mixed, stage, self.codebook, exp_sample, exp_gumbel, top_p)
            if teacher is not None:
                idx, latents = teacher.tokens[stage.si], teacher.latents[stage.si]
            trace.tokens.append(idx)
            trace.latents.append(latents)
            if not stage.is_final:
                f_hat, x = self._run(f"residual_{stage.si}", {"f_hat": f_hat, "latents": latents})
                continue
            (z,) = self._run("diffusion_condition", {"h": h, "latents": self.codebook[idx]})
            trace.z = z
            residual = self._diffusion(z.reshape(-1, z.shape[-1]), t, next_draw, last * last)
            trace.residual = residual[None]
            f_hat = f_hat + (latents + residual[None]).transpose(0, 2, 1).reshape(1, Cz, last, last)
        trace.f_hat = f_hat
        (image,) = self._run("vae_decode", {"f_hat": f_hat.astype(np.float32)})
        # The graph returns (clamp(decoder) + 1) / 2; upstream saves uint8(img * 255) by truncation.
        pixels = (np.transpose(image[0], (1, 2, 0)) * 255).astype(np.uint8)
        return pixels, trace

    def _diffusion(self, z: np.ndarray, t: float, next_draw: Callable[[], np.ndarray], n: int) -> np.ndarray:
        """The residual head's IDDPM loop (numpy scheduler, graph denoiser); mirrors DiffLoss.sample."""
        sched = self.schedule
        Cz = self.loop.latent_dim
        guided = not t == 1.0  # upstream's exact test: cfg == 1.0 skips guidance altogether
        cond_rows = z if guided else z[:n]
        (cond_emb,) = self._run("diffusion_cond_embed", {"z": np.ascontiguousarray(cond_rows)})
        x = next_draw().reshape(n, Cz)
        steps = [next_draw().reshape(n, Cz) for _ in range(sched.num_steps)]
        for i, j in enumerate(reversed(range(sched.num_steps))):
            x_in = np.concatenate([x, x]) if guided else x
            tt = np.array([float(sched.timesteps[j])], np.float32)
            (out,) = self._run("denoise", {"x": x_in.astype(np.float32), "t": tt, "cond_embedding": cond_emb})
            eps, v = out[:n, :Cz], out[:n, Cz:]
            if guided:
                eps = eps * np.float32(1 + t) - np.float32(t) * out[n:, :Cz]
            x = sched.step(j, x, eps, v, steps[i])
        return (x * np.float32(VAE_SCALE)).astype(np.float32)

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.backend.run(graph, feeds)
