"""Core ML quantization (coremltools.optimize.coreml on the converted packages) on the tiny preset.

Core ML cannot predict on Linux, so every cell is *verified*: the compressed weights, decompressed
by coremltools, equal the eager fake-quantized ones (int8/int4; palettization: at most 2^n distinct
values per tensor), and the decompressed program, re-computed by the numpy MIL interpreter (fp16) on
recorded inputs, agrees with the eager-quantized torch graph. Packages shrink as the bit width says.
Conversions are done once (iOS18, needed by per-block int4) and reused by the recipes below.
"""

from __future__ import annotations

import math
import warnings

import pytest

pytest.importorskip("coremltools")
pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (conftest.py)

GRAPHS = ["text_encoder", "ar_head", "denoise", "vae_decode"]
RECIPES = {
    "fp16": {"default": "fp16"},
    "a": {"components": {"text_encoder": "int4", "ar_transformer": "int8", "diffusion_head": "palettize4",
                         "vae": "palettize6"}},
    "b": {"components": {"text_encoder": "palettize8", "ar_transformer": "int4-g64", "diffusion_head": "int8",
                         "vae": "int8"}},
    "c": {"default": "int4"},  # every layer int4, the VAE convs included (per block of 32 input channels)
}


def _package_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name == "weight.bin")


@pytest.fixture(scope="module")
def coreml(tiny_model, tiny_text_encoder, tiny_graphs, tmp_path_factory):
    from hartkit.export.quantization import QuantizationPlan
    from hartkit.export.targets import TARGETS
    from hartkit.export.targets.coreml.compress import check_coreml_quantized, compressor
    from hartkit.export.targets.coreml.lower import export_coreml
    from hartkit.model.graphs import run_graph
    from hartkit.quantize.calibration import record

    S, specs, byname, modules, inputs = tiny_graphs
    calib = record(tiny_model, tiny_text_encoder, S, ["a red circle above a blue square"])
    recorded = {g: [(f, run_graph(modules[g], [f[n] for n in inputs[g]])) for f in calib.feeds(g, limit=1)]
                for g in GRAPHS}
    outputs = {g: [o.name for o in byname[g].outputs] for g in GRAPHS}
    converted: dict = {}
    results = {}
    for name, recipe in RECIPES.items():
        qx = QuantizationPlan.prepare({"name": name, **recipe}, tiny_model, tiny_text_encoder, S, specs, modules,
                                      [TARGETS["coreml"]], recorded)
        # one deployment target for every recipe, so the conversions are shared
        folder = tmp_path_factory.mktemp(f"qcoreml-{name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            files = export_coreml([byname[g] for g in GRAPHS], modules, folder, lambda m: None, target="iOS18",
                                  transform=compressor(qx["coreml"]), converted=converted)
            info = {"files": {"coreml": files}, "graphs": [byname[g].to_json() for g in GRAPHS]}
            rows, report, notes = check_coreml_quantized(qx["coreml"], folder, info, recorded, outputs, inputs)
        results[name] = dict(qx=qx, rows=rows, report=report, notes=notes,
                             bytes={g: _package_bytes(folder / files[g]) for g in GRAPHS})
    return results


@pytest.mark.parametrize("name", list(RECIPES))
def test_programs_agree_with_the_eager_quantization(coreml, name):
    r = coreml[name]
    assert {row.graph for row in r["rows"]} == set(GRAPHS), r["notes"]
    for row in r["rows"]:
        assert row.ok, row.to_json()
    for g in GRAPHS:
        assert r["report"][g]["min_snr_vs_eager_db"] >= 35.0, (g, r["report"][g])


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_compressed_weights_equal_the_eager_rule(coreml, name):
    weights = coreml[name]["report"]["weights"]
    plan = coreml[name]["qx"].plans["coreml"]
    compressed = [n for g in GRAPHS for l in coreml[name]["qx"].layers.of_graph(g)
                  for n in [l.name] if plan.scheme_of(n).name not in ("fp32", "fp16")]
    assert set(weights) == set(compressed)  # nothing the plan quantizes was left in float
    for layer, w in weights.items():
        assert w["ok"], (layer, w)
        s = plan.scheme_of(layer)
        if s.name.startswith("palettize"):
            assert w["distinct_values"] <= 2 ** s.bits
        else:
            assert w["fraction_one_step_off"] == 0 and w["max_abs_diff"] <= 1e-3 * 2 ** -8  # bit-exact up to fp16


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_packages_shrink_as_the_storage_formula_says(coreml, name):
    """weight.bin of the fp16 package minus the compressed one = what the formulas of sizes.py save
    (the packages also hold constants that are not layer weights: masks, RoPE tables, biases)."""
    from hartkit.quantize.schemes import Scheme
    from hartkit.quantize.sizes import weight_bytes

    qx = coreml[name]["qx"]
    plan = qx.plans["coreml"]
    for g in GRAPHS:
        layers = [l for l in qx.layers.of_graph(g) if plan.scheme_of(l.name).name not in ("fp32", "fp16")]
        expected = sum(weight_bytes(l, Scheme("fp16"), "coreml") - weight_bytes(l, plan.scheme_of(l.name), "coreml")
                       for l in layers)
        saved = coreml["fp16"]["bytes"][g] - coreml[name]["bytes"][g]
        # each compressed tensor becomes 2-3 blobs, each with a 64-byte record and 64-byte alignment
        assert abs(saved - expected) <= 0.03 * expected + 256 * len(layers), (g, saved, expected)
        assert saved > 0.4 * 2 * sum(l.numel for l in layers) * 0.5, (g, saved)  # at least 4 bits of 16 saved


def test_error_against_fp32_orders_by_bits(coreml):
    snr = {n: coreml[n]["report"]["denoise"]["min_snr_vs_fp32_db"] for n in RECIPES}
    # denoise: fp16 > int8 (b) > palettize4 (a) ~ int4 (c)
    assert snr["fp16"] > snr["b"] + 5 and snr["b"] > max(snr["a"], snr["c"]) + 8, snr
    assert all(math.isfinite(v) and v > 8 for v in snr.values()), snr
