"""``Pipeline(prompt, seed=0) -> PIL.Image``: a bundle's graphs under the one sampling loop.

The loop itself is :class:`hartkit.loop.sampler.StagedLoop`; a Pipeline loads what it runs on (a
bundle, an export folder, or a checkpoint through the eager torch graphs), runs one generation at a
time per instance, and hands each graph call to its backend by name. This module imports no torch.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from hartkit.bundle import (BundleError, LoopInfo, check_or_raise, load_codebook, read_manifest,
                            tokenizer_dir, verify_bundle)
from hartkit.loop.prompt import PromptTokenizer
from hartkit.loop.sampler import StageCallback, StagedLoop, Trace

def _one_at_a_time(method):
    """Run a method of a shared Pipeline under the pipeline's lock (reentrant: generate calls encode_prompt)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._generation_lock:
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

    def __init__(self, loop: LoopInfo, backend, tokenizer: PromptTokenizer, codebook: np.ndarray) -> None:
        self.backend = backend
        self._generation_lock = threading.RLock()
        # The backend is looked up per call (self._run), so a caller may swap or wrap it.
        self.sampler = StagedLoop(loop, self._run, tokenizer, codebook)

    @property
    def loop(self) -> LoopInfo:
        return self.sampler.loop

    @loop.setter
    def loop(self, loop: LoopInfo) -> None:
        self.sampler.loop = loop

    @property
    def tokenizer(self) -> PromptTokenizer:
        return self.sampler.tokenizer

    @property
    def codebook(self) -> np.ndarray:
        return self.sampler.codebook

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_exported(cls, export_dir: str | Path, backend: str = "onnxruntime",
                      graph_backends: Mapping[str, str] | None = None) -> "Pipeline":
        """Load an export folder written by ``hartkit export``; ``graph_backends`` overrides per graph."""
        from hartkit.backends import open_backend

        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        loop = LoopInfo.from_dict(manifest["loop"])
        runner = open_backend(export_dir, manifest, backend, graph_backends or {}, generation=True)
        # Every path the manifest names stays inside the folder (the bundle reader refuses the rest).
        codebook = load_codebook(export_dir, manifest, loop)
        tokenizer = PromptTokenizer.from_dir(tokenizer_dir(export_dir, manifest))
        return cls(loop, runner, tokenizer, codebook)

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
    def from_checkpoint(cls, checkpoint: str | Path, text_model: str | Path | None = None,
                        resolution: int | None = None) -> "Pipeline":
        """Eager torch graphs straight from a checkpoint folder: the reference (needs torch).

        ``resolution``: the same weights on fewer scales (``load_hart``), as ``hartkit export --resolution``.
        """
        from hartkit.model.torch_runner import TorchBackend  # the torch reference: the eager graphs (needs torch)

        backend, info = TorchBackend.from_checkpoint(checkpoint, text_model, resolution=resolution)
        return cls(LoopInfo.from_dict(info["loop"]), backend, backend.tokenizer, backend.codebook)

    # ------------------------------------------------------------------ diffusers-style construction
    # Made by from_pretrained: __call__ then returns an output object with .images (diffusers' convention).
    _diffusers_style = False
    _image_size: int | None = None
    # What callback_on_step_end may ask for (callback_on_step_end_tensor_inputs), as diffusers pipelines list.
    _callback_tensor_inputs = ("logits", "tokens", "latents", "f_hat", "h")

    @classmethod
    def from_pretrained(cls, bundle: str | Path, backend: str = "onnxruntime",
                        graph_backends: Mapping[str, str] | None = None, verify: bool = True,
                        self_check: bool = True, allow_download: bool = False,
                        text_model: str | Path | None = None) -> "Pipeline":
        """A bundle folder or a Hugging Face repo id of one (from the local cache; fetched only with
        ``allow_download``), loaded as :meth:`from_bundle` does; ``pipe(prompts, ...)`` then returns a
        :class:`hartkit.runtime.output.PipelineOutput` (see :meth:`text_to_image`).

        ``backend="torch"`` runs a checkpoint (folder, ``.../llm`` or repo id) through the eager torch
        graphs instead (needs torch; ``text_model`` as for ``hartkit generate``).
        """
        from hartkit.bundle import MANIFEST, BundleError, read_manifest
        from hartkit.errors import UsageError
        from hartkit.model.hub import link_free_copy, parse_repo_spec, snapshot

        if backend == "torch":
            from hartkit.model.hub import resolve_checkpoint, resolve_text_model

            root = resolve_checkpoint(bundle, allow_download=allow_download)
            pipe = cls.from_checkpoint(root, resolve_text_model(text_model, root, allow_download=allow_download))
            pipe._diffusers_style = True
            return pipe
        folder = Path(bundle)
        if not folder.exists():
            spec = parse_repo_spec(str(bundle))
            if spec is None:
                raise BundleError(f"{bundle}: bundle folder not found (give a folder from `hartkit export` or a "
                                  "Hugging Face repo id of one)")
            folder = link_free_copy(snapshot(spec, "bundle", allow_download=allow_download))
        if not (folder / MANIFEST).is_file() and ((folder / "llm").is_dir() or folder.name == "llm"):
            raise UsageError(f"{bundle}: a checkpoint, not a bundle: export it with `hartkit export --checkpoint "
                             f"{bundle} --out BUNDLE`, or pass backend='torch' for the PyTorch reference")
        pipe = cls.from_bundle(folder, backend=backend, graph_backends=graph_backends, verify=verify,
                               self_check=self_check)
        size = read_manifest(folder)["loop"].get("image_size")
        pipe._image_size = int(size) if isinstance(size, int) else None
        pipe._diffusers_style = True
        return pipe

    @property
    def image_size(self) -> int | None:
        """The one image size (px) the graphs draw, when the pipeline knows it (bundles loaded by from_pretrained)."""
        return self._image_size

    # ------------------------------------------------------------------ generation
    def __call__(self, prompt: "str | list[str]", seed: int | None = None, cfg: float | None = None,
                 more_smooth: bool = True, top_p: float = 0.0, progress: Callable[[str], None] | None = None,
                 **diffusers_kwargs):
        """``pipe(prompt, seed=0) -> PIL.Image``; diffusers-style (a pipeline from :meth:`from_pretrained`, a
        list of prompts, or any of :meth:`text_to_image`'s keywords): an output object with ``.images``."""
        if self._diffusers_style or not isinstance(prompt, str) or diffusers_kwargs:
            guidance = diffusers_kwargs.pop("guidance_scale", None)
            return self.text_to_image(prompt, seed=seed, guidance_scale=cfg if guidance is None else guidance,
                                      more_smooth=more_smooth, top_p=top_p, progress=progress, **diffusers_kwargs)
        from PIL import Image

        image, _ = self.generate(prompt, seed=0 if seed is None else seed, cfg=cfg, more_smooth=more_smooth,
                                 top_p=top_p, progress=progress)
        return Image.fromarray(image)

    def text_to_image(self, prompt: "str | list[str]", *, height: int | None = None, width: int | None = None,
                      guidance_scale: float | None = None, num_images_per_prompt: int = 1,
                      generator=None, seed: int | None = None, callback_on_step_end=None,
                      callback_on_step_end_tensor_inputs: "tuple[str, ...] | list[str]" = ("f_hat",),
                      output_type: str = "pil", return_dict: bool = True, more_smooth: bool = True,
                      top_p: float = 0.0, progress: Callable[[str], None] | None = None):
        """Images for one prompt or a list, diffusers-style; returns ``PipelineOutput(images, seeds, prompts)``
        (``return_dict=False``: the tuple ``(images,)``).

        The graphs take one image at a time, so the images are generated one after another (each
        prompt's text encoding is computed once); image ``k`` uses seed ``seed + k`` (see
        :mod:`hartkit.runtime.output` for ``generator``), so any image can be made again alone.
        ``guidance_scale`` None: the model's recommendation. ``height``/``width`` may be given only as
        the bundle's own size. ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict``
        runs after each of HART's stages (``step`` = stage index, ``timestep`` = its token-map side),
        ``callback_kwargs`` holding the tensors named in ``callback_on_step_end_tensor_inputs`` (of
        ``logits``, ``tokens``, ``latents``, ``f_hat``, ``h``) and ``image_index``; returning new
        ``tokens``/``latents`` replaces them for the rest of the image. ``pipe.decode_latents(
        callback_kwargs["f_hat"])`` draws a preview of the image so far.
        """
        from hartkit.errors import UsageError
        from hartkit.runtime.output import PipelineOutput, image_seeds, prompt_list, to_output

        prompts = prompt_list(prompt)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise UsageError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "np"):
            raise UsageError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        unknown = [n for n in callback_on_step_end_tensor_inputs if n not in self._callback_tensor_inputs]
        if unknown:
            raise UsageError(f"callback_on_step_end_tensor_inputs: {unknown} not available; choose from "
                             f"{list(self._callback_tensor_inputs)}")
        self._check_size(height, width)
        seeds = image_seeds(len(prompts) * num_images_per_prompt, seed, generator)
        images, made_for = [], []
        for p_index, text in enumerate(prompts):
            embeds = self.encode_prompt(text)  # once per prompt, shared by its images
            for j in range(num_images_per_prompt):
                k = p_index * num_images_per_prompt + j
                hook = None
                if callback_on_step_end is not None:
                    hook = self._step_callback(callback_on_step_end, tuple(callback_on_step_end_tensor_inputs), k)
                image, _ = self.generate(text, seed=seeds[k], cfg=guidance_scale, more_smooth=more_smooth,
                                         top_p=top_p, progress=progress, prompt_embeds=embeds,
                                         callback_on_stage_end=hook)
                if k == 0:
                    self._check_size(height, width, drawn=image.shape[0])
                images.append(image)
                made_for.append(text)
        out = to_output(images, output_type)
        return PipelineOutput(out, seeds, made_for) if return_dict else (out,)

    def _check_size(self, height: int | None, width: int | None, drawn: int | None = None) -> None:
        """height/width are accepted only as the size the graphs draw (refused before any work where known)."""
        from hartkit.errors import UsageError

        size = drawn if drawn is not None else self.image_size
        asked = [(n, v) for n, v in (("height", height), ("width", width)) if v is not None]
        if size is None or not asked:
            return
        wrong = [f"{n}={v!r}" for n, v in asked if isinstance(v, bool) or v != size]
        if wrong:
            raise UsageError(f"{', '.join(wrong)}: this pipeline draws {size}x{size} px images only (its graphs "
                             "are exported for one resolution; `hartkit export --resolution PX` makes a smaller one)")

    def _step_callback(self, callback, names: tuple[str, ...], image_index: int):
        """diffusers' ``callback_on_step_end(pipe, step, timestep, kwargs)`` over the loop's stage callback."""
        patch_nums = self.loop.patch_nums

        def on_stage_end(si: int, state: dict):
            given = {name: state[name] for name in names}
            returned = callback(self, si, patch_nums[si], {**given, "image_index": image_index})
            if not returned:
                return None
            # Only what the callback replaced: handing back the same tokens would re-derive the latents.
            return {name: returned[name] for name in ("tokens", "latents")
                    if name in returned and returned[name] is not state[name]}

        return on_stage_end

    @_one_at_a_time
    def decode_latents(self, f_hat: np.ndarray, output_type: str = "pil"):
        """The image of an ``f_hat`` ``[1, Cvae, h, w]`` (e.g. a callback's, for a preview): vae_decode on it."""
        from hartkit.runtime.output import to_output

        (image,) = self._run("vae_decode", {"f_hat": np.ascontiguousarray(f_hat, dtype=np.float32)})
        pixels = (np.transpose(image[0], (1, 2, 0)) * 255).astype(np.uint8)  # as the loop's final image
        out = to_output([pixels], output_type)
        return out[0]

    @_one_at_a_time
    def encode_prompt(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """-> context ``[1,T,D]`` fp32 and context mask ``[1,T]`` bool (warns on truncation)."""
        return self.sampler.encode_prompt(prompt)

    @_one_at_a_time
    def generate(self, prompt: str, seed: int = 0, cfg: float | None = None, more_smooth: bool = True,
                 top_p: float = 0.0, progress: Callable[[str], None] | None = None,
                 prompt_embeds: tuple[np.ndarray, np.ndarray] | None = None,
                 callback_on_stage_end: StageCallback | None = None) -> tuple[np.ndarray, Trace]:
        """One image: uint8 ``[H, W, 3]`` and the trace; see :meth:`hartkit.loop.sampler.StagedLoop.generate`.

        ``cfg`` None: the guidance the model recommends (manifest ``loop.default_cfg``; HART's 4.5
        unless the checkpoint's ``llm/generation_config.json`` says otherwise).
        """
        return self.sampler.generate(prompt, seed=seed, cfg=cfg, more_smooth=more_smooth, top_p=top_p,
                                     progress=progress, prompt_embeds=prompt_embeds,
                                     callback_on_stage_end=callback_on_stage_end)

    def _run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.backend.run(graph, feeds)
