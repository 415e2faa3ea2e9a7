"""HART's staged loop cut into pure graphs: the one place that declares every exported graph.

Each :class:`GraphSpec` names its inputs and outputs with dtypes and shapes (static ints or bounded
dynamic :class:`Dim`); the exporters (ONNX, ExecuTorch, Core ML), the manifest, the runtime and the
tests all read these specs. No graph draws random numbers or has data-dependent shapes: sampling,
CFG mixing of logits, top-k/top-p, the Gumbel mixture and the diffusion scheduler update stay on the
host in numpy (fp32/fp64), fed by the portable RNG (:mod:`hartkit.loop.rng`).

The cut, for one image (B = 1; the two CFG rows are [cond; uncond]):

=====================  =================================================================================
graph                  role
=====================  =================================================================================
text_encoder           Qwen2 over [system prompt; prompt] -> context states (system rows dropped)
condition              context -> AdaLN modulations of every block and the head, stage-0 input
ar_context             stage 0: the blocks over the context tokens (no cache yet) -> h, keys, values
ar_stage               stages >= 1: the blocks over one scale's tokens with the past keys/values
ar_head                head_nm + head -> logits (stage 0: only the last context row is passed)
residual_{si}          f_hat += phi(bicubic(latents)); next stage input = embed(area(f_hat)) (per stage)
diffusion_condition    final stage: decoder_norm(h + word_embed(codebook[idx]))
diffusion_cond_embed   the diffusion head's cond_embed(z), once per image
denoise                one denoiser evaluation (eps and variance interpolant) given x, t, cond_embed
vae_decode             post_quant_conv + decoder -> image in [0, 1]
=====================  =================================================================================

**KV cache — why per-stage graphs that return only the new keys/values.** The blocks take the
past keys/values as inputs of the exact cached length K and return only this stage's keys/values;
the host appends them. Reasons: (1) Core ML has no ``index_copy``/``scatter`` into a static buffer
worth the name, and a one-hot write costs a full cache pass; (2) ``torch.export`` specialises
dimensions of size 0 and 1, so the first stage (no past) is its own graph ``ar_context`` instead of a
zero-length cache; (3) with K and l as bounded dynamic dimensions one ``ar_stage`` graph serves every
later stage, and ExecuTorch methods / Core ML multifunction packages share one copy of the weights
between ``ar_context`` and ``ar_stage``. The final stage runs ``ar_stage`` too and its new
keys/values are dropped. The cost is the host-side append (README, "Performance").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hartkit.loop.plan import LoopInfo, kv_cache_len
from hartkit.loop.resample import area_matrix, bicubic_matrix
from hartkit.model.checkpoint import HART


@dataclass(frozen=True)
class Dim:
    """A bounded dynamic dimension (inclusive bounds)."""

    name: str
    min: int
    max: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" | "int64"
    shape: tuple[int | Dim, ...]

    def concrete(self, **sizes: int) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else sizes[d.name] for d in self.shape)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [d if isinstance(d, int) else {"dim": d.name, "min": d.min, "max": d.max} for d in self.shape],
        }


@dataclass
class GraphSpec:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    build: Callable[[], nn.Module]  # -> module whose forward takes the inputs positionally
    example_sizes: dict[str, int] = field(default_factory=dict)  # a value for every Dim, for tracing
    weights: str = ""  # which weights it holds: "text_encoder" | "ar_transformer" | "diffusion_head" | "vae"

    @property
    def dims(self) -> dict[str, Dim]:
        out: dict[str, Dim] = {}
        for spec in self.inputs:
            for d in spec.shape:
                if isinstance(d, Dim):
                    out[d.name] = d
        return out

    def example_inputs(self, seed: int = 0) -> tuple[Tensor, ...]:
        """Random inputs of the example sizes (tracing only; parity checks use recorded real inputs)."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for spec in self.inputs:
            shape = spec.concrete(**self.example_sizes)
            if spec.dtype == "int64":
                out.append(torch.randint(0, 2, shape, generator=gen, dtype=torch.int64))
            else:
                out.append(torch.randn(shape, generator=gen))
        return tuple(out)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "weights": self.weights,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }


# ----------------------------------------------------------------------------- wrapper modules
# Each wraps a piece of the reference model so that forward() takes and returns plain tensors.


class TextEncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module, system_length: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.system_length = system_length

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.encoder(input_ids, attention_mask)[:, self.system_length :].float()


class ConditionGraph(nn.Module):
    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.tr = transformer

    def forward(self, context: Tensor, context_mask_2b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cond = self.tr.condition_tokens(context)
        block_mods, head_mod = self.tr.modulations(cond, context_mask_2b > 0.5)
        return block_mods, head_mod, self.tr.context_stage_input(cond)


class ARContextGraph(nn.Module):
    """Stage 0 (llama attention): inputs ``x, block_mods, cos, sin``."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.tr = transformer

    def forward(self, x: Tensor, block_mods: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.tr.blocks_forward(x, block_mods, cos, sin, None, None)


class ARStageGraph(nn.Module):
    """Stages >= 1 (llama attention): inputs ``x, block_mods, cos, sin, past_k, past_v``."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.tr = transformer

    def forward(self, x: Tensor, block_mods: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor,
                past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.tr.blocks_forward(x, block_mods, cos, sin, past_k, past_v)


# gpt2 attention has no RoPE tables (torch.export wants explicit positional inputs, no *args).
class ARContextGraphNoRope(ARContextGraph):
    def forward(self, x: Tensor, block_mods: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        return self.tr.blocks_forward(x, block_mods, None, None, None, None)


class ARStageGraphNoRope(ARStageGraph):
    def forward(self, x: Tensor, block_mods: Tensor, past_k: Tensor,  # type: ignore[override]
                past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.tr.blocks_forward(x, block_mods, None, None, past_k, past_v)


class ARHeadGraph(nn.Module):
    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.tr = transformer

    def forward(self, h: Tensor, head_mod: Tensor) -> Tensor:
        return self.tr.logits(h, head_mod)


class ResidualGraph(nn.Module):
    """One discrete stage's residual update with resampling as fixed matrices (no bicubic/area ops).

    ``f_hat' = f_hat + phi_k(U h U^T)`` with U the bicubic matrix [last, pn]; the next stage's input
    is ``word_embed(P f_hat' P^T) + lvl_embed[si+1]`` with P the area matrix [pn', last], repeated for
    the two CFG rows.
    """

    def __init__(self, model: HART, si: int, phi: int) -> None:
        super().__init__()
        pns = model.cfg.patch_nums
        self.pn, self.next_pn, last = pns[si], pns[si + 1], pns[-1]
        self.si, self.phi = si, phi
        self.vae, self.tr = model.vae, model.transformer
        self.register_buffer("up", torch.from_numpy(bicubic_matrix(last, self.pn)).float(), persistent=False)
        self.register_buffer("down", torch.from_numpy(area_matrix(self.next_pn, last)).float(), persistent=False)

    def forward(self, f_hat: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
        B, n, C = latents.shape
        h = latents.transpose(1, 2).reshape(B, C, self.pn, self.pn)
        h_up = self.up @ h @ self.up.T
        f_next = f_hat + self.vae.phi(self.phi, h_up)
        small = self.down @ f_next @ self.down.T  # [B, C, pn', pn']
        tokens = small.flatten(2).transpose(1, 2)
        return f_next, self.tr.token_stage_input(tokens, self.si + 1)


class DiffusionConditionGraph(nn.Module):
    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.tr = transformer

    def forward(self, h: Tensor, latents: Tensor) -> Tensor:
        return self.tr.diffusion_condition(h, latents)


class DiffusionCondEmbedGraph(nn.Module):
    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.net = transformer.diffloss.net

    def forward(self, z: Tensor) -> Tensor:
        return self.net.cond_embed(z)


class DenoiseGraph(nn.Module):
    """``net(x, t, z)`` with ``cond_embed(z)`` precomputed: out = [eps | variance interpolant]."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.net = transformer.diffloss.net

    def forward(self, x: Tensor, t: Tensor, cond_embedding: Tensor) -> Tensor:
        y = self.net.time_embed(t) + cond_embedding
        return self.net.forward_embedded(x, y)


class VAEDecodeGraph(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, f_hat: Tensor) -> Tensor:
        return (self.vae.decode(f_hat) + 1) * 0.5


# ----------------------------------------------------------------------------- the specs


def f32(name: str, *shape: int | Dim) -> TensorSpec:
    return TensorSpec(name, "float32", tuple(shape))


def i64(name: str, *shape: int | Dim) -> TensorSpec:
    return TensorSpec(name, "int64", tuple(shape))


# One attention call's fp32 scores [2 rows, heads, queries, keys] stay under this in the exported graphs:
# ONNX Runtime and XNNPACK materialise them (torch's CPU SDPA does not). At 1024 px the final stage
# would hold 2 x 24 x 4096 x 9751 x 4 B = 7.7 GB (and as much again for the softmax) at once.
ATTENTION_SCORES_MAX_BYTES = 1 << 30


def limit_attention_memory(model: HART, max_bytes: int = ATTENTION_SCORES_MAX_BYTES) -> int:
    """Set the AR attention's heads per call (the largest divisor of the head count whose scores fit
    ``max_bytes`` at the final stage); returns it (= num_heads: one call, as in the reference)."""
    cfg = model.cfg
    H, pns = cfg.num_heads, tuple(cfg.patch_nums)
    queries = max(pns[-1] ** 2, cfg.context_token)
    keys = kv_cache_len(pns, cfg.context_token) + pns[-1] ** 2
    per_head = 2 * queries * keys * 4
    step = next((s for s in range(H, 0, -1) if H % s == 0 and s * per_head <= max_bytes), 1)
    for blk in model.transformer.blocks:
        blk.attn.heads_per_call = 0 if step == H else step
    return step


def hart_graph_specs(model: HART, text_encoder: nn.Module | None = None, system_length: int | None = None,
                     num_phis: int | None = None) -> list[GraphSpec]:
    """Every graph of one HART export, in loop order. The text encoder is optional."""
    limit_attention_memory(model)
    cfg, tr = model.cfg, model.transformer
    C, D, depth, H, d = cfg.embed_dim, cfg.context_dim, cfg.depth, cfg.num_heads, cfg.head_dim
    T, V, Cz = cfg.context_token, model.vocab_size, model.latent_dim
    pns = tuple(cfg.patch_nums)
    last = pns[-1]
    n_last = last * last
    k_max = kv_cache_len(pns, T)
    rows = 2  # [cond; uncond]
    width = cfg.diff_width
    side = last * model.vae_cfg.downsample

    # Stages >= 1 have l = pn^2 tokens and K = keys cached before them.
    l_dim = Dim("tokens", min(4, pns[1] ** 2), n_last)
    k_dim = Dim("past", T, k_max)
    n_dim = Dim("rows", 1, n_last)
    dn_dim = Dim("diffusion_rows", 1, rows * n_last)

    rope = cfg.attn_type == "llama"

    def rope_specs(length: int | Dim) -> list[TensorSpec]:
        # RoPE tables are host-computed inputs (loop/rope.py); gpt2 attention has none.
        if not rope:
            return []
        return [f32("cos", rows, length, d), f32("sin", rows, length, d)]

    specs: list[GraphSpec] = []
    if text_encoder is not None:
        if system_length is None:
            raise ValueError("system_length is needed with a text encoder")
        S = system_length
        hidden = int(text_encoder.hidden_size)
        specs.append(GraphSpec(
            "text_encoder", [i64("input_ids", 1, S + T), i64("attention_mask", 1, S + T)],
            [f32("context", 1, T, hidden)], lambda: TextEncoderGraph(text_encoder, S), weights="text_encoder"))
    specs += [
        GraphSpec("condition", [f32("context", 1, T, D), f32("context_mask_2b", rows, T)],
                  [f32("block_mods", depth, rows, 6, C), f32("head_mod", rows, 2, C), f32("x", rows, T, C)],
                  lambda: ConditionGraph(tr), weights="ar_transformer"),
        GraphSpec("ar_context",
                  [f32("x", rows, T, C), f32("block_mods", depth, rows, 6, C), *rope_specs(T)],
                  [f32("h", rows, T, C), f32("new_k", depth, rows, H, T, d), f32("new_v", depth, rows, H, T, d)],
                  lambda: (ARContextGraph if rope else ARContextGraphNoRope)(tr), weights="ar_transformer"),
        GraphSpec("ar_stage",
                  [f32("x", rows, l_dim, C), f32("block_mods", depth, rows, 6, C), *rope_specs(l_dim),
                   f32("past_k", depth, rows, H, k_dim, d), f32("past_v", depth, rows, H, k_dim, d)],
                  [f32("h", rows, l_dim, C), f32("new_k", depth, rows, H, l_dim, d), f32("new_v", depth, rows, H, l_dim, d)],
                  lambda: (ARStageGraph if rope else ARStageGraphNoRope)(tr), example_sizes={"tokens": pns[min(2, len(pns) - 1)] ** 2, "past": T + 4},
                  weights="ar_transformer"),
        GraphSpec("ar_head", [f32("h", rows, n_dim, C), f32("head_mod", rows, 2, C)], [f32("logits", rows, n_dim, V)],
                  lambda: ARHeadGraph(tr), example_sizes={"rows": 4}, weights="ar_transformer"),
    ]
    phis = model.vae.num_phis if num_phis is None else num_phis
    from hartkit.loop.resample import phi_index

    for si in range(len(pns) - 1):
        n, n_next = pns[si] ** 2, pns[si + 1] ** 2
        k = phi_index(si, len(pns), phis)
        specs.append(GraphSpec(
            f"residual_{si}", [f32("f_hat", 1, Cz, last, last), f32("latents", 1, n, Cz)],
            [f32("f_hat_next", 1, Cz, last, last), f32("x_next", rows, n_next, C)],
            (lambda si=si, k=k: ResidualGraph(model, si, k)), weights="vae"))
    specs += [
        GraphSpec("diffusion_condition", [f32("h", rows, n_last, C), f32("latents", 1, n_last, Cz)],
                  [f32("z", rows, n_last, C)], lambda: DiffusionConditionGraph(tr), weights="ar_transformer"),
        GraphSpec("diffusion_cond_embed", [f32("z", dn_dim, C)], [f32("cond_embedding", dn_dim, width)],
                  lambda: DiffusionCondEmbedGraph(tr), example_sizes={"diffusion_rows": 8}, weights="diffusion_head"),
        GraphSpec("denoise", [f32("x", dn_dim, Cz), f32("t", 1), f32("cond_embedding", dn_dim, width)],
                  [f32("out", dn_dim, 2 * Cz)], lambda: DenoiseGraph(tr), example_sizes={"diffusion_rows": 8},
                  weights="diffusion_head"),
        GraphSpec("vae_decode", [f32("f_hat", 1, Cz, last, last)], [f32("image", 1, 3, side, side)],
                  lambda: VAEDecodeGraph(model.vae), weights="vae"),
    ]
    return specs


def dynamic_shapes(spec: GraphSpec) -> tuple | None:
    """``torch.export`` dynamic shapes of a graph's inputs, from its bounded :class:`Dim` s."""
    dims = {name: torch.export.Dim(name, min=d.min, max=d.max) for name, d in spec.dims.items()}
    if not dims:
        return None
    out = []
    for inp in spec.inputs:
        axes = {i: dims[d.name] for i, d in enumerate(inp.shape) if not isinstance(d, int)}
        out.append(axes or None)
    return tuple(out)


def specs_by_name(specs: Sequence[GraphSpec]) -> dict[str, GraphSpec]:
    return {s.name: s for s in specs}


def run_graph(module: nn.Module, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Eager torch run of a wrapper on numpy inputs (the torch backend and parity checks use it)."""
    with torch.no_grad():
        out = module(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
    if isinstance(out, Tensor):
        out = (out,)
    return [o.detach().cpu().numpy() for o in out]


def loop_info(model: HART, system_length: int) -> dict:
    """The manifest's ``loop`` section: what the torch-free host loop needs, plus the image size."""
    cfg = model.cfg
    loop = LoopInfo(
        patch_nums=tuple(cfg.patch_nums),
        context_token=cfg.context_token,
        vocab_size=model.vocab_size,
        latent_dim=model.latent_dim,
        head_dim=cfg.head_dim,
        attn_type=cfg.attn_type,
        num_phis=int(model.vae.num_phis),
        num_sampling_steps=str(cfg.num_sampling_steps),
        system_length=int(system_length),
        default_cfg=float(model.default_cfg),  # the checkpoint's recommended guidance (else HART's 4.5)
    )
    return {**loop.to_dict(), "image_size": cfg.patch_nums[-1] * model.vae_cfg.downsample}
