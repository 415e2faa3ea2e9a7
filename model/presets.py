"""Named model shapes, and random-weight checkpoints of them in the official layout.

``tiny`` is for tests and quick demos (well under a million parameters per part, 32x32 images).
``hart-0.7b-1024px`` has the official shapes (hart-reference.md sections 1 and 5); the values the
reading marks [I]/[U] (num_heads, pooling mode, ...) are our best reading, and a real checkpoint's
config.json always wins over them: presets only feed ``init-checkpoint``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from hartkit.errors import UsageError
from hartkit.model.config import HARTConfig, VAEConfig

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    hart: HARTConfig
    vae: VAEConfig
    text: dict  # keyword arguments for the text-model factory


def _tiny() -> Preset:
    patch_nums = (1, 2, 3, 4, 6, 8)
    hart = HARTConfig(
        context_token=64, context_dim=32, depth=2, embed_dim=64, num_heads=4, mlp_ratio=4.0,
        patch_nums=patch_nums, attn_type="llama", mlp_type="llama", sep_aln_pooling_mode="max",
        diff_width=64, diff_depth=2, num_sampling_steps="8",
    )
    vae = VAEConfig(
        vocab_size=1024, z_channels=8, ch=32, ch_mult=(1, 1, 2), v_patch_nums=patch_nums,
        quantizer_type="var_hybrid", share_quant_resi=4, quant_resi=0.5,
    )
    return Preset("tiny", "test-sized HART: 2 blocks, 6 scales, 32x32 px", hart, vae,
                  {"hidden_size": 32, "num_layers": 2, "vocab_size": 512})


def _demo() -> Preset:
    """The shipped demo model (assets/demo), trained by examples/train_tiny_hart.py on the procedural
    scenes of hartkit.validate.scenes: 64x64 px, an 8x8 latent, ~4.3 M parameters (AR transformer
    2.3 M, diffusion head 0.27 M, tokenizer 1.5 M, text model 0.18 M). 6 blocks of width 128: trained
    side by side from scratch for the same 7 minutes on one GPU, the earlier 4 blocks of width 96
    drew 34 % of their captions right, this shape 71 %. The captions have at most 14 tokens, hence
    16 context tokens."""
    patch_nums = (1, 2, 3, 4, 6, 8)
    hart = HARTConfig(
        context_token=16, context_dim=64, depth=6, embed_dim=128, num_heads=4, mlp_ratio=4.0,
        patch_nums=patch_nums, attn_type="llama", mlp_type="llama", sep_aln_pooling_mode="max",
        diff_width=128, diff_depth=2, num_sampling_steps="8", cond_drop_rate=0.1, diffusion_batch_mul=2,
    )
    vae = VAEConfig(
        vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 1, 2, 2), v_patch_nums=patch_nums,
        quantizer_type="var_hybrid", share_quant_resi=4, quant_resi=0.5,
    )
    return Preset("demo", "the shipped demo shape: 6 blocks of width 128, 6 scales, 64x64 px", hart, vae,
                  {"hidden_size": 64, "num_layers": 4, "vocab_size": 512})


def _hart_07b() -> Preset:
    hart = HARTConfig(
        context_token=300, context_dim=1536, depth=16, embed_dim=1536, num_heads=24, mlp_ratio=4.0,
        patch_nums=OFFICIAL_PATCH_NUMS, attn_type="llama", mlp_type="llama", sep_aln_pooling_mode="max",
        diff_width=1024, diff_depth=6, num_sampling_steps="8",
    )
    vae = VAEConfig(
        vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), v_patch_nums=OFFICIAL_PATCH_NUMS,
        quantizer_type="var_hybrid", share_quant_resi=4, quant_resi=0.5,
    )
    return Preset("hart-0.7b-1024px", "official HART-0.7B shapes, 1024x1024 px, Qwen2-1.5B text encoder",
                  hart, vae, {"full_size": True})


PRESETS: dict[str, Callable[[], Preset]] = {"tiny": _tiny, "demo": _demo, "hart-0.7b-1024px": _hart_07b}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def init_random_weights(model, seed: int) -> None:
    """Seeded random weights with sensible scales (not PyTorch's per-layer defaults, which vary).

    Linear/conv weights ~ N(0, 0.02) (attention and MLP outputs scaled down by depth, GPT-2 style),
    biases zero, norm weights one, embeddings and the codebook ~ N(0, 1/sqrt(dim)).
    """
    gen = torch.Generator().manual_seed(seed)
    depth = max(1, getattr(model.cfg, "depth", 1))
    for module in (model.transformer, model.vae):
        for name, param in module.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    param.zero_()
                elif param.ndim == 1:  # norm weights
                    param.fill_(1.0)
                elif "embedding" in name or name.startswith("lvl_embed") or name.startswith("pos_"):
                    param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
                else:
                    std = 0.02
                    if name.endswith(("proj.weight", "down_proj.weight", "fc2.weight")) and "blocks" in name:
                        std = 0.02 / (2 * depth) ** 0.5
                    param.copy_(torch.randn(param.shape, generator=gen) * std)


def init_checkpoint(preset: str, out: str | os.PathLike, *, seed: int = 0, overwrite: bool = False,
                    with_text_model: bool = True) -> Path:
    """Write a random-weight checkpoint of ``preset`` in the official layout, atomically.

    ``out/llm``, ``out/tokenizer`` and (unless disabled) the text model in ``out/text_model``.
    """
    from hartkit.model.checkpoint import atomic_dir, build_hart, save_hart

    spec = get_preset(preset)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        torch.manual_seed(seed)
        model = build_hart(spec.hart, spec.vae)
        init_random_weights(model, seed)
        save_hart(model, tmp)
        del model
        if with_text_model:
            from hartkit.model.text_encoder import make_tiny_text_model, qwen2_1p5b_config

            if spec.text.get("full_size"):
                _write_full_text_model(tmp / "text_model", qwen2_1p5b_config(), seed)
            else:
                make_tiny_text_model(tmp / "text_model", seed=seed, **spec.text)
    return out


def _write_full_text_model(out: Path, config, seed: int) -> None:
    """A Qwen2-1.5B-shaped random text model with the tiny offline tokenizer's files."""
    from transformers import Qwen2Model

    from hartkit.model.text_encoder import make_tiny_text_model

    make_tiny_text_model(out, seed=seed, hidden_size=32, num_layers=1, vocab_size=512)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    torch.manual_seed(seed)
    model = Qwen2Model(config)
    model.save_pretrained(out, safe_serialization=True)
