"""ONNX export of the graphs (torch.onnx dynamo exporter, opset 18, external data past 2 GB).

The text encoder goes through our own graph wrapper like the others: optimum's Qwen2 exporter
produces ``last_hidden_state`` for the whole [system; prompt] sequence, but HART needs the system rows
dropped and the exact mask semantics of transformers 4.42 (see model/text_encoder.py); the wrapper is
one graph with both. (optimum remains the route for users who only want the stock Qwen2 export.)
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from hartkit.errors import MissingDependencyError
from hartkit.model.graphs import GraphSpec, dynamic_shapes

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of initializers; protobuf's hard limit is 2 GB


def _require():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("ONNX export needs onnx and onnxscript: pip install 'hartkit[onnx]'") from exc


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and warns about torchvision ops we never use."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            yield
    finally:
        logger.setLevel(level)


def strip_debug_metadata(model) -> int:
    """Drop the exporter's per-node debug metadata (torch stack traces with this machine's absolute
    source paths, FX node dumps, name scopes): ~70 % of a small graph file's bytes, and nothing a
    bundle should ship. Returns the number of entries removed."""
    removed = 0

    def clean(nodes) -> None:
        nonlocal removed
        for node in nodes:
            removed += len(node.metadata_props)
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:  # subgraphs (If/Loop/Scan bodies)
                if attr.g is not None:
                    clean(attr.g.node)
                for g in attr.graphs:
                    clean(g.node)

    clean(model.graph.node)
    for fn in model.functions:
        clean(fn.node)
    return removed


def export_onnx_graph(spec: GraphSpec, module: nn.Module, path: Path) -> None:
    """Export one graph; weights go to ``<name>.onnx.data`` when the model would pass 2 GB."""
    import onnx

    _require()
    module = module.eval()
    args = spec.example_inputs()
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes(spec),
            input_names=[i.name for i in spec.inputs], output_names=[o.name for o in spec.outputs],
            optimize=True, verbose=False, external_data=False, report=False,
        )
    model = program.model_proto
    strip_debug_metadata(model)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    tmp = path.with_name(path.name + ".tmp")
    if size > EXTERNAL_DATA_THRESHOLD:
        data_name = path.name + ".data"
        for stale in (path.with_name(data_name),):
            if stale.exists():
                stale.unlink()  # onnx appends to an existing data file
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
        onnx.checker.check_model(str(tmp))
    else:
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(model)
    os.replace(tmp, path)


def export_onnx(specs: list[GraphSpec], modules: Mapping[str, nn.Module], out_dir: Path,
                progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """All graphs to ``out_dir/onnx/<graph>.onnx``; returns graph -> path relative to ``out_dir``."""
    _require()
    sub = out_dir / "onnx"
    sub.mkdir(parents=True, exist_ok=True)
    files = {}
    for spec in specs:
        if progress:
            progress(f"onnx: {spec.name}")
        export_onnx_graph(spec, modules[spec.name], sub / f"{spec.name}.onnx")
        files[spec.name] = f"onnx/{spec.name}.onnx"
    return files
