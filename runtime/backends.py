"""Backends run one exported graph by name: ``run(graph, {input: array}) -> [outputs in declared order]``.

``open_backend`` picks one per graph (a default plus per-graph overrides, e.g. the AR stages on
ExecuTorch and the VAE on onnxruntime). Each backend imports its library lazily, so this module —
and with it ``hartkit.runtime`` — imports without torch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from hartkit.bundle import bundle_path, past_shape
from hartkit.errors import HartkitError, MissingDependencyError, UsageError

BACKENDS = ("onnxruntime", "executorch", "coreml", "torch")
# Which export format each backend reads.
BACKEND_FORMAT = {"onnxruntime": "onnx", "executorch": "executorch", "coreml": "coreml", "torch": "torch"}


class Backend(Protocol):
    name: str

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


def _graph_io(info: dict) -> dict[str, tuple[list[str], list[str]]]:
    return {g["name"]: ([i["name"] for i in g["inputs"]], [o["name"] for o in g["outputs"]]) for g in info["graphs"]}


def _ordered(graph: str, names: list[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    missing = [n for n in names if n not in feeds]
    if missing:
        raise HartkitError(f"graph {graph}: missing inputs {missing}")
    return [np.ascontiguousarray(feeds[n]) for n in names]


class OnnxRuntimeBackend:
    name = "onnxruntime"
    # In a generation (``generation=True``), stage 0 runs on the ar_stage graph with an empty past
    # (bit-exact with ar_context: full attention over no cached keys), so one session holds the AR
    # weights: each InferenceSession prepacks its own copy of them (+0.45 GB int8, +2.9 GB fp32 at
    # 0.7B). onnxruntime binds symbolic dims at run time, so the export's example bounds (past >=
    # context tokens) do not stop a zero-length past. Opened for a parity check or bundle
    # verification (no ``generation``), every graph runs its own file.
    context_on_stage_graph = True
    # Each session's CPU arena keeps its largest run's activations for good (the 0.7B VAE decoder alone
    # ~0.6 GB at 256 px); without it a graph's buffers are returned when it ends, so a generation peaks
    # at its largest graph instead of the sum over graphs.
    use_arena = False

    def __init__(self, export_dir: Path, info: dict, threads: int | None = None, generation: bool = False) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingDependencyError("backend 'onnxruntime' needs the onnxruntime package: pip install 'hartkit[onnx]'") from exc
        self._ort = ort
        self._dir = export_dir
        self._files = info.get("files", {}).get("onnx", {})
        self._io = _graph_io(info)
        self._sessions: dict[str, Any] = {}
        self._threads = threads
        # (depth, rows, heads, head_dim) of ar_stage's past, when stage 0 runs on that graph
        self._stage0_past = past_shape(info) if generation and self.context_on_stage_graph else None

    def _session(self, graph: str):
        if graph not in self._sessions:
            if graph not in self._files:
                raise HartkitError(f"{self._dir}: no ONNX file for graph '{graph}' (export with --format onnx)")
            path = bundle_path(self._dir, self._files[graph], f"ONNX file of graph '{graph}'")
            if not path.is_file():
                raise HartkitError(f"{path}: ONNX file of graph '{graph}' is missing")
            opts = self._ort.SessionOptions()
            if self._threads:
                opts.intra_op_num_threads = self._threads
            opts.log_severity_level = 3
            opts.enable_cpu_mem_arena = self.use_arena
            with _ort_errors(f"{path}: onnxruntime cannot load the graph '{graph}'"):
                self._sessions[graph] = self._ort.InferenceSession(str(path), opts,
                                                                   providers=["CPUExecutionProvider"])
        return self._sessions[graph]

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if graph == "ar_context" and self._stage0_past is not None and "ar_stage" in self._files:
            depth, rows, heads, head_dim = self._stage0_past
            empty = np.zeros((depth, rows, heads, 0, head_dim), np.float32)
            graph, feeds = "ar_stage", {**feeds, "past_k": empty, "past_v": empty}
        sess = self._session(graph)
        names = [i.name for i in sess.get_inputs()]
        arrays = _ordered(graph, names, feeds)
        with _ort_errors(f"onnxruntime failed on graph '{graph}'"):
            return sess.run(None, dict(zip(names, arrays)))


@contextlib.contextmanager
def _ort_errors(what: str):
    """onnxruntime's own exceptions (a corrupt file, inputs that disagree with the graph) as one-line
    HartkitErrors: they come from the files or the manifest, not from a bug here."""
    try:
        yield
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HartkitError(f"{what}: {first[:300]}") from None


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


def _make(name: str, export_dir: Path, info: dict, generation: bool) -> Backend:
    if name == "onnxruntime":
        return OnnxRuntimeBackend(export_dir, info, generation=generation)
    if name == "executorch":
        from hartkit.runtime.executorch_backend import ExecuTorchBackend

        return ExecuTorchBackend(export_dir, info)
    if name == "coreml":
        from hartkit.runtime.coreml_backend import CoreMLBackend

        return CoreMLBackend(export_dir, info)
    if name == "torch":
        raise UsageError("the torch backend runs from a checkpoint: Pipeline.from_checkpoint(...) "
                         "or `hartkit generate --checkpoint DIR`")
    raise UsageError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")


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
            cache[name] = _make(name, export_dir, info, generation)
        return cache[name]

    default = get(backend)
    return MixedBackend(default, {g: get(b) for g, b in graph_backends.items()})
