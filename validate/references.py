"""The references a bundle is validated against: eager torch on the same checkpoint, fp32 and fp16.

Both run the *same graph cut* as the bundle (:class:`~hartkit.model.torch_runner.TorchBackend` drives
the wrappers of :mod:`hartkit.model.graphs`) inside the same host loop (:class:`Pipeline`), so every
stage, graph input and RNG draw lines up one to one with the candidate's.

fp16 is what upstream ships: ``sample.py`` runs the whole model under
``torch.autocast("cuda", dtype=torch.float16)`` with fp32 weights. We do the same on the CPU with
``torch.autocast("cpu", dtype=torch.float16)`` around every graph call: matmuls, linears and convs
run in fp16, autocast's fp32 list (norms, softmax, ...) and the model's own ``.float()`` islands stay
fp32, exactly as upstream's autocast would treat them. The host loop (sampling, the diffusion
scheduler, the ``f_hat`` accumulator between graphs) stays fp32, as in every hartkit runtime. When
an op has no fp16 CPU kernel, the graph that hit it reruns in fp32 and the report says so
(``notes``): the fp16 row is then fp16 everywhere except that graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from hartkit.bundle import CONSTANTS, LOOP_KEYS, LoopInfo, bundle_path, load_npz
from hartkit.errors import HartkitError, UsageError
from hartkit.runtime.pipeline import Pipeline


class Autocast16Backend:
    """Runs a torch backend's graphs under CPU autocast fp16; outputs come back as fp32 arrays."""

    name = "torch-fp16"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.fallbacks: dict[str, str] = {}  # graph -> why it ran in fp32

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        if graph not in self.fallbacks:
            try:
                with torch.autocast("cpu", dtype=torch.float16):
                    out = self.inner.run(graph, feeds)
                return [np.asarray(o).astype(np.float32) if np.asarray(o).dtype == np.float16 else o for o in out]
            except RuntimeError as exc:
                # e.g. "... not implemented for 'Half'": an op without an fp16 CPU kernel.
                if "Half" not in str(exc) and "float16" not in str(exc).lower():
                    raise
                self.fallbacks[graph] = str(exc).splitlines()[0]
        return self.inner.run(graph, feeds)


def text_model_dir(checkpoint: Path, text_model: str | Path | None) -> Path:
    """--text-model (folder or repo id), else DIR/text_model, else upstream's default from the HF cache."""
    from hartkit.model.hub import resolve_text_model

    return resolve_text_model(text_model, checkpoint)


class References:
    """fp32 and fp16 reference pipelines on one checkpoint (one set of weights, shared)."""

    def __init__(self, checkpoint: str | Path, text_model: str | Path | None = None) -> None:
        from hartkit.model.checkpoint import load_hart
        from hartkit.model.text_encoder import TextEncoder
        from hartkit.model.torch_runner import TorchBackend, system_length_of

        from hartkit.model.hub import resolve_checkpoint

        self.checkpoint = resolve_checkpoint(checkpoint)  # a folder, .../llm or a cached repo id
        if not self.checkpoint.is_dir():
            raise UsageError(f"{self.checkpoint}: checkpoint folder not found")
        self.text_model = text_model_dir(self.checkpoint, text_model)
        model = load_hart(self.checkpoint)
        encoder = TextEncoder.from_pretrained(self.text_model)
        system_length = system_length_of(encoder.tokenizer, model.cfg.context_token)
        backend, info = TorchBackend.from_model(model, encoder, system_length)
        self.info = info
        self.loop = LoopInfo.from_dict(info["loop"])
        self.codebook = backend.codebook
        self.torch_backend = backend
        self.fp16_backend = Autocast16Backend(backend)
        self.fp32 = Pipeline(self.loop, backend, encoder.tokenizer, backend.codebook)
        self.fp16 = Pipeline(self.loop, self.fp16_backend, encoder.tokenizer, backend.codebook)
        self.output_names = {g["name"]: [o["name"] for o in g["outputs"]] for g in info["graphs"]}

    def check_bundle(self, folder: Path, manifest: dict) -> None:
        """Refuse a bundle exported from another model: its loop constants and codebook must match."""
        mine, theirs = self.info["loop"], manifest.get("loop", {})
        diff = [k for k in LOOP_KEYS if mine.get(k) != theirs.get(k)]
        if diff:
            raise HartkitError(f"{folder}: bundle and checkpoint {self.checkpoint} describe different models "
                               f"(loop constants {', '.join(diff)} differ)")
        constants = bundle_path(folder, manifest.get("constants", CONSTANTS), "constants")
        if constants.is_file():
            codebook = load_npz(constants).get("codebook")
            if codebook is None or codebook.shape != self.codebook.shape or not np.allclose(
                    codebook, self.codebook, rtol=1e-3, atol=1e-3):
                raise HartkitError(f"{folder}: the bundle's VQ codebook differs from {self.checkpoint}'s: it was "
                                   "exported from another checkpoint (pass the right --checkpoint)")
