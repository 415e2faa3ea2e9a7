"""``hartkit export`` with calibrated int4 weights (GPTQ, HQQ) and a mixed section, on the tiny preset.

The export records calibration inputs, ranks a mixed section on the checkpoint in hand, writes the
weights each algorithm chooses and holds the files to the eager reference built from those same
weights (the exact bar: a reference rounded to nearest instead would miss it). The bundle's
recipe.json and manifest say which algorithm and which scheme each layer got, and why.
"""

from __future__ import annotations

import json
import warnings

import pytest

from hartkit.quantize.recipe import RECIPE_FILE

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle above a blue square", "a cat on a chair"]
ALGORITHMS = {"name": "tiny-algorithms", "components": {"text_encoder": "int4-g32-gptq",
                                                        "ar_transformer": "int4-g32-hqq"}}


def _export(checkpoint, out, recipe):
    from hartkit.export.exporter import export_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_checkpoint(checkpoint, out, ["onnx"], recipe=recipe, calibration=PROMPTS)
    return result, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def algorithms_export(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("algo_export") / "bundle"
    return (out, *_export(tiny_checkpoint, out, ALGORITHMS))


@pytest.fixture(scope="module")
def quality_export(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality_export") / "bundle"
    return (out, *_export(tiny_checkpoint, out, "phone-quality"))


def test_gptq_and_hqq_exports_pass_the_exact_bar_against_their_own_weights(algorithms_export):
    _out, result, info = algorithms_export
    assert all(r.ok for r in result.parity), [r for r in result.parity if not r.ok]
    q = info["quantization"]["formats"]["onnx"]
    # weight-only int4 on onnx is the exact cell: the eager reference must carry the very weights
    # gptq and onnxruntime's hqq wrote, or these graphs drop far below 60 dB
    for graph in ("text_encoder", "ar_context", "ar_stage"):
        assert q["parity"][graph]["bar"] == "exact" and q["parity"][graph]["min_snr_vs_eager_db"] >= 60, \
            (graph, q["parity"][graph])
    assert q["layers"]["text_encoder/layers.0.mlp.down_proj"]["scheme"].endswith("gptq")
    assert q["layers"]["ar_transformer/blocks.0.attn.qkv_proj"]["scheme"].endswith("hqq")
    algos = {g: rep.get("algorithms", {}) for g, rep in q["onnx_files"].items()}
    assert algos["text_encoder"].get("text_encoder/layers.0.mlp.down_proj") == "gptq"
    assert algos["ar_stage"].get("ar_transformer/blocks.0.attn.qkv_proj") == "hqq"
    assert info["quantization"]["calibration"]["prompts"] == len(PROMPTS)


def test_gptq_weights_are_the_same_in_every_graph_that_uses_them(algorithms_export):
    """The Hessians span every graph of a layer, so ar_context and ar_stage store one weight."""
    from hartkit.export.targets.onnx.share import external_ranges

    out, _result, _info = algorithms_export
    ctx, stage = external_ranges(out / "onnx" / "ar_context.onnx"), external_ranges(out / "onnx" / "ar_stage.onnx")
    assert ctx == stage and len(ctx) >= 4


def test_phone_quality_exports_with_its_mixed_section_expanded(quality_export):
    from hartkit.quantize.recipe import Recipe

    out, result, info = quality_export
    assert all(r.ok for r in result.parity), [r for r in result.parity if not r.ok]
    saved = Recipe.load(out / RECIPE_FILE)
    expanded = saved.mixed_for("onnx")["expanded"]
    assert expanded["avg_bits"] <= 5.0 and expanded["calibration_prompts"] == len(PROMPTS)
    assert expanded["promoted"], "the budget leaves room for some 8-bit layers on tiny"
    q = info["quantization"]["formats"]["onnx"]
    assert q["mixed"]["avg_bits"] == expanded["avg_bits"] and q["mixed"]["high"] == "8da8w"
    ranked = {n: l for n, l in q["layers"].items() if "why" in l}
    assert ranked and all(n.startswith(("text_encoder/", "ar_transformer/")) for n in ranked)
    kept = [l for l in ranked.values() if "kept at 8da8w" in l["why"]]
    low = [l for l in ranked.values() if "kept at" not in l["why"]]
    assert kept and low
    assert all(l["scheme"] == "8da8w" for l in kept)
    assert all("gptq" in l["scheme"] for l in low if l["scheme"].startswith("8da4w"))
    assert any(l["scheme"].startswith("8da4w") for l in low)
    assert any(a == "gptq" for rep in q["onnx_files"].values() for a in rep.get("algorithms", {}).values())
    assert q["parity"]["ar_stage"]["min_snr_vs_eager_db"] >= 60
