"""One weights file for all the ONNX graphs of an export: every large initializer stored once.

The exporter writes one ``.onnx`` per graph, and the graphs that run the same module each carry a
copy of its weights (the AR transformer's are in ``condition``, ``ar_context``, ``ar_stage``,
``ar_head`` and ``diffusion_condition``). :func:`share_onnx_weights` runs after all the graphs of a
folder are written (fp32 or quantized): every initializer of at least ``min_bytes`` moves into one
external-data file (``weights.bin``), deduplicated by content (sha256 of the raw bytes, dtype and
shape), and each graph's initializers point at ``(location, offset, length)`` in it — standard ONNX
external data, resolved by onnxruntime relative to the model file's folder. Offsets are aligned:
64 bytes, and 4096 (the page size) for tensors of 64 KiB and more, so a runtime can map them in
place (onnxruntime 1.32 maps external data on Linux whatever the offset, rounding the mapping down
to a page; other runtimes and platforms may not).

Byte-identical copies are what the exporter and onnxruntime.quantization produce for the same
weight in different graphs (the quantizers are deterministic), so quantized exports dedup too.

Memory at run time (onnxruntime 1.32, CPU): each session maps the file instead of holding a heap
copy of every initializer; weights that a kernel pre-packs (MatMul's B) still get one packed copy
per session (the mapping is released after packing). ``session.disable_prepacking`` would leave one
mapped copy for all sessions but made small-row MatMuls ~3.5x slower here, so it is not used.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from hartkit.errors import HartkitError

SHARED_DATA = "weights.bin"
ALIGN = 64  # every tensor: cache lines / SIMD loads
PAGE_ALIGN = 4096  # large tensors: page-aligned offsets so a runtime can mmap them
PAGE_ALIGN_MIN_BYTES = 64 * 1024


def _graph_initializers(graph) -> Iterator:
    """Initializers of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    from onnx import AttributeProto

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _graph_initializers(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graph_initializers(g)


def _is_external(tensor) -> bool:
    from onnx import TensorProto

    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


@dataclass(frozen=True)
class ExternalRef:
    location: str
    offset: int
    length: int | None


def external_ref(tensor) -> ExternalRef:
    info = {e.key: e.value for e in tensor.external_data}
    if "location" not in info:
        raise HartkitError(f"initializer {tensor.name}: external data without a location")
    length = info.get("length")
    return ExternalRef(info["location"], int(info.get("offset", 0) or 0), int(length) if length else None)


def _resolve(folder: Path, location: str, model: Path) -> Path:
    rel = PurePosixPath(location)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in location:
        raise HartkitError(f"{model}: external data location {location!r} escapes {folder}")
    return folder.joinpath(*rel.parts)


def _read_range(path: Path, offset: int, length: int | None) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read() if length is None else f.read(length)
    if length is not None and len(data) != length:
        raise HartkitError(f"{path}: external data at offset {offset} is truncated ({len(data)} of {length} bytes)")
    return data


def _raw_bytes(tensor, folder: Path, model: Path) -> bytes | None:
    """The tensor's little-endian raw bytes, or None where ONNX cannot store it externally (strings)."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    if _is_external(tensor):
        ref = external_ref(tensor)
        return _read_range(_resolve(folder, ref.location, model), ref.offset, ref.length)
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    try:  # typed fields (float_data, int64_data, ...): through numpy, which gives the raw layout
        return numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
    except Exception:  # noqa: BLE001 - an exotic type we do not move; it stays inline
        return None


def _approx_bytes(tensor) -> int:
    """Stored bytes of an initializer without reading external data."""
    if _is_external(tensor):
        ref = external_ref(tensor)
        return ref.length if ref.length is not None else 1 << 62  # unknown length: treat as large
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return tensor.ByteSize()


def _set_external(tensor, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    for fld in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                "string_data"):
        tensor.ClearField(fld)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def _aligned(offset: int, length: int) -> int:
    step = PAGE_ALIGN if length >= PAGE_ALIGN_MIN_BYTES else ALIGN
    return -(-offset // step) * step


def _file_bytes(folder: Path, models: Iterable[Path], data_files: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in models) + sum(p.stat().st_size for p in set(data_files) if p.is_file())


def share_onnx_weights(onnx_dir: Path, min_bytes: int = 1024, data_name: str = SHARED_DATA) -> dict:
    """Move every initializer of >= ``min_bytes`` of every ``*.onnx`` in ``onnx_dir`` into one
    deduplicated external-data file ``onnx_dir/data_name``; returns stats.

    Tensors already stored externally (per-graph ``.onnx.data`` past 2 GB, or a previous run's
    shared file) move too, whatever their size, and the data files they came from are removed.
    Everything is written to temp files first and swapped in with ``os.replace``; each graph stays
    loadable at every step when the folder held no shared file before. Run it on the export's temp
    folder (``export_checkpoint`` does) for an all-or-nothing result.
    """
    import onnx

    onnx_dir = Path(onnx_dir)
    models = sorted(onnx_dir.glob("*.onnx"))
    shared = _resolve(onnx_dir, data_name, onnx_dir / data_name)
    old_data: set[Path] = set()  # external data files the graphs read now
    tmp_data = onnx_dir / f".{data_name}.tmp"
    tmp_models = [p.with_name(f".{p.name}.tmp") for p in models]
    blobs: dict[tuple[str, int, tuple[int, ...]], tuple[int, int]] = {}  # key -> (offset, length)
    refs = refs_bytes = 0
    end = 0
    by_graph: dict[str, dict[str, int]] = {}
    try:
        with open(tmp_data, "wb") as out:
            for path, tmp in zip(models, tmp_models):
                model = onnx.load(str(path), load_external_data=False)
                g_refs = g_bytes = 0
                for t in _graph_initializers(model.graph):
                    external = _is_external(t)
                    if external:
                        old_data.add(_resolve(onnx_dir, external_ref(t).location, path))
                    if not external and _approx_bytes(t) < min_bytes:
                        continue
                    data = _raw_bytes(t, onnx_dir, path)
                    if data is None:
                        if external:
                            raise HartkitError(f"{path}: initializer {t.name} is stored externally in a "
                                               f"type that cannot be shared (data type {t.data_type})")
                        continue
                    key = (hashlib.sha256(data).hexdigest(), int(t.data_type), tuple(int(d) for d in t.dims))
                    if key not in blobs:
                        start = _aligned(end, len(data))
                        if start > end:
                            out.write(b"\0" * (start - end))
                        out.write(data)
                        end = start + len(data)
                        blobs[key] = (start, len(data))
                    offset, length = blobs[key]
                    _set_external(t, data_name, offset, length)
                    refs += 1
                    refs_bytes += length
                    g_refs += 1
                    g_bytes += length
                tmp.write_bytes(model.SerializeToString())
                by_graph[path.stem] = {"tensors": g_refs, "bytes": g_bytes}
            out.flush()
            os.fsync(out.fileno())
        bytes_before = _file_bytes(onnx_dir, models, old_data)
        if blobs:
            os.replace(tmp_data, shared)
        else:
            tmp_data.unlink()
        for path, tmp in zip(models, tmp_models):
            os.replace(tmp, path)
    finally:
        for p in [tmp_data, *tmp_models]:
            if p.exists():
                p.unlink()
    removed = sorted(p for p in old_data if p != shared and p.is_file())
    for p in removed:
        p.unlink()
    for path in models:  # structure unchanged; this checks every location/offset/length against the file
        onnx.checker.check_model(str(path))
    unique_bytes = sum(length for _off, length in blobs.values())
    return {
        "file": data_name,
        "graphs": len(models),
        "tensors": refs,  # initializers now stored in the shared file
        "unique_tensors": len(blobs),
        "shared_tensors": refs - len(blobs),  # copies that now point at an earlier one
        "tensor_bytes": refs_bytes,  # what those initializers held, copies counted
        "unique_bytes": unique_bytes,
        "padding_bytes": end - unique_bytes,
        "data_bytes": end,
        "bytes_before": bytes_before,  # .onnx files + their external data files
        "bytes_after": _file_bytes(onnx_dir, models, [shared]),
        "removed": [p.name for p in removed],
        "by_graph": by_graph,
    }


def external_ranges(model_path: Path) -> set[ExternalRef]:
    """The (location, offset, length) ranges the initializers of one .onnx file read."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return {external_ref(t) for t in _graph_initializers(model.graph) if _is_external(t)}


def stored_bytes(model_paths: Iterable[Path]) -> int:
    """Bytes on disk that a set of graphs needs: their .onnx files plus every external range they
    read, each range counted once (the graphs of one component share them)."""
    model_paths = list(model_paths)
    ranges: set[ExternalRef] = set()
    for p in model_paths:
        ranges |= {r if r.length is not None else
                   ExternalRef(r.location, r.offset, (Path(p).parent / r.location).stat().st_size - r.offset)
                   for r in external_ranges(p)}
    return sum(Path(p).stat().st_size for p in model_paths) + sum(r.length or 0 for r in ranges)
