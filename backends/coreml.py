"""Core ML backend: runs the exported ``.mlpackage`` graphs with coremltools' predict (macOS only).

Core ML predictions exist only on macOS; elsewhere construction fails with a message that says so
and what to use instead (the export's MIL check verifies the packages on Linux, see
the Core ML export target). No torch and no coremltools at import: coremltools is imported when
the backend is built, on macOS.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hartkit.errors import HartkitError, MissingDependencyError, UsageError
from hartkit.fsutil import confined_path

COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
MULTIFUNCTION_INFO = "coreml/multifunction.json"  # written by the Core ML export target


def _platform() -> str:
    return f"{platform.system() or sys.platform} {platform.release()}".strip()


class CoreMLBackend:
    """``run(graph, feeds)`` on the Core ML packages of an export folder.

    ``multifunction=True`` runs the graphs that have one from the iOS18 multifunction packages
    (shared weights; needs macOS 15), the rest from the per-graph iOS17 packages.
    """

    name = "coreml"
    format = "coreml"  # the manifest's ``files`` section this backend reads

    def __init__(self, export_dir: str | Path, info: Mapping[str, Any], compute_units: str = "ALL",
                 multifunction: bool = False) -> None:
        if sys.platform != "darwin":
            raise HartkitError(
                f"Core ML predictions need macOS; this is {_platform()}; use the onnxruntime or executorch "
                "backend, or verify the Core ML packages with hartkit's MIL check "
                "(which `hartkit export --format coreml` runs)")
        if compute_units not in COMPUTE_UNITS:
            raise UsageError(f"compute_units {compute_units!r}: choose one of {list(COMPUTE_UNITS)}")
        try:
            import coremltools as ct
        except ImportError as exc:
            raise MissingDependencyError("backend 'coreml' needs coremltools: pip install 'hartkit[coreml]'") from exc
        self._ct = ct
        self._dir = Path(export_dir)
        self._files: dict[str, str] = dict(info.get("files", {}).get(self.format, {}))
        self._io = {g["name"]: ([i["name"] for i in g["inputs"]], [o["name"] for o in g["outputs"]])
                    for g in info["graphs"]}
        self._units = getattr(ct.ComputeUnit, compute_units)
        self._functions: dict[str, str] = {}  # graph -> multifunction package (relative)
        if multifunction:
            mf = confined_path(self._dir, MULTIFUNCTION_INFO, "Core ML multifunction index")
            if not mf.is_file():
                raise HartkitError(f"{mf}: missing; this export has no iOS18 multifunction packages")
            mac = tuple(int(p) for p in (platform.mac_ver()[0] or "0").split(".")[:1])
            if mac < (15,):
                raise HartkitError(f"multifunction Core ML packages need macOS 15 or newer; this is {_platform()}")
            for rel, entry in json.loads(mf.read_text())["packages"].items():
                for graph in entry["functions"]:
                    self._functions[graph] = rel
        self._models: dict[str, Any] = {}

    def _model(self, graph: str):
        if graph in self._models:
            return self._models[graph]
        if graph in self._functions:
            path = confined_path(self._dir, self._functions[graph], f"Core ML package of graph '{graph}'")
            kwargs = {"function_name": graph}
        elif graph in self._files:
            path = confined_path(self._dir, self._files[graph], f"Core ML package of graph '{graph}'")
            kwargs = {}
        else:
            raise HartkitError(f"{self._dir}: no Core ML package for graph '{graph}' (export with --format coreml)")
        if not path.is_dir():
            raise HartkitError(f"{path}: Core ML package of graph '{graph}' is missing")
        model = self._ct.models.MLModel(str(path), compute_units=self._units, **kwargs)
        self._models[graph] = model
        return model

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if graph not in self._io:
            raise HartkitError(f"coreml backend: unknown graph '{graph}'")
        inputs, outputs = self._io[graph]
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise HartkitError(f"graph {graph}: missing inputs {missing}")
        arrays = {}
        for name in inputs:
            x = np.asarray(feeds[name])
            # Core ML multi-arrays have no int64: the packages take int32 (token ids, masks)
            arrays[name] = np.ascontiguousarray(x.astype(np.int32) if np.issubdtype(x.dtype, np.integer)
                                                else x.astype(np.float32))
        result = self._model(graph).predict(arrays)
        return [np.asarray(result[n], dtype=np.float32) for n in outputs]
