"""hartkit.model.transformer: state-dict layout (hart-reference.md §5.1, §7) and every forward piece
against a hand-written re-computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hartkit.errors import CheckpointError, UsageError
from hartkit.loop.rope import context_positions, rope_cos_sin_1d, rope_cos_sin_2d, stage_positions
from hartkit.model.config import HARTConfig
from hartkit.model.transformer import MOD_ROWS, HARTTransformer

PATCH_NUMS = (1, 2, 3, 4)
T, CTX_DIM, C, H, DEPTH, V, CVAE = 8, 32, 64, 4, 2, 64, 8
D_HEAD = C // H
OFFICIAL = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def tiny_cfg(kind: str = "llama", **kw) -> HARTConfig:
    base = dict(
        context_token=T, context_dim=CTX_DIM, depth=DEPTH, embed_dim=C, num_heads=H, mlp_ratio=4.0,
        patch_nums=PATCH_NUMS, attn_type=kind, mlp_type=kind, diff_width=32, diff_depth=2,
    )
    base.update(kw)
    return HARTConfig(**base)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (biases, norm weights, gates), so no term can hide behind a 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_wo_grad.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def build(kind: str = "llama", seed: int = 0, **kw) -> HARTTransformer:
    torch.manual_seed(seed)
    model = HARTTransformer(tiny_cfg(kind, **kw), vocab_size=V, latent_dim=CVAE).eval()
    randomize(model, seed)
    return model


# ----------------------------------------------------------------------------- state dict layout
def expected_tiny_shapes(kind: str, l2: bool = False, context_norm: bool = False) -> dict[str, tuple]:
    hid = 256  # llama: int(64*4*2/3 + 255)//256*256; gpt2: round(64*4)
    seq = T + 4 + 9 + 16 - 1 + 1  # T + sum(pn^2) - 1
    w, dd = 32, 2
    e = {
        "word_embed.weight": (C, CVAE), "word_embed.bias": (C,),
        "context_embed.weight": (C, CTX_DIM), "context_embed.bias": (C,),
        "lvl_embed.weight": (len(PATCH_NUMS), C), "lvl_1L": (1, seq),
        "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (V, C), "head.bias": (V,),
        "decoder_norm.weight": (C,),
        "diffloss.net.time_embed.mlp.0.weight": (w, 256), "diffloss.net.time_embed.mlp.0.bias": (w,),
        "diffloss.net.time_embed.mlp.2.weight": (w, w), "diffloss.net.time_embed.mlp.2.bias": (w,),
        "diffloss.net.cond_embed.weight": (w, C), "diffloss.net.cond_embed.bias": (w,),
        "diffloss.net.input_proj.weight": (w, CVAE), "diffloss.net.input_proj.bias": (w,),
        "diffloss.net.final_layer.adaLN_modulation.1.weight": (2 * w, w),
        "diffloss.net.final_layer.adaLN_modulation.1.bias": (2 * w,),
        "diffloss.net.final_layer.linear.weight": (2 * CVAE, w),
        "diffloss.net.final_layer.linear.bias": (2 * CVAE,),
    }
    for k in range(dd):
        p = f"diffloss.net.res_blocks.{k}."
        e.update({p + "in_ln.weight": (w,), p + "in_ln.bias": (w,),
                  p + "mlp.0.weight": (w, w), p + "mlp.0.bias": (w,),
                  p + "mlp.2.weight": (w, w), p + "mlp.2.bias": (w,),
                  p + "adaLN_modulation.1.weight": (3 * w, w), p + "adaLN_modulation.1.bias": (3 * w,)})
    for i in range(DEPTH):
        p = f"blocks.{i}."
        e.update({p + "attn.q_bias": (C,), p + "attn.v_bias": (C,), p + "attn.zero_k_bias": (C,),
                  p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,),
                  p + "ada_lin.1.weight": (6 * C, C), p + "ada_lin.1.bias": (6 * C,)})
        if kind == "llama":
            e.update({p + "attn.qkv_proj.weight": (3 * C, C), p + "ln_wo_grad.weight": (C,),
                      p + "ffn.gate_proj.weight": (hid, C), p + "ffn.up_proj.weight": (hid, C),
                      p + "ffn.down_proj.weight": (C, hid)})
        else:
            e.update({p + "attn.mat_qkv.weight": (3 * C, C),
                      p + "ffn.fc1.weight": (hid, C), p + "ffn.fc1.bias": (hid,),
                      p + "ffn.fc2.weight": (C, hid), p + "ffn.fc2.bias": (C,)})
        if l2:
            e[p + "attn.scale_mul_1H11"] = (1, H, 1, 1)
    if kind == "llama":
        e["head_nm.ln_wo_grad.weight"] = (C,)
    else:
        e.update({"pos_start": (1, T, C), "pos_1LC": (1, seq, C), "decoder_norm.bias": (C,)})
    if context_norm:
        e["context_norm.weight"] = (CTX_DIM,)
    return e


@pytest.mark.parametrize("kind,l2,ctx_norm", [("llama", False, False), ("gpt2", False, False),
                                              ("llama", True, True), ("gpt2", True, False)])
def test_state_dict_layout_tiny(kind, l2, ctx_norm):
    with torch.device("meta"):
        model = HARTTransformer(tiny_cfg(kind, attn_l2_norm=l2, use_context_norm=ctx_norm), V, CVAE)
    sd = model.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    want = expected_tiny_shapes(kind, l2, ctx_norm)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want
    assert not any("attn_bias_for_masking" in k or "inv_freq" in k for k in sd)


def test_buffers_values():
    model = HARTTransformer(tiny_cfg("llama"), V, CVAE)
    lvl = model.state_dict()["lvl_1L"]
    assert lvl.dtype == torch.int64
    want = [0] * T + [1] * 4 + [2] * 9 + [3] * 16
    assert lvl.tolist() == [want]
    assert torch.all(model.blocks[0].attn.zero_k_bias == 0)


def test_context_norm_needs_llama():
    with pytest.raises(CheckpointError):
        HARTTransformer(tiny_cfg("gpt2", use_context_norm=True), V, CVAE)


def official_cfg() -> HARTConfig:
    return HARTConfig(
        context_token=300, context_dim=1536, depth=16, embed_dim=1536, num_heads=24, mlp_ratio=4.0,
        patch_nums=OFFICIAL, attn_type="llama", mlp_type="llama", diff_width=1024, diff_depth=6,
    )


def test_official_07b_shapes_and_parameter_count():
    with torch.device("meta"):
        model = HARTTransformer(official_cfg(), vocab_size=4096, latent_dim=32)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = {  # hart-reference.md §5.1
        "blocks.15.attn.qkv_proj.weight": (4608, 1536), "blocks.0.attn.q_bias": (1536,),
        "blocks.0.attn.v_bias": (1536,), "blocks.0.attn.zero_k_bias": (1536,),
        "blocks.0.attn.proj.weight": (1536, 1536), "blocks.0.attn.proj.bias": (1536,),
        "blocks.0.ffn.gate_proj.weight": (4096, 1536), "blocks.0.ffn.up_proj.weight": (4096, 1536),
        "blocks.0.ffn.down_proj.weight": (1536, 4096), "blocks.0.ln_wo_grad.weight": (1536,),
        "blocks.0.ada_lin.1.weight": (9216, 1536), "blocks.0.ada_lin.1.bias": (9216,),
        "word_embed.weight": (1536, 32), "word_embed.bias": (1536,),
        "context_embed.weight": (1536, 1536), "context_embed.bias": (1536,),
        "lvl_embed.weight": (14, 1536), "lvl_1L": (1, 9750),
        "head_nm.ln_wo_grad.weight": (1536,), "head_nm.ada_lin.1.weight": (3072, 1536),
        "head_nm.ada_lin.1.bias": (3072,), "head.weight": (4096, 1536), "head.bias": (4096,),
        "decoder_norm.weight": (1536,),
        "diffloss.net.time_embed.mlp.0.weight": (1024, 256), "diffloss.net.cond_embed.weight": (1024, 1536),
        "diffloss.net.input_proj.weight": (1024, 32),
        "diffloss.net.res_blocks.5.adaLN_modulation.1.weight": (3072, 1024),
        "diffloss.net.final_layer.adaLN_modulation.1.weight": (2048, 1024),
        "diffloss.net.final_layer.linear.weight": (64, 1024),
    }
    for key, shape in spec.items():
        assert got[key] == shape, key
    assert "blocks.16.attn.q_bias" not in got and "pos_1LC" not in got and "pos_start" not in got
    assert len([k for k in got if k.startswith("blocks.")]) == 16 * 12
    # §7: 42.48M per block, 729.8M including the diffusion head (36.59M)
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    assert abs(per_block - 42.48e6) < 0.01e6
    assert abs(model.num_parameters() - 729.8e6) < 0.1e6
    assert abs(model.num_parameters() - model.num_parameters(include_diffusion=False) - 36.59e6) < 0.01e6


# ----------------------------------------------------------------------------- hand-written reference
def ref_norm(x, params, prefix, kind, eps=1e-6):
    if kind == "llama":  # RMSNorm with learned weight
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * params[prefix + "weight"]
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    out = (x - mu) / torch.sqrt(var + eps)
    if prefix + "weight" in params:
        out = out * params[prefix + "weight"] + params[prefix + "bias"]
    return out


def ref_rope(t, cos, sin):
    """Per channel: k < d/2 pairs with k + d/2 (minus sign), k >= d/2 pairs with k - d/2."""
    d = t.shape[-1]
    out = torch.empty_like(t)
    for k in range(d):
        partner = t[..., k + d // 2] * -1 if k < d // 2 else t[..., k - d // 2]
        out[..., k] = t[..., k] * cos[:, None, :, k] + partner * sin[:, None, :, k]
    return out


def ref_modulations(params, cond, mask, mode):
    if mode == "max":
        pooled = cond.max(dim=1).values
    else:
        m = mask.float()
        pooled = torch.stack([(cond[b] * m[b, :, None]).sum(0) / max(m[b].sum().item(), 1.0)
                              for b in range(cond.shape[0])])
    silu = pooled * torch.sigmoid(pooled)
    mods = []
    for i in range(DEPTH):
        out = silu @ params[f"blocks.{i}.ada_lin.1.weight"].T + params[f"blocks.{i}.ada_lin.1.bias"]
        mods.append({name: out[:, j * C:(j + 1) * C] for j, name in enumerate(MOD_ROWS)})
    return mods


def ref_stack(params, kind, x, mods, cos, sin, block_of_row, l2=False):
    """All blocks over a full sequence with upstream's training-time block-causal mask
    (row r sees key c iff stage(c) <= stage(r)); returns h and per-layer post-RoPE k, v."""
    N, L, _ = x.shape
    allowed = block_of_row[None, :] <= block_of_row[:, None]  # [L(query), L(key)]
    ks, vs = [], []
    for i in range(DEPTH):
        p = f"blocks.{i}."
        m = {k: v[:, None, :] for k, v in mods[i].items()}
        a_in = ref_norm(x, params, p + "ln_wo_grad.", kind) * (1 + m["scale1"]) + m["shift1"]
        w = params[p + ("attn.qkv_proj.weight" if kind == "llama" else "attn.mat_qkv.weight")]
        q = a_in @ w[:C].T + params[p + "attn.q_bias"]
        k = a_in @ w[C:2 * C].T  # no k bias
        v = a_in @ w[2 * C:].T + params[p + "attn.v_bias"]
        q, k, v = (t.view(N, L, H, D_HEAD).transpose(1, 2) for t in (q, k, v))
        scale = 0.25 / math.sqrt(D_HEAD)
        if l2:
            sm = torch.exp(torch.clamp(params[p + "attn.scale_mul_1H11"], max=math.log(100)))
            q = q / q.norm(dim=-1, keepdim=True) * sm
            k = k / k.norm(dim=-1, keepdim=True)
            scale = 1.0
        if kind == "llama":
            q, k = ref_rope(q, cos, sin), ref_rope(k, cos, sin)
        ks.append(k)
        vs.append(v)
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        att = torch.softmax(scores, dim=-1) @ v  # [N,H,L,d]
        att = att.transpose(1, 2).reshape(N, L, C) @ params[p + "attn.proj.weight"].T + params[p + "attn.proj.bias"]
        x = x + m["gamma1"] * att
        f_in = ref_norm(x, params, p + "ln_wo_grad.", kind) * (1 + m["scale2"]) + m["shift2"]
        if kind == "llama":
            gate = f_in @ params[p + "ffn.gate_proj.weight"].T
            hid = gate * torch.sigmoid(gate) * (f_in @ params[p + "ffn.up_proj.weight"].T)
            f = hid @ params[p + "ffn.down_proj.weight"].T
        else:
            a = f_in @ params[p + "ffn.fc1.weight"].T + params[p + "ffn.fc1.bias"]
            a = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
            f = a @ params[p + "ffn.fc2.weight"].T + params[p + "ffn.fc2.bias"]
        x = x + m["gamma2"] * f
    return x, ks, vs


def prompt_inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(B, T, CTX_DIM, generator=g)
    mask = np.zeros((B, T), dtype=bool)
    mask[0, :5] = True
    mask[1, :] = True
    mask_2B = np.concatenate([mask, np.zeros_like(mask)])
    mask_2B[B:, 0] = True  # uncond rows: [1, 0, ..., 0] as upstream
    return context, mask, torch.from_numpy(mask_2B)


def stage_tables(mask, si):
    pos = context_positions(mask)
    if si == 0:
        cos, sin = rope_cos_sin_1d(pos, D_HEAD)
    else:
        cos, sin = rope_cos_sin_2d(stage_positions(PATCH_NUMS, si, pos[:, -1]), D_HEAD)
    return torch.from_numpy(cos), torch.from_numpy(sin)


# ----------------------------------------------------------------------------- forward pieces
def test_condition_tokens_and_uncond_rows():
    model = build()
    context, _, _ = prompt_inputs()
    params = dict(model.named_parameters())
    cond = model.condition_tokens(context)
    assert cond.shape == (4, T, C)
    torch.testing.assert_close(cond[:2], context @ params["context_embed.weight"].T + params["context_embed.bias"])
    torch.testing.assert_close(cond[2:], params["context_embed.bias"].expand(2, T, C))


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_modulations_order_and_pooling(mode):
    model = build(sep_aln_pooling_mode=mode)
    context, _, mask_2B = prompt_inputs()
    params = dict(model.named_parameters())
    cond = model.condition_tokens(context)
    block_mods, head_mod = model.modulations(cond, mask_2B)
    assert block_mods.shape == (DEPTH, 4, 6, C) and head_mod.shape == (4, 2, C)
    want = ref_modulations(params, cond, mask_2B, mode)
    for i in range(DEPTH):
        for j, name in enumerate(MOD_ROWS):
            torch.testing.assert_close(block_mods[i, :, j], want[i][name])
    # head: always max pooling; rows (scale, shift)
    pooled = cond.max(dim=1).values
    out = F.silu(pooled) @ params["head_nm.ada_lin.1.weight"].T + params["head_nm.ada_lin.1.bias"]
    torch.testing.assert_close(head_mod[:, 0], out[:, :C])
    torch.testing.assert_close(head_mod[:, 1], out[:, C:])


def test_modulation_row_order_from_bias():
    """ada_lin output element j*C + c lands in row j: gamma1, gamma2, scale1, scale2, shift1, shift2."""
    model = build()
    with torch.no_grad():
        for blk in model.blocks:
            blk.ada_lin[1].weight.zero_()
            blk.ada_lin[1].bias.copy_(torch.arange(6 * C, dtype=torch.float32))
        model.head_nm.ada_lin[1].weight.zero_()
        model.head_nm.ada_lin[1].bias.copy_(torch.arange(2 * C, dtype=torch.float32))
    cond = torch.randn(4, T, C)
    block_mods, head_mod = model.modulations(cond, torch.ones(4, T, dtype=torch.bool))
    expect = torch.arange(6 * C, dtype=torch.float32).view(6, C)
    assert torch.equal(block_mods, expect.expand(DEPTH, 4, 6, C))
    assert torch.equal(head_mod, torch.arange(2 * C, dtype=torch.float32).view(2, C).expand(4, 2, C))
    # gate semantics: gamma rows (0, 1) zero -> every block is the identity, whatever scale/shift
    x = torch.randn(4, 3, C)
    mods = block_mods.clone()
    mods[:, :, :2] = 0
    cos, sin = torch.ones(4, 3, D_HEAD), torch.zeros(4, 3, D_HEAD)
    h, _, _ = model.blocks_forward(x, mods, cos, sin, None, None)
    torch.testing.assert_close(h, x)


@pytest.mark.parametrize("kind,l2", [("llama", False), ("gpt2", False), ("llama", True)])
def test_staged_blocks_match_block_causal_reference(kind, l2):
    """Stage 0 (context, 1-D RoPE), then stages 1 and 2 through the KV cache, against one
    hand-written pass over the whole sequence with upstream's block-causal training mask."""
    model = build(kind, attn_l2_norm=l2)
    if l2:  # two heads above the exp(.) <= 100 clamp
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.scale_mul_1H11.copy_(torch.tensor([0.5, 5.0, 1.5, 6.0]).view(1, H, 1, 1))
    params = dict(model.named_parameters())
    context, mask, mask_2B = prompt_inputs()
    g = torch.Generator().manual_seed(5)
    lat1 = torch.randn(2, 4, CVAE, generator=g)
    lat2 = torch.randn(2, 9, CVAE, generator=g)
    with torch.no_grad():
        cond = model.condition_tokens(context)
        block_mods, _ = model.modulations(cond, mask_2B)
        xs = [model.context_stage_input(cond), model.token_stage_input(lat1, 1), model.token_stage_input(lat2, 2)]
        tables = [stage_tables(mask, si) if kind == "llama" else (None, None) for si in range(3)]
        past_k = past_v = None
        hs, kcache, vcache = [], [], []
        for x, (cos, sin) in zip(xs, tables):
            h, nk, nv = model.blocks_forward(x, block_mods, cos, sin, past_k, past_v)
            assert nk.shape == (DEPTH, 4, H, x.shape[1], D_HEAD) and nv.shape == nk.shape
            hs.append(h)
            kcache.append(nk)
            vcache.append(nv)
            past_k, past_v = torch.cat(kcache, dim=3), torch.cat(vcache, dim=3)

        x_full = torch.cat(xs, dim=1)
        stage_of_row = torch.tensor([0] * T + [1] * 4 + [2] * 9)
        cos_full = sin_full = None
        if kind == "llama":
            cos_full = torch.cat([t[0] for t in tables], dim=1)
            sin_full = torch.cat([t[1] for t in tables], dim=1)
        mods = ref_modulations(params, cond, mask_2B, "max")
        h_ref, k_ref, v_ref = ref_stack(params, kind, x_full, mods, cos_full, sin_full, stage_of_row, l2)
    tol = 2e-4 if l2 else 2e-5  # a x100 logit scale sharpens the softmax: fp32 order noise grows
    torch.testing.assert_close(torch.cat(hs, dim=1), h_ref, atol=tol, rtol=tol)
    for i in range(DEPTH):
        torch.testing.assert_close(past_k[i], k_ref[i], atol=tol, rtol=tol)
        torch.testing.assert_close(past_v[i], v_ref[i], atol=tol, rtol=tol)


def test_depth1_split_equals_single_call_last_part():
    """With one block the stage-2 output through the cache equals the tail of one call over the
    concatenated sequence (attention is full and unmasked; the only difference is the mask)."""
    model = build(depth=1)
    N = 4
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(N, 5, C, generator=g), torch.randn(N, 3, C, generator=g)
    mods = torch.randn(1, N, 6, C, generator=g)
    ang = torch.rand(N, 8, D_HEAD, generator=g) * 10
    cos, sin = ang.cos(), ang.sin()
    with torch.no_grad():
        _, k1, v1 = model.blocks_forward(x1, mods, cos[:, :5], sin[:, :5], None, None)
        h2, _, _ = model.blocks_forward(x2, mods, cos[:, 5:], sin[:, 5:], k1, v1)
        h_full, k_full, _ = model.blocks_forward(torch.cat([x1, x2], 1), mods, cos, sin, None, None)
        empty = torch.zeros(1, N, H, 0, D_HEAD)
        h1_empty, _, _ = model.blocks_forward(x1, mods, cos[:, :5], sin[:, :5], empty, empty)
        h1, _, _ = model.blocks_forward(x1, mods, cos[:, :5], sin[:, :5], None, None)
    torch.testing.assert_close(h2, h_full[:, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k1, k_full[:, :, :, :5])
    torch.testing.assert_close(h1_empty, h1)


def test_logits_and_head_nm():
    model = build()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(7)
    h = torch.randn(4, 5, C, generator=g)
    head_mod = torch.randn(4, 2, C, generator=g)
    logits = model.logits(h, head_mod)
    assert logits.shape == (4, 5, V) and logits.dtype == torch.float32
    normed = ref_norm(h, params, "head_nm.ln_wo_grad.", "llama")
    ref = (normed * (1 + head_mod[:, None, 0]) + head_mod[:, None, 1]) @ params["head.weight"].T + params["head.bias"]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_gpt2_inputs_use_absolute_positions():
    model = build("gpt2")
    params = dict(model.named_parameters())
    context, mask, mask_2B = prompt_inputs()
    cond = model.condition_tokens(context)
    lvl = params["lvl_embed.weight"]
    torch.testing.assert_close(model.context_stage_input(cond),
                               cond + params["pos_start"] + lvl[0] + params["pos_1LC"][:, :T])
    lat = torch.randn(2, 9, CVAE)
    x = model.token_stage_input(lat, 2)
    we = lat @ params["word_embed.weight"].T + params["word_embed.bias"]
    want = we + lvl[2] + params["pos_1LC"][:, T + 4: T + 4 + 9]  # scale 2 follows the 4 tokens of scale 1
    torch.testing.assert_close(x, torch.cat([want, want]))
    with torch.no_grad():
        block_mods, head_mod = model.modulations(cond, mask_2B)
        h, k, v = model.blocks_forward(x, block_mods, None, None, None, None)
        assert h.shape == (4, 9, C) and torch.isfinite(model.logits(h, head_mod)).all()
        z = model.diffusion_condition(h, lat)
    torch.testing.assert_close(z, ref_norm(h + torch.cat([we, we]), params, "decoder_norm.", "gpt2"),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError):
        model.blocks_forward(x, block_mods, torch.ones(4, 9, D_HEAD), torch.zeros(4, 9, D_HEAD), None, None)


def test_llama_inputs_and_diffusion_condition():
    model = build()
    params = dict(model.named_parameters())
    context, _, _ = prompt_inputs()
    cond = model.condition_tokens(context)
    lvl = params["lvl_embed.weight"]
    torch.testing.assert_close(model.context_stage_input(cond), cond + lvl[0])
    lat = torch.randn(2, 16, CVAE)
    we = lat @ params["word_embed.weight"].T + params["word_embed.bias"]
    torch.testing.assert_close(model.token_stage_input(lat, 3), torch.cat([we + lvl[3]] * 2))
    h = torch.randn(4, 16, C)
    z = model.diffusion_condition(h, lat)
    torch.testing.assert_close(z, ref_norm(h + torch.cat([we, we]), params, "decoder_norm.", "llama"),
                               atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs():
    model = build()
    with pytest.raises(UsageError):
        model.token_stage_input(torch.zeros(2, 5, CVAE), 2)  # scale 2 has 9 tokens
    with pytest.raises(UsageError):
        model.token_stage_input(torch.zeros(2, 1, CVAE), 0)
    with pytest.raises(UsageError):  # llama needs RoPE tables
        model.blocks_forward(torch.zeros(4, 3, C), torch.zeros(DEPTH, 4, 6, C), None, None, None, None)
    with pytest.raises(UsageError):
        model.condition_tokens(torch.zeros(2, T + 1, CTX_DIM))


def test_blocks_forward_exports():
    """Static shapes and no in-place tricks: torch.export traces a cached stage."""
    model = build()

    class Stage(torch.nn.Module):
        def __init__(self, tr):
            super().__init__()
            self.tr = tr

        def forward(self, x, mods, cos, sin, pk, pv):
            return self.tr.blocks_forward(x, mods, cos, sin, pk, pv)

    args = (torch.randn(4, 4, C), torch.randn(DEPTH, 4, 6, C), torch.ones(4, 4, D_HEAD),
            torch.zeros(4, 4, D_HEAD), torch.randn(DEPTH, 4, H, T, D_HEAD), torch.randn(DEPTH, 4, H, T, D_HEAD))
    ep = torch.export.export(Stage(model).eval(), args)
    out = ep.module()(*args)
    ref = model.blocks_forward(*args)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def test_attention_in_head_groups_equals_one_call_and_is_chosen_by_memory():
    """Exported graphs run the AR attention a few heads at a time when the final stage's scores would
    be large (ONNX Runtime / XNNPACK materialise them); the result is the same."""
    import dataclasses

    from hartkit.model.graphs import limit_attention_memory
    from hartkit.model.checkpoint import build_hart
    from hartkit.model.presets import get_preset

    spec = get_preset("tiny")
    torch.manual_seed(0)
    model = build_hart(spec.hart, spec.vae)
    attn = model.transformer.blocks[0].attn
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 9, model.cfg.embed_dim)
    past = torch.randn(2, attn.num_heads, 20, attn.head_dim)
    cos, sin = torch.ones(2, 9, attn.head_dim), torch.zeros(2, 9, attn.head_dim)
    whole = attn(x, cos, sin, past, past.clone())[0]
    attn.heads_per_call = 1
    torch.testing.assert_close(attn(x, cos, sin, past, past.clone())[0], whole, atol=1e-6, rtol=1e-5)

    assert limit_attention_memory(model) == model.cfg.num_heads  # tiny: one call, as the reference
    assert attn.heads_per_call == 0
    big = get_preset("hart-0.7b-1024px")
    with torch.device("meta"):
        full = build_hart(big.hart, big.vae, device="meta")
    # 1024 px: 2 x 4096 queries x 9751 keys x 4 B = 319 MB per head -> 3 heads per call under 1 GiB
    assert limit_attention_memory(full) == 3
    assert all(b.attn.heads_per_call == 3 for b in full.transformer.blocks)
    small = dataclasses.replace(big.hart, patch_nums=big.hart.patch_nums[:10])  # 256 px: one call
    assert limit_attention_memory(build_hart(small, big.vae, device="meta")) == 24
