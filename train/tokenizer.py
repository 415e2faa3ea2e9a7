"""Phase 1, the hybrid tokenizer: VAR's multi-scale residual quantization with its VQ loss, the
reconstruction losses, dead-code re-seeding, and the tokenization of the training pool for phase 3."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hartkit.loop.metrics import psnr_from_mse
from hartkit.model.checkpoint import HART
from hartkit.train.config import TrainConfig
from hartkit.train.schedule import PhaseStop, bar, lr_at, set_lr


def to_model_range(images_u8: np.ndarray) -> Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), on the tensors' device. The MSE is floored
    at 1e-12 so that a training log never holds an infinity."""
    return psnr_from_mse(max(F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item(), 1e-12), peak=2.0)


def quantize_for_training(vae, f: Tensor, beta: float) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """VAR's multi-scale residual quantization with its VQ loss (``VectorQuantizer2.forward``).

    Returns ``(f_hat_discrete, vq_loss, idx_list, queries)``; ``f_hat_discrete`` carries gradients
    to the codebook and phi convs only (the caller adds the straight-through path to the encoder).
    ``queries`` are the vectors looked up at each scale (to re-seed dead codes).
    """
    pns = vae.quantize.v_patch_nums
    B, C, H, W = f.shape
    SN = len(pns)
    f_ng = f.detach()
    f_rest, f_hat = f_ng, torch.zeros_like(f_ng)
    vq_loss = f.new_zeros(())
    idx_list, queries = [], []
    for si, pn in enumerate(pns):
        z = f_rest if si == SN - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
        z = z.detach().permute(0, 2, 3, 1).reshape(-1, C)
        idx = vae.quantize.nearest_index(z)
        h = vae.quantize.embedding(idx).reshape(B, pn, pn, C).permute(0, 3, 1, 2)
        if si != SN - 1:
            h = vae.phi(vae.phi_index(si, SN), F.interpolate(h, size=(H, W), mode="bicubic"))
        f_hat = f_hat + h
        f_rest = f_rest - h
        vq_loss = vq_loss + beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_ng)
        idx_list.append(idx)
        queries.append(z)
    return f_hat, vq_loss / SN, idx_list, queries


def train_tokenizer(model: HART, pool: np.ndarray, cfg: TrainConfig, log: dict, init_codebook: bool = True) -> None:
    vae = model.vae.train()
    V = vae.quantize.vocab_size
    dev = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.95), weight_decay=0.0)
    hits = torch.zeros(V, device=dev)
    history = []
    if init_codebook:
        seed_codebook(vae, pool, cfg, gen)
    pbar = bar(range(cfg.vae_steps), cfg, desc="tokenizer", unit="step")
    for step in pbar:
        set_lr(opt, lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup))
        batch = pool[torch.randint(len(pool), (cfg.vae_batch,), generator=gen).numpy()]
        x = to_model_range(batch).to(dev)
        f = vae.encode(x)
        f_disc, vq_loss, idx_list, queries = quantize_for_training(vae, f, cfg.vq_beta)
        # Hybrid: half of the samples decode the continuous latent (f_disc + residual == f), half the
        # discrete-only one; both straight-through to the encoder.
        discrete = (torch.arange(x.shape[0], device=dev) % 2 == 1).view(-1, 1, 1, 1)
        f_dec = torch.where(discrete, (f_disc.detach() - f.detach()) + f, f)
        rec = vae.decoder(vae.post_quant_conv(f_dec))
        # Shapes cover ~15 % of a scene; weighting their pixels up makes the decoder learn their
        # colours and outlines much sooner (the 32-channel GroupNorm(32) layers normalise each
        # channel per image, so colour is hard to carry; every image's corner is background).
        weight = 1.0 + cfg.fg_weight * ((x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.05).float()
        rec_loss = ((rec - x).abs() * weight).mean() + ((rec - x).square() * weight).mean()
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            hits += torch.bincount(torch.cat(idx_list), minlength=V).float()
            if cfg.restart_every and (step + 1) % cfg.restart_every == 0 and step < 0.6 * cfg.vae_steps:
                dead = (hits == 0).nonzero().flatten()
                if len(dead):
                    q = torch.cat(queries)
                    pick = torch.randint(len(q), (len(dead),), generator=gen)
                    noise = torch.randn(len(dead), q.shape[1], generator=gen).to(dev)
                    vae.quantize.embedding.weight[dead] = q[pick.to(dev)] + 0.01 * noise
                hits.zero_()
        if step % 20 == 0 or step == cfg.vae_steps - 1:
            rec_c = tensor_psnr(rec[~discrete.flatten()].detach(), x[~discrete.flatten()])
            rec_d = tensor_psnr(rec[discrete.flatten()].detach(), x[discrete.flatten()])
            history.append({"step": step, "rec": rec_loss.item(), "vq": vq_loss.item(),
                            "psnr_hybrid": rec_c, "psnr_discrete": rec_d})
            pbar.set_postfix(rec=f"{rec_loss.item():.4f}", vq=f"{vq_loss.item():.4f}",
                             psnr_h=f"{rec_c:.1f}", psnr_d=f"{rec_d:.1f}")
        if PhaseStop.check(log, "tokenizer", step):
            break
    vae.eval()
    log.setdefault("tokenizer_history", []).extend(history)


@torch.no_grad()
def seed_codebook(vae, pool: np.ndarray, cfg: TrainConfig, gen: torch.Generator) -> None:
    """Data-dependent codebook init: random encoder outputs of every scale (plus a little noise)."""
    V = vae.quantize.vocab_size
    dev = vae.quantize.embedding.weight.device
    first = to_model_range(pool[torch.randint(len(pool), (64,), generator=gen).numpy()]).to(dev)
    _, _, _, queries = quantize_for_training(vae, vae.encode(first), cfg.vq_beta)
    q = torch.cat(queries)
    pick = torch.randint(len(q), (V,), generator=gen).to(dev)
    vae.quantize.embedding.weight.copy_(q[pick] + 0.01 * torch.randn(V, q.shape[1], generator=gen).to(dev))


@torch.no_grad()
def tokenize_pool(model: HART, pool: np.ndarray, cfg: TrainConfig) -> tuple[Tensor, Tensor, dict]:
    """Ground-truth token indices of every scale [N, sum pn^2] and the last-scale residual target
    ``f_rest_last`` [N, n_last, Cvae] (upstream's ``last_layer_gt``), plus reconstruction PSNRs."""
    vae = model.vae.eval()
    idx_all, rest_all = [], []
    psnr_h, psnr_d = [], []
    for i in bar(range(0, len(pool), 128), cfg, desc="tokenizing", unit="batch"):
        x = to_model_range(pool[i : i + 128]).to(cfg.device)
        idx_list, f_hats, f_rest_last = vae.quantize_residual(vae.encode(x))
        idx_all.append(torch.cat(idx_list, dim=1))
        rest_all.append(f_rest_last)
        if i < 1024:  # reconstruction quality on the first images
            f_disc = f_hats[-1]
            f_full = vae.encode(x)
            psnr_d.append(tensor_psnr(vae.decode(f_disc), x))
            psnr_h.append(tensor_psnr(vae.decode(f_full), x))
    stats = {"psnr_discrete_db": float(np.mean(psnr_d)), "psnr_hybrid_db": float(np.mean(psnr_h))}
    return torch.cat(idx_all), torch.cat(rest_all), stats

