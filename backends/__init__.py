"""hartkit.backends: the graph runners, torch-free at import. Each runs one exported graph by name:
``run(graph, {input: array}) -> [outputs in declared order]``.

Both sides of the bundle use them: the exporter checks each format's files on its runner, the bundle
verifies golden vectors and replays its loop on them, and the runtime's Pipeline generates with them.
So they sit low, under the bundle format, and read only the parts of a manifest they need (``graphs``
and ``files.<format>``), given as a dict.

``open_backend`` picks one per graph (a default plus per-graph overrides, e.g. the AR stages on
ExecuTorch and the VAE on onnxruntime). Each runner imports its library when it is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from hartkit.backends.coreml import CoreMLBackend
from hartkit.backends.executorch import ExecuTorchBackend
from hartkit.backends.ort import OnnxRuntimeBackend
from hartkit.errors import UsageError

# backend name -> its runner class; one line per runner (each imports its library when it is built).
RUNNERS: dict[str, type] = {cls.name: cls for cls in (OnnxRuntimeBackend, ExecuTorchBackend, CoreMLBackend)}
BACKENDS = (*RUNNERS, "torch")
# Which export format each backend reads; "torch" runs the eager graphs of a checkpoint (hartkit.model.torch_runner).
BACKEND_FORMAT = {**{name: cls.format for name, cls in RUNNERS.items()}, "torch": "torch"}
# Which backend runs each export format (for messages and for picking the backend of a format).
FORMAT_BACKEND = {cls.format: name for name, cls in RUNNERS.items()}


class Backend(Protocol):
    """What the sampling loop, the parity checks and the bundle's verification call."""

    name: str

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


class MixedBackend:
    """Routes each graph to its backend."""

    def __init__(self, default: Backend, overrides: Mapping[str, Backend]) -> None:
        self.default = default
        self.overrides = dict(overrides)
        self.name = default.name if not overrides else "mixed"

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.overrides.get(graph, self.default).run(graph, feeds)

    def backend_for(self, graph: str) -> Backend:
        return self.overrides.get(graph, self.default)


def runner_class(name: str) -> type:
    """The class of backend ``name`` (its library is imported when it is built)."""
    if name == "torch":
        raise UsageError("the torch backend runs from a checkpoint: Pipeline.from_checkpoint(...) "
                         "or `hartkit generate --checkpoint DIR`")
    if name not in RUNNERS:
        raise UsageError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    return RUNNERS[name]


def make_backend(name: str, export_dir: Path, info: dict, generation: bool = False) -> Backend:
    """One backend over an export folder. ``generation``: opened for the sampling loop (a backend may
    then serve one graph through another, e.g. onnxruntime's stage 0 on ar_stage)."""
    cls = runner_class(name)
    if getattr(cls, "serves_generation", False):
        return cls(export_dir, info, generation=generation)
    return cls(export_dir, info)


def open_backend(export_dir: Path, info: dict, backend: str, graph_backends: Mapping[str, str],
                 generation: bool = False) -> Backend:
    """The backend per graph. ``generation``: for the sampling loop (a backend may then serve one graph
    through another, e.g. onnxruntime's stage 0 on ar_stage); without it every graph runs its own file."""
    known = {g["name"] for g in info["graphs"]}
    bad = sorted(set(graph_backends) - known)
    if bad:
        raise UsageError(f"per-graph backend given for unknown graphs {bad}; graphs are {sorted(known)}")
    cache: dict[str, Backend] = {}

    def get(name: str) -> Backend:
        if name not in cache:
            cache[name] = make_backend(name, export_dir, info, generation)
        return cache[name]

    default = get(backend)
    return MixedBackend(default, {g: get(b) for g, b in graph_backends.items()})


__all__ = ["BACKENDS", "BACKEND_FORMAT", "FORMAT_BACKEND", "RUNNERS", "Backend", "CoreMLBackend", "ExecuTorchBackend",
           "MixedBackend", "OnnxRuntimeBackend", "make_backend", "open_backend", "runner_class"]
