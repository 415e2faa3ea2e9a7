"""Shared fixtures: every test that needs a model starts from files on disk, as a user's would."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight `tiny` checkpoint written by the same code as `hartkit init-checkpoint`."""
    from hartkit.model.presets import init_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        init_checkpoint("tiny", out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from hartkit.model.checkpoint import load_hart

    return load_hart(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_text_encoder(tiny_checkpoint):
    from hartkit.model.text_encoder import TextEncoder

    return TextEncoder.from_pretrained(tiny_checkpoint / "text_model")


@pytest.fixture(scope="session")
def onnx_bundle(tiny_checkpoint, tmp_path_factory):
    """An fp32 ONNX export (a verified bundle) of the tiny checkpoint, shared by the test files."""
    from hartkit.export.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("exports") / "onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_checkpoint(tiny_checkpoint, out, ["onnx"])
    return out, result
