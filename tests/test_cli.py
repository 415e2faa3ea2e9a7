"""The command line: help, the init-checkpoint -> generate path, exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from hartkit.cli import main


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hartkit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_help_lists_the_commands():
    res = run_cli("--help")
    assert res.returncode == 0
    for verb in ("demo", "init-checkpoint", "generate"):
        assert verb in res.stdout
    res = run_cli("generate", "--help")
    assert res.returncode == 0 and "--checkpoint" in res.stdout and "--seed" in res.stdout


def test_generate_on_an_init_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["init-checkpoint", str(ckpt), "--preset", "tiny", "--seed", "1"]) == 0
    out = tmp_path / "img.png"
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "a blue circle", "--seed", "5",
                 "--out", str(out)]) == 0
    first = np.asarray(Image.open(out))
    assert first.shape == (32, 32, 3)
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "a blue circle", "--seed", "5",
                 "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "again.png")))


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    res = run_cli("generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x", "--text-model", str(tmp_path))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "missing" in res.stderr and "not found" in res.stderr
    res = run_cli("generate", "--checkpoint", str(tmp_path), "--prompt", "x", "--cfg", "-3")
    assert res.returncode == 2 and "cfg must be in" in res.stderr
    res = run_cli("generate", "--checkpoint", str(tmp_path), "--prompt", "x", "--seed", "-1")
    assert res.returncode == 2 and "seed" in res.stderr
    res = run_cli("init-checkpoint", str(tmp_path / "x"), "--preset", "huge")
    assert res.returncode == 2 and "unknown preset 'huge'" in res.stderr and "Traceback" not in res.stderr


def test_demo_shows_reference_export_runtime_and_report(tmp_path):
    res = run_cli("demo", "--out", str(tmp_path / "demo"))
    assert res.returncode == 0, res.stderr
    demo = tmp_path / "demo"
    assert (demo / "demo.png").is_file() and (demo / "bundle-onnx" / "manifest.json").is_file()
    # Same tokens -> the same image up to float rounding before the uint8 truncation.
    from hartkit.loop.metrics import psnr

    ref, rt = (np.asarray(Image.open(demo / name)) for name in ("demo.png", "demo-onnxruntime.png"))
    assert psnr(ref, rt) >= 40.0
    assert "identical to the reference" in res.stdout or "dB vs the reference" in res.stdout
    assert f"validation report: {(demo / 'report' / 'report.html').resolve().as_uri()}" in res.stdout
    assert (demo / "report" / "report.json").is_file()
    # the shipped demo model: its caption judge verdicts and the grid of held-out prompts
    grid = np.asarray(Image.open(demo / "demo-grid.png"))
    assert grid.shape[1] == 4 * 150 and "8 held-out prompts" in res.stdout and "caption judge on" in res.stdout
