"""hartkit bench on tiny: it runs and writes well-formed JSON (numbers are reported, not asserted)."""

import json

from hartkit.cli import main


def test_bench_writes_json_and_a_plot(tiny_checkpoint, onnx_bundle, tmp_path, capsys):
    bundle, _ = onnx_bundle
    assert main(["bench", "--checkpoint", str(tiny_checkpoint), "--bundle", str(bundle), "--runs", "1",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["machine"]["gemm_fp32_flops"] > 1e8
    graphs = {row["graph"] for row in data["graphs"]}
    assert {"ar_stage", "denoise", "vae_decode"} <= graphs
    assert all(row["torch_eager_s"] > 0 and row["onnxruntime_s"] > 0 for row in data["graphs"])
    e2e = data["end_to_end"]
    assert e2e[0]["speedup"] == 1.0 and e2e[1]["pipeline"] == "onnxruntime"
    assert set(e2e[1]["breakdown"]) == {"text_encoder", "ar", "diffusion_head", "vae", "host", "total"}
    assert len(data["ar_stages"]) == 6 and all(0 < r["fraction_of_gemm_peak"] for r in data["ar_stages"])
    sizes = {(r["format"], r["component"]): r for r in data["sizes"]}
    assert sizes[("onnx", "ar_transformer")]["bits"] == 32
    assert data["memory"][0]["peak_rss_bytes"] > 10e6
    assert (tmp_path / "bench.png").is_file()
    assert "GEMM" in capsys.readouterr().out
