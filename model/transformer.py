"""HART's AR transformer (upstream ``HARTForT2I`` without the VAE), as plain PyTorch.

Upstream: ``hart/modules/models/transformer/hart_transformer_t2i.py`` and
``hart/modules/networks/basic_hart.py`` (commit e28a41f). Parameter and buffer names and shapes are
upstream's, so ``llm/ema_model.bin`` loads strictly once the training-only ``attn_bias_for_masking``
buffer is dropped (we never create it).

The module exposes the pieces of ``autoregressive_infer_cfg`` separately instead of running the loop
itself, so the sampler and the graph exporter can cut it where they need:

* per prompt: :meth:`condition_tokens`, :meth:`modulations` (AdaLN of every block and of the head
  depend only on the prompt), :meth:`context_stage_input`;
* per stage: :meth:`token_stage_input`, :meth:`blocks_forward` (explicit KV cache in and out),
  :meth:`logits`, and at the final stage :meth:`diffusion_condition` + ``diffloss``.

Batch rows are always ``[cond (B); uncond (B)]``. RoPE tables come from :mod:`hartkit.loop.rope`.
Everything is out-of-place and has static shapes, for torch.export.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hartkit.errors import CheckpointError, UsageError
from hartkit.model.config import HARTConfig

if TYPE_CHECKING:  # imported for real inside HARTTransformer.__init__
    from hartkit.model.diffusion import DiffLoss

__all__ = ["HARTTransformer", "RMSNorm", "rotate_half", "apply_rope", "MOD_ROWS", "HEAD_MOD_ROWS"]

# Row order of a block's ada_lin output, viewed as [..., 6, C] (upstream unbinds it in this order).
MOD_ROWS = ("gamma1", "gamma2", "scale1", "scale2", "shift1", "shift2")
# Row order of head_nm's ada_lin output, viewed as [..., 2, C].
HEAD_MOD_ROWS = ("scale", "shift")


class RMSNorm(nn.Module):
    """Llama RMSNorm as computed by upstream's fused CUDA kernel ``LlamaRMSNormFused``.

    Quirk: the fused class ignores ``elementwise_affine=False``, so every llama norm (``ln_wo_grad``
    of the blocks and the head included) has a learned weight. Normalisation runs in fp32, the result
    is cast back to the input dtype and only then multiplied by the weight (kernel order).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


def _norm(cfg: HARTConfig, dim: int, affine: bool) -> nn.Module:
    """Upstream's ``norm_layer``: llama -> fused RMSNorm (always with weight), gpt2 -> LayerNorm."""
    if cfg.attn_type == "llama":
        return RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=affine)


def rotate_half(x: Tensor) -> Tensor:
    """``cat(-x[d/2:], x[:d/2])`` over the full last dim (HF llama convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x [N,H,l,d]`` with tables ``[N,l,d]``; upstream casts the fp32 tables to x's dtype first."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """``LlamaAttention`` (llama) or ``SelfAttention`` (gpt2): full, unmasked attention over
    ``cat(past, new)`` keys. Only the weight name and RoPE differ between the two."""

    def __init__(self, cfg: HARTConfig) -> None:
        super().__init__()
        C, H = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim = H, cfg.head_dim
        self.use_rope = cfg.attn_type == "llama"
        if self.use_rope:
            self.qkv_proj = nn.Linear(C, 3 * C, bias=False)
        else:
            self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        # A persistent zeros buffer upstream, hence part of the checkpoint: keep it for strict loads.
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.attn_l2_norm = cfg.attn_l2_norm
        if self.attn_l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100.0)
            self.scale = 1.0
        else:
            # VAR convention: a quarter of the usual 1/sqrt(d).
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.proj = nn.Linear(C, C)
        # Heads per attention call: 0 = all at once. Exported graphs set it (see
        # export/graphs.py: limit_attention_memory) so that ONNX/XNNPACK, which materialise the
        # [rows, heads, queries, keys] scores, hold a few heads' scores at a time at 1024 px.
        self.heads_per_call = 0

    @property
    def qkv_weight(self) -> Tensor:
        return self.qkv_proj.weight if self.use_rope else self.mat_qkv.weight

    def forward(
        self, x: Tensor, cos: Tensor | None, sin: Tensor | None,
        past_k: Tensor | None, past_v: Tensor | None, attn_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        N, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv_weight, bias).view(N, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, H, L, d]
        if self.attn_l2_norm:  # before RoPE, as upstream
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1) * scale_mul
            k = F.normalize(k, dim=-1)
        if self.use_rope:
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        new_k, new_v = k, v  # the cache holds post-RoPE keys
        if past_k is not None:
            k = torch.cat((past_k.to(k.dtype), k), dim=2)
            v = torch.cat((past_v.to(v.dtype), v), dim=2)
        step = self.heads_per_call
        if 0 < step < self.num_heads:  # a static loop over head groups (slices of a static dimension)
            out = torch.cat([F.scaled_dot_product_attention(q[:, h : h + step], k[:, h : h + step], v[:, h : h + step],
                                                            attn_mask=attn_bias, scale=self.scale)
                             for h in range(0, self.num_heads, step)], dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(N, L, C)
        return self.proj(out), new_k, new_v


class LlamaMLP(nn.Module):
    """SwiGLU without biases: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GPT2MLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` (upstream ``FFN`` with its default act_func 'gelu')."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """``AdaLNSelfAttn`` (no shared/disabled AdaLN, no cross-attention).

    ``x += gamma1 * attn(N(x) * (1 + scale1) + shift1)``;
    ``x += gamma2 * ffn(N(x) * (1 + scale2) + shift2)`` (gamma is a plain gate, not 1 + gamma).
    """

    def __init__(self, cfg: HARTConfig) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.attn = Attention(cfg)
        mlp = LlamaMLP if cfg.mlp_type == "llama" else GPT2MLP
        self.ffn = mlp(C, cfg.mlp_hidden)
        self.ln_wo_grad = _norm(cfg, C, affine=False)
        # Index 1 is the Linear (key ada_lin.1.*); D = C in HART.
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(
        self, x: Tensor, mods: Tensor, cos: Tensor | None, sin: Tensor | None,
        past_k: Tensor | None, past_v: Tensor | None, attn_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unsqueeze(1).unbind(2)  # [N,1,C]
        a, k, v = self.attn(self.ln_wo_grad(x) * (scale1 + 1) + shift1, cos, sin, past_k, past_v, attn_bias)
        x = x + a * gamma1
        x = x + self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2
        return x, k, v


class HeadNorm(nn.Module):
    """``AdaLNBeforeHead``: ``N(x) * (1 + scale) + shift`` with (scale, shift) from the max-pooled prompt."""

    def __init__(self, cfg: HARTConfig) -> None:
        super().__init__()
        C = cfg.embed_dim
        self.ln_wo_grad = _norm(cfg, C, affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x: Tensor, head_mod: Tensor) -> Tensor:
        scale, shift = head_mod.unsqueeze(1).unbind(2)  # [N,1,C]
        return self.ln_wo_grad(x) * (scale + 1) + shift


class HARTTransformer(nn.Module):
    """The AR transformer plus the residual diffusion head (``diffloss``); see the module docstring."""

    diffloss: "DiffLoss"

    def __init__(self, cfg: HARTConfig, vocab_size: int, latent_dim: int) -> None:
        super().__init__()
        cfg.validate()
        if cfg.use_context_norm and cfg.attn_type != "llama":
            # Upstream passes scale= to nn.LayerNorm here, which raises: no such checkpoint exists.
            raise CheckpointError("use_context_norm=True needs attn_type 'llama' (upstream cannot build it)")
        from hartkit.model.diffusion import DiffLoss  # late: keeps this module importable on its own

        self.cfg = cfg
        self.V, self.Cvae = int(vocab_size), int(latent_dim)
        C, T = cfg.embed_dim, cfg.context_token
        self.C, self.T, self.depth = C, T, cfg.depth
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.patch_nums = tuple(cfg.patch_nums)
        init_std = math.sqrt(1 / C / 3)

        self.word_embed = nn.Linear(self.Cvae, C)
        self.context_embed = nn.Linear(cfg.context_dim, C)
        nn.init.trunc_normal_(self.context_embed.weight, mean=0.0, std=init_std)
        # Quirk: upstream passes scale=context_norm_scale, which the fused RMSNorm ignores (weight = 1).
        self.context_norm = RMSNorm(cfg.context_dim, cfg.norm_eps) if cfg.use_context_norm else nn.Identity()

        # Sequence layout: T context slots (level 0), then every scale but the 1x1 (level si).
        self.stage_offsets = [0, T]  # first row of each stage's inputs in the full sequence
        for pn in self.patch_nums[1:-1]:
            self.stage_offsets.append(self.stage_offsets[-1] + pn * pn)
        seq_len = cfg.seq_len
        if cfg.attn_type == "gpt2":  # absolute positions; llama relies on RoPE only
            self.pos_start = nn.Parameter(torch.empty(1, T, C))
            self.pos_1LC = nn.Parameter(torch.empty(1, seq_len, C))
            nn.init.trunc_normal_(self.pos_start, mean=0.0, std=init_std)
            nn.init.trunc_normal_(self.pos_1LC, mean=0.0, std=init_std)
        else:
            self.pos_start = None
            self.pos_1LC = None
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0.0, std=init_std)
        levels = [torch.zeros(T, dtype=torch.int64)]
        levels += [torch.full((pn * pn,), si, dtype=torch.int64) for si, pn in enumerate(self.patch_nums) if si > 0]
        # Persistent upstream (so it is in the checkpoint); we index lvl_embed by si directly.
        self.register_buffer("lvl_1L", torch.cat(levels).view(1, seq_len))

        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.head_nm = HeadNorm(cfg)
        self.head = nn.Linear(C, self.V)
        self.decoder_norm = _norm(cfg, C, affine=True)  # gpt2: LayerNorm with weight and bias
        self.diffloss = DiffLoss(
            target_channels=self.Cvae, z_channels=C, width=cfg.diff_width, depth=cfg.diff_depth,
            num_sampling_steps=cfg.num_sampling_steps,
        )

    # ---------------------------------------------------------------- prompt level
    def condition_tokens(self, context: Tensor) -> Tensor:
        """``[B,T,context_dim]`` text features -> ``cond_BD [2B,T,C]``; the uncond half embeds zeros
        (every row equals ``context_embed.bias``)."""
        self._check(context.dim() == 3 and context.shape[1:] == (self.T, self.cfg.context_dim),
                    f"context must be [B, {self.T}, {self.cfg.context_dim}], got {tuple(context.shape)}")
        both = torch.cat((context, torch.zeros_like(context)), dim=0)
        return self.context_embed(self.context_norm(both))

    def _pool(self, cond_BD: Tensor, context_mask_2B: Tensor) -> Tensor:
        if self.cfg.sep_aln_pooling_mode == "max":
            # Unmasked: padded rows take part too (upstream).
            return cond_BD.amax(dim=1)
        mask = context_mask_2B.to(cond_BD.dtype).unsqueeze(-1)  # [2B,T,1]
        denom = mask.sum(dim=1, keepdim=True).clamp_min(1)  # [2B,1,1]
        return (cond_BD * mask / denom).sum(dim=1)  # divide before summing, as upstream

    def modulations(self, cond_BD: Tensor, context_mask_2B: Tensor) -> tuple[Tensor, Tensor]:
        """AdaLN parameters for the whole generation.

        Returns ``block_mods [depth,2B,6,C]`` with rows in :data:`MOD_ROWS` order
        (gamma1, gamma2, scale1, scale2, shift1, shift2) and ``head_mod [2B,2,C]`` with rows
        (scale, shift). Blocks pool per ``sep_aln_pooling_mode``; the head always takes the max.
        """
        N = cond_BD.shape[0]
        self._check(context_mask_2B.shape == cond_BD.shape[:2],
                    f"context_mask_2B must be {tuple(cond_BD.shape[:2])}, got {tuple(context_mask_2B.shape)}")
        pooled = self._pool(cond_BD, context_mask_2B)
        block_mods = torch.stack([blk.ada_lin(pooled).view(N, 6, self.C) for blk in self.blocks])
        head_mod = self.head_nm.ada_lin(cond_BD.amax(dim=1)).view(N, 2, self.C)
        return block_mods, head_mod

    def context_stage_input(self, cond_BD: Tensor) -> Tensor:
        """Stage-0 input ``[2B,T,C]``: ``cond_BD + lvl_embed[0]`` (gpt2: ``+ pos_start + pos_1LC[:T]``)."""
        lvl = self.lvl_embed.weight[0]
        if self.pos_1LC is None:
            return cond_BD + lvl
        return cond_BD + self.pos_start + (lvl + self.pos_1LC[:, : self.T])

    def token_stage_input(self, latents: Tensor, si: int) -> Tensor:
        """Input of stage ``si >= 1``: ``latents [B,pn*pn,Cvae]`` -> ``[2B,pn*pn,C]``
        (``word_embed + lvl_embed[si]``, gpt2 also ``+ pos_1LC`` of that scale), repeated for CFG."""
        self._check(1 <= si < len(self.patch_nums), f"si must be in 1..{len(self.patch_nums) - 1}, got {si}")
        n = self.patch_nums[si] ** 2
        self._check(latents.dim() == 3 and latents.shape[1:] == (n, self.Cvae),
                    f"latents of stage {si} must be [B, {n}, {self.Cvae}], got {tuple(latents.shape)}")
        pos = self.lvl_embed.weight[si]
        if self.pos_1LC is not None:
            off = self.stage_offsets[si]
            pos = pos + self.pos_1LC[:, off : off + n]
        return (self.word_embed(latents) + pos).repeat(2, 1, 1)

    # ---------------------------------------------------------------- stage level
    def blocks_forward(
        self, x: Tensor, block_mods: Tensor, cos: Tensor | None, sin: Tensor | None,
        past_k: Tensor | None, past_v: Tensor | None, attn_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run all blocks on one stage's inputs.

        ``x [2B,l,C]``; ``cos``/``sin [2B,l,head_dim]`` (llama only; None for gpt2);
        ``past_k``/``past_v [depth,2B,H,K,d]`` or None. Returns ``(h [2B,l,C], new_k, new_v)`` with
        ``new_k``/``new_v [depth,2B,H,l,d]``: only this stage's post-RoPE keys/values.

        ``attn_bias`` (training only; inference never masks) is an additive mask broadcastable to
        ``[N, H, l, K]`` (K = cached + new keys), e.g. upstream's block-causal
        ``attn_bias_for_masking`` for a whole teacher-forced sequence. None: full attention.
        """
        N, L, C = x.shape
        self._check(C == self.C, f"x must have {self.C} channels, got {C}")
        self._check(block_mods.shape == (self.depth, N, 6, C),
                    f"block_mods must be {(self.depth, N, 6, C)}, got {tuple(block_mods.shape)}")
        if self.cfg.attn_type == "llama":
            want = (N, L, self.head_dim)
            self._check(cos is not None and sin is not None and cos.shape == want and sin.shape == want,
                        f"llama attention needs cos/sin of shape {want}")
        else:
            self._check(cos is None and sin is None, "gpt2 attention takes no RoPE tables")
        self._check((past_k is None) == (past_v is None), "past_k and past_v go together")
        if past_k is not None:
            self._check(past_k.dim() == 5 and past_k.shape[:3] == (self.depth, N, self.num_heads)
                        and past_k.shape[4] == self.head_dim and past_v.shape == past_k.shape,
                        f"past_k/past_v must be [{self.depth}, {N}, {self.num_heads}, K, {self.head_dim}]")
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            pk = None if past_k is None else past_k[i]
            pv = None if past_v is None else past_v[i]
            x, k, v = blk(x, block_mods[i], cos, sin, pk, pv, attn_bias)
            ks.append(k)
            vs.append(v)
        return x, torch.stack(ks), torch.stack(vs)

    def logits(self, h: Tensor, head_mod: Tensor) -> Tensor:
        """``head(head_nm(h))`` in fp32 -> ``[2B,l,V]`` (no CFG mixing here)."""
        return self.head(self.head_nm(h.float(), head_mod.float()).float()).float()

    def diffusion_condition(self, h: Tensor, latents: Tensor) -> Tensor:
        """Final stage: ``decoder_norm(h + word_embed(latents))`` with the same (hard codebook)
        latents ``[B,l,Cvae]`` for both CFG halves; ``h`` is the raw block output (before head_nm)."""
        self._check(latents.shape[0] * 2 == h.shape[0] and latents.shape[1] == h.shape[1],
                    f"latents {tuple(latents.shape)} do not match h {tuple(h.shape)}")
        return self.decoder_norm(h + self.word_embed(latents).repeat(2, 1, 1))

    # ---------------------------------------------------------------- helpers
    def num_parameters(self, include_diffusion: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not include_diffusion:
            total -= sum(p.numel() for p in self.diffloss.parameters())
        return total

    @staticmethod
    def _check(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)
