"""Presets: the official 0.7B shapes (built on the meta device, no memory) and the tiny test shape."""

import pytest
import torch

from hartkit.errors import UsageError
from hartkit.model.checkpoint import build_hart
from hartkit.model.presets import get_preset


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_hart_07b_preset_matches_the_reference_figures():
    spec = get_preset("hart-0.7b-1024px")
    model = build_hart(spec.hart, spec.vae, device="meta")
    tr, vae = model.transformer, model.vae
    # hart-reference.md section 7: AR + diffusion head 729.8 M, of which the diffusion head 36.59 M
    assert _count(tr) == pytest.approx(729.8e6, abs=0.1e6)
    assert _count(tr.diffloss) == pytest.approx(36.59e6, abs=0.01e6)
    assert _count(vae.decoder) == pytest.approx(64.65e6, abs=0.01e6)
    state = tr.state_dict()
    assert state["blocks.15.attn.qkv_proj.weight"].shape == (4608, 1536)
    assert state["blocks.0.ffn.gate_proj.weight"].shape == (4096, 1536)
    assert state["blocks.0.ada_lin.1.weight"].shape == (9216, 1536)
    assert state["lvl_embed.weight"].shape == (14, 1536)
    assert state["lvl_1L"].shape == (1, 9750)
    assert state["head.weight"].shape == (4096, 1536)
    assert vae.state_dict()["quantize.embedding.weight"].shape == (4096, 32)
    assert spec.hart.patch_nums[-1] * spec.vae.downsample == 1024
    assert spec.hart.seq_len == 9750


def test_qwen2_text_model_of_the_full_preset_is_1p5b():
    from transformers import Qwen2Model

    from hartkit.model.text_encoder import qwen2_1p5b_config

    with torch.device("meta"):
        model = Qwen2Model(qwen2_1p5b_config())
    assert _count(model) == pytest.approx(1.54e9, rel=0.01)


def test_tiny_preset_is_small():
    spec = get_preset("tiny")
    model = build_hart(spec.hart, spec.vae, device="meta")
    n_tr, n_dec = _count(model.transformer), _count(model.vae.decoder)
    assert 100_000 < n_tr < 1_000_000 and n_dec < 1_000_000
    assert spec.hart.patch_nums[-1] * spec.vae.downsample == 32


def test_unknown_preset():
    with pytest.raises(UsageError, match="unknown preset 'big'"):
        get_preset("big")
