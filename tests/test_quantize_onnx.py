"""ONNX quantization, every (component, scheme) cell onnxruntime supports, on the tiny preset.

Per cell: the graph is exported once in fp32, quantized by hartkit.quantize.onnx_quant and run by
onnxruntime on real inputs recorded from the reference loop; it must agree with the same
quantization applied in eager torch (weight-only cells: SNR >= 60 dB; activation-quantizing cells:
at least as close to the eager reference as that is to fp32, and as close to fp32 within 1 dB), its error against
fp32 is measured and bounded (fp16 > int8 > w8a8 > int4, int8 at least 12 dB above int4), and the
file shrinks by what the storage formulas of hartkit.quantize.sizes say. Then one whole export with
the `phone` preset: parity, recipe.json, export.json, and the runtime on it samples the same tokens
as the eager-quantized torch graphs.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from hartkit.loop.metrics import snr_db

CELLS = {
    "text_encoder": ["fp16", "int8", "int4", "w8a8", "w8a8_static", "8da8w", "8da4w"],
    "ar_transformer": ["fp16", "int8", "int4", "int4-g64", "w8a8", "w8a8_static", "8da8w", "8da4w"],
    "diffusion_head": ["fp16", "int8", "int4", "w8a8", "w8a8_static", "8da8w"],
    "vae": ["fp16", "w8a8", "w8a8_static"],
}
GRAPHS = {"text_encoder": ["text_encoder"], "ar_transformer": ["condition", "ar_context", "ar_head"],
          "diffusion_head": ["denoise"], "vae": ["vae_decode"]}
CALLS = 2  # test inputs per graph

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (conftest.py)


@pytest.fixture(scope="module")
def base(tiny_model, tiny_text_encoder, tiny_graphs, tmp_path_factory):
    from hartkit.export.targets.onnx.lower import export_onnx_graph
    from hartkit.quantize.calibration import record, replay_fns
    from hartkit.quantize.layers import discover

    S, _, specs, modules, spec_inputs = tiny_graphs
    calib = record(tiny_model, tiny_text_encoder, S, ["a red circle above a blue square", "a cat on a chair"])
    layers = discover(tiny_model, tiny_text_encoder, specs.values())
    folder = tmp_path_factory.mktemp("qonnx")
    wanted = sorted({g for gs in GRAPHS.values() for g in gs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g in wanted:
            export_onnx_graph(specs[g], modules[g], folder / f"{g}.onnx")
    replay = replay_fns(modules, spec_inputs)
    feeds = {g: list(calib.feeds(g, replay, limit=CALLS)) for g in wanted}
    return dict(S=S, specs=specs, modules=modules, calib=calib, layers=layers, folder=folder, feeds=feeds,
                spec_inputs=spec_inputs, models=(tiny_model, tiny_text_encoder))


def _quantize_cell(base, model, encoder, component, scheme):
    import onnxruntime as ort

    from hartkit.model.graphs import run_graph
    from hartkit.export.targets import TARGETS
    from hartkit.quantize.apply import graph_bar, realize
    from hartkit.quantize.calibration import activation_ranges, replay_fns
    from hartkit.quantize.layers import layer_modules
    from hartkit.quantize.onnx_quant import quantize_onnx_graph
    from hartkit.quantize.recipe import Recipe, resolve
    from hartkit.quantize.sizes import weight_bytes
    from hartkit.quantize.schemes import Scheme

    plan = resolve(Recipe.from_dict({"components": {component: scheme}}), base["layers"], "onnx")
    mods = layer_modules(model, encoder)
    ranges = None
    if Scheme.parse(scheme).name == "w8a8_static":
        static = [n for n, a in plan.assignments.items() if a.scheme.name == "w8a8_static"]
        ranges = activation_ranges(base["modules"], base["spec_inputs"], base["calib"],
                                   {id(mods[n].weight): n for n in static}, graphs=GRAPHS[component])
    real = realize(model, encoder, base["S"], plan, ranges, TARGETS["onnx"].quantize_eager)
    out = {}
    for g in GRAPHS[component]:
        src = base["folder"] / f"{g}.onnx"
        dst = base["folder"] / f"{g}.{component}.{scheme}.onnx"
        shutil.copy(src, dst)
        layers = base["layers"].of_graph(g)
        weights = {l.name: (l.kind, mods[l.name].weight.detach().numpy()) for l in layers}
        replay = replay_fns(base["modules"], base["spec_inputs"])
        rep = quantize_onnx_graph(dst, g, weights, plan.scheme_of, lambda g=g: base["calib"].feeds(g, replay))
        sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        names = base["spec_inputs"][g]
        vs_eager, vs_fp32, eager_fp32 = [], [], []
        for f in base["feeds"][g]:
            ref = run_graph(base["modules"][g], [f[n] for n in names])
            eq = run_graph(real.modules[g], [f[n] for n in names])
            got = sess.run(None, {n: f[n] for n in names})
            vs_eager += [snr_db(e, o) for e, o in zip(eq, got)]
            vs_fp32 += [snr_db(r, o) for r, o in zip(ref, got)]
            eager_fp32 += [snr_db(r, e) for r, e in zip(ref, eq)]
        changed = [l for l in layers if plan.scheme_of(l.name).name != "fp32"]
        expected_saving = sum(weight_bytes(l, Scheme("fp32"), "onnx") - weight_bytes(l, plan.scheme_of(l.name), "onnx")
                              for l in changed)
        out[g] = dict(bar=graph_bar(plan, g), vs_eager=min(vs_eager), vs_fp32=min(vs_fp32), eager_fp32=min(eager_fp32),
                      before=rep.tensor_bytes_before, after=rep.tensor_bytes_after, file_before=rep.bytes_before,
                      file_after=rep.bytes_after, expected_saving=expected_saving,
                      nodes=len(rep.nodes), changed=len(changed), ops=rep.ops, gemm=rep.gemm_rewritten)
    return out


@pytest.fixture(scope="module")
def cells(base, tiny_model, tiny_text_encoder):
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for component, schemes in CELLS.items():
            for scheme in schemes:
                results[(component, scheme)] = _quantize_cell(base, tiny_model, tiny_text_encoder, component, scheme)
    return results


@pytest.mark.parametrize("component,scheme", [(c, s) for c, ss in CELLS.items() for s in ss])
def test_cell_agrees_with_eager_quantization(cells, component, scheme):
    for g, r in cells[(component, scheme)].items():
        mode, value = r["bar"]
        if mode == "exact":
            assert r["vs_eager"] >= 60.0, (g, r)
        else:  # as close to the eager reference as that is to fp32, and as close to fp32 (1 dB margin)
            assert r["vs_eager"] >= max(15.0, min(60.0, r["eager_fp32"])), (g, r)
            assert r["vs_fp32"] >= min(60.0, r["eager_fp32"]) - 1.0, (g, r)
        if scheme.startswith("8da"):  # emulated op for op: the relative bar is for deep stacks (schemes.py)
            assert r["vs_eager"] >= 60.0, (g, r)
        assert r["nodes"] >= r["changed"] > 0, (g, r)  # every quantized layer found its ONNX node


@pytest.mark.parametrize("component,scheme", [(c, s) for c, ss in CELLS.items() for s in ss])
def test_cell_shrinks_by_the_storage_formula(cells, component, scheme):
    for g, r in cells[(component, scheme)].items():
        saved = r["before"] - r["after"]  # stored tensors (weights + scales)
        # protobuf framing of the new tensors (names, dims) costs ~80 bytes per quantized layer
        assert abs(saved - r["expected_saving"]) <= 0.01 * r["before"] + 80 * r["changed"] + 256, (g, saved, r)
        assert r["file_after"] < r["file_before"] - r["expected_saving"] // 2, (g, r)


def test_error_against_fp32_is_ordered_and_bounded(cells):
    floors = {"fp16": 55.0, "int8": 30.0, "w8a8": 20.0, "w8a8_static": 18.0, "int4": 10.0, "int4-g64": 10.0,
              "8da8w": 25.0, "8da4w": 10.0}
    for (component, scheme), graphs in cells.items():
        for g, r in graphs.items():
            assert r["vs_fp32"] >= floors[scheme], (component, scheme, g, r["vs_fp32"])
    for component in ("text_encoder", "ar_transformer", "diffusion_head"):
        for g in GRAPHS[component]:
            snr = {s: cells[(component, s)][g]["vs_fp32"] for s in ("fp16", "int8", "int4")}
            assert snr["fp16"] > snr["int8"] + 10 > snr["int4"] + 10 + 12, (component, g, snr)


def test_gemm_nodes_are_rewritten_so_the_diffusion_head_quantizes(cells):
    r = cells[("diffusion_head", "int4")]["denoise"]
    assert r["gemm"] >= 10 and r["ops"].get("MatMulNBits", 0) == r["changed"] and "Gemm" not in r["ops"]
    assert cells[("ar_transformer", "int8")]["condition"]["ops"].get("MatMulNBits", 0) >= 4  # 2-D AdaLN linears


# ----------------------------------------------------------------------------- a whole quantized export


@pytest.fixture(scope="module")
def phone_export(tiny_checkpoint, tmp_path_factory):
    from hartkit.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("qexports") / "phone"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_checkpoint(tiny_checkpoint, out, ["onnx"], recipe="phone")
    return out, result


def test_phone_export_passes_parity_and_records_its_recipe(phone_export):
    from hartkit.quantize.recipe import Recipe

    out, result = phone_export
    assert all(r.ok for r in result.parity) and {r.graph for r in result.parity} >= {"text_encoder", "denoise"}
    assert Recipe.load(out / "recipe.json").to_dict() == Recipe.load("phone").to_dict()
    info = json.loads((out / "manifest.json").read_text())
    q = info["quantization"]["formats"]["onnx"]
    assert q["layers"]["ar_transformer/blocks.0.attn.qkv_proj"]["scheme"] == "8da4w-g64"  # int4, int8 compute
    emb = q["layers"]["text_encoder/embed_tokens"]  # int4 rows; tiny's 32-wide rows take groups of 32
    assert emb["scheme"] == "int4-g32" and "not a multiple of 64" in emb["fallback"]
    assert q["parity"]["ar_stage"]["min_snr_vs_eager_db"] >= 60
    assert q["parity"]["ar_stage"]["min_snr_vs_fp32_db"] < 40  # it is really int4
    assert any("embed_tokens" in n for n in info["notes"])
    assert info["recipe"]["name"] == "phone"


def test_phone_export_stores_each_quantized_weight_once(phone_export):
    """onnxruntime's quantizers are deterministic: the same weight quantized in two graphs gives
    byte-identical initializers, which the export's weight sharing stores once (onnx/weights.bin)."""
    import onnx

    from hartkit.export.targets.onnx.share import SHARED_DATA, external_ranges

    out, _ = phone_export
    info = json.loads((out / "manifest.json").read_text())
    onnx_dir = out / "onnx"
    assert (onnx_dir / SHARED_DATA).is_file() and info["onnx_weights"]["shared_tensors"] > 0
    ctx, stage = external_ranges(onnx_dir / "ar_context.onnx"), external_ranges(onnx_dir / "ar_stage.onnx")
    assert ctx == stage and len(ctx) >= 4  # MatMulNBits weights and scales of both blocks, stored once
    inline, ranges = 0, set()
    for g in info["graphs"]:
        if g["weights"] == "ar_transformer":
            path = out / info["files"]["onnx"][g["name"]]
            model = onnx.load(str(path), load_external_data=False)
            inline += sum(len(t.raw_data) for t in model.graph.initializer
                          if t.data_location != onnx.TensorProto.EXTERNAL)
            ranges |= external_ranges(path)
    stored = inline + sum(r.length for r in ranges)
    estimate = info["quantization"]["formats"]["onnx"]["estimated_mb"]["ar_transformer"] * 1e6  # one copy
    assert stored <= 1.15 * estimate, (stored, estimate)


def test_a_quantized_bundle_verifies_against_its_own_quantized_goldens(phone_export):
    from hartkit.bundle import read_manifest, verify_bundle

    out, _ = phone_export
    golden = read_manifest(out)["golden"]
    assert "onnx" in golden["graphs"]["by_format"] and golden["loop"] is None
    report = verify_bundle(out, backend="onnxruntime")
    assert report.ok, report.problems
    assert {g["graph"] for g in report.golden} >= {"ar_stage", "denoise", "text_encoder"}


def test_runtime_on_the_phone_export_samples_like_the_eager_quantized_graphs(phone_export, tiny_model,
                                                                               tiny_text_encoder):
    from hartkit.model.graphs import hart_graph_specs
    from hartkit.bundle import LoopInfo
    from hartkit.model.graphs import loop_info
    from hartkit.export.targets import TARGETS
    from hartkit.quantize.apply import realize
    from hartkit.quantize.layers import discover
    from hartkit.quantize.recipe import Recipe, resolve
    from hartkit.model.torch_runner import TorchBackend
    from hartkit.runtime.pipeline import Pipeline

    out, _ = phone_export
    pipe = Pipeline.from_exported(out, backend="onnxruntime")
    S = pipe.loop.system_length
    layers = discover(tiny_model, tiny_text_encoder, hart_graph_specs(tiny_model, tiny_text_encoder, S))
    real = realize(tiny_model, tiny_text_encoder, S, resolve(Recipe.load("phone"), layers, "onnx"), None,
                   TARGETS["onnx"].quantize_eager)
    io = {s.name: ([i.name for i in s.inputs], [o.name for o in s.outputs]) for s in real.specs}
    eager = Pipeline(LoopInfo.from_dict(loop_info(tiny_model, S)), TorchBackend(real.modules, io), pipe.tokenizer,
                     pipe.codebook)
    for prompt in ("a red circle above a blue square", "a green triangle"):
        img, trace = pipe.generate(prompt, seed=5)
        ref_img, ref = eager.generate(prompt, seed=5)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert all(np.array_equal(a, b) for a, b in zip(ref.tokens, trace.tokens))
        assert np.abs(img.astype(int) - ref_img.astype(int)).max() <= 2


def test_graphs_past_the_protobuf_limit_keep_their_weights_beside_them(base, tiny_model, tiny_text_encoder,
                                                                       monkeypatch):
    """The >2 GB path (external data), forced on a tiny graph with a mix of static, dynamic and int4."""
    import onnxruntime as ort

    from hartkit.model.graphs import run_graph
    from hartkit.quantize import onnx_quant
    from hartkit.export.targets import TARGETS
    from hartkit.quantize.apply import realize
    from hartkit.quantize.calibration import activation_ranges, replay_fns
    from hartkit.quantize.layers import layer_modules
    from hartkit.quantize.recipe import Recipe, resolve

    monkeypatch.setattr(onnx_quant, "EXTERNAL_DATA_THRESHOLD", 0)
    recipe = Recipe.from_dict({"components": {"ar_transformer": "int4"},
                               "layers": {"ar_transformer/blocks.0.*": "w8a8", "ar_transformer/blocks.1.ffn.*": "w8a8_static"}})
    plan = resolve(recipe, base["layers"], "onnx")
    mods = layer_modules(tiny_model, tiny_text_encoder)
    static = [n for n, a in plan.assignments.items() if a.scheme.name == "w8a8_static"]
    ranges = activation_ranges(base["modules"], base["spec_inputs"], base["calib"],
                               {id(mods[n].weight): n for n in static}, graphs=["ar_context"])
    real = realize(tiny_model, tiny_text_encoder, base["S"], plan, ranges, TARGETS["onnx"].quantize_eager)
    dst = base["folder"] / "big" / "ar_context.onnx"
    dst.parent.mkdir()
    shutil.copy(base["folder"] / "ar_context.onnx", dst)
    weights = {l.name: (l.kind, mods[l.name].weight.detach().numpy()) for l in base["layers"].of_graph("ar_context")}
    replay = replay_fns(base["modules"], base["spec_inputs"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = onnx_quant.quantize_onnx_graph(dst, "ar_context", weights, plan.scheme_of,
                                             lambda: base["calib"].feeds("ar_context", replay))
    assert (dst.parent / "ar_context.onnx.data").is_file() and dst.stat().st_size < 200_000
    assert {"MatMulNBits", "MatMulInteger", "QuantizeLinear"} <= set(rep.ops)
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    names = base["spec_inputs"]["ar_context"]
    for f in base["feeds"]["ar_context"]:
        eq = run_graph(real.modules["ar_context"], [f[n] for n in names])
        ref = run_graph(base["modules"]["ar_context"], [f[n] for n in names])
        got = sess.run(None, {n: f[n] for n in names})
        for e, o, r in zip(eq, got, ref):
            assert snr_db(e, o) >= snr_db(r, e) + 3


def test_static_calibration_equals_onnxruntimes_own(base, cells):
    """The activation ranges hartkit computes (torch, over the recorded inputs) are the ones
    onnxruntime's MinMax calibrator wrote into the QDQ graph: same zero points, scales to 1e-6."""
    import onnx
    from onnx import numpy_helper

    from hartkit.quantize.calibration import activation_ranges
    from hartkit.quantize.fakequant import uint8_qparams
    from hartkit.quantize.layers import layer_modules
    from hartkit.quantize.recipe import Recipe, resolve

    model = onnx.load(str(base["folder"] / "text_encoder.text_encoder.w8a8_static.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    stored = sorted((float(inits[n.input[1]]), int(inits[n.input[2]])) for n in model.graph.node
                    if n.op_type == "QuantizeLinear")
    plan = resolve(Recipe.from_dict({"components": {"text_encoder": "w8a8_static"}}), base["layers"], "onnx")
    mods = layer_modules(*base["models"])
    ranges = activation_ranges(base["modules"], base["spec_inputs"], base["calib"],
                               {id(mods[n].weight): n for n, a in plan.assignments.items()
                                if a.scheme.name == "w8a8_static"}, graphs=["text_encoder"])
    mine = sorted(set(uint8_qparams(*r["text_encoder"]) for r in ranges.values()))
    assert len(stored) == len(mine) == 8  # 2 layers x (qkv input, o, gate/up input, down)
    for (s1, z1), (s2, z2) in zip(stored, mine):
        assert z1 == z2 and abs(s1 - s2) <= 1e-6 * s1


def test_relative_bar_asks_for_the_same_computation_and_no_more_noise():
    """The bar for activation-quantized graphs (quantize/apply.py): the export at least as close to the
    eager reference as that is to fp32 (the same computation), and no more than 1.5 dB farther from
    fp32 than the eager reference (its own draw of the rounding noise)."""
    from hartkit.quantize.apply import relative_ok

    q = 34.81  # eager reference vs fp32 (the demo model's ExecuTorch int8 ar_stage, 16 tokens)
    assert relative_ok(37.46, 33.78, q)  # as measured there: 1.03 dB noisier than the eager reference
    assert not relative_ok(37.46, q - 1.6, q)  # noisier than that
    assert not relative_ok(q - 1.0, q, q)  # farther from the eager reference than it is from fp32
    assert not relative_ok(14.0, 60.0, 10.0)  # the 15 dB floor
    assert relative_ok(60.0, 58.5, 80.0) and not relative_ok(59.9, 58.5, 80.0)  # capped at 60 dB
