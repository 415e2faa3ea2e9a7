"""Official-layout checkpoints: round trip, strict loading, and refusal of bad files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from hartkit.errors import CheckpointError
from hartkit.model.checkpoint import load_hart, read_weight_file, save_hart
from hartkit.model.config import HARTConfig, VAEConfig


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layout_written_by_init_checkpoint(tiny_checkpoint):
    for rel in ("llm/config.json", "llm/model.safetensors", "tokenizer/config.json", "tokenizer/model.safetensors",
                "text_model/config.json", "text_model/tokenizer.json"):
        assert (tiny_checkpoint / rel).is_file(), rel
    cfg = json.loads((tiny_checkpoint / "llm/config.json").read_text())
    assert cfg["model_type"] == "hart_transformer_t2i" and cfg["attn_type"] == "llama"
    vae_keys = read_weight_file(tiny_checkpoint / "tokenizer/model.safetensors")
    assert all(k.startswith("vae.") for k in vae_keys)
    assert "vae.quantize.embedding.weight" in vae_keys


def test_save_load_round_trip(tiny_model, tmp_path):
    save_hart(tiny_model, tmp_path / "again")
    again = load_hart(tmp_path / "again")
    assert again.cfg == tiny_model.cfg and again.vae_cfg == tiny_model.vae_cfg
    assert _states_equal(again.transformer.state_dict(), tiny_model.transformer.state_dict())
    assert _states_equal(again.vae.state_dict(), tiny_model.vae.state_dict())


def test_ema_weights_are_preferred_and_training_keys_dropped(tiny_checkpoint, tiny_model, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    state = read_weight_file(ckpt / "llm/model.safetensors")
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}
    n = sum(p * p for p in tiny_model.cfg.patch_nums) + tiny_model.cfg.context_token - 1
    ema["attn_bias_for_masking"] = torch.zeros(1, 1, n, n)  # upstream persists it; we drop it
    torch.save(ema, ckpt / "llm/ema_model.bin")  # a plain pickled state dict, as released
    vae = read_weight_file(ckpt / "tokenizer/model.safetensors")
    vae["disc.dino.weight"] = torch.zeros(3)  # discriminator weights are ignored
    from safetensors.torch import save_file

    save_file(vae, str(ckpt / "tokenizer/model.safetensors"))
    model = load_hart(ckpt)
    w = model.transformer.state_dict()["head.weight"]
    assert torch.equal(w, state["head.weight"] + 1.0)
    assert torch.equal(load_hart(ckpt, prefer_ema=False).transformer.state_dict()["head.weight"], state["head.weight"])


def test_strict_errors_list_keys_and_shapes(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    ckpt = _copy(tiny_checkpoint, tmp_path)
    state = read_weight_file(ckpt / "llm/model.safetensors")
    del state["head.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(2)
    state["word_embed.weight"] = torch.zeros(3, 3)
    save_file(state, str(ckpt / "llm/model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_hart(ckpt)
    msg = str(err.value)
    assert "model.safetensors" in msg
    assert "missing keys (1): head.bias" in msg
    assert "unexpected keys (1): blocks.0.extra.weight" in msg
    assert "word_embed.weight: expected (64, 8), found (3, 3)" in msg


def test_truncated_safetensors_is_a_clear_error(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    path = ckpt / "llm/model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_hart(ckpt)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    torch.save({"head.weight": _Evil()}, ckpt / "llm/ema_model.bin")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_hart(ckpt)


def test_missing_folders_and_files(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_hart(tmp_path / "nope")
    ckpt = _copy(tiny_checkpoint, tmp_path)
    (ckpt / "tokenizer/model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_hart(ckpt)
    shutil.rmtree(ckpt / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_hart(ckpt)


def test_config_errors(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        HARTConfig.from_json_file(bad)
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        VAEConfig.from_json_file(bad)
    bad.write_text(json.dumps({"model_type": "hart_transformer_t2i", "embed_dim": 65, "num_heads": 4}))
    with pytest.raises(CheckpointError, match="not divisible"):
        HARTConfig.from_json_file(bad)


def test_unknown_config_keys_are_dropped_with_a_warning():
    with pytest.warns(UserWarning, match="ignoring keys"):
        cfg = HARTConfig.from_dict({"model_type": "hart_transformer_t2i", "depth": 3, "brand_new_key": 1})
    assert cfg.depth == 3 and not hasattr(cfg, "brand_new_key")
    # Keys that transformers' PretrainedConfig always writes are not worth a warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HARTConfig.from_dict({"model_type": "hart_transformer_t2i", "architectures": ["HARTForT2I"],
                              "transformers_version": "4.42.2", "_name_or_path": "x"})


def test_init_checkpoint_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    from hartkit.model import presets

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        presets.init_checkpoint("tiny", out)
    assert (out / "precious.txt").read_text() == "keep me"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("hartkit.model.checkpoint.save_hart", boom)
    with pytest.raises(RuntimeError):
        presets.init_checkpoint("tiny", tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fresh")]
