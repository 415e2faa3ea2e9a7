"""hartkit validate: metrics against direct re-computations, fp32 export vs fp32 reference, a broken graph,
report.json, the HTML report in a real headless browser, the CLI's exit codes, int4 vs int8 recipes."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from hartkit.errors import HartkitError, UsageError
from hartkit.loop import metrics as M
from hartkit.validate import thresholds as T
from hartkit.validate.core import DEFAULT_PROMPTS, parse_seeds, read_prompts, run_references, validate
from hartkit.validate.references import Autocast16Backend, References
from hartkit.validate.report import report_dict, write_report

PROMPT = DEFAULT_PROMPTS[0]  # a scene caption, so the caption scorer can read it


# ----------------------------------------------------------------------------- fixtures


def _rewrite_hashes(folder: Path) -> None:
    """What a broken build (or an attacker) does: the manifest's checksums match the changed files."""
    from hartkit.bundle import artifacts

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"] = artifacts(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def broken_bundle(onnx_bundle, tmp_path_factory) -> Path:
    """The fp32 bundle with every weight matrix of ``ar_stage`` (stages >= 1) drowned in noise."""
    import onnx
    from onnx import numpy_helper

    dst = tmp_path_factory.mktemp("validate") / "broken"
    shutil.copytree(onnx_bundle[0], dst)
    path = dst / "onnx" / "ar_stage.onnx"
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    changed = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32 or arr.ndim < 2:
            continue
        noisy = arr + 20 * float(arr.std()) * rng.standard_normal(arr.shape).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(noisy, init.name))
        changed += 1
    assert changed > 0
    onnx.save(model, str(path))
    _rewrite_hashes(dst)
    return dst


@pytest.fixture(scope="module")
def reference_runs(tiny_checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs = References(tiny_checkpoint)
        return run_references(refs, prompts=[PROMPT], seeds=[0])


@pytest.fixture(scope="module")
def validation(onnx_bundle, broken_bundle, reference_runs):
    # Stage 0 on ar_context (onnxruntime otherwise runs it on ar_stage with an empty past), so that
    # the broken ar_stage first acts at stage 1 and the stage the report names is known in advance.
    from hartkit.backends import OnnxRuntimeBackend

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OnnxRuntimeBackend, "context_on_stage_graph", False)
        return validate([onnx_bundle[0], broken_bundle], reference=reference_runs)


def _row(report, name: str):
    return next(r for r in report.bundle_rows if r.bundle and Path(r.bundle).name == name)


# ----------------------------------------------------------------------------- metrics


def test_logit_metrics_against_explicit_loops():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(1, 5, 13)).astype(np.float32)
    b = a + rng.normal(scale=0.7, size=a.shape).astype(np.float32)
    kl = M.kl_divergence(a, b)
    for i in range(5):
        p = [math.exp(x) for x in a[0, i]]
        q = [math.exp(x) for x in b[0, i]]
        p = [x / sum(p) for x in p]
        q = [x / sum(q) for x in q]
        expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        assert kl[0, i] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert np.all(M.kl_divergence(a, a) == 0)
    top1 = sum(int(np.argmax(a[0, i]) == np.argmax(b[0, i])) for i in range(5)) / 5
    assert M.top1_agreement(a, b) == top1
    k = 4
    overlap = np.mean([len(set(np.argsort(-a[0, i])[:k]) & set(np.argsort(-b[0, i])[:k])) / k for i in range(5)])
    assert M.topk_overlap(a, b, k) == pytest.approx(overlap)
    assert M.topk_overlap(a, a, 100) == 1.0  # k capped at the vocabulary
    x, y = rng.normal(size=40), rng.normal(size=40)
    assert M.cosine(x, y) == pytest.approx(float(x @ y) / math.sqrt(float(x @ x) * float(y @ y)))
    assert M.cosine(x, -x) == pytest.approx(-1.0)
    assert M.token_agreement(np.array([[1, 2, 3, 4]]), np.array([[1, 0, 3, 0]])) == 0.5
    assert M.first_divergent_stage([np.array([1]), np.array([2, 3])], [np.array([1]), np.array([2, 4])]) == 1
    assert M.first_divergent_stage([np.array([1])], [np.array([1])]) is None


def test_ssim_matches_a_direct_windowed_computation():
    """Gaussian SSIM (sigma 1.5, 11x11, K1 .01, K2 .03) with explicit loops over every full window."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(14, 15, 2)).astype(np.uint8)
    b = np.clip(a.astype(np.int32) + rng.integers(-40, 40, size=a.shape), 0, 255).astype(np.uint8)
    g = [math.exp(-((i - 5) ** 2) / (2 * 1.5**2)) for i in range(11)]
    w = np.outer(g, g) / sum(g) ** 2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for c in range(2):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        vals = []
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx = (w * (px - mx) ** 2).sum()
                vy = (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(vals))
    assert M.ssim(a, b) == pytest.approx(float(np.mean(per_channel)), rel=1e-9)
    assert M.ssim(a, a) == pytest.approx(1.0)
    assert M.ssim(a, 255 - a) < 0.2
    assert M.psnr(a, a) == math.inf


def test_thresholds_resolve_parse_and_refuse():
    bars = T.resolve({"tf_top1_min": "0.9", "image_ssim_min": "none"})
    assert bars["tf_top1_min"] == 0.9 and bars["image_ssim_min"] is None
    assert bars["graph_snr_db_min"] == T.DEFAULTS["graph_snr_db_min"]
    with pytest.raises(UsageError, match="unknown threshold 'tf_top_1'"):
        T.resolve({"tf_top_1": 1})
    with pytest.raises(UsageError, match="expected a number"):
        T.resolve({"tf_kl_max": "lots"})
    assert T.parse_assignments(["a=1", " b = none "]) == {"a": "1", "b": "none"}
    with pytest.raises(UsageError, match="NAME=VALUE"):
        T.parse_assignments(["tf_kl_max"])
    assert T.misses("tf_top1_min", 0.5, bars) and not T.misses("tf_top1_min", 0.95, bars)
    assert T.misses("tf_kl_max", 1.0, bars) and not T.misses("tf_kl_max", 0.0, bars)
    assert not T.misses("image_ssim_min", 0.0, bars)  # turned off
    assert all(text for _, text in T.THRESHOLDS.values())


def test_prompts_and_seeds_inputs(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\na red circle on a blue background\n\n  a green square on a white background \n")
    assert read_prompts(f) == ["a red circle on a blue background", "a green square on a white background"]
    f.write_text(json.dumps(["one", "two"]))
    assert read_prompts(f) == ["one", "two"]
    f.write_text("\n# nothing\n")
    with pytest.raises(UsageError, match="no prompts"):
        read_prompts(f)
    assert parse_seeds("0, 1,0x10,1") == [0, 1, 16]
    with pytest.raises(UsageError):
        parse_seeds("a")


def test_fp16_reference_falls_back_to_fp32_for_ops_without_half_kernels():
    import torch

    class HalfHater:
        name = "fake"

        def run(self, graph, feeds):
            if torch.is_autocast_enabled("cpu"):
                raise RuntimeError('"slow_conv" not implemented for \'Half\'')
            return [np.ones(2, np.float32)]

    backend = Autocast16Backend(HalfHater())
    assert backend.run("vae_decode", {})[0].tolist() == [1.0, 1.0]
    assert "vae_decode" in backend.fallbacks and "Half" in backend.fallbacks["vae_decode"]


def test_recorder_keeps_first_calls_within_its_budget():
    from hartkit.validate.core import BudgetRecorder

    class Echo:
        name = "echo"

        def run(self, graph, feeds):
            return [feeds["x"] * 2]

    rec = BudgetRecorder(Echo(), budget_bytes=3 * 2 * 40)  # three calls of 40 B in + 40 B out
    for i in range(6):
        assert rec.run("ar_stage", {"x": np.full(10, i, np.float32)})[0][0] == 2 * i  # always runs
    rec.run("denoise", {"x": np.zeros(1000, np.float32)})  # over budget, but a graph's first call is kept
    assert [int(f["x"][0]) for f, _ in rec.calls["ar_stage"]] == [0, 1, 2]
    assert len(rec.calls["denoise"]) == 1


# ----------------------------------------------------------------------------- the validation itself


def test_fp32_export_matches_the_fp32_reference_near_perfectly(validation):
    good = _row(validation, "onnx")
    assert good.status == "ok" and good.passed, [f.message() for f in good.failures]
    assert good.first_divergent_stage is None
    assert len(good.stages) == 6
    for s in good.stages:
        assert s.tf_top1 == 1.0 and s.tf_topk == 1.0 and s.free_token_agreement == 1.0
        assert s.tf_kl < 1e-9 and s.tf_logits_max_abs_err < 1e-4
    assert {g.graph for g in good.graphs} >= {"text_encoder", "ar_context", "ar_stage", "ar_head", "denoise",
                                              "vae_decode", "residual_0"}
    assert all(g.error is None and g.snr_db_min > 80 and g.cosine_min > 0.999999 for g in good.graphs)
    run = good.runs[0]
    assert run.image_psnr_db > 60 and run.image_ssim > 0.9999 and run.residual_snr_db > 80
    # The fp16 reference row is computed alongside, is worse than the fp32 export, and is not gated.
    fp16 = next(r for r in validation.rows if r.kind == "reference")
    assert fp16.status == "ok" and 30 < fp16.summary()["graph_snr_db_min"] < good.summary()["graph_snr_db_min"]
    assert good.runs[0].image_psnr_vs_fp16_db is not None


def test_a_broken_graph_fails_and_names_the_first_divergent_stage(validation):
    broken = _row(validation, "broken")
    assert broken.status == "ok" and not broken.passed
    assert not validation.passed  # one bundle row failing fails the whole validation
    # Stage 0 runs ar_context (untouched): identical; stage 1 is the first to run the broken ar_stage.
    assert broken.stages[0].tf_top1 == 1.0 and broken.stages[0].free_token_agreement == 1.0
    assert broken.first_divergent_stage == 1
    graph_failures = {f.graph for f in broken.failures if f.graph}
    assert graph_failures == {"ar_stage"}
    stage_failures = sorted({f.stage for f in broken.failures if f.stage is not None})
    assert stage_failures[0] == 1 and 0 not in stage_failures
    assert any("stage 1" in line for line in validation.failure_lines())


def test_report_json_is_well_formed(validation, tmp_path):
    json_path, html_path = write_report(validation, tmp_path / "rep")
    assert html_path.is_file()

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(json_path.read_text(), parse_constant=no_constants)
    assert data["schema"] == "hartkit.validate/1" and data["passed"] is False
    assert data["prompts"] == [PROMPT] and data["seeds"] == [0]
    assert set(data["thresholds"]) == set(T.THRESHOLDS)
    labels = [m["label"] for m in data["matrix"]]
    assert len(labels) == 3 and labels[0].startswith("torch (fp16")
    by_bundle = {Path(r["bundle"]).name: r for r in data["rows"] if r["kind"] == "bundle"}
    assert by_bundle["onnx"]["passed"] is True and by_bundle["broken"]["passed"] is False
    assert by_bundle["broken"]["first_divergent_stage"] == 1
    assert len(by_bundle["broken"]["stages"]) == 6
    first = next(f for f in data["failures"] if f["stage"] is not None)
    assert first["stage"] == 1 and "stage 1" in first["message"]
    psnr = by_bundle["onnx"]["summary"]["image_psnr_db_min"]
    assert psnr == "inf" or psnr > 60  # JSON has no infinity: identical images say "inf"
    assert data == report_dict(validation) | {"created": data["created"]}


def test_a_bundle_of_another_model_is_refused(onnx_bundle, reference_runs, tmp_path):
    dst = tmp_path / "other"
    shutil.copytree(onnx_bundle[0], dst)
    np.savez(dst / "constants.npz", codebook=np.zeros_like(reference_runs.refs.codebook))
    _rewrite_hashes(dst)
    with pytest.raises(HartkitError, match="codebook differs"):
        validate([dst], reference=reference_runs)


def test_a_graph_that_cannot_run_makes_an_error_row_not_a_crash(onnx_bundle, reference_runs, tmp_path):
    dst = tmp_path / "swapped"
    shutil.copytree(onnx_bundle[0], dst)
    shutil.copy(dst / "onnx" / "denoise.onnx", dst / "onnx" / "ar_head.onnx")  # wrong graph under the name
    _rewrite_hashes(dst)
    report = validate([dst], reference=reference_runs)
    (row,) = report.bundle_rows
    assert row.status == "error" and "generation failed" in row.reason and not report.passed
    assert next(g for g in row.graphs if g.graph == "ar_head").error
    assert any("could not be validated" in line for line in report.failure_lines())


@pytest.mark.skipif(__import__("sys").platform == "darwin", reason="Core ML runs on macOS: the row would not skip")
def test_formats_that_cannot_run_here_are_skipped_rows_not_failures(onnx_bundle, reference_runs, tmp_path):
    from hartkit.validate.core import open_candidates

    dst = tmp_path / "two-formats"
    shutil.copytree(onnx_bundle[0], dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["coreml"] = {"ar_head": manifest["files"]["onnx"]["ar_head"]}  # listed, covered by hashes
    (dst / "manifest.json").write_text(json.dumps(manifest))
    rows = [c.row for c in open_candidates([dst], reference_runs.refs)]
    assert [(r.format, r.status) for r in rows] == [("onnx", "ok"), ("coreml", "skipped")]
    assert "macOS" in rows[1].reason
    with pytest.raises(HartkitError, match="macOS"):  # asked for explicitly: an error, not a skip
        open_candidates([dst], reference_runs.refs, backend="coreml")
    with pytest.raises(UsageError, match="no executorch files"):
        open_candidates([dst], reference_runs.refs, backend="executorch")


# ----------------------------------------------------------------------------- the HTML in a browser


def _browser() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_html_report_renders_in_a_headless_browser(validation, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser installed (chromium); .ci/run installs one")
    _, html_path = write_report(validation, tmp_path / "rep")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = html_path.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "<table class=\"matrix\">" in dom
    matrix = dom[dom.index('<table class="matrix">'):]
    matrix = matrix[:matrix.index("</table>")]
    assert matrix.count("<tr") == 1 + 1 + 3  # header, fp32 reference, fp16, two bundles
    for label in ("onnx (onnx, fp32)", "broken (onnx, fp32)", "torch (fp16 autocast)"):
        assert label in matrix
    assert "FAIL" in matrix and ">pass<" in matrix
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    # 1 stage plot + (fp32, fp16, 2 bundles) images + 3 difference maps for the one prompt x seed
    assert len(images) == 1 + 4 + 3
    assert "first divergent stage: 1" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1400,2400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2400, 1400, 3)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 200  # the FAIL badge and the failing cells were drawn
    assert pixels.std() > 20  # not a blank page


# ----------------------------------------------------------------------------- CLI


def test_cli_exit_codes_and_report_location(onnx_bundle, broken_bundle, tiny_checkpoint, tmp_path, capsys):
    from hartkit.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    # A manifest records a local checkpoint by name and content hash only (no path of the exporting
    # machine), so its folder is given; one from the Hugging Face cache is found by id (test_hub.py).
    common = ["--prompts", str(prompts), "--seeds", "0", "--no-fp16", "--checkpoint", str(tiny_checkpoint)]
    assert main(["validate", str(onnx_bundle[0]), *common, "--out", str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and (tmp_path / "good" / "report.html").resolve().as_uri() in out
    code = main(["validate", str(broken_bundle), *common, "--out", str(tmp_path / "bad")])
    out = capsys.readouterr().out
    assert code == 3
    # onnxruntime runs stage 0 on ar_stage too (empty past): the broken graph acts from stage 0
    assert "tokens first diverge at stage 0" in out and "graph ar_stage" in out
    assert json.loads((tmp_path / "bad" / "report.json").read_text())["passed"] is False
    assert main(["validate", str(onnx_bundle[0]), *common, "--threshold", "no_such_bar=1"]) == 2
    assert "unknown threshold" in capsys.readouterr().err


# ----------------------------------------------------------------------------- int4 vs int8 recipes


@pytest.mark.slow  # two quantized exports of `tiny`: about a minute each on 2 shared cores
def test_int4_recipe_scores_below_int8(tiny_checkpoint, reference_runs, tmp_path_factory):
    from hartkit.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("quant")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for recipe in ("laptop", "phone"):  # int8 AR transformer / int4 AR transformer + text encoder
            export_checkpoint(tiny_checkpoint, out / recipe, ["onnx"], recipe=recipe)
    report = validate([out / "laptop", out / "phone"], reference=reference_runs)
    int8, int4 = (_row(report, name).summary() for name in ("laptop", "phone"))
    assert _row(report, "laptop").recipe == "laptop" and _row(report, "phone").recipe == "phone"
    assert int4["graph_snr_db_min"] < int8["graph_snr_db_min"]
    assert int4["graph_cosine_min"] < int8["graph_cosine_min"]
    assert int4["tf_kl_max"] > int8["tf_kl_max"]
    assert int4["residual_snr_db_min"] < int8["residual_snr_db_min"]
    assert int4["image_psnr_db_min"] < int8["image_psnr_db_min"]
    # Both are far from fp32-exact: the numbers see the quantization at all.
    assert int8["graph_snr_db_min"] < 80


def test_image_psnr_pools_the_error_so_one_identical_image_does_not_hide_the_others():
    from hartkit.loop.metrics import pooled_psnr

    assert pooled_psnr([math.inf, math.inf]) == math.inf
    assert pooled_psnr([30.0]) == pytest.approx(30.0)
    # one identical image and one at 30 dB: half the mean squared error of 30 dB, i.e. +3.01 dB
    assert pooled_psnr([math.inf, 30.0]) == pytest.approx(30.0 + 10 * math.log10(2))
    assert pooled_psnr([20.0, 40.0]) == pytest.approx(-10 * math.log10((1e-2 + 1e-4) / 2))
    assert pooled_psnr([None, 25.0]) == pytest.approx(25.0) and pooled_psnr([None]) is None
