"""hartkit.model.text_encoder against transformers' Qwen2Model running upstream's encode_prompts recipe."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from hartkit.errors import CheckpointError
from hartkit.loop.prompt import HART_SYSTEM_PROMPT
from hartkit.model.text_encoder import (
    TextEncoder,
    build_attention_bias,
    make_tiny_text_model,
    qwen2_1p5b_config,
    rope_cos_sin,
)

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

PROMPTS = [
    "a red cube on a blue sphere",
    "crocodile in a sweater, soft light",
    "an astronaut sitting in a diner, eating fries, cinematic, analog film, " * 2,
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_text"), seed=0)


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    return transformers.Qwen2Model.from_pretrained(str(tiny_dir), local_files_only=True).eval()


def upstream_encode(path: Path, model, prompts, max_length, use_system_prompt=True):
    """hart/utils/tools.py:encode_prompts re-done with transformers' tokenizer and model."""
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    ids = torch.stack(
        [
            tok(p, return_tensors="pt", padding="max_length", max_length=max_length, truncation=True).input_ids[0]
            for p in prompts
        ]
    )
    mask = ids != tok.pad_token_id
    pos = torch.cumsum(mask, dim=1) - 1
    if not use_system_prompt:
        hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return hidden.float(), mask, pos
    sys_ids = tok([HART_SYSTEM_PROMPT], return_tensors="pt", padding="longest", max_length=max_length, truncation=True)
    sys_ids = sys_ids.input_ids[0][None].repeat(len(prompts), 1)
    s = sys_ids.shape[1]
    out = model(
        torch.cat([sys_ids, ids], dim=1),
        attention_mask=torch.cat([torch.ones_like(mask)[:, :s], mask], dim=1),
        output_hidden_states=True,
    )
    return out.hidden_states[-1][:, s:].float(), mask, pos


def test_encode_matches_transformers(tiny_dir, hf_model):
    enc = TextEncoder.from_pretrained(tiny_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is truncated at 300 tokens
        context, mask, pos = enc.encode(PROMPTS, 300)
    assert context.shape == (3, 300, 32) and context.dtype == torch.float32
    assert mask.shape == (3, 300) and mask.dtype == torch.bool
    assert pos.shape == (3, 300) and pos.dtype == torch.int64
    with torch.no_grad():
        ref, ref_mask, ref_pos = upstream_encode(tiny_dir, hf_model, PROMPTS, 300)
    assert torch.equal(mask, ref_mask) and torch.equal(pos, ref_pos)
    torch.testing.assert_close(context, ref, atol=2e-5, rtol=2e-5)
    # padded rows are kept (and differ from each other: they attend to the real tokens)
    n = int(mask[0].sum())
    assert not torch.allclose(context[0, n], context[0, n + 1])


def test_hidden_states_last_is_after_final_norm(tiny_dir, hf_model):
    # transformers 4.57.6: hidden_states[-1] is the *normed* output, as in 4.42.2 (spec §2.4)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    captured = {}
    def grab(module, args, output):
        captured["pre"] = output[0] if isinstance(output, tuple) else output

    hook = hf_model.layers[-1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            out = hf_model(ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    finally:
        hook.remove()
    pre = captured["pre"]
    assert len(out.hidden_states) == hf_model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(out.hidden_states[-1], hf_model.norm(pre))
    assert not torch.allclose(out.hidden_states[-1], pre, atol=1e-2)
    # and our forward returns that same post-norm tensor
    enc = TextEncoder.from_pretrained(tiny_dir)
    with torch.no_grad():
        ours = enc(ids, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(ours, out.hidden_states[-1], atol=2e-5, rtol=2e-5)


def test_no_system_prompt_and_left_padding(tiny_dir, hf_model, tmp_path):
    enc = TextEncoder.from_pretrained(tiny_dir)
    with pytest.warns(UserWarning, match="truncated"):
        context, mask, _ = enc.encode(PROMPTS, 40, use_system_prompt=False)
    with torch.no_grad():
        ref, ref_mask, _ = upstream_encode(tiny_dir, hf_model, PROMPTS, 40, use_system_prompt=False)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(context, ref, atol=2e-5, rtol=2e-5)

    left = tmp_path / "left"
    shutil.copytree(tiny_dir, left)
    cfg = json.loads((left / "tokenizer_config.json").read_text())
    cfg["padding_side"] = "left"
    (left / "tokenizer_config.json").write_text(json.dumps(cfg))
    enc_left = TextEncoder.from_pretrained(left)
    context, mask, pos = enc_left.encode(PROMPTS[:2], 300)
    assert not mask[:, 0].any() and (pos[:, 0] == -1).all()
    with torch.no_grad():
        ref, ref_mask, ref_pos = upstream_encode(left, hf_model, PROMPTS[:2], 300)
    assert torch.equal(mask, ref_mask) and torch.equal(pos, ref_pos)
    torch.testing.assert_close(context, ref, atol=2e-5, rtol=2e-5)


def test_forward_with_random_key_masks(tiny_dir, hf_model):
    # any mask whose rows all see some key (key 0 kept): same as transformers
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (3, 23), generator=gen)
    mask = torch.rand(3, 23, generator=gen) > 0.4
    mask[:, 0] = True
    enc = TextEncoder.from_pretrained(tiny_dir)
    with torch.no_grad():
        ref = hf_model(ids, attention_mask=mask.long()).last_hidden_state
        ours = enc(ids, mask)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_attention_bias_explicit():
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    bias = build_attention_bias(mask, torch.float32)
    assert bias.shape == (3, 1, 5, 5)
    neg = torch.finfo(torch.float32).min
    for b in range(3):
        for i in range(5):
            visible = [j for j in range(5) if j <= i and mask[b, j]]
            for j in range(5):
                # a query that sees nothing attends to every key (transformers 4.42.2 SDPA on CUDA)
                want = 0.0 if (j in visible or not visible) else neg
                assert bias[b, 0, i, j].item() == want, (b, i, j)
    assert build_attention_bias(mask, torch.float16).dtype == torch.float16


def test_fully_masked_rows_attend_everywhere(tmp_path):
    # Left padding without system prompt: the leading pad query sees no key. Upstream (4.42.2 SDPA
    # on CUDA) then lets it attend to every key, future ones included. Recompute that row by hand
    # on a one-layer model.
    enc = TextEncoder.from_pretrained(make_tiny_text_model(tmp_path / "one", num_layers=1))
    ids = torch.tensor([[511, 511, 3, 40, 77]])
    mask = ids != 511
    layer = enc.layers[0]
    with torch.no_grad():
        got = enc(ids, mask)
        x = enc.embed_tokens(ids)
        h = layer.input_layernorm(x)
        cos, sin = rope_cos_sin(torch.arange(5)[None], layer.self_attn.head_dim, enc.rope_theta, x.dtype)
        everything = layer.self_attn(h, cos, sin, torch.zeros(1, 1, 5, 5))  # no mask at all
        x0 = x[:, 0] + everything[:, 0]
        want0 = enc.norm(x0 + layer.mlp(layer.post_attention_layernorm(x0)))
        causal = enc(ids, torch.ones_like(mask))
    torch.testing.assert_close(got[:, 0], want0, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, 0], causal[:, 0], atol=1e-3)
    # the real tokens (2..4) see only the real keys: RoPE is relative, so the same tokens alone
    # at positions 0..2 give the same rows
    with torch.no_grad():
        alone = enc(ids[:, 2:], mask[:, 2:])
    torch.testing.assert_close(got[:, 2:], alone, atol=1e-5, rtol=1e-5)


def test_truncation_warns(tiny_dir):
    enc = TextEncoder.from_pretrained(tiny_dir)
    with pytest.warns(UserWarning, match=r"index 2.*truncated"):
        context, mask, pos = enc.encode(PROMPTS, 24)
    assert context.shape == (3, 24, 32) and mask[2].all() and pos[2, -1] == 23


def test_loads_prefixed_sharded_checkpoint(tiny_dir, tmp_path):
    # a Qwen2ForCausalLM / VL-style layout: "model." prefixes, lm_head and a vision tower, 2 shards
    path = tmp_path / "prefixed"
    shutil.copytree(tiny_dir, path)
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    renamed = {"model." + k: v for k, v in state.items()}
    renamed["lm_head.weight"] = torch.zeros(512, 32)
    renamed["visual.patch_embed.weight"] = torch.zeros(4, 4)
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: renamed[k] for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.warns(UserWarning, match="visual"):
        enc = TextEncoder.from_pretrained(path)
    ref = TextEncoder.from_pretrained(tiny_dir)
    for k, v in ref.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v), k


def test_dtype_option(tiny_dir):
    enc = TextEncoder.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in enc.parameters())
    context, _, _ = enc.encode(PROMPTS[:1], 16)
    assert context.dtype == torch.float32 and torch.isfinite(context).all()


def test_load_errors(tiny_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        TextEncoder.from_pretrained(tmp_path / "nowhere")

    def variant(name: str) -> Path:
        p = tmp_path / name
        shutil.copytree(tiny_dir, p)
        return p

    p = variant("noconfig")
    (p / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        TextEncoder.from_pretrained(p)

    p = variant("vl")
    cfg = json.loads((p / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="qwen2_vl"):
        TextEncoder.from_pretrained(p)

    p = variant("noweights")
    (p / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        TextEncoder.from_pretrained(p)

    p = variant("notok")
    (p / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        TextEncoder.from_pretrained(p)

    p = variant("missingkey")
    state = load_file(str(p / "model.safetensors"))
    del state["layers.1.mlp.up_proj.weight"]
    save_file(state, str(p / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.1.mlp.up_proj.weight"):
        TextEncoder.from_pretrained(p)

    p = variant("badshape")
    state = load_file(str(p / "model.safetensors"))
    state["norm.weight"] = torch.ones(31)
    save_file(state, str(p / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="norm.weight"):
        TextEncoder.from_pretrained(p)


def test_tiny_model_is_deterministic(tiny_dir, tmp_path):
    again = make_tiny_text_model(tmp_path / "again", seed=0)
    other = make_tiny_text_model(tmp_path / "other", seed=1)
    files = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json", "model.safetensors")
    for name in files:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_qwen2_1p5b_shapes_on_meta():
    config = qwen2_1p5b_config()
    with torch.device("meta"):
        ours = TextEncoder(config)
        theirs = transformers.Qwen2Model(config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes
    # spec §1.3 / §7: 28 layers, hidden 1536, 12/2 heads (head_dim 128), MLP 8960, vocab 151936
    h, kv, m, v, n = 1536, 2 * 128, 8960, 151936, 28
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * m + 2 * h
    expected = v * h + n * per_layer + h
    total = sum(p.numel() for p in ours.parameters())
    assert total == expected == 1_543_714_304
    assert total - v * h == 1_310_340_608  # "1.31 B non-embedding"


def test_forward_exports_with_dynamic_length(tiny_dir):
    enc = TextEncoder.from_pretrained(tiny_dir)
    gen = torch.Generator().manual_seed(2)
    ids, mask = torch.randint(0, 512, (2, 30), generator=gen), torch.rand(2, 30, generator=gen) > 0.3
    n = torch.export.Dim("n", min=2, max=1024)
    program = torch.export.export(enc, (ids, mask), dynamic_shapes=({1: n}, {1: n}))
    ids2, mask2 = torch.randint(0, 512, (2, 47), generator=gen), torch.rand(2, 47, generator=gen) > 0.3
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids2, mask2), enc(ids2, mask2))
