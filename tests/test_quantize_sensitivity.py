"""Calibration recording, per-layer sensitivity, and mixed precision under a budget (tiny preset)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from hartkit.errors import UsageError

PROMPTS = ["a red circle above a blue square", "a cat on a chair"]

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (conftest.py)


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_text_encoder, tiny_system_length, tmp_path_factory):
    from hartkit.quantize.calibration import CalibrationSet, record

    S = tiny_system_length
    calib = record(tiny_model, tiny_text_encoder, S, PROMPTS)
    path = calib.save(tmp_path_factory.mktemp("calib") / "calibration.npz")
    return dict(S=S, calib=calib, loaded=CalibrationSet.load(path), path=path)


def test_calibration_round_trips_compactly_and_rebuilds_the_cache(setup, tiny_model, tiny_text_encoder):
    from hartkit.model.graphs import hart_graph_specs
    from hartkit.quantize.calibration import replay_fns
    from hartkit.model.torch_runner import TorchBackend
    from hartkit.bundle import LoopInfo
    from hartkit.model.graphs import loop_info
    from hartkit.runtime.pipeline import Pipeline

    calib, loaded, S = setup["calib"], setup["loaded"], setup["S"]
    assert loaded.prompts == PROMPTS and len(loaded.calls) == len(calib.calls)
    pns = tiny_model.cfg.patch_nums
    assert loaded.count("ar_stage") == len(PROMPTS) * (len(pns) - 1)
    assert loaded.count("denoise") == len(PROMPTS) * 4  # capped per prompt
    assert all("past_k" not in c.feeds for c in loaded.calls)  # not stored: rebuilt on load
    # the replayed past keys equal the ones the loop really fed (recorded here independently)
    specs = hart_graph_specs(tiny_model, tiny_text_encoder, S)
    modules = {s.name: s.build().eval() for s in specs}
    inputs = {s.name: [i.name for i in s.inputs] for s in specs}
    seen = []

    class Spy:
        name = "spy"

        def __init__(self, inner):
            self.inner = inner

        def run(self, graph, feeds):
            if graph == "ar_stage":
                seen.append(np.array(feeds["past_k"]))
            return self.inner.run(graph, feeds)

    backend, _ = TorchBackend.from_model(tiny_model, tiny_text_encoder, S)
    Pipeline(LoopInfo.from_dict(loop_info(tiny_model, S)), Spy(backend), tiny_text_encoder.tokenizer,
             backend.codebook).generate(PROMPTS[0], seed=0)
    rebuilt = [f["past_k"] for f in loaded.feeds("ar_stage", replay_fns(modules, inputs))][: len(seen)]
    for a, b in zip(seen, rebuilt):
        assert a.shape == b.shape and np.abs(a - b).max() <= 2e-3 * max(np.abs(a).max(), 1)  # fp16-stored inputs
    raw = sum(v.nbytes for c in calib.calls for v in c.feeds.values())
    assert setup["path"].stat().st_size < 0.6 * raw


@pytest.fixture(scope="module")
def analysis(setup, tiny_model, tiny_text_encoder):
    from hartkit.quantize import sensitivity as sv

    report, ev = sv.analyze(tiny_model, tiny_text_encoder, setup["S"], setup["loaded"],
                            components=["ar_transformer"], low="int4", high="int8", fmt="onnx", max_calls=2)
    return report, ev


def test_ranking_measures_each_layer_alone(analysis):
    report, ev = analysis
    names = [u.unit for u in report.units]
    assert "ar_transformer/blocks.0.attn.qkv_proj" in names and "ar_transformer/head" in names
    scores = [u.score for u in report.units]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    head = next(u for u in report.units if u.unit == "ar_transformer/head")
    assert head.logits_nmse is not None and head.logits_kl is not None and "ar_head" in head.graph_nmse
    # the ranking's score of a unit equals the logits error of quantizing it alone, re-measured here
    top = report.units[0]
    from hartkit.quantize.schemes import Scheme

    again = ev.q  # quantize the top unit by hand and re-measure through the chain
    with again.applied({n: Scheme("int4") for n in top.layers}):
        nmse, _ = ev.logits_error()
    assert np.isclose(nmse, top.score, rtol=1e-6)
    with again.applied({}):
        assert ev.logits_error()[0] == 0.0  # nothing quantized: the reference itself


def test_mixed_recipe_respects_the_budget_and_keeps_the_most_sensitive(analysis, tiny_model, tiny_text_encoder, setup,
                                                                      tmp_path):
    from hartkit.model.graphs import hart_graph_specs
    from hartkit.quantize import sensitivity as sv
    from hartkit.quantize.layers import discover
    from hartkit.quantize.recipe import resolve
    from hartkit.quantize.sizes import MB, plan_bytes

    report, ev = analysis
    lo, hi = report.size_bytes(set()), report.size_bytes({u.unit for u in report.units})
    budget = (lo + 0.4 * (hi - lo)) / MB
    promoted = sv.mixed_plan(report, budget_mb=budget)
    assert 0 < len(promoted) < len(report.units)
    assert report.size_bytes(promoted) <= budget * MB
    first_skipped = next(u for u in report.units if u.unit not in promoted)
    # everything ranked above the first unit left at int4 was kept at int8
    assert all(u.unit in promoted for u in report.units[: report.units.index(first_skipped)])
    recipe = sv.plan_recipe(report, promoted)
    recipe.save(tmp_path / "mixed.json")
    layers = discover(tiny_model, tiny_text_encoder, hart_graph_specs(tiny_model, tiny_text_encoder, setup["S"]))
    plan = resolve(recipe, layers, "onnx")
    assert plan_bytes(plan)["ar_transformer"] <= budget * MB  # the written recipe meets the budget too
    assert all(plan.scheme_of(n).name == "int8" for u in report.units if u.unit in promoted for n in u.layers)
    mix = sv.measure(ev, report, promoted)
    none = sv.measure(ev, report, set())
    assert mix["error"] < none["error"]  # promoting the sensitive layers helps
    bits = sv.mixed_plan(report, avg_bits=6.0)
    assert sum(u.weight_bits_high if u.unit in bits else u.weight_bits_low for u in report.units) \
        <= 6.0 * sum(u.params for u in report.units)


def test_impossible_budgets_say_what_is_reachable(analysis):
    from hartkit.quantize import sensitivity as sv

    report, _ = analysis
    with pytest.raises(UsageError, match=r"below what int4-g32 can reach for ar_transformer: [0-9.]+ MB"):
        sv.mixed_plan(report, budget_mb=0.001)
    with pytest.raises(UsageError, match=r"an average of 2 bits is below what int4-g32 can reach"):
        sv.mixed_plan(report, avg_bits=2)
    with pytest.raises(UsageError, match="exactly one"):
        sv.mixed_plan(report)


def test_sweep_and_plot(analysis, tmp_path):
    from hartkit.quantize import sensitivity as sv

    report, ev = analysis
    sv.sweep(ev, report, points=3)
    counts = [p["promoted"] for p in report.curve]
    assert counts[0] == 0 and counts[-1] == len(report.units) and counts == sorted(counts) and len(counts) == 3
    assert report.curve[0]["mb"] < report.curve[-1]["mb"] and report.curve[-1]["error"] < report.curve[0]["error"]
    png = sv.plot(report, tmp_path / "s.png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    json.dumps(report.to_json())


def test_bad_sensitivity_requests(setup, tiny_model, tiny_text_encoder):
    from hartkit.quantize import sensitivity as sv

    with pytest.raises(UsageError, match="unknown component 'ar'"):
        sv.analyze(tiny_model, tiny_text_encoder, setup["S"], setup["loaded"], components=["ar"])
    with pytest.raises(UsageError, match="not available on executorch"):
        sv.analyze(tiny_model, tiny_text_encoder, setup["S"], setup["loaded"], low="int4", fmt="executorch")
    with pytest.raises(UsageError, match="at least as many bits"):
        sv.analyze(tiny_model, tiny_text_encoder, setup["S"], setup["loaded"], low="int8", high="int4")


def test_block_granularity_groups_layers(setup, tiny_model, tiny_text_encoder):
    from hartkit.quantize import sensitivity as sv

    report, _ = sv.analyze(tiny_model, tiny_text_encoder, setup["S"], setup["loaded"], components=["diffusion_head"],
                           low="int8", high="fp16", granularity="block", max_calls=1)
    units = {u.unit: u for u in report.units}
    assert set(units["diffusion_head/net.res_blocks.0"].layers) == {
        "diffusion_head/net.res_blocks.0.mlp.0", "diffusion_head/net.res_blocks.0.mlp.2",
        "diffusion_head/net.res_blocks.0.adaLN_modulation.1"}
    assert units["diffusion_head/net.res_blocks.0"].logits_nmse is None  # not upstream of the logits
    assert units["diffusion_head/net.res_blocks.0"].graph_nmse["denoise"] > 0


def test_cli_quantize_and_sensitivity(tiny_checkpoint, tmp_path, capsys):
    from hartkit.cli import main

    assert main(["quantize", "--list"]) == 0
    assert "8da4w" in capsys.readouterr().out
    assert main(["quantize", "--checkpoint", str(tiny_checkpoint), "--recipe", "phone", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "text_encoder/embed_tokens" in out and "fallback:" in out and "estimated:" in out
    assert main(["quantize", "--checkpoint", str(tiny_checkpoint), "--recipe", "phnoe", "--dry-run"]) == 2
    assert "did you mean phone" in capsys.readouterr().err
    # a refused cell fails before anything is written
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"components": {"ar_transformer": "int8"}}))
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--recipe", str(bad), "--format", "executorch",
                 "--out", str(tmp_path / "x")]) == 2
    # without executorch installed the export stops one step earlier, naming the missing library
    why = "silently wrong" if importlib.util.find_spec("executorch") else "needs executorch (not installed)"
    assert why in capsys.readouterr().err and not (tmp_path / "x").exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n# a comment\n\na cat\n")
    code = main(["sensitivity", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "s"), "--components",
                 "ar_transformer", "--prompts", str(prompts), "--budget-mb", "0.25", "--points", "3", "--threads", "1"])
    assert code == 0
    for name in ("sensitivity.json", "sensitivity.png", "recipe.json", "calibration.npz"):
        assert (tmp_path / "s" / name).is_file(), name
    report = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert report["prompts"] == 2 and report["chosen"]["mb"] <= 0.25
    assert main(["sensitivity", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "t"), "--components",
                 "ar_transformer", "--calibration", str(tmp_path / "s" / "calibration.npz"), "--budget-mb", "0.001"]) == 2
    assert "below what int4-g32 can reach" in capsys.readouterr().err
