"""The ``onnxruntime`` backend: runs a bundle's ONNX graphs, one InferenceSession per graph, on the CPU."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hartkit.errors import HartkitError, MissingDependencyError
from hartkit.fsutil import confined_path
from hartkit.loop.plan import past_shape


def _graph_io(info: dict) -> dict[str, tuple[list[str], list[str]]]:
    return {g["name"]: ([i["name"] for i in g["inputs"]], [o["name"] for o in g["outputs"]]) for g in info["graphs"]}


def _ordered(graph: str, names: list[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    missing = [n for n in names if n not in feeds]
    if missing:
        raise HartkitError(f"graph {graph}: missing inputs {missing}")
    return [np.ascontiguousarray(feeds[n]) for n in names]


class OnnxRuntimeBackend:
    name = "onnxruntime"
    format = "onnx"  # the manifest's ``files`` section this backend reads
    serves_generation = True  # takes ``generation=``: see context_on_stage_graph
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
        self._files = info.get("files", {}).get(self.format, {})
        self._io = _graph_io(info)
        self._sessions: dict[str, Any] = {}
        self._threads = threads
        # (depth, rows, heads, head_dim) of ar_stage's past, when stage 0 runs on that graph
        self._stage0_past = past_shape(info) if generation and self.context_on_stage_graph else None

    def _session(self, graph: str):
        if graph not in self._sessions:
            if graph not in self._files:
                raise HartkitError(f"{self._dir}: no ONNX file for graph '{graph}' (export with --format onnx)")
            path = confined_path(self._dir, self._files[graph], f"ONNX file of graph '{graph}'")
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
