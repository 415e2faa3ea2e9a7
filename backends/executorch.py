"""The ``executorch`` backend: runs the methods of the exported ``.pte`` program(s) with ExecuTorch's pybindings.

The export writes one program, ``executorch/hart.pte``, with one method per graph (method name ==
graph name); ``export.json`` maps every graph to its file, so a fallback export with several programs
reads the same way. Programs and methods are loaded once, on first use, and cached.

Torch: ExecuTorch's Python runtime is a pybind extension linked against libtorch — importing it
imports torch, and ``Method.execute`` accepts only ``torch.Tensor`` inputs (numpy arrays are refused
with "Unsupported python type"). So this backend needs torch at run time; it imports it lazily, in the
constructor, so that ``import hartkit.runtime`` stays torch-free. Inputs are wrapped with
``torch.from_numpy`` (no copy) and outputs come back as tensors that the runtime has already copied out
of its arenas (methods of one program share those arenas), so ``.numpy()`` on them is safe.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from hartkit.errors import HartkitError, MissingDependencyError
from hartkit.fsutil import confined_path

# ExecuTorch's threadpool probes the CPU on the first method load and logs each probe to stderr from
# C++ (no logger to silence): these lines, and only these, are dropped.
CPUINFO_NOISE = ("[cpuinfo_utils.cpp:",)


@contextmanager
def _without_native_lines(prefixes: tuple[str, ...]) -> Iterator[None]:
    """Capture file descriptor 2 for the call and write back every line not starting with ``prefixes``
    (a C++ library writes to the descriptor, below Python's sys.stderr)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # a replaced stderr (pytest's capture, an IDE)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not line.startswith(prefixes)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
DTYPES = {"float32": np.float32, "int64": np.int64}


class ExecuTorchBackend:
    name = "executorch"
    format = "executorch"  # the manifest's ``files`` section this backend reads

    def __init__(self, export_dir: str | Path, info: dict) -> None:
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError as exc:
            raise MissingDependencyError(
                "backend 'executorch' needs the executorch package (and torch, which its runtime links against): "
                "pip install 'hartkit[executorch]'") from exc
        self._torch = torch
        self._runtime = Runtime.get()
        self._dir = Path(export_dir)
        self._files: dict[str, str] = dict(info.get("files", {}).get(self.format, {}))
        self._graphs: dict[str, dict] = {g["name"]: g for g in info["graphs"]}
        self._programs: dict[str, Any] = {}
        self._methods: dict[str, Any] = {}

    # ------------------------------------------------------------------ loading
    def _program(self, graph: str):
        if graph not in self._files:
            raise HartkitError(f"{self._dir}: no ExecuTorch program for graph '{graph}' (export with --format executorch)")
        rel = self._files[graph]
        if rel not in self._programs:
            path = confined_path(self._dir, rel, f"ExecuTorch program of graph '{graph}'")
            if not path.is_file():
                raise HartkitError(f"{path}: ExecuTorch program of graph '{graph}' is missing")
            try:
                self._programs[rel] = self._runtime.load_program(path)
            except (RuntimeError, ValueError) as exc:
                raise HartkitError(f"{path}: not a loadable ExecuTorch program (truncated or corrupt?): {exc}") from exc
        return self._programs[rel]

    def _method(self, graph: str):
        if graph not in self._methods:
            program = self._program(graph)
            if graph not in program.method_names:
                raise HartkitError(f"{self._dir / self._files[graph]}: has no method for graph '{graph}' "
                                   f"(methods: {', '.join(sorted(program.method_names))})")
            try:
                with _without_native_lines(CPUINFO_NOISE):
                    self._methods[graph] = program.load_method(graph)
            except RuntimeError as exc:
                raise HartkitError(f"ExecuTorch could not load method '{graph}': {exc}") from exc
        return self._methods[graph]

    def release_except(self, keep: "set[str] | frozenset[str]") -> None:
        """Drop the loaded methods of graphs not in ``keep``, and every program none of ``keep`` needs:
        checking graph by graph, a 0.7B bundle then never holds its text encoder (6 GB, and as much
        again in XNNPACK's packed copy) beside the AR transformer."""
        for graph in [g for g in self._methods if g not in keep]:
            del self._methods[graph]
        needed = {self._files[g] for g in keep if g in self._files}
        for rel in [r for r in self._programs if r not in needed]:
            del self._programs[rel]

    # ------------------------------------------------------------------ running
    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if graph not in self._graphs:
            raise HartkitError(f"executorch backend: unknown graph '{graph}'")
        method = self._method(graph)
        spec = self._graphs[graph]
        arrays = [_checked(graph, inp, feeds) for inp in spec["inputs"]]
        tensors = [self._torch.from_numpy(a) for a in arrays]
        try:
            outs = method.execute(tensors)
        except RuntimeError as exc:
            shapes = ", ".join(f"{i['name']}{list(a.shape)}" for i, a in zip(spec["inputs"], arrays))
            raise HartkitError(f"ExecuTorch method '{graph}' failed on inputs {shapes}: {exc}") from exc
        if len(outs) != len(spec["outputs"]):
            raise HartkitError(f"ExecuTorch method '{graph}' returned {len(outs)} outputs, "
                               f"export.json declares {len(spec['outputs'])}")
        return [o.numpy() for o in outs]


def _checked(graph: str, inp: Mapping[str, Any], feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The feed for one declared input, checked against its dtype and (bounded) shape.

    ExecuTorch reports a wrong dtype or a size past a bound only as an error code; say which input.
    """
    name = inp["name"]
    if name not in feeds:
        raise HartkitError(f"graph {graph}: missing input '{name}'")
    arr = np.asarray(feeds[name])
    want = DTYPES[inp["dtype"]]
    if arr.dtype != want:
        raise HartkitError(f"graph {graph}: input '{name}' is {arr.dtype}, expected {inp['dtype']}")
    dims = inp["shape"]
    ok = arr.ndim == len(dims)
    for size, d in zip(arr.shape, dims):
        ok = ok and (size == d if isinstance(d, int) else d["min"] <= size <= d["max"])
    if not ok:
        declared = [d if isinstance(d, int) else f"{d['dim']}[{d['min']}..{d['max']}]" for d in dims]
        raise HartkitError(f"graph {graph}: input '{name}' has shape {list(arr.shape)}, expected {declared}")
    # from_numpy wants a contiguous, writable array (it shares the memory; a read-only one warns).
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = np.array(arr, order="C", copy=True)
    return arr
