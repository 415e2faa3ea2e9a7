"""HART's residual diffusion head: a per-token MLP denoiser and its IDDPM sampler.

Upstream: ``hart/modules/diffusion/diffloss.py`` (``DiffLoss``, ``SimpleMLPAdaLN``), itself MAR's
(LTH14/mar) head. At the final stage every image token gets a condition vector z (from the AR
transformer) and the head samples a 32-d residual latent in a few IDDPM steps.

Differences from upstream, all numerically neutral for the returned rows:

* every random draw is an input (``noise_init``, ``step_noise``) instead of ``torch.randn``;
* only the cond half of the latent is carried: upstream's ``forward_with_cfg`` never reads the
  uncond half of x (it feeds ``[x_cond; x_cond]``), and the caller discards that half anyway;
* ``cond_embed(z)`` is computed once per call and the time embedding once per step on a single row,
  then broadcast (upstream recomputes both for every row and step; same math, the last float bit
  can differ only through BLAS blocking).

Training (``DiffLoss.forward``) and weight init are not reproduced: we only load released weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from hartkit.loop.schedule import VAE_SCALE, IDDPMSchedule


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (GLIDE/DiT style) followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """[N] timesteps -> [N, dim] features: cos half first, then sin (the weights expect this order)."""
        half = dim // 2
        # Computed in the forward, not stored: a non-persistent buffer would stay on the meta device
        # when the model is built there and then loaded. Same float32 op order as upstream.
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.to(torch.float32)[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """AdaLN residual MLP block: h + gate * MLP(LN(h) * (1 + scale) + shift)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)  # affine, unlike the final layer's norm
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels),
            nn.SiLU(),
            nn.Linear(channels, channels),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # this chunk order is in the weights
        h = self.mlp(modulate(self.in_ln(x), shift, scale))
        return x + gate * h


class FinalLayer(nn.Module):
    """DiT's final layer: non-affine LN, AdaLN shift/scale, then a linear projection."""

    def __init__(self, model_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The denoiser: (noisy latent x, original timestep t, condition c) -> [eps | v] per row."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        z_channels: int,
        num_res_blocks: int,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks

        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)

    def embed(self, t: Tensor, c: Tensor) -> Tensor:
        """The AdaLN conditioning y = TimeEmb(t) + cond_embed(c); t is [N] or [1] (broadcast)."""
        return self.time_embed(t) + self.cond_embed(c)

    def forward_embedded(self, x: Tensor, y: Tensor) -> Tensor:
        """The MLP given the conditioning y ([N, w] or [1, w]); returns [N, out_channels]."""
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self.forward_embedded(x, self.embed(t, c))


def p_sample_step(
    schedule: IDDPMSchedule,
    j: int,
    x: Tensor,
    eps: Tensor,
    v: Tensor,
    noise: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """One IDDPM ``p_sample`` update from respaced step j (float32; mirrors ``IDDPMSchedule.step``).

    EPSILON mean type, LEARNED_RANGE variance, ``clip_denoised=True``. At j == 0 no noise is added
    (upstream multiplies its draw by zero).
    """
    s = schedule.step_scalars(j)
    # Upstream's constants are float32 (_extract_into_tensor(...).float()); python floats of the
    # float32 values multiply a float32 tensor exactly the same way. Kept fp32 even for fp16 nets:
    # sqrt(1/alpha-bar) is ~2e4 at the noisiest step.
    x0 = (float(s.sqrt_recip_alphas_cumprod) * x - float(s.sqrt_recipm1_alphas_cumprod) * eps).clamp(-1.0, 1.0)
    mean = float(s.posterior_mean_coef1) * x0 + float(s.posterior_mean_coef2) * x
    if j == 0:
        return mean
    frac = (v + 1) / 2  # v in [-1, 1] interpolates log-variance between the two IDDPM bounds
    log_variance = frac * float(s.max_log) + (1 - frac) * float(s.min_log)
    return mean + torch.exp(0.5 * log_variance) * noise * temperature


class DiffLoss(nn.Module):
    """Upstream's wrapper: holds the net (state-dict keys ``diffloss.net.*``) and its sampler.

    Note the argument order: (target_channels, z_channels, width, depth, ...); upstream's is
    (target_channels, z_channels, depth, width, ...). Pass them by keyword.
    """

    def __init__(
        self,
        target_channels: int,
        z_channels: int,
        width: int,
        depth: int,
        num_sampling_steps: str = "8",
    ) -> None:
        super().__init__()
        self.vae_scale = VAE_SCALE
        self.in_channels = target_channels
        # out = 2 * target: eps and the learned-range variance interpolator v.
        self.net = SimpleMLPAdaLN(
            in_channels=target_channels,
            model_channels=width,
            out_channels=target_channels * 2,
            z_channels=z_channels,
            num_res_blocks=depth,
        )
        self.num_sampling_steps = num_sampling_steps
        # Plain numpy tables, not buffers: nothing extra in the state dict.
        self.schedule = IDDPMSchedule.create(num_sampling_steps)

    def sample(
        self,
        z: Tensor,
        cfg: float,
        noise_init: Tensor,
        step_noise: Tensor,
        temperature: float = 1.0,
    ) -> Tensor:
        """Sample residual latents for N tokens; returns [N, Cvae] float32, already times ``vae_scale``.

        z: [2N, C] conditions, rows [cond N; uncond N]. With ``cfg == 1.0`` exactly, only the first N
        rows are used and may be all that is passed.
        noise_init: [N, Cvae], the starting latent (upstream's ``x = [n; n]``, of which only n matters).
        step_noise: [S, N, Cvae]; ``step_noise[i]`` is used at the i-th iteration, i = 0 being the
        noisiest step j = S-1; the last one (j = 0) is unused, as upstream draws it and multiplies by 0.

        CFG is HART's form eps = (1 + cfg) * eps_cond - cfg * eps_uncond, and v is the cond rows' own.
        Quirk: upstream tests ``cfg == 1.0`` and then skips guidance altogether (eps = eps_cond), so
        cfg = 1.0 is *unguided*, whereas the formula at cfg = 1.0 would give 2 eps_c - eps_u; cfg
        values next to 1.0 are strongly guided. In that branch upstream draws independent noise for
        the uncond rows; they never touch the cond rows, so they are simply not computed here.
        """
        n_tokens, cvae = noise_init.shape
        num_steps = self.schedule.num_steps
        if cvae != self.in_channels:
            raise ValueError(f"noise_init has {cvae} channels, the head samples {self.in_channels}")
        if tuple(step_noise.shape) != (num_steps, n_tokens, cvae):
            raise ValueError(f"step_noise must be {(num_steps, n_tokens, cvae)}, got {tuple(step_noise.shape)}")
        guided = not cfg == 1.0  # upstream's exact test
        if guided and z.shape[0] != 2 * n_tokens:
            raise ValueError(f"with CFG, z needs 2N = {2 * n_tokens} rows [cond; uncond], got {z.shape[0]}")
        if not guided and z.shape[0] not in (n_tokens, 2 * n_tokens):
            raise ValueError(f"z needs N = {n_tokens} (or 2N) rows, got {z.shape[0]}")

        net_dtype = self.net.input_proj.weight.dtype
        cond = self.net.cond_embed((z if guided else z[:n_tokens]).to(net_dtype))
        timesteps = self.schedule.timesteps
        x = noise_init.to(torch.float32)
        for i, j in enumerate(reversed(range(num_steps))):
            t = torch.full((1,), float(timesteps[j]), dtype=torch.float32, device=x.device)
            y = self.net.time_embed(t) + cond
            x_in = torch.cat([x, x], dim=0) if guided else x
            out = self.net.forward_embedded(x_in.to(net_dtype), y).to(torch.float32)
            eps, v = out[:n_tokens, :cvae], out[:n_tokens, cvae:]
            if guided:
                eps = eps * (1 + cfg) - cfg * out[n_tokens:, :cvae]
            x = p_sample_step(self.schedule, j, x, eps, v, step_noise[i].to(torch.float32), temperature)
        return x * self.vae_scale


__all__ = ["SimpleMLPAdaLN", "DiffLoss", "TimestepEmbedder", "ResBlock", "FinalLayer", "p_sample_step", "VAE_SCALE"]
