"""hartkit bench on tiny: it runs and writes well-formed JSON (numbers are reported, not asserted)."""

import json
import sys

import numpy as np

from hartkit.bench.exports import STATS
from hartkit.cli import main
from hartkit.bundle import read_manifest


def test_bench_writes_json_and_a_plot(tiny_checkpoint, onnx_bundle, tmp_path, capsys):
    bundle, _ = onnx_bundle
    assert main(["bench", "--checkpoint", str(tiny_checkpoint), "--bundle", str(bundle), "--runs", "1",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["machine"]["gemm_fp32_flops"] > 1e8
    graphs = {row["graph"] for row in data["graphs"]}
    assert {"ar_stage", "denoise", "vae_decode"} <= graphs
    assert all(row["torch_eager_s"] > 0 and row["onnxruntime/fp32_s"] > 0 for row in data["graphs"])
    e2e = data["end_to_end"]
    assert e2e[0]["speedup"] == 1.0 and e2e[1]["pipeline"] == "onnxruntime/fp32"
    assert set(e2e[1]["breakdown"]) == {"text_encoder", "ar", "diffusion_head", "vae", "host", "total"}
    # the fp32 export reproduces the reference sampler: same tokens, (nearly) the same image
    assert e2e[1]["tokens_identical"] and e2e[1]["psnr_vs_fp32_db"] > 40
    assert len(data["ar_stages"]) == 6 and all(0 < r["fraction_of_gemm_peak"] for r in data["ar_stages"])
    sizes = {(r["format"], r["component"]): r for r in data["sizes"]}
    assert sizes[("onnx", "ar_transformer")]["bits"] == 32
    mem = data["memory"][0]
    assert mem["peak_rss_bytes"] > 10e6 and mem["ratio_to_limit"] == mem["peak_rss_bytes"] / (
        mem["bundle_bytes"] + mem["kv_cache_bytes"])
    assert (tmp_path / "bench.png").is_file()
    assert "| onnxruntime/fp32 |" in (tmp_path / "bench.md").read_text()
    assert "GEMM" in capsys.readouterr().out


def test_bench_exports_recipes_at_a_lower_resolution_and_reuses_them(tiny_checkpoint, tmp_path, capsys):
    """--recipes exports in a child process (time and peak memory measured), at --resolution the
    loop runs fewer scales, and a second run reuses the bundle instead of exporting again."""
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["bench", "--checkpoint", str(tiny_checkpoint), "--recipes", "fp32", "--format", "onnx",
            "--resolution", "16", "--work", str(work), "--runs", "1", "--no-memory", "--out", str(out)]
    assert main(args) == 0
    bundle = work / "fp32-onnx-16px"
    manifest = read_manifest(bundle)
    assert manifest["loop"]["image_size"] == 16 and manifest["loop"]["patch_nums"] == [1, 2, 3, 4]
    data = json.loads((out / "bench.json").read_text())
    (export,) = data["exports"]
    assert export["recipe"] == "fp32" and export["seconds"] > 0 and export["peak_rss_bytes"] > 50e6
    assert len(data["ar_stages"]) == 4  # one row per scale of the 16 px loop
    assert data["end_to_end"][1]["tokens_identical"]
    stamp = (bundle / "manifest.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (bundle / "manifest.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "bench.json").read_text())["exports"][0]["reused"] is True
    assert json.loads((work / STATS).read_text())["fp32-onnx-16px"]["recipe"] == "fp32"


def test_bench_needs_something_to_measure(tiny_checkpoint, tmp_path, capsys):
    assert main(["bench", "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "--bundle" in capsys.readouterr().err
    assert main(["bench", "--checkpoint", str(tiny_checkpoint), "--recipes", "fp32"]) == 2
    assert "--work" in capsys.readouterr().err


def test_a_failed_export_is_recorded_with_its_reason(tiny_checkpoint, tmp_path, monkeypatch):
    """An export killed for memory (here: a child that kills itself) is a row with the reason, not a crash."""
    import hartkit.bench.exports as ex

    monkeypatch.setattr(ex, "export_command", lambda *a, **k: [sys.executable, "-c",
                                                               "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    bundles, rows = ex.prepare_bundles(tiny_checkpoint, tmp_path, ["fp32"], ["onnx"], None)
    assert bundles == [] and rows[0]["failed"] == "killed by SIGKILL (out of memory?)"
    assert json.loads((tmp_path / STATS).read_text())["fp32-onnx"]["failed"]


def test_peak_rss_is_the_childs_own_not_inherited_from_a_big_parent():
    """Linux keeps ru_maxrss across fork+exec; the bench reads VmHWM, which starts afresh."""
    import subprocess

    big = np.ones(300_000_000 // 8)  # ~300 MB resident in this (parent) process
    code = "from hartkit.bench.run import own_peak_rss; print(own_peak_rss())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 1e6 < int(out.strip()) < 250e6
    assert big.sum() > 0


def test_a_slow_call_is_timed_once(monkeypatch):
    """Minutes-long calls (ExecuTorch's AR graphs) are not repeated: the warm-up is the measurement."""
    import time

    from hartkit.bench import run

    calls = []

    def fn(delay):
        calls.append(delay)
        time.sleep(delay)

    monkeypatch.setattr(run, "SLOW_CALL_S", 0.05)
    t = run.median_time(lambda: fn(0.08), warmup=1, runs=3)
    assert len(calls) == 1 and 0.08 <= t < 1.0
    calls.clear()
    run.median_time(lambda: fn(0.0), warmup=1, runs=3)
    assert len(calls) == 4  # fast: one warm-up + three timed runs


def test_a_bundle_of_an_older_preset_is_not_reused(tmp_path):
    """A preset whose schemes changed since the bundle was exported gives a new export, not stale numbers."""
    from hartkit.bench.exports import _matches
    from hartkit.quantize.recipe import Recipe

    bundle = tmp_path / "laptop-onnx-256px"
    bundle.mkdir()
    current = Recipe.load("laptop").to_dict()
    older = {**current, "components": {"ar_transformer": "int8"}, "formats": {}}
    for recipe, want in ((current, True), (older, False)):
        manifest = {"recipe": recipe, "loop": {"image_size": 256}, "files": {"onnx": {}}}
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        assert _matches(bundle, "laptop", ["onnx"], 256) is want
