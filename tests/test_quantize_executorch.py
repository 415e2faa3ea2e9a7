"""ExecuTorch quantization (torchao before lowering to XNNPACK) on the tiny preset.

One lowering covers every ExecuTorch cell: 8da8w and 8da4w on the text encoder and the AR
transformer (by layer patterns, so both schemes share one program), 8da4w on the diffusion head,
fp16 on the VAE. Each method runs on the ExecuTorch runtime and must agree with the torchao-quantized
eager module it was exported from (closer to it than the eager module is to fp32, by >= 3 dB), its
error against fp32 is bounded (8da8w well below 8da4w), and the program shrinks as the bit widths
say. Weight-only schemes are refused (see test_quantize_recipe.py).
"""

from __future__ import annotations

import json
import warnings

import pytest

pytest.importorskip("executorch")

RECIPE = {
    "name": "et-cells",
    "components": {"text_encoder": "8da8w", "ar_transformer": "8da8w", "diffusion_head": "8da4w", "vae": "fp16"},
    "layers": {"text_encoder/layers.1.*": "8da4w", "ar_transformer/blocks.1.*": "8da4w-g64"},
}
GRAPHS = ["text_encoder", "ar_context", "denoise", "residual_0"]

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (conftest.py)


@pytest.fixture(scope="module")
def et(tiny_model, tiny_text_encoder, tiny_graphs, tmp_path_factory):
    from hartkit.export.targets.executorch.lower import export_executorch
    from hartkit.model.graphs import run_graph
    from hartkit.export.parity import check_quantized
    from hartkit.export.quantization import QuantizationPlan
    from hartkit.export.targets import TARGETS
    from hartkit.quantize.calibration import record, replay_fns
    from hartkit.backends.executorch import ExecuTorchBackend

    S, specs, byname, modules, inputs = tiny_graphs
    calib = record(tiny_model, tiny_text_encoder, S, ["a red circle above a blue square", "a cat"])
    replay = replay_fns(modules, inputs)
    recorded = {}
    for g in GRAPHS:
        recorded[g] = [(f, run_graph(modules[g], [f[n] for n in inputs[g]])) for f in calib.feeds(g, replay, limit=2)]
    qx = QuantizationPlan.prepare(RECIPE, tiny_model, tiny_text_encoder, S, specs, modules, [TARGETS["executorch"]],
                                  recorded)
    real = qx["executorch"].reference()
    folder = tmp_path_factory.mktemp("qet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = export_executorch([s for s in real.specs if s.name in GRAPHS], real.modules, folder)
    info = {"files": {"executorch": files}, "graphs": [byname[g].to_json() for g in GRAPHS]}
    rows, report = check_quantized(ExecuTorchBackend(folder, info), real, recorded,
                                   {g: [o.name for o in byname[g].outputs] for g in GRAPHS}, inputs)
    return dict(qx=qx, rows=rows, report=report, folder=folder, files=files)


def test_every_method_agrees_with_the_torchao_module(et):
    assert {r.graph for r in et["rows"]} == set(GRAPHS)
    for r in et["rows"]:
        assert r.ok and r.calls == 2, r.to_json()
    rep = et["report"]
    assert rep["residual_0"]["bar"] == "relative"  # word_embed is 8da8w there
    for g in GRAPHS:
        assert rep[g]["min_snr_vs_eager_db"] >= min(60, rep[g]["eager_min_snr_vs_fp32_db"] + 3), (g, rep[g])


def test_the_plan_covers_both_schemes_and_the_qkv_projection(et):
    plan = et["qx"].plans["executorch"]
    assert plan.scheme_of("text_encoder/layers.0.mlp.up_proj").label == "8da8w"
    assert plan.scheme_of("text_encoder/layers.1.mlp.up_proj").label == "8da4w-g32"
    assert plan.scheme_of("ar_transformer/blocks.1.attn.qkv_proj").label == "8da4w-g64"
    assert plan.scheme_of("vae/quantize.quant_resi.qresi_ls.0").label == "fp16"
    # the qkv projection's torchao ops are inside the XNNPACK delegate (a parameter bias, see apply.py)
    delegation = json.loads((et["folder"] / "executorch" / "delegation.json").read_text())
    outside = delegation["methods"]["ar_context"]["ops_outside_delegate"]
    assert not [op for op in outside if "torchao" in op], outside


def test_error_against_fp32_is_bounded_and_ordered(et):
    rep = et["report"]
    assert rep["text_encoder"]["min_snr_vs_fp32_db"] > 12  # layer 0 at 8da8w, layer 1 at 8da4w
    assert rep["denoise"]["min_snr_vs_fp32_db"] > 10  # 8da4w
    assert rep["residual_0"]["min_snr_vs_fp32_db"] > 40  # fp16 phi + 8da8w word_embed


def test_the_program_shrinks_as_the_bit_widths_say(et, tiny_model, tiny_text_encoder):
    from hartkit.quantize.schemes import Scheme
    from hartkit.quantize.sizes import layer_bytes

    qx = et["qx"]
    plan = qx.plans["executorch"]
    layers = {l.name: l for g in GRAPHS for l in qx.layers.of_graph(g)}
    fp32 = sum(layer_bytes(l, Scheme("fp32"), "executorch") for l in layers.values())
    quant = sum(layer_bytes(l, plan.scheme_of(n), "executorch") for n, l in layers.items())
    other = 4 * sum(qx.layers.other.get(c, 0) for c in ("text_encoder", "ar_transformer", "diffusion_head"))
    pte = sum((et["folder"] / rel).stat().st_size for rel in set(et["files"].values()))
    assert quant < 0.4 * fp32
    assert pte < 0.75 * (fp32 + other), (pte, fp32)  # the rest is program structure (~140 kB here)
    # the stored tensors (delegate data + constant buffer) are what the storage formulas say
    files = json.loads((et["folder"] / "executorch" / "delegation.json").read_text()).get("files", {})
    stored = [f.get("named_data_bytes", 0) + f.get("constant_buffer_bytes", 0) for f in files.values()
              if isinstance(f, dict)]
    if stored and sum(stored):
        assert abs(sum(stored) - (quant + other)) <= 0.15 * (quant + other) + 8_000, (stored, quant, other)
