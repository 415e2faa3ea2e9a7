"""Every error metric is written once, in hartkit.loop.metrics; everything else imports it."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

from hartkit.loop import metrics

ROOT = Path(__file__).resolve().parent.parent
METRICS = ROOT / "loop" / "metrics.py"


def _sources(tests: bool = False):
    """(relative path, syntax tree) of every Python file of the package and its examples; tests only when
    asked: they keep their own oracles on purpose."""
    skip = {"build", "dist", "__pycache__"} | (set() if tests else {"tests"})
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder) / name
            if name.endswith(".py") and path != METRICS:
                yield path.relative_to(ROOT), ast.parse(path.read_text(), str(path))


def _is_property(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)


def test_metric_functions_are_defined_only_in_loop_metrics():
    """No function elsewhere has a metric's name (a property that reads a stored result may)."""
    names = set(metrics.__all__) | {"psnr", "snr_db", "ssim"}
    found = [f"{rel}:{node.lineno} {node.name}" for rel, tree in _sources() for node in ast.walk(tree)
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names
             and not _is_property(node)]
    assert found == []


def test_decibels_are_computed_only_in_loop_metrics():
    """A log10 elsewhere is a dB formula written a second time."""
    found = [f"{rel}:{node.lineno}" for rel, tree in _sources() for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr == "log10"]
    assert found == []


def test_metrics_are_imported_from_loop_metrics_only():
    """No module passes a metric on: a re-export would be a second place to look it up."""
    names = set(metrics.__all__)
    found = [f"{rel}:{node.lineno} from {node.module}" for rel, tree in _sources(tests=True)
             for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.module != "hartkit.loop.metrics" and any(a.name in names for a in node.names)]
    assert found == []


def test_the_training_psnr_is_the_numpy_psnr_of_the_same_images():
    """hartkit.train's torch wrapper (images in [-1, 1]) gives the number psnr gives for the images."""
    torch = pytest.importorskip("torch")
    from hartkit.train.tokenizer import tensor_psnr

    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (2, 3, 8, 8))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), -1, 1)
    got = tensor_psnr(torch.from_numpy(a), torch.from_numpy(b))
    assert got == pytest.approx(metrics.psnr(a, b, peak=2.0), rel=1e-9)
    zero = torch.zeros(1, 3, 4, 4)
    assert tensor_psnr(zero, zero) == pytest.approx(10 * np.log10(4e12))  # the MSE is floored at 1e-12
