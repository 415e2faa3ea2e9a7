"""Core ML export of every tiny graph, checked without a Mac.

What IS verified here (Linux):
- every graph converts (torch.export -> coremltools, mlprogram, iOS17, fp16 compute), the package loads
  with ``skip_model_load=True`` and its interface matches the spec: input/output names, dtypes (float32;
  int64 inputs become int32, Core ML has no int64), static dims and the bounded dims' (min, max) ranges;
- the MIL program as saved on disk, with the weights as saved in ``weight.bin``, computes the torch
  graph's function on inputs recorded from the reference loop: a numpy interpreter of the MIL ops
  (export/mil_check.py) runs it with fp16 rounding after every op, as the program declares. Bar:
  SNR >= 35 dB and |err| <= 2e-3 + 3e-2 * max|ref| per output (the tiny graphs reach 57-70 dB). The
  same holds for every function of the iOS18 multifunction packages;
- the check can fail: a perturbed weight blob inside a package, an interface that differs from the
  spec, and an op the interpreter lacks (reported as NOT verified, with no parity claimed);
- the Core ML backend refuses on Linux with a clear message, without importing torch; its plumbing
  (package/function routing, int32 feeds, output order) runs with the interpreter standing in for Core ML.

Sensitivity caveat: a comparison at an fp16 bar only sees weights whose contribution to an output is
above the fp16 noise. In the random-weight tiny checkpoint the AdaLN gates are small, so even negating an
AR block's whole MLP changes ``h`` by less than that (new_k/new_v and most other graphs' weights are
caught: a 10% error in one key projection is, below).

What is NOT verified on Linux: Core ML's own kernels (the interpreter follows the MIL op definitions,
not Apple's implementation), device precision (ANE/GPU accumulate differently from fp32-then-round),
compilation/loading on a device, and speed. The macOS-only test below runs the real runtime.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from hartkit.errors import HartkitError

pytest.importorskip("coremltools")

FP16_MIN_SNR_DB = 35.0


def _snr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - got) ** 2), 1e-300)))


@pytest.fixture(scope="module")
def graphs(tiny_model, tiny_text_encoder):
    """The specs and torch modules of every tiny graph."""
    from hartkit.model.graphs import hart_graph_specs
    from hartkit.model.torch_runner import system_length_of

    S = system_length_of(tiny_text_encoder.tokenizer, tiny_model.cfg.context_token)
    specs = hart_graph_specs(tiny_model, tiny_text_encoder, S)
    return {s.name: s for s in specs}, {s.name: s.build().eval() for s in specs}


@pytest.fixture(scope="module")
def recorded(tiny_model, tiny_text_encoder):
    """Real inputs of every graph, recorded from one run of the reference loop on torch."""
    from hartkit.export.exporter import RecordingBackend
    from hartkit.bundle import LoopInfo
    from hartkit.model.graphs import loop_info
    from hartkit.model.torch_runner import TorchBackend, system_length_of
    from hartkit.runtime.pipeline import Pipeline

    S = system_length_of(tiny_text_encoder.tokenizer, tiny_model.cfg.context_token)
    torch_backend, _ = TorchBackend.from_model(tiny_model, tiny_text_encoder, S)
    rec = RecordingBackend(torch_backend, max_calls=2)
    pipe = Pipeline(LoopInfo.from_dict(loop_info(tiny_model, S)), rec, tiny_text_encoder.tokenizer,
                    torch_backend.codebook)
    pipe.generate("a blue square under a yellow sun", seed=3)
    return rec.calls


@pytest.fixture(scope="module")
def coreml_export(tiny_checkpoint, tmp_path_factory):
    """One ``hartkit export --format coreml`` of the tiny checkpoint (it runs verify_coreml itself)."""
    from hartkit.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("coreml") / "exp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_checkpoint(tiny_checkpoint, out, ["coreml"])
    from hartkit.bundle import read_manifest

    return out, result, read_manifest(out)


def test_every_graph_converts_and_its_interface_matches_the_spec(coreml_export, graphs):
    import coremltools as ct
    from coremltools.proto import Model_pb2

    out, _, info = coreml_export
    specs, _ = graphs
    assert set(info["files"]["coreml"]) == set(specs)
    array_dtype = Model_pb2.ArrayFeatureType.ArrayDataType.Name
    for name, spec in specs.items():
        path = out / info["files"]["coreml"][name]
        assert path.suffix == ".mlpackage" and path.is_dir()
        model = ct.models.MLModel(str(path), skip_model_load=True)
        mspec = model.get_spec()
        assert mspec.WhichOneof("Type") == "mlProgram"
        assert mspec.specificationVersion == 8, name  # iOS17
        desc = mspec.description
        assert [i.name for i in desc.input] == [i.name for i in spec.inputs], name
        assert [o.name for o in desc.output] == [o.name for o in spec.outputs], name
        for feat, tspec in zip(desc.input, spec.inputs):
            arr = feat.type.multiArrayType
            assert array_dtype(arr.dataType) == ("INT32" if tspec.dtype == "int64" else "FLOAT32"), (name, feat.name)
            ranges = list(arr.shapeRange.sizeRanges)
            assert len(arr.shape) == len(tspec.shape)
            for axis, dim in enumerate(tspec.shape):
                if isinstance(dim, int):
                    assert arr.shape[axis] == dim
                    assert not ranges or (ranges[axis].lowerBound, ranges[axis].upperBound) == (dim, dim)
                else:
                    assert (ranges[axis].lowerBound, ranges[axis].upperBound) == (dim.min, dim.max), (name, feat.name)
                    assert arr.shape[axis] == spec.example_sizes[dim.name]  # the default shape
        for feat in desc.output:
            assert array_dtype(feat.type.multiArrayType.dataType) == "FLOAT32", (name, feat.name)
        # fp16 compute: the program's ops produce fp16 tensors (MIL DataType FLOAT16 = 10)
        main = mspec.mlProgram.functions["main"]
        ops = main.block_specializations[main.opset].operations
        assert any(op.type not in ("const", "cast") and op.outputs[0].type.tensorType.dataType == 10
                   for op in ops), name
    # written atomically: no temp package left behind
    assert not [p for p in (out / "coreml").rglob("*") if ".tmp" in p.name]


def test_mil_recomputation_agrees_with_torch_on_recorded_inputs(coreml_export, graphs, recorded):
    """The test's own re-run: package on disk -> MIL interpreter vs the torch module (not the exporter's numbers)."""
    from hartkit.export.targets.coreml import mil as mil_check
    from hartkit.model.graphs import run_graph

    out, _, info = coreml_export
    specs, modules = graphs
    assert set(recorded) == set(specs)
    worst = {}
    for name, spec in specs.items():
        fn = mil_check.load_package(out / info["files"]["coreml"][name]).function()
        assert not fn.unsupported_ops(), (name, fn.unsupported_ops())
        for feeds, _ in recorded[name]:
            ref = run_graph(modules[name], [feeds[i.name] for i in spec.inputs])
            got = fn.run(feeds)
            for o, r in zip(spec.outputs, ref):
                g = got[o.name]
                assert g.shape == r.shape and g.dtype == np.float32, (name, o.name)
                snr = _snr(r, g)
                worst[name] = min(worst.get(name, np.inf), snr)
                assert snr >= FP16_MIN_SNR_DB, (name, o.name, snr)
                assert np.abs(g - r).max() <= 2e-3 + 3e-2 * np.abs(r).max(), (name, o.name)
    # fp32 mode (weights as stored in fp16, no rounding of intermediates) is closer to torch than fp16
    name = "ar_stage"
    feeds, _ = recorded[name][-1]
    fn = mil_check.load_package(out / info["files"]["coreml"][name]).function()
    ref = run_graph(modules[name], [feeds[i.name] for i in specs[name].inputs])[0]
    assert _snr(ref, fn.run(feeds, fp16=False)["h"]) > _snr(ref, fn.run(feeds)["h"])


def test_export_parity_covers_every_graph_and_every_multifunction_function(coreml_export, graphs):
    out, result, info = coreml_export
    specs, _ = graphs
    by_fmt: dict[str, dict] = {}
    for gp in result.parity:
        by_fmt.setdefault(gp.fmt, {})[gp.graph] = gp
    assert set(by_fmt["coreml"]) == set(specs)
    for gp in by_fmt["coreml"].values():
        assert gp.ok and gp.calls >= 1 and gp.to_json()["min_snr_db"] >= FP16_MIN_SNR_DB, gp.to_json()
    assert by_fmt["coreml"]["ar_stage"].calls == len(info["loop"]["patch_nums"]) - 1  # every later stage
    assert not [n for n in result.notes if "NOT" in n]
    mf = json.loads((out / "coreml" / "multifunction.json").read_text())
    functions = {g for entry in mf["packages"].values() for g in entry["functions"]}
    assert {"ar_context", "ar_stage", "ar_head"} <= functions
    assert set(by_fmt["coreml-ios18"]) == functions
    assert all(gp.ok for gp in by_fmt["coreml-ios18"].values())
    # weight sharing: the transformer package is smaller than its graphs' separate packages
    tr = mf["packages"]["coreml/ios18/ar_transformer.mlpackage"]
    assert tr["bytes"] < 0.8 * tr["separate_bytes"]


def _blob_of(pkg: Path, *words: str) -> tuple[Path, int, int, int]:
    """(weight file, dtype code, size, data offset) of the const whose name has all ``words``, read
    from the storage layout (blob record: sentinel, dtype code, size, data offset)."""
    from hartkit.export.targets.coreml import mil as mil_check

    spec = mil_check.load_package(pkg).spec
    main = spec.mlProgram.functions["main"]
    for op in main.block_specializations[main.opset].operations:
        if op.type == "const" and all(w in op.outputs[0].name for w in words):
            record = op.attributes["val"].blobFileValue.offset
            break
    else:
        raise AssertionError(f"no const named with {words}")
    weight_file = pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    sentinel, code, size, offset = struct.unpack_from("<IIQQ", weight_file.read_bytes(), record)
    assert sentinel == 0xDEADBEEF
    return weight_file, code, size, offset


def _one_graph_export(out: Path, info: dict, graph: str, folder: Path) -> tuple[dict, Path]:
    """A copy of one graph's package in an export-like folder, and the info describing just it."""
    rel = f"coreml/{graph}.mlpackage"
    shutil.copytree(out / info["files"]["coreml"][graph], folder / rel)
    one = {"graphs": [g for g in info["graphs"] if g["name"] == graph], "files": {"coreml": {graph: rel}}}
    return one, folder / rel


def test_a_perturbed_weight_in_a_package_fails_the_check(coreml_export, recorded, tiny_model, tmp_path):
    from hartkit.export.targets.coreml.lower import verify_coreml

    out, _, info = coreml_export
    graph = "ar_stage"
    one, pkg = _one_graph_export(out, info, graph, tmp_path)
    names = {graph: [o["name"] for o in one["graphs"][0]["outputs"]]}
    calls = {graph: recorded[graph][:2]}
    ok, _ = verify_coreml(tmp_path, one, calls, names)
    assert len(ok) == 1 and ok[0].ok  # control: the untouched copy passes

    # block 1's key projection 10% too large: rows C..2C of the fused qkv weight [3C, C]
    weight_file, code, size, offset = _blob_of(pkg, "blocks_1_", "qkv", "weight")
    assert code == 1  # fp16
    C = tiny_model.cfg.embed_dim
    raw = bytearray(weight_file.read_bytes())
    w = np.frombuffer(bytes(raw[offset:offset + size]), np.float16).reshape(3 * C, C).copy()
    w[C:2 * C] *= np.float16(1.1)
    raw[offset:offset + size] = w.tobytes()
    weight_file.write_bytes(bytes(raw))
    bad, _ = verify_coreml(tmp_path, one, calls, names)
    assert len(bad) == 1 and not bad[0].ok
    worst = {o.name: o.snr_db for o in bad[0].outputs if not o.ok}
    assert set(worst) == {"new_k"} and max(worst.values()) < FP16_MIN_SNR_DB  # exactly the keys are caught


def test_an_interface_mismatch_fails_and_an_unknown_op_is_reported_not_claimed(coreml_export, recorded, monkeypatch,
                                                                             tmp_path):
    from hartkit.export.targets.coreml import mil as mil_check
    from hartkit.export.targets.coreml.lower import verify_coreml

    out, _, info = coreml_export
    graph = "ar_stage"
    one, pkg = _one_graph_export(out, info, graph, tmp_path)
    spec = json.loads(json.dumps(one["graphs"][0]))
    spec["inputs"][0]["shape"][1]["max"] += 1  # the spec says one more token than the package allows
    spec["outputs"][0]["name"] = "hidden"
    fn = mil_check.load_package(pkg).function()
    problems = mil_check.check_interface(fn, spec)
    assert any("axis 1" in p and "x" in p for p in problems) and any("outputs" in p for p in problems)
    names = {graph: [o["name"] for o in one["graphs"][0]["outputs"]]}
    bad, notes = verify_coreml(tmp_path, {**one, "graphs": [spec]}, {graph: recorded[graph][:1]}, names)
    assert len(bad) == 1 and not bad[0].ok and any("interface" in n for n in notes)

    # an op without an interpreter: no parity is claimed for the graph, the note names op and graph
    monkeypatch.delitem(mil_check.OPS, "softmax")
    results, notes = verify_coreml(tmp_path, one, {graph: recorded[graph][:1]}, names)
    assert results == []
    assert any(graph in n and "NOT numerically verified" in n and "softmax" in n for n in notes)


@pytest.mark.skipif(sys.platform == "darwin", reason="the refusal is for platforms without Core ML")
def test_coreml_backend_refuses_off_macos_without_importing_torch(coreml_export):
    out, _, _ = coreml_export
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import would raise ImportError
        "from pathlib import Path\n"
        "from hartkit.errors import HartkitError\n"
        "from hartkit.backends.coreml import CoreMLBackend\n"
        "from hartkit.bundle import read_manifest\n"
        f"p = Path({str(out)!r})\n"
        "try:\n"
        "    CoreMLBackend(p, read_manifest(p))\n"
        "except HartkitError as e:\n"
        "    print('REFUSED:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    msg = proc.stdout
    assert "REFUSED: Core ML predictions need macOS" in msg
    assert "onnxruntime" in msg and "executorch" in msg and "MIL check" in msg
    # and through the public backend factory
    from hartkit.backends import open_backend

    with pytest.raises(HartkitError, match="Core ML predictions need macOS"):
        open_backend(out, coreml_export[2], "coreml", {})


def test_coreml_backend_plumbing_with_the_mil_interpreter_standing_in_for_core_ml(coreml_export, graphs, recorded,
                                                                                 monkeypatch):
    """The backend's own logic (package/function routing, int64 -> int32 feeds, output order) on Linux:
    platform checks patched to macOS 15 and coremltools replaced by a stub whose predict() is the MIL
    interpreter. This tests the plumbing, not Core ML."""
    import types

    from hartkit.export.targets.coreml import mil as mil_check
    from hartkit.model.graphs import run_graph
    from hartkit.backends import coreml as coreml_backend

    out, _, info = coreml_export
    specs, modules = graphs
    # read with the real coremltools before it is stubbed
    used = ["text_encoder", "ar_stage", "vae_decode", "ios18/ar_transformer", "ios18/vae"]
    programs = {str(out / "coreml" / f"{u}.mlpackage"): mil_check.load_package(out / "coreml" / f"{u}.mlpackage")
                for u in used}
    loaded = []

    class StubModel:
        def __init__(self, path, compute_units=None, function_name=None):
            loaded.append((Path(path).name, function_name))
            self.fn = programs[str(path)].function(function_name)

        def predict(self, feeds):
            for name, x in feeds.items():
                want = {"INT32": np.int32, "FLOAT32": np.float32}[next(i.dtype for i in self.fn.inputs if i.name == name)]
                assert x.dtype == want, (name, x.dtype)  # Core ML would refuse other dtypes
            return self.fn.run(feeds)

    stub = types.SimpleNamespace(ComputeUnit=types.SimpleNamespace(ALL="all", CPU_ONLY="cpu"),
                                 models=types.SimpleNamespace(MLModel=StubModel))
    monkeypatch.setitem(sys.modules, "coremltools", stub)
    monkeypatch.setattr(coreml_backend, "sys", types.SimpleNamespace(platform="darwin"))
    monkeypatch.setattr(coreml_backend, "platform", types.SimpleNamespace(
        mac_ver=lambda: ("15.1", ("", "", ""), ""), system=lambda: "Darwin", release=lambda: "24.1"))
    for multifunction in (False, True):
        backend = coreml_backend.CoreMLBackend(out, info, multifunction=multifunction)
        for name in ("text_encoder", "ar_stage", "vae_decode"):  # the graphs of `used`
            feeds, _ = recorded[name][-1]
            ref = run_graph(modules[name], [feeds[i.name] for i in specs[name].inputs])
            got = backend.run(name, {k: feeds[k] for k in reversed(list(feeds))})  # order of the dict must not matter
            assert len(got) == len(ref)
            for r, g in zip(ref, got):
                assert g.dtype == np.float32 and g.shape == r.shape and _snr(r, g) >= FP16_MIN_SNR_DB, name
    assert ("ar_stage.mlpackage", None) in loaded and ("ar_transformer.mlpackage", "ar_stage") in loaded
    assert ("text_encoder.mlpackage", None) in loaded  # no multifunction package holds it
    assert ("vae.mlpackage", "vae_decode") in loaded


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions need macOS (coremltools predict)")
def test_coreml_runtime_matches_the_reference_on_macos(coreml_export, graphs, recorded):
    import platform

    from hartkit.model.graphs import run_graph
    from hartkit.backends.coreml import CoreMLBackend

    out, _, info = coreml_export
    specs, modules = graphs
    variants = [False] + ([True] if int(platform.mac_ver()[0].split(".")[0]) >= 15 else [])
    for multifunction in variants:
        backend = CoreMLBackend(out, info, compute_units="CPU_ONLY", multifunction=multifunction)
        for name, spec in specs.items():
            for feeds, _ in recorded[name]:
                ref = run_graph(modules[name], [feeds[i.name] for i in spec.inputs])
                got = backend.run(name, feeds)
                for o, r, g in zip(spec.outputs, ref, got):
                    assert g.shape == r.shape and _snr(r, g) >= FP16_MIN_SNR_DB, (multifunction, name, o.name)
