"""The reference sampler: determinism from the portable seed, and its sampling math against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hartkit.errors import UsageError
from hartkit.loop.plan import stage_plan
from hartkit.model.sampler import SamplerOptions, filter_top_k_top_p, generate_from_prompts, sample_stage

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def seeded(tiny_model, tiny_text_encoder):
    return generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT], seed=7, keep_logits=True)


def test_same_seed_same_image_other_seed_other_image(tiny_model, tiny_text_encoder, seeded):
    images, trace = seeded
    again, trace2 = generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT], seed=7)
    other, trace3 = generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT], seed=8)
    assert np.array_equal(images, again)
    assert all(np.array_equal(a, b) for a, b in zip(trace.tokens, trace2.tokens))
    assert not np.array_equal(images, other)
    assert any(not np.array_equal(a, b) for a, b in zip(trace.tokens, trace3.tokens))


def test_trace_shapes_follow_the_scales(tiny_model, seeded):
    images, trace = seeded
    cfg = tiny_model.cfg
    side = cfg.patch_nums[-1] * tiny_model.vae_cfg.downsample
    assert images.shape == (1, side, side, 3) and images.dtype == np.uint8
    assert [t.shape for t in trace.tokens] == [(1, 1)] + [(1, pn * pn) for pn in cfg.patch_nums[1:]]
    assert all(t.min() >= 0 and t.max() < tiny_model.vocab_size for t in trace.tokens)
    assert trace.f_hat.shape == (1, tiny_model.latent_dim, cfg.patch_nums[-1], cfg.patch_nums[-1])
    # residuals are x0-clamped then scaled by 0.6 (vae_scale): |r| <= 0.6 after the last (noise-free) step
    assert np.abs(trace.residual).max() <= 0.6 + 1e-5
    assert len(trace.stage_logits) == len(cfg.patch_nums)


def test_stage0_logits_equal_a_direct_transformer_call(tiny_model, tiny_text_encoder, seeded):
    from hartkit.loop.rope import context_positions, rope_cos_sin_1d

    _, trace = seeded
    tr = tiny_model.transformer
    context, mask, _ = tiny_text_encoder.encode([PROMPT], max_length=tiny_model.cfg.context_token)
    mask2 = torch.cat([mask, torch.zeros_like(mask)])
    mask2[1:, 0] = True
    with torch.no_grad():
        cond = tr.condition_tokens(context)
        mods, head = tr.modulations(cond, mask2)
        cos, sin = rope_cos_sin_1d(context_positions(mask.numpy()), tiny_model.cfg.head_dim)
        h, _, _ = tr.blocks_forward(tr.context_stage_input(cond), mods, torch.from_numpy(cos), torch.from_numpy(sin), None, None)
        logits = tr.logits(h[:, -1:], head)
    # stage 0 has no guidance (t = 0): the conditional row alone
    assert np.allclose(trace.stage_logits[0], logits[:1].numpy(), atol=1e-5)


def test_top_k_top_p_filter_against_numpy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 50, generator=gen)
    logits[0, 0, :5] = 3.0  # ties at the threshold survive
    out = filter_top_k_top_p(logits, top_k=4, top_p=0.0).numpy()
    x = logits.numpy()
    for row, got in zip(x.reshape(-1, 50), out.reshape(-1, 50)):
        kth = np.sort(row)[-4]
        assert np.array_equal(np.isfinite(got), row >= kth)
    assert np.isfinite(out[0, 0]).sum() == 5
    # top-p: keep the smallest set of largest-probability entries whose tail mass is > 1 - p
    p = 0.8
    out = filter_top_k_top_p(logits, top_k=0, top_p=p).numpy()
    for row, got in zip(x.reshape(-1, 50), out.reshape(-1, 50)):
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        order = np.argsort(probs)
        removed = np.cumsum(probs[order]) <= 1 - p
        removed[-1] = False
        expect = np.ones(50, bool)
        expect[order[removed]] = False
        assert np.array_equal(np.isfinite(got), expect)


def test_sample_stage_is_argmax_p_over_e_and_a_gumbel_mixture():
    gen = torch.Generator().manual_seed(1)
    V, C = 40, 3
    stage = stage_plan((1, 2, 3), context_tokens=4, vocab_size=V, cfg=2.0, num_phi=1)[1]
    stage = type(stage)(**{**stage.to_dict(), "top_k": 10})
    logits = torch.randn(1, 4, V, generator=gen) * 3
    codebook = torch.randn(V, C, generator=gen)
    e1 = torch.rand(1, 4, V, generator=gen) + 0.01
    e2 = torch.rand(1, 4, V, generator=gen) + 0.01
    idx, latents = sample_stage(logits, stage, codebook, e1, e2, top_p=0.0)
    x = logits.numpy().astype(np.float64)
    kth = np.sort(x, axis=-1)[..., -10][..., None]
    masked = np.where(x >= kth, x, -np.inf)
    p = np.exp(masked - masked.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert np.array_equal(idx.numpy(), np.argmax(p / e1.numpy(), axis=-1))
    g = (masked * stage.logit_scale - np.log(e2.numpy())) / stage.gumbel_tau
    y = np.exp(g - g.max(-1, keepdims=True))
    y /= y.sum(-1, keepdims=True)
    assert np.allclose(latents.numpy(), y @ codebook.numpy(), atol=1e-5)
    idx_hard, hard = sample_stage(logits, stage, codebook, e1, None, top_p=0.0)
    assert torch.equal(idx_hard, idx) and torch.equal(hard, codebook[idx])


def test_teacher_forcing_takes_the_given_tokens_and_keeps_the_random_stream(tiny_model, tiny_text_encoder):
    """Forcing a run's own tokens reproduces it (hard sampling); forced stages take exactly the given
    tokens, and the later stages still draw from the same stream (forcing 0 stages changes nothing)."""
    hard = SamplerOptions(more_smooth=False)
    images, trace = generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT], seed=3, options=hard)
    own = [torch.from_numpy(t) for t in trace.tokens]
    again, trace2 = generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT], seed=3, options=hard,
                                          forced_tokens=own[:3])
    assert np.array_equal(images, again)
    none, _ = generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT], seed=3, options=hard, forced_tokens=[])
    assert np.array_equal(images, none)
    other = [(t + 1) % tiny_model.vocab_size for t in own[:2]]
    _, trace3 = generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT], seed=3, options=hard,
                                      forced_tokens=other)
    assert all(np.array_equal(trace3.tokens[i], other[i].numpy()) for i in range(2))
    assert any(not np.array_equal(a, b) for a, b in zip(trace.tokens[2:], trace3.tokens[2:]))


def test_bad_options_are_refused(tiny_model, tiny_text_encoder):
    with pytest.raises(UsageError, match="cfg"):
        generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT], seed=0, options=SamplerOptions(cfg=-1))
    with pytest.raises(UsageError, match="top_p"):
        generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT], seed=0, options=SamplerOptions(top_p=1.5))
    with pytest.raises(UsageError, match="no prompt"):
        generate_from_prompts(tiny_model, tiny_text_encoder, [], seed=0)


def test_long_prompts_are_truncated_with_a_warning(tiny_model, tiny_text_encoder):
    with pytest.warns(UserWarning, match="truncat"):
        images, _ = generate_from_prompts(tiny_model, tiny_text_encoder, ["red " * 400], seed=0)
    assert images.shape[0] == 1


def test_hard_sampling_path_runs(tiny_model, tiny_text_encoder):
    images, trace = generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT, "a green triangle"], seed=3,
                                          options=SamplerOptions(more_smooth=False, cfg=1.0))
    assert images.shape[0] == 2 and trace.tokens[-1].shape[0] == 2


def test_resolution_option_runs_the_same_weights_on_fewer_scales(tiny_checkpoint, tiny_model, tiny_text_encoder):
    from hartkit.errors import CheckpointError
    from hartkit.model.checkpoint import load_hart

    small = load_hart(tiny_checkpoint, resolution=16)
    assert small.cfg.patch_nums == tiny_model.cfg.patch_nums[:4]
    assert torch.equal(small.transformer.lvl_embed.weight, tiny_model.transformer.lvl_embed.weight[:4])
    assert torch.equal(small.transformer.blocks[0].attn.proj.weight, tiny_model.transformer.blocks[0].attn.proj.weight)
    assert small.transformer.lvl_1L.shape[1] == small.cfg.seq_len
    images, trace = generate_from_prompts(small, tiny_text_encoder, [PROMPT], seed=1)
    assert images.shape == (1, 16, 16, 3)
    assert [t.shape[1] for t in trace.tokens] == [1, 4, 9, 16]
    # the first stages see the same inputs as the full model: identical tokens there
    _, full = generate_from_prompts(tiny_model, tiny_text_encoder, [PROMPT], seed=1)
    assert np.array_equal(trace.tokens[0], full.tokens[0])
    with pytest.raises(CheckpointError, match="choose from"):
        load_hart(tiny_checkpoint, resolution=20)
