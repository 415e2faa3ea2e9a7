"""The shipped demo model (assets/demo) and the training script that makes it."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hartkit.model.checkpoint import build_hart, load_hart
from hartkit.model.presets import get_preset
from hartkit.model.sampler import SamplerOptions, generate_from_prompts
from hartkit.model.text_encoder import TextEncoder
from hartkit.train import demo_eval as evaluator
from hartkit.train.config import TrainConfig, parse_args, shaped_preset
from hartkit.train.diffusion import DiffusionTrainingLoss
from hartkit.train.run import previous_stages, train
from hartkit.train.schedule import StepBudget
from hartkit.train.transformer import block_causal_bias, init_transformer, rope_tables
from hartkit.validate import caption_score, scenes

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"


def _load_script(name: str):
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    if not (DEMO / "llm" / "config.json").is_file():
        pytest.skip("assets/demo is not shipped yet: the demo model's training run has not landed")
    model = load_hart(DEMO)
    encoder = TextEncoder.from_pretrained(DEMO / "text_model")
    return model, encoder


# ----------------------------------------------------------------------------- the shipped model


def test_shipped_checkpoint_is_the_demo_preset_in_the_official_layout(demo):
    model, encoder = demo
    spec = get_preset("demo")
    assert model.cfg.to_dict() == spec.hart.to_dict()
    assert model.vae_cfg.to_dict() == spec.vae.to_dict()
    assert encoder.hidden_size == model.cfg.context_dim
    assert encoder.config.num_hidden_layers == spec.text["num_layers"]
    for part in ("llm", "tokenizer", "text_model"):
        assert (DEMO / part / "config.json").is_file() and (DEMO / part / "model.safetensors").is_file()
    total = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert total < 20e6, f"assets/demo is {total / 1e6:.1f} MB"
    assert "examples/reproduce_demo.sh" in (DEMO / "README.md").read_text()
    assert (ROOT / "examples" / "reproduce_demo.sh").is_file()
    # the guidance it runs at by default was chosen by eval_demo_model.py --choose-cfg (README: how)
    note = json.loads((DEMO / "llm" / "generation_config.json").read_text())["hartkit_note"]
    assert "training prompts" in note and f"{model.default_cfg:g}" in note.split("--choose-cfg ")[1].split()[0].split(",")


def test_shipped_model_draws_its_captions(demo):
    """Held-out prompts (never trained on), fixed seed, judged from the pixels. The bars sit under what
    the model measures (5 of 9 one-shape and 8 of 8 two-shape captions right here; 83 % on 100
    held-out prompts, assets/demo/README.md) and far above chance (a whole caption 0.3 %, a
    background 17 %)."""
    model, encoder = demo
    prompts = scenes.heldout_prompts(100)
    singles, doubles = prompts[:9], prompts[9::12][:8]  # the 9 one-shape test captions, 8 two-shape ones
    assert [len(scenes.parse_caption(p).objects) for p in singles + doubles] == [1] * 9 + [2] * 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the default options: the guidance the checkpoint recommends, as `hartkit demo` draws
        images, _ = generate_from_prompts(model, encoder, singles + doubles, seed=0, options=SamplerOptions())
    assert images.shape == (17, 64, 64, 3) and images.dtype == np.uint8
    one = caption_score.evaluate(images[:9], singles)
    two = caption_score.evaluate(images[9:], doubles)
    right = round(one.accuracy * 9) + round(two.accuracy * 8)
    assert right >= 10, (one.summary(), two.summary())  # of 17; by chance P(>= 10 of 17) < 1e-20
    assert one.accuracy >= 4 / 9, one.summary()  # by chance (< 1 % per one-shape caption): P < 1e-5
    assert two.accuracy >= 4 / 8, two.summary()  # whole two-shape captions, relation included
    assert two.per_attribute["background"] >= 6 / 8, two.summary()
    again, _ = generate_from_prompts(model, encoder, singles[:2], seed=0, options=SamplerOptions(cfg=4.5))
    first, _ = generate_from_prompts(model, encoder, singles[:2], seed=0, options=SamplerOptions(cfg=4.5))
    assert np.array_equal(again, first)


def test_teacher_forcing_separates_reading_from_painting(demo):
    """eval_demo_model --teacher-stages forces the first K stages to a rendered scene's tokens. Told
    other captions than the scenes it is forced to, the model draws what it is told when no stage is
    forced and the forced scenes when every stage is (10 of 15 here: the diffusion head, the only part
    left to the model then, still hears the wrong caption; with the right one, 94 % on 100
    prompts, assets/demo/README.md). Chance for a whole caption: 0.3 %."""
    model, encoder = demo
    scenes_drawn = scenes.heldout_prompts(100)[9::6][:15]  # two-shape captions
    told = scenes_drawn[1:] + scenes_drawn[:1]  # every prompt names another scene
    tokens = evaluator.scene_tokens(model, scenes_drawn, 0)
    stages = len(model.cfg.patch_nums)
    free, forced = (evaluator.generate_all(model, encoder, told, seed=0, cfg=model.default_cfg, batch=15,
                                           forced=tokens[:k]) for k in (0, stages))
    assert evaluator.evaluate(free, told).accuracy >= 0.6  # it reads its prompts
    assert evaluator.evaluate(free, scenes_drawn).accuracy <= 1 / 15
    assert evaluator.evaluate(forced, scenes_drawn).accuracy >= 0.6  # and paints the forced tokens


# ----------------------------------------------------------------------------- training pieces


def test_block_causal_bias_is_upstreams_mask():
    spec = get_preset("tiny")
    tr = build_hart(spec.hart, spec.vae).transformer
    T, pns = spec.hart.context_token, spec.hart.patch_nums
    # upstream: d = [0]*T + [i+1]*pn^2 for the scales after the first; allowed iff d[q] >= d[k]
    d = [0] * T + [i + 1 for i, pn in enumerate(pns[1:]) for _ in range(pn * pn)]
    bias = block_causal_bias(tr)
    assert bias.shape == (1, 1, len(d), len(d))
    for q in range(0, len(d), 7):
        for k in range(0, len(d), 5):
            assert bias[0, 0, q, k].item() == (0.0 if d[q] >= d[k] else -math.inf)


def test_masked_full_sequence_equals_staged_kv_cache_inference():
    """Training's one masked pass over the teacher-forced sequence computes what the sampler's
    stage-by-stage loop with a KV cache computes (so the trained weights mean the same thing)."""
    spec = get_preset("tiny")
    torch.manual_seed(0)
    model = build_hart(spec.hart, spec.vae)
    init_transformer(model.transformer)
    tr = model.transformer
    with torch.no_grad():  # make the blocks do something (upstream init gates them shut)
        for blk in tr.blocks:
            blk.ada_lin[-1].bias.normal_(0, 0.3)
    B, T, seq = 2, tr.T, tr.cfg.seq_len
    x = torch.randn(B, seq, tr.C)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    positions = np.cumsum(mask.numpy(), axis=1) - 1
    cos, sin = rope_tables(tr, positions)
    mods, _ = tr.modulations(torch.randn(B, T, tr.C), mask)
    with torch.no_grad():
        full, _, _ = tr.blocks_forward(x, mods, cos, sin, None, None, attn_bias=block_causal_bias(tr))
        bounds = tr.stage_offsets + [seq]
        past_k = past_v = None
        for si in range(len(bounds) - 1):
            a, b = bounds[si], bounds[si + 1]
            h, k, v = tr.blocks_forward(x[:, a:b], mods, cos[:, a:b], sin[:, a:b], past_k, past_v)
            torch.testing.assert_close(h, full[:, a:b], atol=1e-5, rtol=1e-4)
            past_k = k if past_k is None else torch.cat([past_k, k], dim=3)
            past_v = v if past_v is None else torch.cat([past_v, v], dim=3)
        unmasked, _, _ = tr.blocks_forward(x, mods, cos, sin, None, None)
    assert not torch.allclose(unmasked[:, :T], full[:, :T])  # the mask does change things


def _alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def test_diffusion_loss_terms():
    loss = DiffusionTrainingLoss()
    N, C = 6, 4
    x0 = torch.rand(N, C) * 1.6 - 0.8
    noise = torch.randn(N, C)
    t = torch.tensor([1, 5, 99, 400, 800, 999])

    class Perfect(torch.nn.Module):  # eps exact, variance = the true posterior's (v = -1)
        def forward(self, x_t, tt, z):
            return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    mse, vb = loss.terms(Perfect(), x0, torch.zeros(N, 1), t, noise)
    assert mse.abs().max() < 1e-10 and vb.abs().max() < 1e-5

    # Against torch.distributions with the schedule recomputed from the cosine formula.
    eps = torch.randn(N, C)
    v = torch.rand(N, C) * 2 - 1

    class Guess(torch.nn.Module):
        def forward(self, x_t, tt, z):
            return torch.cat([eps, v], dim=1)

    mse, vb = loss.terms(Guess(), x0, torch.zeros(N, 1), t, noise)
    torch.testing.assert_close(mse, (eps - noise).square().mean(1))
    for i, ti in enumerate(t.tolist()):
        ab = np.prod([1 - min(1 - _alpha_bar((s + 1) / 1000) / _alpha_bar(s / 1000), 0.999) for s in range(ti + 1)])
        ab_prev = ab / (1 - min(1 - _alpha_bar((ti + 1) / 1000) / _alpha_bar(ti / 1000), 0.999))
        beta = 1 - ab / ab_prev
        x_t = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        post_mean = lambda x_start: (beta * math.sqrt(ab_prev) / (1 - ab)) * x_start + (  # noqa: E731
            (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)) * x_t
        post_var = beta * (1 - ab_prev) / (1 - ab)
        pred_x0 = x_t / math.sqrt(ab) - math.sqrt(1 / ab - 1) * eps[i]
        frac = (v[i] + 1) / 2
        model_var = torch.exp(frac * math.log(beta) + (1 - frac) * math.log(post_var))
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(post_mean(x0[i]).double(), math.sqrt(post_var)),
            torch.distributions.Normal(post_mean(pred_x0).double(), model_var.sqrt().double()),
        )
        assert vb[i].item() == pytest.approx(kl.mean().item() / math.log(2), rel=2e-3, abs=1e-5)


def test_training_smoke_run_writes_a_loadable_checkpoint(tmp_path):
    cfg = TrainConfig.smoke(str(tmp_path / "ckpt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train(cfg)
    log = json.loads((out / "training.json").read_text())
    assert len(log["transformer_history"]) >= 1 and len(log["tokenizer_history"]) >= 1
    assert all(math.isfinite(h["loss"]) for h in log["transformer_history"])
    assert (out / "README.md").is_file()
    model = load_hart(out)
    encoder = TextEncoder.from_pretrained(out / "text_model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, _ = generate_from_prompts(model, encoder, ["a red circle on a blue background"], seed=1)
    assert images.shape == (1, 32, 32, 3)
    # the text model's tokenizer reads a caption word as one token
    ids = encoder.tokenizer.encode(["a red circle on a blue background"], 16)
    assert int(ids.mask.sum()) == 7

    # the evaluator chooses the guidance on training prompts, records it, and scores held-out at it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert evaluator.main(["--checkpoint", str(out), "--n", "4", "--batch", "4", "--threads", "1",
                               "--choose-cfg", "0,4.5", "--choose-n", "4", "--json", str(tmp_path / "eval.json"),
                               "--update-readme"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["cfg_sweep_training_prompts"]) == {"0", "4.5"} and result["cfg"] in (0.0, 4.5)
    assert load_hart(out).default_cfg == result["cfg"]
    assert "chosen on 4 *training* prompts" in (out / "README.md").read_text()


def test_time_budget_records_a_replayable_step_count(tmp_path):
    """--ar-seconds picks the transformer's step count at the end of the warm-up from the measured speed;
    training.json then holds that count as ar_steps (no budget), so the same command with --ar-steps
    replays the schedule; parse_args takes --device and --ar-seconds."""
    cfg = parse_args(["--smoke", "--out", str(tmp_path / "ckpt"), "--ar-seconds", "1",
                      "--ar-steps", "100000", "--warmup", "6", "--vae-steps", "1", "--device", "cpu"])
    assert (cfg.ar_seconds, cfg.device, cfg.ar_steps) == (1.0, "cpu", 100000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train(cfg)
    log = json.loads((out / "training.json").read_text())
    chosen = log["ar_seconds_chosen_steps"]
    assert 6 < chosen < 100000 and log["ar_seconds_requested"] == 1.0
    assert log["config"]["ar_steps"] == chosen == log["transformer_steps_done"]
    assert log["config"]["ar_seconds"] == 0.0 and log["device"] == "cpu"
    assert log["transformer_history"][-1]["step"] == chosen - 1


def test_step_budget_turns_the_measured_rate_into_steps(monkeypatch):
    cpu = torch.device("cpu")
    for cap, expected in ((1000, 40), (20, 20)):
        clock = iter([100.0, 101.0, 102.0])  # start, mark at warm-up/2, end of warm-up
        monkeypatch.setattr(time, "time", lambda: next(clock))
        budget = StepBudget(10.0, warmup=8)
        budget.tick(3, cpu)  # not the mark
        budget.tick(4, cpu)
        # 4 steps in 1 s, 8 s left -> 32 more steps after step 8, unless the cap (--ar-steps) is lower
        assert budget.steps(8, cap, cpu) == expected
    with pytest.raises(SystemExit, match="--warmup"):
        StepBudget(10.0, warmup=2)


def test_training_shape_overrides_reach_the_checkpoint(tmp_path):
    """--embed-dim/--depth/--num-heads/--text-layers change the model that is trained and written."""
    from dataclasses import replace

    cfg = replace(TrainConfig.smoke(str(tmp_path / "ckpt")), embed_dim=48, depth=3, num_heads=3,
                  text_layers=3, text_lr=1e-3, vae_steps=1, ar_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train(cfg)
    model = load_hart(out)
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads) == (48, 3, 3)
    assert TextEncoder.from_pretrained(out / "text_model").config.num_hidden_layers == 3
    card = (out / "README.md").read_text()
    assert "trained jointly" in card and "frozen" not in card  # --text-lr > 0 trains the text model
    with pytest.raises(SystemExit, match="multiple of"):
        shaped_preset(replace(cfg, embed_dim=50))


def test_provenance_takes_only_the_tokenizer_runs_of_a_tokenizer_source(tmp_path):
    """--tokenizer-from a whole checkpoint brings the runs that trained its tokenizer, not the transformer
    runs that followed them; --transformer-from brings the whole history."""
    def run(name: str, **config) -> str:
        folder = tmp_path / name
        folder.mkdir()
        full = {"vae_steps": 0, "ar_steps": 0, "tokenizer_from": None, "transformer_from": None, **config}
        log = {"config": {"out": name, **full}}
        log["stages"] = previous_stages(log)  # as train() records it
        (folder / "training.json").write_text(json.dumps(log))
        return str(folder)

    tok = run("tok", vae_steps=10, tokenizer_only=True)
    ar1 = run("ar1", tokenizer_from=tok, ar_steps=5)
    ar2 = run("ar2", tokenizer_from=tok, transformer_from=ar1, ar_steps=5)

    def names(**config) -> list[str]:
        return [stage["config"]["out"] for stage in previous_stages({"config": config})]

    assert names(tokenizer_from=ar2) == ["tok"]
    assert names(tokenizer_from=ar2, transformer_from=ar2) == ["tok", "ar1", "ar2"]
    assert names(transformer_from=ar1) == ["tok", "ar1"]
    (tmp_path / "tok").rename(tmp_path / "gone")  # the history is read from the records, not the folders
    assert names(tokenizer_from=ar2, transformer_from=ar2) == ["tok", "ar1", "ar2"]


def test_quantized_demo_table_reads_a_validate_report():
    script = _load_script("quantized_demo")

    def row(recipe, fmt, caption, top1, agree, psnr):
        return {"kind": "bundle", "status": "ok", "recipe": recipe, "format": fmt, "caption": {"accuracy": caption},
                "summary": {"tf_top1_min": top1, "image_psnr_db_min": psnr},
                "stages": [{"free_token_agreement": 1.0}, {"free_token_agreement": agree}]}

    report = {"cfg": 2.0, "reference": {"fp32": {"caption": {"accuracy": 0.6}}},
              "rows": [row("fp32", "onnx", 0.58, 1.0, 0.999, "inf"), row("laptop", "executorch", 0.5, 0.9, 0.35, 24.04),
                       {"kind": "bundle", "status": "skipped", "recipe": "phone", "format": "coreml"}]}
    lines = script.table(report).splitlines()
    assert lines[2] == "| torch fp32 (reference, guidance 2) | 60 % | | | |"
    assert lines[3] == "| onnxruntime / ExecuTorch fp32 | 58 % / - | 1.00 / - | 99.90 % / - | equal images / - |"
    assert lines[4] == "| onnxruntime / ExecuTorch `laptop` (int8) | - / 50 % | - / 0.90 | - / 35.00 % | - / 24.0 dB |"
    assert lines[5].endswith("| - / - | - / - | - / - | - / - |")
