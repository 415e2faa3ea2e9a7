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

from hartkit.bundle import build_export_info, bundle_path
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
    # Stage 0 runs on the ar_stage graph with an empty past (bit-exact with ar_context: full attention
    # over no cached keys), so one session holds the AR weights: each InferenceSession prepacks its
    # own copy of them (+0.45 GB int8, +2.9 GB fp32 at 0.7B). onnxruntime binds symbolic dims at run
    # time, so the export's example bounds (past >= context tokens) do not stop a zero-length past.
    context_on_stage_graph = True
    # Each session's CPU arena keeps its largest run's activations for good (the 0.7B VAE decoder alone
    # ~0.6 GB at 256 px); without it a graph's buffers are returned when it ends, so a generation peaks
    # at its largest graph instead of the sum over graphs.
    use_arena = False

    def __init__(self, export_dir: Path, info: dict, threads: int | None = None) -> None:
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


class TorchBackend:
    """Runs the graph wrappers of :mod:`hartkit.export.graphs` eagerly (reference and debugging)."""

    name = "torch"

    def __init__(self, modules: Mapping[str, Any], io: Mapping[str, tuple[list[str], list[str]]]) -> None:
        self._modules = dict(modules)
        self._io = dict(io)
        self.tokenizer = None
        self.codebook: np.ndarray | None = None

    @classmethod
    def from_model(cls, model, text_encoder, system_length: int) -> tuple["TorchBackend", dict]:
        from hartkit.export.graphs import hart_graph_specs

        specs = hart_graph_specs(model, text_encoder, system_length)
        info = build_export_info(model, system_length, specs)
        backend = cls({s.name: s.build().eval() for s in specs}, _graph_io(info))
        backend.tokenizer = text_encoder.tokenizer
        backend.codebook = model.vae.quantize.embedding.weight.detach().float().numpy().copy()
        return backend, info

    @classmethod
    def from_checkpoint(cls, checkpoint, text_model=None) -> tuple["TorchBackend", dict]:
        from hartkit.model.checkpoint import load_hart
        from hartkit.model.text_encoder import TextEncoder

        checkpoint = Path(checkpoint)
        model = load_hart(checkpoint)
        encoder = TextEncoder.from_pretrained(Path(text_model) if text_model else checkpoint / "text_model")
        return cls.from_model(model, encoder, system_length_of(encoder.tokenizer, model.cfg.context_token))

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        from hartkit.export.graphs import run_graph

        if graph not in self._modules:
            raise HartkitError(f"torch backend: unknown graph '{graph}'")
        return run_graph(self._modules[graph], _ordered(graph, self._io[graph][0], feeds))


def system_length_of(tokenizer, context_token: int) -> int:
    """Length of the (possibly truncated) system prompt the text encoder graph is built for."""
    return tokenizer.encode([""], context_token).system_length


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


def _make(name: str, export_dir: Path, info: dict) -> Backend:
    if name == "onnxruntime":
        return OnnxRuntimeBackend(export_dir, info)
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


def open_backend(export_dir: Path, info: dict, backend: str, graph_backends: Mapping[str, str]) -> Backend:
    known = {g["name"] for g in info["graphs"]}
    bad = sorted(set(graph_backends) - known)
    if bad:
        raise UsageError(f"per-graph backend given for unknown graphs {bad}; graphs are {sorted(known)}")
    cache: dict[str, Backend] = {}

    def get(name: str) -> Backend:
        if name not in cache:
            cache[name] = _make(name, export_dir, info)
        return cache[name]

    default = get(backend)
    return MixedBackend(default, {g: get(b) for g, b in graph_backends.items()})
