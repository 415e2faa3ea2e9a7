"""HART's VQ-VAE (hartkit.model.vae): key layout, phi schedule, blocks and the sampler step, each
against the spec's numbers or a re-computation written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hartkit.loop.resample import area_matrix, bicubic_matrix, phi_index, resample_2d
from hartkit.model.config import VAEConfig
from hartkit.model.vae import HARTVAE, AttnBlock, ResnetBlock, Upsample2x, next_autoregressive_input

PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def _tiny_cfg(**kw) -> VAEConfig:
    base = dict(ch=32, ch_mult=(1, 2), z_channels=4, vocab_size=16, v_patch_nums=(1, 2, 3, 4))
    base.update(kw)
    return VAEConfig(**base)


def _randomize(module: torch.nn.Module, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


# ---------------------------------------------------------------------------------------------
# state dict at full size (meta device: no memory, no time)


@pytest.fixture(scope="module")
def full_sd():
    cfg = VAEConfig(v_patch_nums=PATCH_NUMS_1024)  # ch 160, ch_mult (1,1,2,2,4), V 4096, Cvae 32, K=4
    with torch.device("meta"):
        vae = HARTVAE(cfg)
    return {k: tuple(v.shape) for k, v in vae.state_dict().items()}


def _expected_decoder_shapes() -> dict[str, tuple[int, ...]]:
    """Decoder keys and shapes as spec §5.2 / §3.8 list them."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        out[f"{name}.weight"] = (cout, cin, k, k)
        out[f"{name}.bias"] = (cout,)

    def norm(name, c):
        out[f"{name}.weight"] = (c,)
        out[f"{name}.bias"] = (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        conv(f"{name}.qkv", 3 * c, c, 1)
        conv(f"{name}.proj_out", c, c, 1)

    d = "decoder"
    conv(f"{d}.conv_in", 640, 32, 3)
    res(f"{d}.mid.block_1", 640, 640)
    attn(f"{d}.mid.attn_1", 640)
    res(f"{d}.mid.block_2", 640, 640)
    # (level, input width of block 0, width) from the top level down
    for level, cin, c in [(4, 640, 640), (3, 640, 320), (2, 320, 320), (1, 320, 160), (0, 160, 160)]:
        for j in range(3):
            res(f"{d}.up.{level}.block.{j}", cin if j == 0 else c, c)
            if level == 4:
                attn(f"{d}.up.{level}.attn.{j}", c)
        if level != 0:
            conv(f"{d}.up.{level}.upsample.conv", c, c, 3)
    norm(f"{d}.norm_out", 160)
    conv(f"{d}.conv_out", 3, 160, 3)
    return out


def test_decoder_keys_and_shapes_match_spec(full_sd):
    want = _expected_decoder_shapes()
    got = {k: v for k, v in full_sd.items() if k.startswith("decoder.")}
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k, shape in want.items():
        assert got[k] == shape, k


def test_other_keys_and_shapes(full_sd):
    assert full_sd["quantize.embedding.weight"] == (4096, 32)
    assert full_sd["quantize.ema_vocab_hit_SV"] == (14, 4096)
    for k in range(4):
        assert full_sd[f"quantize.quant_resi.qresi_ls.{k}.weight"] == (32, 32, 3, 3)
        assert full_sd[f"quantize.quant_resi.qresi_ls.{k}.bias"] == (32,)
    for name in ("quant_conv", "post_quant_conv"):
        assert full_sd[f"{name}.weight"] == (32, 32, 3, 3)
        assert full_sd[f"{name}.bias"] == (32,)
    assert full_sd["encoder.conv_in.weight"] == (160, 3, 3, 3)
    assert full_sd["encoder.conv_out.weight"] == (32, 640, 3, 3)
    assert full_sd["encoder.down.4.attn.1.qkv.weight"] == (1920, 640, 1, 1)
    assert full_sd["encoder.down.3.downsample.conv.weight"] == (320, 320, 3, 3)
    assert "encoder.down.4.downsample.conv.weight" not in full_sd
    tops = {k.split(".")[0] for k in full_sd}
    assert tops == {"encoder", "quant_conv", "quantize", "post_quant_conv", "decoder"}
    quant = {k for k in full_sd if k.startswith("quantize.")}
    assert len(quant) == 2 + 8  # codebook, ema statistic, 4 phis x (weight, bias)


def test_parameter_counts_match_spec(full_sd):
    def count(prefix: str) -> int:
        return sum(int(np.prod(s)) for k, s in full_sd.items() if k.startswith(prefix))

    assert round(count("decoder.") / 1e6, 2) == 64.65
    assert round(count("encoder.") / 1e6, 1) == 44.1
    assert count("post_quant_conv.") == 32 * 32 * 9 + 32  # 9.2k
    assert round((count("quantize.embedding.") + count("quantize.quant_resi.")) / 1e6, 2) == 0.17


@pytest.mark.parametrize(
    "share,prefix,count",
    [
        (0, "quantize.quant_resi.{}.weight", 4),  # one per v_patch_nums entry
        (1, "quantize.quant_resi.qresi.weight", 1),
        (3, "quantize.quant_resi.qresi_ls.{}.weight", 3),
    ],
)
def test_phi_layouts_for_share_quant_resi(share, prefix, count):
    with torch.device("meta"):
        vae = HARTVAE(_tiny_cfg(share_quant_resi=share))
    keys = {k for k in vae.state_dict() if k.startswith("quantize.quant_resi.") and k.endswith("weight")}
    assert keys == {prefix.format(i) for i in range(count)}
    assert vae.num_phis == count


def test_zero_quant_resi_makes_phi_the_identity():
    vae = HARTVAE(_tiny_cfg(quant_resi=0.0))
    assert not any(k.startswith("quantize.quant_resi.") for k in vae.state_dict())
    h = torch.randn(1, 4, 3, 3)
    assert torch.equal(vae.phi(vae.phi_index(1, 4), h), h)


# ---------------------------------------------------------------------------------------------
# phi schedule (spec §3.5 table and §8 ties)


def _upstream_phi_choice(si: int, num_stages: int, k: int = 4) -> int:
    # upstream PhiPartiallyShared: ticks by np.linspace, quant_resi[si / (SN - 1)], np.argmin
    margin = 1 / 3 / k if k == 4 else 1 / 2 / k
    ticks = np.linspace(margin, 1 - margin, k)
    return int(np.argmin(np.abs(ticks - si / (num_stages - 1))))


def test_phi_index_table_for_14_scales():
    vae = HARTVAE(_tiny_cfg())
    table = [vae.phi_index(si, 14) for si in range(13)]
    assert table == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert table == [_upstream_phi_choice(si, 14) for si in range(13)]


def test_phi_index_ties_follow_float64_rounding():
    vae = HARTVAE(_tiny_cfg())
    for n in range(2, 20):
        for k in (2, 3, 4, 5):
            assert all(phi_index(si, n, k) == _upstream_phi_choice(si, n, k) for si in range(n)), (n, k)
    # The stages that tie in exact arithmetic: the float64 rounding picks these phis.
    assert vae.phi_index(2, 5) == 2  # 0.5 is midway between ticks 1 and 2
    assert vae.phi_index(2, 10) == 1  # 2/9 midway between ticks 0 and 1
    assert vae.phi_index(7, 10) == 3  # 7/9 midway between ticks 2 and 3
    # ...where "first minimum in exact arithmetic" would say 1, 0, 2.
    from fractions import Fraction as Fr

    exact = [Fr(1, 12), Fr(13, 36), Fr(23, 36), Fr(11, 12)]

    def exact_first_min(si, n):
        d = [abs(t - Fr(si, n - 1)) for t in exact]
        return d.index(min(d))

    assert [exact_first_min(2, 5), exact_first_min(2, 10), exact_first_min(7, 10)] == [1, 0, 2]


def test_phi_formula():
    vae = HARTVAE(_tiny_cfg()).double()
    _randomize(vae.quantize, 0.3, seed=5)
    h = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    conv = vae.quantize.quant_resi.qresi_ls[2]
    want = 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(vae.phi(2, h), want, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# blocks against hand-written math


def _group_norm(x: torch.Tensor, gn: torch.nn.GroupNorm) -> torch.Tensor:
    B, C, H, W = x.shape
    g = x.reshape(B, 32, C // 32 * H * W)
    mean = g.mean(dim=2, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + 1e-6)).reshape(B, C, H, W)
    return y * gn.weight.view(1, C, 1, 1) + gn.bias.view(1, C, 1, 1)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


@pytest.mark.parametrize("cin,cout", [(64, 64), (64, 32)])
def test_resnet_block_by_hand(cin, cout):
    blk = ResnetBlock(cin, cout).double().eval()
    _randomize(blk, 0.1, seed=cin + cout)
    x = torch.randn(2, cin, 5, 6, dtype=torch.float64)
    x0 = x.clone()
    h = F.conv2d(_silu(_group_norm(x, blk.norm1)), blk.conv1.weight, blk.conv1.bias, padding=1)
    h = F.conv2d(_silu(_group_norm(h, blk.norm2)), blk.conv2.weight, blk.conv2.bias, padding=1)
    if cin != cout:
        w = blk.nin_shortcut.weight[:, :, 0, 0]
        short = torch.einsum("oc,bchw->bohw", w, x) + blk.nin_shortcut.bias.view(1, -1, 1, 1)
    else:
        short = x
    torch.testing.assert_close(blk(x), short + h, rtol=0, atol=1e-12)
    assert torch.equal(x, x0)  # out-of-place


def test_attn_block_by_hand():
    C = 64
    blk = AttnBlock(C).double().eval()
    _randomize(blk, 0.1, seed=7)
    x = torch.randn(2, C, 4, 3, dtype=torch.float64)
    x0 = x.clone()
    n = _group_norm(x, blk.norm).reshape(2, C, 12)
    qkv = torch.einsum("oc,bcn->bon", blk.qkv.weight[:, :, 0, 0], n) + blk.qkv.bias.view(1, -1, 1)
    q, k, v = qkv[:, :C], qkv[:, C : 2 * C], qkv[:, 2 * C :]  # channel blocks in order q | k | v
    out = torch.empty(2, C, 12, dtype=torch.float64)
    for b in range(2):
        for i in range(12):  # one query position at a time, single head, scale C^-1/2
            s = torch.stack([(q[b, :, i] * k[b, :, j]).sum() for j in range(12)]) / C**0.5
            p = torch.exp(s - s.max())
            p = p / p.sum()
            out[b, :, i] = (v[b] * p.view(1, 12)).sum(dim=1)
    proj = torch.einsum("oc,bcn->bon", blk.proj_out.weight[:, :, 0, 0], out)
    proj = proj + blk.proj_out.bias.view(1, -1, 1)
    torch.testing.assert_close(blk(x), x + proj.reshape(2, C, 4, 3), rtol=0, atol=1e-12)
    assert torch.equal(x, x0)


def test_upsample_is_nearest_then_conv():
    up = Upsample2x(32).double()
    _randomize(up, 0.1, seed=8)
    x = torch.randn(1, 32, 3, 2, dtype=torch.float64)
    rep = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    want = F.conv2d(rep, up.conv.weight, up.conv.bias, padding=1)
    torch.testing.assert_close(up(x), want, rtol=0, atol=1e-12)


def test_no_inplace_activation_anywhere():
    vae = HARTVAE(_tiny_cfg())
    for m in vae.modules():
        assert not getattr(m, "inplace", False), m


# ---------------------------------------------------------------------------------------------
# decode and the sampler step


def test_tiny_decode_shape_range_and_clamp():
    vae = HARTVAE(_tiny_cfg()).eval()
    _randomize(vae, 0.3, seed=9)  # large weights: the decoder output leaves [-1, 1] and gets clamped
    f_hat = torch.randn(2, 4, 3, 3)
    f0 = f_hat.clone()
    with torch.no_grad():
        img = vae.decode(f_hat)
        raw = vae.decoder(vae.post_quant_conv(f_hat))
    assert img.shape == (2, 3, 6, 6) and vae.downsample == 2
    assert img.min() >= -1 and img.max() <= 1
    assert (raw.abs() > 1).any() and ((raw.abs() < 1) | (img.abs() == 1)).all()
    torch.testing.assert_close(img, raw.clamp(-1, 1), rtol=0, atol=0)
    assert torch.equal(f_hat, f0)


def test_next_autoregressive_input_against_resample_matrices():
    vae = HARTVAE(_tiny_cfg()).double()
    _randomize(vae.quantize, 0.3, seed=10)
    pns = (1, 2, 3, 5, 8)
    SN = len(pns)
    rng = np.random.default_rng(11)
    f_hat = torch.from_numpy(rng.standard_normal((2, 4, 8, 8)))
    for si in range(SN - 1):
        h = torch.from_numpy(rng.standard_normal((2, 4, pns[si], pns[si])))
        f_in = f_hat.clone()
        with torch.no_grad():
            got_f, got_next = next_autoregressive_input(vae, si, pns, f_hat, h)
        assert torch.equal(f_hat, f_in)  # upstream adds in place; we do not

        up = resample_2d(h.numpy(), bicubic_matrix(8, pns[si]))
        k = _upstream_phi_choice(si, SN)
        conv = vae.quantize.quant_resi.qresi_ls[k]
        conv_up = F.conv2d(torch.from_numpy(up), conv.weight, conv.bias, padding=1).detach().numpy()
        want_f = f_hat.numpy() + 0.5 * up + 0.5 * conv_up
        want_next = resample_2d(want_f, area_matrix(pns[si + 1], 8))
        np.testing.assert_allclose(got_f.detach().numpy(), want_f, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got_next.numpy(), want_next, rtol=0, atol=1e-12)
        assert got_next.shape == (2, 4, pns[si + 1], pns[si + 1])
        f_hat = got_f
    with pytest.raises(ValueError):
        next_autoregressive_input(vae, SN - 1, pns, f_hat, f_hat)


def test_residual_quantization_round_trip():
    vae = HARTVAE(_tiny_cfg()).double().eval()
    _randomize(vae, 0.2, seed=12)
    img = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        f = vae.encode(img)
        idx, f_hats, f_rest_last = vae.quantize_residual(f)
        assert [t.shape for t in idx] == [(2, 1), (2, 4), (2, 9), (2, 16)]
        # stage 0 picks the code nearest to the mean latent, by brute force
        mean = f.mean(dim=(2, 3))
        dist = ((mean[:, None, :] - vae.quantize.embedding.weight[None]) ** 2).sum(-1)
        assert torch.equal(idx[0][:, 0], dist.argmin(dim=1))
        cos = F.cosine_similarity(mean[:, None, :], vae.quantize.embedding.weight[None], dim=-1)
        assert torch.equal(vae.quantize.nearest_index(mean, cosine=True), cos.argmax(dim=1))
        # the last discrete map has no phi; adding the leftover continuous residual gives f back
        h_last = vae.codebook_lookup(idx[-1])
        rest = f_rest_last.reshape(2, 4, 4, 4).permute(0, 3, 1, 2)
        torch.testing.assert_close(f_hats[-1] + rest - h_last, f, rtol=0, atol=1e-12)
        torch.testing.assert_close(f_hats[-1] - f_hats[-2], h_last, rtol=0, atol=1e-12)
        # teacher forcing inputs: scales 1..3, the first one = area(phi(bicubic(code_0)) -> 2)
        tf = vae.teacher_forcing_input(idx)
        assert tf.shape == (2, 4 + 9 + 16, 4)
        first = vae.phi(0, F.interpolate(vae.codebook_lookup(idx[0]), size=(4, 4), mode="bicubic"))
        want = F.adaptive_avg_pool2d(first, 2).reshape(2, 4, 4).transpose(1, 2)
        torch.testing.assert_close(tf[:, :4], want, rtol=0, atol=1e-12)
