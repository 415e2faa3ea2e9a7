"""A checkpoint's recommended guidance (llm/generation_config.json) is every command's default."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest

from hartkit.errors import CheckpointError
from hartkit.loop.plan import HART_DEFAULT_CFG
from hartkit.model.checkpoint import GENERATION_CONFIG, load_hart, read_default_cfg, save_hart, write_default_cfg
from hartkit.model.sampler import SamplerOptions, generate_from_prompts
from hartkit.bundle import LoopInfo
from hartkit.runtime.pipeline import Pipeline
from hartkit.validate.core import keep_logits

PROMPT = "a red circle above a blue square on a yellow background"


def test_read_and_write(tmp_path):
    assert read_default_cfg(tmp_path) == HART_DEFAULT_CFG  # official checkpoints have no such file
    (tmp_path / GENERATION_CONFIG).write_text(json.dumps({"other": 1}))
    assert read_default_cfg(tmp_path) == HART_DEFAULT_CFG
    write_default_cfg(tmp_path, 2.0, note="chosen on training prompts")
    data = json.loads((tmp_path / GENERATION_CONFIG).read_text())
    assert data == {"other": 1, "guidance_scale": 2.0, "hartkit_note": "chosen on training prompts"}
    assert read_default_cfg(tmp_path) == 2.0


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[2.0]", "expected a JSON object"),
    ('{"guidance_scale": "high"}', "'guidance_scale' must be a number"),
    ('{"guidance_scale": -1}', "'guidance_scale' must be a number in"),
    ('{"guidance_scale": true}', "'guidance_scale' must be a number"),
])
def test_bad_files_are_named(tmp_path, text, match):
    (tmp_path / GENERATION_CONFIG).write_text(text)
    with pytest.raises(CheckpointError, match=match) as info:
        read_default_cfg(tmp_path)
    assert GENERATION_CONFIG in str(info.value)


def test_checkpoint_round_trip_and_resolution(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    assert load_hart(ckpt).default_cfg == HART_DEFAULT_CFG
    assert not (ckpt / "llm" / GENERATION_CONFIG).exists()
    write_default_cfg(ckpt / "llm", 1.5)
    model = load_hart(ckpt)
    assert model.default_cfg == 1.5
    side = model.cfg.patch_nums[3] * model.vae_cfg.downsample
    assert load_hart(ckpt, resolution=side).default_cfg == 1.5
    save_hart(model, tmp_path / "again")
    assert read_default_cfg(tmp_path / "again" / "llm") == 1.5


def logits_of(model, encoder, cfg: float | None = None) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, trace = generate_from_prompts(model, encoder, [PROMPT], seed=3, options=SamplerOptions(cfg=cfg),
                                         keep_logits=True)
    return trace.stage_logits


def test_sampler_default_is_the_models(tiny_model, tiny_text_encoder):
    model = dataclasses.replace(tiny_model, default_cfg=1.0)
    by_default, explicit = logits_of(model, tiny_text_encoder), logits_of(model, tiny_text_encoder, cfg=1.0)
    hart = logits_of(tiny_model, tiny_text_encoder)
    assert all(np.array_equal(a, b) for a, b in zip(by_default, explicit))
    # guidance acts from stage 1 on (ratio 0 at stage 0): the default really was 1.0, not 4.5
    assert not np.allclose(by_default[2], hart[2])


def test_runtime_reads_the_bundles_default(onnx_bundle):
    folder, _ = onnx_bundle
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["loop"]["default_cfg"] == HART_DEFAULT_CFG
    assert manifest["golden"]["loop"]["cfg"] == HART_DEFAULT_CFG
    old = {k: v for k, v in manifest["loop"].items() if k != "default_cfg"}
    assert LoopInfo.from_dict(old).default_cfg == HART_DEFAULT_CFG  # bundles written before the field
    pipe = Pipeline.from_exported(folder)
    pipe.loop = dataclasses.replace(pipe.loop, default_cfg=1.0)
    by_default, explicit, hart = [], [], []
    pipe.generate(PROMPT, seed=1, callback_on_stage_end=keep_logits(by_default))
    pipe.generate(PROMPT, seed=1, cfg=1.0, callback_on_stage_end=keep_logits(explicit))
    pipe.generate(PROMPT, seed=1, cfg=HART_DEFAULT_CFG, callback_on_stage_end=keep_logits(hart))
    assert all(np.array_equal(a, b) for a, b in zip(by_default, explicit))
    assert not np.allclose(by_default[2], hart[2])


def test_export_carries_the_checkpoints_default(tiny_checkpoint, tmp_path):
    """The manifest, the golden loop replay and the runtime's default all follow the checkpoint."""
    from hartkit.export.exporter import export_checkpoint
    from hartkit.bundle import verify_bundle

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    write_default_cfg(ckpt / "llm", 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_checkpoint(ckpt, tmp_path / "bundle", ["onnx"])
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["loop"]["default_cfg"] == 2.0 and manifest["golden"]["loop"]["cfg"] == 2.0
    assert manifest["loop"]["stages_at_default_cfg"][2]["cfg_scale"] == pytest.approx(2.0 * 2 / 5)
    assert Pipeline.from_exported(tmp_path / "bundle").loop.default_cfg == 2.0
    assert verify_bundle(tmp_path / "bundle").ok  # the golden loop replays at 2.0
