"""Bundles: round trip, verification, refusals (tampering, newer schema, escaping archives), fuzzed manifests."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hartkit.bundle import BundleError, pack, parse_manifest, read_manifest, unpack, verify_bundle
from hartkit.runtime.pipeline import Pipeline


@pytest.fixture()
def bundle_copy(onnx_bundle, tmp_path):
    out, _ = onnx_bundle
    dst = tmp_path / "bundle"
    shutil.copytree(out, dst)
    return dst


def test_round_trip_export_verify_load_generate(onnx_bundle, tmp_path):
    out, _ = onnx_bundle
    report = verify_bundle(out, backend="onnxruntime")
    assert report.ok, report.problems
    graphs = {g["graph"] for g in report.golden}
    assert {"ar_stage", "denoise", "vae_decode", "loop"} <= graphs
    manifest = read_manifest(out)
    golden = manifest["golden"]["loop"]
    archive = pack(out, tmp_path / "b.hartkit")
    unpacked = unpack(archive, tmp_path / "unpacked")
    pipe = Pipeline.from_bundle(unpacked, backend="onnxruntime")
    image, trace = pipe.generate(golden["prompt"], seed=golden["seed"])
    with np.load(unpacked / golden["file"]) as data:
        assert all(np.array_equal(data[f"tokens.{i}"], t) for i, t in enumerate(trace.tokens))
    again, _ = Pipeline.from_bundle(out, backend="onnxruntime").generate(golden["prompt"], seed=golden["seed"])
    assert np.array_equal(image, again)


def test_manifest_has_what_a_port_needs(onnx_bundle):
    m = read_manifest(onnx_bundle[0])
    assert m["schema_version"] == 1
    assert m["rng"]["bits"].startswith("philox4x64-10")
    assert len(m["diffusion"]["timesteps"]) == 8 and m["diffusion"]["vae_scale"] == 0.6
    assert len(m["loop"]["stages_at_default_cfg"]) == len(m["loop"]["patch_nums"])
    assert m["prompt"]["system_prompt"].endswith("User Prompt:\n")
    assert "onnxruntime" in m["libraries"]
    for art in m["artifacts"]:
        assert len(art["sha256"]) == 64 and art["size"] > 0
    for graph in m["graphs"]:
        assert graph["inputs"] and graph["outputs"]


def test_a_tampered_file_is_named(bundle_copy):
    path = bundle_copy / "onnx" / "ar_head.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify_bundle(bundle_copy)
    assert not report.ok
    assert any("onnx/ar_head.onnx" in p and "sha256" in p for p in report.problems)
    with pytest.raises(BundleError, match="ar_head"):
        Pipeline.from_bundle(bundle_copy)


def test_a_corrupted_shared_weights_file_is_named(bundle_copy):
    """The ONNX graphs read their weights from one shared file (export/onnx_share.py): it is an
    artifact like the graphs, so flipping one of its bytes fails verification, naming it."""
    path = bundle_copy / "onnx" / "weights.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify_bundle(bundle_copy)
    assert not report.ok
    assert [p for p in report.problems if "onnx/weights.bin" in p and "sha256" in p] == report.problems
    with pytest.raises(BundleError, match="weights.bin"):
        Pipeline.from_bundle(bundle_copy)
    path.unlink()
    assert any("onnx/weights.bin: missing" in p for p in verify_bundle(bundle_copy).problems)


def test_a_perturbed_graph_fails_the_golden_vectors(bundle_copy):
    """Rewrite one weight of the denoiser (and its hash, as an attacker or a broken build would)."""
    import onnx
    from onnx import numpy_helper

    from hartkit.bundle import artifacts

    path = bundle_copy / "onnx" / "denoise.onnx"
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init).copy()
    arr += 0.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["artifacts"] = artifacts(bundle_copy)
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    report = verify_bundle(bundle_copy, backend="onnxruntime")
    assert not report.ok
    assert any(p.startswith("golden denoise") for p in report.problems)


def test_newer_schema_is_refused_with_the_version(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema_version 99 is newer"):
        read_manifest(bundle_copy)


def test_unpack_refuses_escaping_paths(onnx_bundle, tmp_path):
    archive = tmp_path / "evil.hartkit"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("manifest.json", (onnx_bundle[0] / "manifest.json").read_text())
        zf.writestr("../escaped.txt", "gotcha")
    with pytest.raises(BundleError, match="escapes the bundle"):
        unpack(archive, tmp_path / "target")
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "target").exists()
    with pytest.raises(BundleError, match="not a hartkit bundle archive"):
        unpack(tmp_path / "evil.hartkit.missing", tmp_path / "t2")


def test_missing_manifest_and_bad_json(tmp_path):
    with pytest.raises(BundleError, match="bundle folder not found"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match="no manifest.json"):
        read_manifest(tmp_path)
    with pytest.raises(BundleError, match="not valid JSON"):
        parse_manifest("{")
    with pytest.raises(BundleError, match="invalid manifest at loop"):
        parse_manifest(json.dumps({"schema_version": 1, "model": {"hart": {}, "vae": {}}, "loop": {}, "graphs": [],
                                   "files": {}, "artifacts": [], "rng": {}, "diffusion": {"timesteps": [], "vae_scale": 0.6},
                                   "prompt": {"max_tokens": 1, "system_prompt": ""}}))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=64), json_values.map(json.dumps),
                 st.dictionaries(st.sampled_from(["schema_version", "model", "loop", "graphs", "files", "artifacts",
                                                  "rng", "prompt", "diffusion"]), json_values).map(json.dumps)))
def test_fuzzed_manifests_only_ever_raise_bundle_errors(text):
    try:
        parse_manifest(text)
    except BundleError:
        pass


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fuzzed_mutations_of_a_real_manifest(onnx_bundle, data):
    manifest = json.loads((onnx_bundle[0] / "manifest.json").read_text())
    key = data.draw(st.sampled_from(sorted(manifest)))
    manifest[key] = data.draw(json_values)
    try:
        parse_manifest(json.dumps(manifest))
    except BundleError:
        pass
