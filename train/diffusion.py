"""Phase 3's loss for the residual diffusion head: IDDPM's ``training_losses`` (epsilon MSE + the
variational-bound term that trains the learned variance), on the schedule the sampler uses."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from hartkit.loop.schedule import IDDPMSchedule


class DiffusionTrainingLoss:
    """IDDPM ``training_losses`` for DiffLoss: 1000-step cosine schedule, epsilon prediction with the
    plain MSE, plus the variational-bound term that trains the learned-range variance (with the mean
    frozen), in bits per dimension; the decoder NLL replaces the KL at t = 0 (as upstream)."""

    def __init__(self) -> None:
        s = IDDPMSchedule.create("")  # no respacing: the 1000 training steps
        def t32(a):
            return torch.tensor(np.asarray(a), dtype=torch.float32)
        self.num_timesteps = s.num_steps
        self.sqrt_ac = t32(np.sqrt(s.alphas_cumprod))
        self.sqrt_1m_ac = t32(np.sqrt(1.0 - s.alphas_cumprod))
        self.sqrt_recip_ac = t32(s.sqrt_recip_alphas_cumprod)
        self.sqrt_recipm1_ac = t32(s.sqrt_recipm1_alphas_cumprod)
        self.coef1 = t32(s.posterior_mean_coef1)
        self.coef2 = t32(s.posterior_mean_coef2)
        self.min_log = t32(s.posterior_log_variance_clipped)
        self.max_log = t32(s.log_betas)

    def to(self, device: str | torch.device) -> "DiffusionTrainingLoss":
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        return self

    def __call__(self, net, x0: Tensor, z: Tensor, gen: torch.Generator) -> Tensor:
        """Mean loss over rows of ``x0 [N, C]`` (targets / vae_scale) with conditions ``z [N, D]``."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=gen, device=x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        mse, vb = self.terms(net, x0, z, t, noise)
        return (mse + vb).mean()

    def terms(self, net, x0: Tensor, z: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row ``(mse, vb)`` at timesteps ``t [N]`` (int) with the given ``noise [N, C]``."""
        C = x0.shape[1]
        col = lambda a: a[t].unsqueeze(1)  # noqa: E731
        x_t = col(self.sqrt_ac) * x0 + col(self.sqrt_1m_ac) * noise
        out = net(x_t, t.float(), z)
        eps, v = out[:, :C], out[:, C:]
        mse = (noise - eps).square().mean(dim=1)
        # VB term: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) with the mean's gradient stopped.
        true_mean = col(self.coef1) * x0 + col(self.coef2) * x_t
        true_logvar = col(self.min_log)
        pred_x0 = col(self.sqrt_recip_ac) * x_t - col(self.sqrt_recipm1_ac) * eps.detach()
        model_mean = col(self.coef1) * pred_x0 + col(self.coef2) * x_t
        frac = (v + 1) / 2
        model_logvar = frac * col(self.max_log) + (1 - frac) * col(self.min_log)
        kl = 0.5 * (-1.0 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                    + (true_mean - model_mean).square() * torch.exp(-model_logvar))
        kl = kl.mean(dim=1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=1) / math.log(2.0)
        return mse, torch.where(t == 0, nll, kl)


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Upstream's (ADM's) likelihood of x in [-1, 1] discretised to 256 bins."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))

