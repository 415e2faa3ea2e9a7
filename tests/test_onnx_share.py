"""ONNX exports store each weight once: one shared, deduplicated external-data file for all graphs.

On the tiny fp32 export (the session's ``onnx_bundle``): the AR transformer's initializers take at
most 1.15x its parameters x 4 bytes (they were in five graphs), every graph loads from a copy of the
bundle elsewhere and replays its golden vectors (the torch outputs recorded at export). On small
hand-made graphs: per-graph ``.onnx.data`` files merge and disappear, small tensors stay inline,
offsets are aligned, a second run changes nothing and a failing run leaves the folder as it was.
(The quantized export's dedup is checked in test_quantize_onnx.py, the corrupted-file case in
test_bundle.py: both reuse the exports those files make anyway.)
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hartkit.errors import HartkitError
from hartkit.export.targets.onnx.share import (ALIGN, PAGE_ALIGN, PAGE_ALIGN_MIN_BYTES, SHARED_DATA, external_ranges,
                                       share_onnx_weights, stored_bytes)


def component_initializer_bytes(folder: Path, manifest: dict, component: str) -> int:
    """Initializer bytes of a component's graphs: inline tensors, plus each external range once."""
    import onnx

    inline, ranges = 0, set()
    for g in manifest["graphs"]:
        if g.get("weights") != component:
            continue
        path = folder / manifest["files"]["onnx"][g["name"]]
        model = onnx.load(str(path), load_external_data=False)
        inline += sum(len(t.raw_data) if t.HasField("raw_data") else t.ByteSize() for t in model.graph.initializer
                      if t.data_location != onnx.TensorProto.EXTERNAL)
        ranges |= external_ranges(path)
    return inline + sum(r.length for r in ranges)


def test_the_ar_transformer_weights_are_stored_once(onnx_bundle, tiny_model):
    import onnx

    out, result = onnx_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    onnx_dir = out / "onnx"
    assert (onnx_dir / SHARED_DATA).is_file() and not list(onnx_dir.glob("*.onnx.data"))
    params = tiny_model.transformer.num_parameters(include_diffusion=False)
    ar_bytes = component_initializer_bytes(out, manifest, "ar_transformer")
    assert ar_bytes <= 1.15 * params * 4, (ar_bytes, params * 4)
    # the blocks' weights: ar_context and ar_stage read the very same bytes
    assert external_ranges(onnx_dir / "ar_context.onnx") == external_ranges(onnx_dir / "ar_stage.onnx")
    stats = manifest["onnx_weights"]
    assert stats["file"] == SHARED_DATA and stats["shared_tensors"] > 0
    assert stats["bytes_after"] < stats["bytes_before"]
    assert stats["data_bytes"] == (onnx_dir / SHARED_DATA).stat().st_size
    ar_graphs = [out / manifest["files"]["onnx"][g["name"]] for g in manifest["graphs"]
                 if g.get("weights") == "ar_transformer"]
    assert stats["component_bytes"]["ar_transformer"] == stored_bytes(ar_graphs)
    assert any("weights.bin" in n for n in result.notes)
    # every large initializer is external, at an aligned offset
    for path in onnx_dir.glob("*.onnx"):
        model = onnx.load(str(path), load_external_data=False)
        for t in model.graph.initializer:
            assert t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) < 1024, (path.name, t.name)
        for r in external_ranges(path):
            assert r.location == SHARED_DATA
            assert r.offset % (PAGE_ALIGN if r.length >= PAGE_ALIGN_MIN_BYTES else ALIGN) == 0
    assert any("weights.bin" == a["path"].split("/")[-1] for a in manifest["artifacts"])


def test_every_graph_loads_from_a_moved_copy_and_replays_its_golden_vectors(onnx_bundle, tmp_path):
    from hartkit.backends import OnnxRuntimeBackend
    from hartkit.bundle import VerifyReport, read_manifest, verify_golden

    out, _ = onnx_bundle
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(out, moved)
    manifest = read_manifest(moved)
    assert all(p["ok"] for p in manifest["parity"])  # the export's own check ran on the shared files
    report = VerifyReport()
    verify_golden(moved, manifest, OnnxRuntimeBackend(moved, manifest), report, "onnx")
    assert report.ok, report.problems
    assert {g["graph"] for g in report.golden} == set(manifest["files"]["onnx"])


# ----------------------------------------------------------------------------- small hand-made graphs


def _graph(path: Path, weights: dict[str, np.ndarray], external: bool = False) -> None:
    """y = (x @ W0 + b) @ W1 ...: one MatMul per 2-D weight, one Add per 1-D one, in the dict's order."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, cur = [], "x"
    for i, (name, w) in enumerate(weights.items()):
        op = "MatMul" if w.ndim == 2 else "Add"
        nodes.append(helper.make_node(op, [cur, name], [f"h{i}"]))
        cur = f"h{i}"
    dims = [w.shape[-1] for w in weights.values()]
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["n", dims[-1]])],
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))


def _run(folder: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    return {p.stem: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for p in sorted(folder.glob("*.onnx"))}


@pytest.fixture()
def graphs(tmp_path):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((32, 64), dtype=np.float32)  # 8 KiB, in both graphs
    w_big = rng.standard_normal((64, 512), dtype=np.float32)  # 128 KiB: page aligned
    b = rng.standard_normal(64, dtype=np.float32)  # 256 bytes: stays inline
    w1 = rng.standard_normal((64, 48), dtype=np.float32)
    folder = tmp_path / "onnx"
    folder.mkdir()
    _graph(folder / "a.onnx", {"w0": w0, "b": b, "w1": w1})
    _graph(folder / "b.onnx", {"weight_0": w0.copy(), "bias": b.copy(), "big": w_big})
    _graph(folder / "c.onnx", {"w0": w0, "big": w_big}, external=True)  # as a >2 GB graph is written
    return folder


def test_dedup_merges_per_graph_data_files_keeps_small_tensors_inline(graphs):
    import onnx

    x = np.random.default_rng(1).standard_normal((3, 32), dtype=np.float32)
    before = _run(graphs, x)
    assert (graphs / "c.onnx.data").is_file()
    stats = share_onnx_weights(graphs)
    assert sorted(p.name for p in graphs.iterdir()) == ["a.onnx", "b.onnx", "c.onnx", SHARED_DATA]
    assert stats["removed"] == ["c.onnx.data"]
    # w0 x3, w1, big x2 (b is 256 bytes: inline) -> 3 unique tensors
    assert (stats["tensors"], stats["unique_tensors"], stats["shared_tensors"]) == (6, 3, 3)
    assert stats["unique_bytes"] == (32 * 64 + 64 * 48 + 64 * 512) * 4
    assert stats["data_bytes"] == (graphs / SHARED_DATA).stat().st_size
    for name, want in before.items():
        np.testing.assert_array_equal(_run(graphs, x)[name], want)
    b_model = onnx.load(str(graphs / "b.onnx"), load_external_data=False)
    inline = [t.name for t in b_model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert inline == ["bias"]
    ranges = {p.stem: external_ranges(p) for p in graphs.glob("*.onnx")}
    assert ranges["c"] <= ranges["a"] | ranges["b"]  # the external graph's weights found their copies
    big = next(r for r in ranges["b"] if r.length == 64 * 512 * 4)
    assert big.offset % PAGE_ALIGN == 0 and all(r.offset % ALIGN == 0 for rs in ranges.values() for r in rs)
    assert stored_bytes([graphs / "b.onnx", graphs / "c.onnx"]) == (
        (graphs / "b.onnx").stat().st_size + (graphs / "c.onnx").stat().st_size + (32 * 64 + 64 * 512) * 4)

    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in graphs.iterdir()}
    again = share_onnx_weights(graphs)  # idempotent: the shared file is read back and rewritten the same
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in graphs.iterdir()} == digest
    assert again["removed"] == [] and again["bytes_before"] == again["bytes_after"]


def test_a_failing_run_leaves_the_folder_as_it_was(graphs):
    (graphs / "c.onnx.data").write_bytes(b"short")  # truncated external data
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in graphs.iterdir()}
    with pytest.raises(HartkitError, match="truncated"):
        share_onnx_weights(graphs)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in graphs.iterdir()} == digest


def test_external_data_outside_the_folder_is_refused(graphs):
    import onnx

    model = onnx.load(str(graphs / "c.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../c.onnx.data"
    (graphs / "c.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(HartkitError, match="escapes"):
        share_onnx_weights(graphs)
    assert not (graphs / SHARED_DATA).exists()
