"""Correct on every CPU: integer kernels that cannot saturate, and bundles that check the CPU they land on.

onnxruntime's uint8 x int8 kernels sum neighbouring products in int16 with saturation on AVX2 (and
AVX-512 without VNNI), exactly on AVX512-VNNI. ``fakequant.u8s8_dot`` models both; the tests below
hold the emulation to the real kernel and the chosen weights to the range that cannot saturate. Where
``qemu-x86_64`` is installed (.ci/run installs it) they also run the real kernels and a bundle's
load-time self-check on an emulated AVX2-only CPU, so a VNNI CI machine covers the AVX2 class too.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hartkit.quantize.fakequant import W8A8_QMAX, u8s8_can_saturate, u8s8_dot
from hartkit.quantize.recipe import PRESETS, Recipe
from hartkit.quantize.schemes import FORMATS, SUPPORT

pytestmark = pytest.mark.usefixtures("one_thread")

QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                                reason="needs qemu-x86_64 on an x86-64 host to emulate an AVX2-only CPU "
                                       "(apt-get install qemu-user; .ci/run installs it)")


def run_on_avx2(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run Python code on an emulated AVX2-only CPU (Haswell: AVX2 and FMA, no AVX-512, no VNNI)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env)


# ----------------------------------------------------------------------------- the kernel model


def test_avx2_pairwise_sums_saturate_where_vnni_sums_exactly():
    a = np.full((1, 64), 255, np.uint8)
    full = np.full((64, 1), 127, np.int8)
    # the numbers measured with onnxruntime's MatMulInteger on an AVX2-only EPYC and on AVX512-VNNI
    assert u8s8_dot(a, full, "avx2")[0, 0] == 1_048_544
    assert u8s8_dot(a, full, "vnni")[0, 0] == 2_072_640
    seven_bit = np.full((64, 1), W8A8_QMAX, np.int8)
    assert u8s8_dot(a, seven_bit, "avx2")[0, 0] == u8s8_dot(a, seven_bit, "vnni")[0, 0] == 255 * 64 * 64
    assert u8s8_can_saturate(127) and not u8s8_can_saturate(W8A8_QMAX)
    with pytest.raises(ValueError, match="isa must be"):
        u8s8_dot(a, full, "sse2")


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 70), n=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_seven_bit_weights_sum_exactly_on_avx2(k, n, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (3, k)).astype(np.uint8)
    a[0] = 255  # the worst row
    b = rng.integers(-W8A8_QMAX, W8A8_QMAX + 1, (k, n)).astype(np.int8)
    b[:, 0] = rng.choice([-W8A8_QMAX, W8A8_QMAX], k)  # the worst column
    np.testing.assert_array_equal(u8s8_dot(a, b, "avx2"), a.astype(np.int64) @ b.astype(np.int64))


@settings(max_examples=30, deadline=None)
# magnitudes below 2**-10 (down to subnormal scales) would test float32's precision, not the rule
@given(w=arrays(np.float32, (5, 12), elements=st.one_of(st.just(0.0), st.floats(1 / 1024, 8, width=32),
                                                        st.floats(-8, -1 / 1024, width=32))))
def test_w8a8_weights_stay_in_the_seven_bit_range(w):
    """The eager rule of onnx w8a8 (what the exported file must hold): |q| <= 64 per channel."""
    import torch

    from hartkit.quantize.fakequant import fake_weight
    from hartkit.quantize.schemes import Scheme

    deq = fake_weight(torch.from_numpy(w), "linear", Scheme("w8a8"), "onnx").numpy().astype(np.float64)
    scale = np.abs(w).max(axis=1, keepdims=True).astype(np.float64) / W8A8_QMAX
    q = np.divide(deq, scale, out=np.zeros_like(deq), where=scale > 0)
    assert np.abs(np.round(q)).max(initial=0) <= W8A8_QMAX
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)


def test_every_preset_uses_only_cells_whose_result_does_not_depend_on_the_cpu():
    for name in PRESETS:
        recipe = Recipe.load(name)
        for fmt in FORMATS:
            default, components, layers = recipe.for_format(fmt)
            for scheme in [default, *components.values(), *(s for _, s in layers)]:
                cell = SUPPORT.get((scheme.name, fmt))
                assert cell is not None and cell.isa_independent, (name, fmt, scheme.label)
    assert "VPMADDUBSW" in SUPPORT[("w8a8", "onnx")].kernels and SUPPORT[("w8a8", "onnx")].isa_independent


# ----------------------------------------------------------------------------- the real kernels, emulated AVX2

_MATMUL_INTEGER = """
import json, numpy as np, onnxruntime as ort
from onnx import helper, TensorProto
from hartkit.bundle import cpu_isa
M, K, N = 6, 70, 9
g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g",
    [helper.make_tensor_value_info("a", TensorProto.UINT8, [M, K]),
     helper.make_tensor_value_info("b", TensorProto.INT8, [K, N])],
    [helper.make_tensor_value_info("y", TensorProto.INT32, [M, N])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
r = np.random.default_rng(7)
a = r.integers(0, 256, (M, K)).astype(np.uint8); a[0] = 255
b = r.integers(-128, 128, (K, N)).astype(np.int8); b[:, 0] = 127
print(json.dumps({"isa": cpu_isa(), "a": a.tolist(), "b": b.tolist(), "y": s.run(None, {"a": a, "b": b})[0].tolist()}))
"""


@needs_qemu
def test_the_kernel_model_matches_onnxruntime_on_an_emulated_avx2_cpu():
    res = run_on_avx2(_MATMUL_INTEGER)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["isa"] == "avx2"
    a, b, y = (np.array(out[k]) for k in ("a", "b", "y"))
    np.testing.assert_array_equal(y, u8s8_dot(a, b, "avx2"))
    assert (y != a @ b).any()  # full-range weights do saturate there


# ----------------------------------------------------------------------------- the load-time self-check


@pytest.fixture(scope="module")
def laptop_bundle(tiny_checkpoint, tmp_path_factory):
    from hartkit.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("isa") / "laptop"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_checkpoint(tiny_checkpoint, out, ["onnx"], recipe="laptop")
    return out


def _copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst


def _rehash(bundle: Path) -> None:
    """Make the manifest's checksums match edited files (what a careless re-packer would do)."""
    from hartkit.bundle import sha256_file

    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    for art in manifest["artifacts"]:
        f = bundle / art["path"]
        art["sha256"], art["size"] = sha256_file(f), f.stat().st_size
    path.write_text(json.dumps(manifest, indent=1))


def test_a_quantized_bundle_lists_its_integer_graphs_and_passes_its_self_check(laptop_bundle):
    from hartkit.runtime.pipeline import Pipeline
    from hartkit.bundle import run_self_check, self_check_graphs

    manifest = json.loads((laptop_bundle / "manifest.json").read_text())
    listed = self_check_graphs(manifest, "onnx")
    assert {"ar_stage", "ar_context", "text_encoder"} <= set(listed) and "vae_decode" not in listed
    assert manifest["exported_on"]["isa"] and manifest["exported_on"]["machine"]
    pipe = Pipeline.from_bundle(laptop_bundle)
    report = run_self_check(laptop_bundle, manifest, pipe.backend)
    assert report.ok and {g["graph"] for g in report.golden} == set(listed)
    assert all(g["backend"] == "onnxruntime" and g["snr_db"] > 30 for g in report.golden)


def test_a_graph_that_computes_differently_here_is_refused_at_load(laptop_bundle, tmp_path):
    """A golden output that no longer matches (as a saturating CPU would produce) stops the load with
    one line naming the graph, the backend and the dB; --no-self-check / self_check=False runs anyway."""
    from hartkit.cli import main
    from hartkit.runtime.pipeline import Pipeline
    from hartkit.bundle import SelfCheckError

    bundle = _copy(laptop_bundle, tmp_path / "b")
    golden = bundle / "golden" / "onnx" / "ar_stage.npz"
    with np.load(golden) as data:
        arrays = dict(data)
    key = next(k for k in arrays if k.startswith("out."))
    arrays[key] = arrays[key] * 1.7 + 0.3
    np.savez_compressed(golden, **arrays)
    _rehash(bundle)
    with pytest.raises(SelfCheckError, match=r"graph ar_stage on onnxruntime is -?\d+\.\d dB from the output"):
        Pipeline.from_bundle(bundle)
    assert Pipeline.from_bundle(bundle, self_check=False) is not None
    out = tmp_path / "x.png"
    assert main(["generate", "--exported", str(bundle), "--prompt", "a red circle", "--out", str(out)]) == 3
    assert not out.exists()
    assert main(["generate", "--exported", str(bundle), "--prompt", "a red circle", "--out", str(out),
                 "--no-self-check"]) == 0 and out.is_file()


def _saturating_copy(bundle: Path, dst: Path) -> Path:
    """The same bundle with full-range int8 weights in ar_stage: every MatMulInteger weight doubled
    (clipped to 127) and its scale halved. On a CPU that sums exactly this computes what the 7-bit file
    computes (but for the clipped extremes); on AVX2 its neighbouring products saturate int16."""
    import onnx
    from onnx import numpy_helper

    dst = _copy(bundle, dst)
    path = dst / json.loads((dst / "manifest.json").read_text())["files"]["onnx"]["ar_stage"]
    model = onnx.load(str(path))  # external weights are read in and saved inline below
    inits = {t.name: t for t in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        weight = node.input[1] if node.op_type == "MatMulInteger" else ""
        if not weight.endswith("_quantized") or weight not in inits:
            continue
        scale = inits[weight[: -len("_quantized")] + "_scale"]  # quantize_dynamic's naming
        q = numpy_helper.to_array(inits[weight]).astype(np.int16)
        inits[weight].CopyFrom(numpy_helper.from_array(np.clip(2 * q, -128, 127).astype(np.int8), weight))
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) / 2, scale.name))
        changed += 1
    assert changed > 0
    onnx.save(model, str(path))
    _rehash(dst)
    return dst


_SELF_CHECK = """
import sys
from hartkit.bundle import cpu_isa
from hartkit.runtime.pipeline import Pipeline
from hartkit.bundle import SelfCheckError
print("isa", cpu_isa())
try:
    Pipeline.from_bundle(sys.argv[1])
except SelfCheckError as exc:
    print("REFUSED", exc)
else:
    print("LOADED")
"""


@needs_qemu
def test_on_an_emulated_avx2_cpu_the_laptop_bundle_loads_and_a_full_range_one_is_refused(laptop_bundle, tmp_path):
    from hartkit.bundle import cpu_isa
    from hartkit.runtime.pipeline import Pipeline

    # The full-range copy computes like the 7-bit file where the kernels sum exactly (VNNI) ...
    bad = _saturating_copy(laptop_bundle, tmp_path / "full-range")
    if cpu_isa() == "avx512_vnni":
        Pipeline.from_bundle(bad)  # passes its self-check here
    # ... and the real AVX2 kernels: the shipped recipe is exact, the full-range copy is refused.
    good = run_on_avx2(_SELF_CHECK.replace("sys.argv[1]", repr(str(laptop_bundle))))
    assert good.returncode == 0, good.stderr[-2000:]
    assert "isa avx2" in good.stdout and "LOADED" in good.stdout, good.stdout
    refused = run_on_avx2(_SELF_CHECK.replace("sys.argv[1]", repr(str(bad))))
    assert refused.returncode == 0, refused.stderr[-2000:]
    # ar_context runs on the ar_stage session (empty past) in a pipeline: either graph names the file
    assert "REFUSED" in refused.stdout and re.search(r"graph ar_(stage|context) on onnxruntime", refused.stdout), \
        refused.stdout
    assert "this CPU (avx2" in refused.stdout
