"""The eager torch graph runner: the :mod:`hartkit.model.graphs` wrappers run by name, like an exported graph's backend.

``run(graph, feeds) -> [outputs in declared order]`` over torch modules, so the one sampling loop
(:mod:`hartkit.loop.sampler`) drives the fp32 reference, the export's recording and calibration the
same way it drives an exported bundle. Needs torch.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from hartkit.errors import HartkitError


class TorchBackend:
    """Runs the graph wrappers of :mod:`hartkit.model.graphs` eagerly (reference and debugging)."""

    name = "torch"

    def __init__(self, modules: Mapping[str, Any], io: Mapping[str, tuple[list[str], list[str]]]) -> None:
        self.modules = dict(modules)
        self._io = dict(io)
        self.tokenizer = None
        self.codebook: np.ndarray | None = None

    @classmethod
    def from_model(cls, model, text_encoder, system_length: int) -> tuple["TorchBackend", dict]:
        """-> the backend and ``{"loop": ..., "graphs": [...]}``: those two sections as a manifest holds them."""
        from hartkit.model.graphs import hart_graph_specs, loop_info

        specs = hart_graph_specs(model, text_encoder, system_length)
        info = {"loop": loop_info(model, system_length), "graphs": [s.to_json() for s in specs]}
        io = {s.name: ([i.name for i in s.inputs], [o.name for o in s.outputs]) for s in specs}
        backend = cls({s.name: s.build().eval() for s in specs}, io)
        backend.tokenizer = text_encoder.tokenizer
        backend.codebook = model.vae.quantize.embedding.weight.detach().float().numpy().copy()
        return backend, info

    @classmethod
    def from_checkpoint(cls, checkpoint, text_model=None, resolution: int | None = None) -> tuple["TorchBackend", dict]:
        from hartkit.model.checkpoint import load_hart
        from hartkit.model.text_encoder import TextEncoder

        from hartkit.model.hub import resolve_checkpoint, resolve_text_model

        checkpoint = resolve_checkpoint(checkpoint)  # a folder, .../llm or a cached repo id
        model = load_hart(checkpoint, resolution=resolution)
        encoder = TextEncoder.from_pretrained(resolve_text_model(text_model, checkpoint))
        return cls.from_model(model, encoder, system_length_of(encoder.tokenizer, model.cfg.context_token))

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        from hartkit.model.graphs import run_graph

        if graph not in self.modules:
            raise HartkitError(f"torch backend: unknown graph '{graph}'")
        names = self._io[graph][0]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise HartkitError(f"graph {graph}: missing inputs {missing}")
        return run_graph(self.modules[graph], [np.ascontiguousarray(feeds[n]) for n in names])


def system_length_of(tokenizer, context_token: int) -> int:
    """Length of the (possibly truncated) system prompt the text encoder graph is built for."""
    return tokenizer.encode([""], context_token).system_length
