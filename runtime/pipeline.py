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

    # ------------------------------------------------------------------ generation
    def __call__(self, prompt: str, seed: int = 0, cfg: float | None = None, more_smooth: bool = True,
                 top_p: float = 0.0, progress: Callable[[str], None] | None = None):
        from PIL import Image

        image, _ = self.generate(prompt, seed=seed, cfg=cfg, more_smooth=more_smooth, top_p=top_p, progress=progress)
        return Image.fromarray(image)

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
