"""HART's VQ autoencoder (the ``tokenizer/`` checkpoint): encoder, multi-scale quantizer, decoder.

Mirrors upstream ``HARTAutoEncoder`` (hart_autoencoder.py), ``basic_vae.py`` and the quantizers in
``quantize/var_quantize_multiple_res.py`` / ``hart_hybrid_quantize.py``. State-dict keys and shapes
are upstream's, without the ``vae.`` prefix of the released file (the loader strips it).

Generation needs only ``quantize.embedding`` (the codebook), the phi convs, ``post_quant_conv`` and
the decoder. The encoder and the residual quantization of an image are kept for training a small
HART and because the official checkpoint contains them.

Differences from upstream, none numerical: every op is out-of-place (upstream uses
``silu(inplace=True)``, ``mul_``, ``add_``, ``clamp_`` and mutates ``f_hat``), nothing makes
CUDA-only device calls, and phi is chosen through :meth:`HARTVAE.phi_index` rather than ``quant_resi[float]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hartkit.loop.resample import phi_index as _phi_index
from hartkit.model.config import VAEConfig


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-6, affine): the only norm in the VAE."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=1, padding=0)


# ----------------------------------------------------------------------------------------------
# building blocks (basic_vae.py)


class Upsample2x(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    """3x3 conv with stride 2 after padding one zero row/column at the bottom/right only (taming-
    transformers' asymmetric padding, kept because the weights were trained with it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))))))``; 1x1 shortcut only when widths differ."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        # Upstream keeps a Dropout here when dropout > 1e-6 (training only; released configs use
        # 0.0). It has no weights; in eval mode it is the identity.
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = _conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut: nn.Module = _conv1x1(in_channels, out_channels)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, scale C^-0.5, with a residual.

    One 1x1 conv makes q, k, v (channel blocks in that order); scores are ``(q·k)·C^-0.5`` (scaled
    after the product, as upstream), softmax over keys, then a 1x1 output projection.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.C = channels
        self.norm = Normalize(channels)
        self.qkv = _conv1x1(channels, 3 * channels)
        self.w_ratio = int(channels) ** (-0.5)
        self.proj_out = _conv1x1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, C, H * W)
        q, k, v = qkv.unbind(1)  # each [B, C, HW]
        scores = torch.bmm(q.transpose(1, 2), k) * self.w_ratio  # [B, HW_q, HW_k]
        attn = F.softmax(scores, dim=2)
        h = torch.bmm(v, attn.transpose(1, 2))  # [B, C, HW_q]
        return x + self.proj_out(h.reshape(B, C, H, W))


def _make_attn(channels: int, using_sa: bool) -> nn.Module:
    return AttnBlock(channels) if using_sa else nn.Identity()


class Encoder(nn.Module):
    """Image [B,3,H,W] in [-1,1] -> latent [B,z_channels,H/ds,W/ds] (VQGAN / ldm layout)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        dropout: float = 0.0,
        in_channels: int = 3,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = _conv3x3(in_channels, ch)

        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                # Attention only at the lowest resolution.
                if i_level == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = _make_attn(block_in, using_mid_sa)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)

        self.norm_out = Normalize(block_in)
        self.conv_out = _conv3x3(block_in, z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B,z_channels,h,w] -> image [B,3,h·ds,w·ds] (unclamped).

    ``up`` is indexed by resolution level (``up.0`` is the full-resolution level) but runs from the
    last level down, as upstream builds it with ``insert(0, ...)``; each level has
    ``num_res_blocks + 1`` ResnetBlocks.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        dropout: float = 0.0,
        out_channels: int = 3,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = _conv3x3(z_channels, block_in)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = _make_attn(block_in, using_mid_sa)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)

        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and using_sa:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = _conv3x3(block_in, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# quantizer (var_quantize_multiple_res.py)


class Phi(nn.Conv2d):
    """``phi(h) = (1 − r)·h + r·conv3x3(h)`` with r = |quant_resi| (the weights are the conv's)."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


def _make_phi(channels: int, quant_resi: float) -> nn.Module:
    # Upstream replaces phi by the identity when quant_resi is ~0 (no weights then).
    return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()


class PhiShared(nn.Module):
    """share_quant_resi == 1: one phi for every stage (key ``quant_resi.qresi.*``)."""

    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi

    @property
    def num_phis(self) -> int:
        return 1

    def get(self, k: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """share_quant_resi == K >= 2: K phis spread over [0, 1] (keys ``quant_resi.qresi_ls.k.*``)."""

    def __init__(self, phis: nn.ModuleList):
        super().__init__()
        self.qresi_ls = phis

    @property
    def num_phis(self) -> int:
        return len(self.qresi_ls)

    def get(self, k: int) -> nn.Module:
        return self.qresi_ls[k]


class PhiNonShared(nn.ModuleList):
    """share_quant_resi == 0: one phi per tick (keys ``quant_resi.k.*``)."""

    @property
    def num_phis(self) -> int:
        return len(self)

    def get(self, k: int) -> nn.Module:
        return self[k]


class VectorQuantizer(nn.Module):
    """The codebook, the phi convs and a training statistic; upstream ``VectorQuantizer2`` /
    ``HARTHybridQuantizer`` (same weights; they differ only in what they do at the last scale)."""

    def __init__(
        self,
        vocab_size: int,
        Cvae: int,
        v_patch_nums: Sequence[int],
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        using_znorm: bool = False,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.Cvae = Cvae
        self.v_patch_nums = tuple(v_patch_nums)
        self.using_znorm = using_znorm
        self.quant_resi_ratio = quant_resi
        if share_quant_resi == 0:
            count = default_qresi_counts or len(self.v_patch_nums)
            phis = [_make_phi(Cvae, quant_resi) for _ in range(count)]
            self.quant_resi: nn.Module = PhiNonShared(phis)
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(_make_phi(Cvae, quant_resi))
        elif share_quant_resi > 1:
            self.quant_resi = PhiPartiallyShared(
                nn.ModuleList([_make_phi(Cvae, quant_resi) for _ in range(share_quant_resi)])
            )
        else:
            raise ValueError(f"share_quant_resi must be >= 0, got {share_quant_resi}")
        # Per-scale codebook usage, only updated by upstream's training loop; a persistent buffer so
        # that checkpoints load strictly.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def nearest_index(self, z: torch.Tensor, cosine: bool = False) -> torch.Tensor:
        """Codebook index nearest to each row of ``z [N, Cvae]`` (upstream's expressions).

        L2: ``argmin(|z|² + |e|² − 2 z·e)``; ``cosine=True`` (upstream's ``using_znorm`` branch
        of the VAR quantizer): ``argmax`` of cosine similarity.
        """
        e = self.embedding.weight
        if cosine:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(e.T, dim=0), dim=1)
        d = z.square().sum(dim=1, keepdim=True) + e.square().sum(dim=1) - 2.0 * (z @ e.T)
        return torch.argmin(d, dim=1)


# ----------------------------------------------------------------------------------------------
# the autoencoder (hart_autoencoder.py)


class HARTVAE(nn.Module):
    """``HARTAutoEncoder`` without the ``vae.`` prefix: encoder, quant_conv, quantize,
    post_quant_conv, decoder."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if cfg.double_decoder:
            raise ValueError("double_decoder=True is not supported (no released HART tokenizer uses it)")
        self.cfg = cfg
        self.V, self.Cvae = cfg.vocab_size, cfg.z_channels
        # Upstream's ddconfig: num_res_blocks is hard-coded to 2, attention always on.
        dd = dict(
            ch=cfg.ch,
            ch_mult=tuple(cfg.ch_mult),
            num_res_blocks=VAEConfig.NUM_RES_BLOCKS,
            z_channels=cfg.z_channels,
            dropout=cfg.dropout,
            using_sa=True,
            using_mid_sa=True,
        )
        self.encoder = Encoder(in_channels=3, **dd)
        self.decoder = Decoder(out_channels=3, **dd)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(self.Cvae, self.Cvae, ks, stride=1, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(self.Cvae, self.Cvae, ks, stride=1, padding=ks // 2)
        self.quantize = VectorQuantizer(
            vocab_size=cfg.vocab_size,
            Cvae=cfg.z_channels,
            v_patch_nums=cfg.v_patch_nums,
            quant_resi=cfg.quant_resi,
            share_quant_resi=cfg.share_quant_resi,
            default_qresi_counts=cfg.default_qresi_counts,
            using_znorm=cfg.using_znorm,
        )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.cfg.ch_mult) - 1)

    # ---- phi --------------------------------------------------------------------------------

    @property
    def num_phis(self) -> int:
        return self.quantize.quant_resi.num_phis

    def phi_index(self, si: int, num_stages: int) -> int:
        """Index of the phi conv used after stage ``si`` of ``num_stages`` scales.

        Upstream's float64 ``argmin |ticks − si/(SN−1)|`` (first minimum wins), so the tie stages of
        spec §8 resolve as upstream; see :func:`hartkit.loop.resample.phi_index`.
        """
        return _phi_index(si, num_stages, self.num_phis)

    def phi(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Apply phi number k: ``(1 − r)·h + r·conv_k(h)`` (identity when quant_resi is ~0)."""
        return self.quantize.quant_resi.get(k)(h)

    # ---- decoding -----------------------------------------------------------------------------

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Latent ``f_hat [B,Cvae,h,w]`` -> image ``[B,3,h·ds,w·ds]`` in [-1, 1] (``fhat_to_img``)."""
        return torch.clamp(self.decoder(self.post_quant_conv(f_hat)), -1.0, 1.0)

    def codebook_lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx [B, pn²]`` -> token map ``[B, Cvae, pn, pn]`` (raster order)."""
        B, L = idx.shape
        pn = _side(L)
        return self.quantize.embedding(idx).transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    # ---- encoding and residual quantization (training path) ---------------------------------

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Image ``[B,3,H,W]`` in [-1, 1] -> continuous latent ``f = quant_conv(encoder(img))``."""
        return self.quant_conv(self.encoder(img))

    def encode_to_fhat_scales(
        self, img: torch.Tensor, patch_nums: Sequence[int] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Multi-scale residual quantization of an image (upstream ``f_to_idxBl_and_frest``).

        For each scale pn (last = latent size): pick the nearest code of ``area(f_rest → pn)``,
        bicubic it up to full size, apply phi (not at the last scale: the hybrid tokenizer leaves
        the last discrete map un-phi'd), add it to ``f_hat`` and subtract it from ``f_rest``.

        Returns ``(idx_list, f_hat_list, f_rest_last)``: ``idx_list[si]`` is ``[B, pn²]`` int64,
        ``f_hat_list[si]`` the accumulated ``[B,Cvae,H,W]`` after scale si, and ``f_rest_last``
        ``[B, H·W, Cvae]`` the residual *before* the last discrete map was subtracted (upstream's
        ``last_layer_gt``: the transformer's diffusion target is ``f_rest_last − codebook[idx_last]``).
        Adding ``f_rest_last − h_last`` to ``f_hat_list[-1]`` reconstructs ``f`` exactly.
        """
        return self.quantize_residual(self.encode(img), patch_nums)

    def quantize_residual(
        self, f: torch.Tensor, patch_nums: Sequence[int] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """:meth:`encode_to_fhat_scales` on a latent ``f [B,Cvae,H,W]``."""
        pns = tuple(patch_nums or self.quantize.v_patch_nums)
        B, C, H, W = f.shape
        if pns[-1] != H or H != W:
            raise ValueError(f"last patch size {pns[-1]} must equal the square latent size {H}x{W}")
        SN = len(pns)
        f_rest = f.detach()
        f_hat = torch.zeros_like(f_rest)
        idx_list: list[torch.Tensor] = []
        f_hats: list[torch.Tensor] = []
        f_rest_last = f_rest
        for si, pn in enumerate(pns):
            z = f_rest if si == SN - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            # Upstream's f_to_idxBl_and_frest always uses the L2 distance (using_znorm is ignored).
            idx = self.quantize.nearest_index(z.permute(0, 2, 3, 1).reshape(-1, C)).reshape(B, pn * pn)
            # Upstream bicubics even at the last scale (same size: an exact copy).
            h = F.interpolate(self.codebook_lookup(idx), size=(H, W), mode="bicubic")
            if si != SN - 1:
                h = self.phi(self.phi_index(si, SN), h)
            else:
                f_rest_last = f_rest
            f_hat = f_hat + h
            f_rest = f_rest - h
            idx_list.append(idx)
            f_hats.append(f_hat)
        return idx_list, f_hats, f_rest_last.permute(0, 2, 3, 1).reshape(B, H * W, C)

    def teacher_forcing_input(
        self, idx_list: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Transformer inputs for scales 1..SN−1 from ground-truth codes (``idxBl_to_var_input``).

        ``idx_list[si]`` is ``[B, pn²]`` (int) or a continuous map ``[B, pn², Cvae]``; only scales
        0..SN−2 are used. Returns ``[B, Σ_{si≥1} pn², Cvae]`` in the codebook's dtype (upstream
        accumulates in float32, which is the codebook's dtype in training).
        """
        pns = tuple(patch_nums or self.quantize.v_patch_nums)
        SN = len(pns)
        B = idx_list[0].shape[0]
        weight = self.quantize.embedding.weight
        f_hat = torch.zeros(B, self.Cvae, pns[-1], pns[-1], device=weight.device, dtype=weight.dtype)
        outs = []
        for si in range(SN - 1):
            codes = idx_list[si]
            emb = self.quantize.embedding(codes) if codes.dim() == 2 else codes.to(weight.dtype)
            h = emb.transpose(1, 2).reshape(B, self.Cvae, pns[si], pns[si])
            f_hat, nxt = next_autoregressive_input(self, si, pns, f_hat, h)
            outs.append(nxt.reshape(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(outs, dim=1)


def _side(num_tokens: int) -> int:
    pn = round(num_tokens**0.5)
    if pn * pn != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square map")
    return pn


# ----------------------------------------------------------------------------------------------
# sampler helper (get_next_autoregressive_input)


def next_autoregressive_input(
    vae: HARTVAE, si: int, patch_nums: Sequence[int], f_hat: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One residual step of the staged loop, for a stage ``si < SN − 1``.

    ``h [B,Cvae,pn,pn]`` is the token map sampled at stage si. Returns ``(f_hat', next_map)``:
    ``f_hat' = f_hat + phi_k(bicubic(h → last))`` with k = ``vae.phi_index(si, SN)`` and
    ``next_map = area(f_hat' → patch_nums[si+1])`` (the identity when that is the last size).
    Out-of-place: upstream adds into ``f_hat``. The final stage is not handled here: there the
    hybrid quantizer just adds ``h`` (no interpolation, no phi), which the sampler does itself.
    """
    SN = len(patch_nums)
    if not 0 <= si < SN - 1:
        raise ValueError(f"next_autoregressive_input: stage {si} must be below the last ({SN - 1})")
    last = patch_nums[-1]
    # Upstream: F.interpolate(..., mode="bicubic") with align_corners left unset (= False).
    up = F.interpolate(h, size=(last, last), mode="bicubic", align_corners=False)
    f_hat = f_hat + vae.phi(vae.phi_index(si, SN), up)
    nxt = patch_nums[si + 1]
    return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")


__all__ = [
    "HARTVAE",
    "Encoder",
    "Decoder",
    "ResnetBlock",
    "AttnBlock",
    "Upsample2x",
    "Downsample2x",
    "Phi",
    "PhiShared",
    "PhiPartiallyShared",
    "PhiNonShared",
    "VectorQuantizer",
    "next_autoregressive_input",
]
