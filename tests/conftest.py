"""Shared fixtures: every test that needs a model starts from files on disk, as a user's would."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

# Prepended to code run by `without_torch`: any import of torch fails, as in a torch-free install.
_BLOCK_TORCH = """import sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _BlockTorch())
"""


@pytest.fixture
def without_torch() -> Callable[..., subprocess.CompletedProcess]:
    """Run Python code in a fresh interpreter in which torch cannot be imported."""

    def run(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _BLOCK_TORCH + code], capture_output=True, text=True,
                              timeout=timeout)

    return run


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


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a whole test file (`pytestmark = pytest.mark.usefixtures("one_thread")`).

    Tiny graphs run faster on one thread, and much faster on a machine shared with other jobs.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_system_length(tiny_model, tiny_text_encoder) -> int:
    """The system-prompt length S the tiny preset's graphs are built for."""
    from hartkit.model.torch_runner import system_length_of

    return system_length_of(tiny_text_encoder.tokenizer, tiny_model.cfg.context_token)


class TinyGraphs(NamedTuple):
    S: int
    specs: list  # GraphSpec, in loop order
    byname: dict  # name -> GraphSpec
    modules: dict  # name -> the built module, in eval mode
    inputs: dict  # name -> its input names, in order


@pytest.fixture(scope="module")
def tiny_graphs(tiny_model, tiny_text_encoder, tiny_system_length) -> TinyGraphs:
    """Every graph of the tiny preset, built afresh for each test file (quantizing may change modules)."""
    from hartkit.model.graphs import hart_graph_specs

    specs = hart_graph_specs(tiny_model, tiny_text_encoder, tiny_system_length)
    return TinyGraphs(tiny_system_length, specs, {s.name: s for s in specs},
                      {s.name: s.build().eval() for s in specs}, {s.name: [i.name for i in s.inputs] for s in specs})
