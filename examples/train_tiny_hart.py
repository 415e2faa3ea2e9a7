"""Train a tiny HART end to end, on CPU or one GPU: the demo model shipped in ``assets/demo``.

    bash examples/reproduce_demo.sh                                 # the shipped model, run by run
    python examples/train_tiny_hart.py --out /tmp/smoke --smoke     # a few steps of a tiny config

Data: the procedural scenes of :mod:`hartkit.validate.scenes` (train split only). Three phases,
following the public HART/VAR code (``hart_transformer_t2i.py: forward``, ``hart_hybrid_quantize.py``,
``diffusion/gaussian_diffusion.py: training_losses``); HART's own training scripts are not public,
so loss weights and schedules are ours:

1. **Hybrid tokenizer** (VAE encoder/decoder, multi-scale residual VQ with the phi convs): L1 + L2
   reconstruction (shape pixels weighted ``1 + fg_weight``) + VAR's VQ loss
   ``mean_s [beta * |sg(f_hat_s) - f|^2 + |f_hat_s - sg(f)|^2]``, straight-through to the encoder.
   As HART's hybrid quantizer, the decoder sees the continuous latent (discrete + residual = f) or
   the discrete-only f_hat, half of the time each (per sample here, per batch upstream). No GAN,
   no perceptual loss. At this width (ch=32) every GroupNorm(32) of the full-resolution levels is a
   per-channel instance norm, which makes flat colours slow to learn: the tokenizer needs several
   thousand steps, and ``--tokenizer-only`` / ``--tokenizer-from`` let it be trained in stages.
2. **Text features**: a tiny random Qwen2 (frozen, never trained) encodes every caption once, with
   HART's system prompt, exactly as :class:`~hartkit.model.text_encoder.TextEncoder` does at
   inference. Its tokenizer is a byte-level BPE trained on the captions (one token per word).
3. **AR transformer + residual diffusion head**, jointly, with teacher forcing over all scales and
   upstream's block-causal mask (a token sees every token of its own and earlier scales; the
   context tokens are level 0). Cross-entropy on every scale's tokens (the last context position
   predicts the 1x1 scale); the diffusion head's DiffLoss (epsilon MSE + the learned-variance VB
   term, IDDPM cosine schedule, 1000 steps, ``diffusion_batch_mul`` copies per token) on the
   continuous residual ``f_rest_last - codebook[idx]`` / 0.6, conditioned on
   ``decoder_norm(h + word_embed(codebook[idx]))`` where idx is *sampled* from the model's own
   last-scale logits (top-k 600, top-p 0.96), as upstream does. Conditioning dropout for CFG.

Deviations from upstream, on purpose: the dropped-condition rows get inference's unconditional
layout (zero context -> ``cond_BD = context_embed.bias``, RoPE positions 0) with probability
``cond_drop_rate`` (upstream tests ``randn < cond_drop_rate``, i.e. drops ~54 % of rows at 0.1);
no MaskGIT-style token dropping at the last scale (upstream trains on a random subset of the last
scale's tokens to save memory at 64x64 latents; ours has 8x8); the tokenizer's discrete path
applies no phi at the last scale, like inference and ``f_to_idxBl_and_frest`` (upstream's training
quantizer does apply it there); dead codebook entries are re-seeded from encoder outputs.

Writes ``OUT/llm``, ``OUT/tokenizer`` (official layout, safetensors), ``OUT/text_model``,
``OUT/training.json`` (settings, losses, timings) and ``OUT/README.md``.

On a shared machine prefer ``--threads 1``: with other jobs on the two cores, two torch threads
spend most of their time waiting for each other (measured: 6 s vs 1.4 s per tokenizer step).
``kill -USR1 <pid>`` ends the running phase early (the checkpoint is still written).
``--device cuda`` trains on a GPU (the demo's transformer runs: 7 and 4 min on an H100 against hours on
one CPU thread); ``--ar-seconds S`` sizes the transformer phase to about S seconds from the speed
measured during its warm-up and records the step count it chose, which ``--ar-steps`` replays.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from hartkit.loop.prompt import HART_SYSTEM_PROMPT
from hartkit.loop.rope import rope_cos_sin_1d, rope_cos_sin_2d, stage_positions
from hartkit.loop.schedule import IDDPMSchedule
from hartkit.model.checkpoint import HART, atomic_dir, build_hart, save_hart, write_json
from hartkit.model.presets import Preset, get_preset
from hartkit.model.sampler import filter_top_k_top_p
from hartkit.model.text_encoder import TextEncoder, make_tiny_text_model
from hartkit.validate import scenes



@dataclass
class TrainConfig:
    out: str = "assets/demo"
    preset: str = "demo"
    seed: int = 0
    threads: int = 2
    num_images: int = 16000  # training pool (train split), shared by both phases
    two_shape_prob: float = scenes.TWO_SHAPE_PROB
    # tokenizer
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vq_beta: float = 0.25
    fg_weight: float = 4.0  # extra reconstruction weight of shape pixels
    restart_every: int = 100  # dead-code re-seeding period (first 60 % of the steps)
    # AR transformer + diffusion head
    ar_steps: int = 1200
    ar_batch: int = 32
    ar_lr: float = 2e-3
    # (conditioning dropout and the diffusion batch multiplier are the model config's
    # cond_drop_rate and diffusion_batch_mul, as upstream)
    weight_decay: float = 0.05
    warmup: int = 100
    grad_clip: float = 2.0
    overwrite: bool = True
    progress: bool = True
    tokenizer_from: str | None = None  # reuse a trained tokenizer (a checkpoint folder) and skip phase 1
    tokenizer_only: bool = False  # stop after phase 1 (the transformer stays untrained)
    transformer_from: str | None = None  # continue training the transformer of a checkpoint folder
    text_lr: float = 0.0  # 0: the text model stays frozen (HART); > 0: fine-tuned jointly at this rate
    # Token weight of scale s in the CE: n_s ** -scale_weight, normalised to mean 1. 0 = uniform, as
    # upstream; > 0 moves weight to the coarse scales, which carry what the caption says.
    scale_weight: float = 0.0
    # AR transformer shape over the preset's (0 = the preset's): the checkpoint's config records it, so
    # every loader reads a wider/deeper demo model like any other.
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    text_layers: int = 0  # text model depth over the preset's (0 = the preset's)
    # Where the tensors live ("cpu", "cuda", "cuda:1", ...). Data generation stays on the CPU; on an
    # accelerator the in-loop sampling (diffusion timesteps/noise, the last scale's sampled tokens)
    # draws from a generator of that device, so a run is reproducible per device, not across devices.
    device: str = "cpu"
    # > 0: the transformer phase's step count is chosen at the end of its warm-up from the measured
    # speed so that the phase lasts about this long (ar_steps is then an upper bound). The schedule is
    # a function of the step alone, so `--ar-steps N` with the recorded N replays the same run.
    ar_seconds: float = 0.0

    @classmethod
    def smoke(cls, out: str) -> "TrainConfig":
        """A few steps of the ``tiny`` preset (32x32 px): exercises every line in seconds."""
        return cls(out=out, preset="tiny", num_images=16, vae_steps=2, vae_batch=4, ar_steps=2, ar_batch=4,
                   warmup=1, restart_every=1, progress=False)


# ----------------------------------------------------------------------------- helpers


class PhaseStop:
    """``kill -USR1 <pid>`` ends the running phase after the current step (the run goes on to the
    next phase and still writes a checkpoint): a way to fit a busy machine's time budget."""

    requested = False

    @classmethod
    def install(cls) -> None:
        import signal

        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda *_: setattr(cls, "requested", True))

    @classmethod
    def check(cls, log: dict, phase: str, step: int) -> bool:
        if cls.requested:
            cls.requested = False
            log.setdefault("stopped_early", {})[phase] = step + 1
            print(f"\n{phase}: stopped early after {step + 1} steps (SIGUSR1)", file=sys.stderr)
            return True
        return False


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def image_size_of(spec: Preset) -> int:
    return spec.vae.downsample * spec.vae.v_patch_nums[-1]


def to_model_range(images_u8: np.ndarray) -> Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def bar(iterable, cfg: TrainConfig, **kwargs):
    return tqdm(iterable, disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True, **kwargs)


# ----------------------------------------------------------------------------- text model


def write_text_model(out: Path, spec: Preset, seed: int) -> Path:
    """A frozen random tiny Qwen2 (``make_tiny_text_model``) whose tokenizer is re-trained on the
    scene captions, so every caption word is one token. config.json's special ids follow."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    make_tiny_text_model(out, seed=seed, **spec.text)
    vocab_size = spec.text.get("vocab_size", 512)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    captions = [s.caption() for s in scenes.specs_of_split("train")]
    tok.train_from_iterator([HART_SYSTEM_PROMPT] * 4 + captions, trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / stale).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(str(out))
    pad_id = tok.token_to_id("<|endoftext|>")
    config = json.loads((out / "config.json").read_text())
    config.update(bos_token_id=pad_id, eos_token_id=pad_id, pad_token_id=pad_id)
    write_json(out / "config.json", config)
    return out


class TextFeatures:
    """Context features of the distinct training captions, laid out as ``TextEncoder.encode`` does
    ([system prompt; caption] in, the caption's positions out). Frozen: computed once; trainable:
    recomputed (with gradients) for every batch. The tensors live where the encoder's weights do."""

    def __init__(self, encoder: TextEncoder, captions: list[str], max_length: int, trainable: bool) -> None:
        batch = encoder.tokenizer.encode(captions, max_length)
        if batch.truncation_message():
            raise ValueError(batch.truncation_message())
        ids, attention = batch.text_model_inputs()
        device = next(encoder.parameters()).device
        self.ids, self.attention = torch.from_numpy(ids).to(device), torch.from_numpy(attention).to(device)
        self.mask = torch.from_numpy(batch.mask).to(device)
        self.system_length = batch.system_length
        self.encoder, self.trainable = encoder, trainable
        encoder.requires_grad_(trainable)
        if not trainable:
            with torch.no_grad():
                self.context = torch.cat([self._run(torch.arange(i, min(i + 512, len(captions)), device=device))
                                          for i in range(0, len(captions), 512)])

    def _run(self, rows: Tensor) -> Tensor:
        return self.encoder(self.ids[rows], self.attention[rows])[:, self.system_length :].float()

    def __call__(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(context [n, T, D], context_mask [n, T])`` of caption ids ``rows``."""
        rows = rows.to(self.ids.device)
        return (self._run(rows) if self.trainable else self.context[rows]), self.mask[rows]


# ----------------------------------------------------------------------------- tokenizer training


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
            rec_c = psnr(rec[~discrete.flatten()].detach(), x[~discrete.flatten()])
            rec_d = psnr(rec[discrete.flatten()].detach(), x[discrete.flatten()])
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
            psnr_d.append(psnr(vae.decode(f_disc), x))
            psnr_h.append(psnr(vae.decode(f_full), x))
    stats = {"psnr_discrete_db": float(np.mean(psnr_d)), "psnr_hybrid_db": float(np.mean(psnr_h))}
    return torch.cat(idx_all), torch.cat(rest_all), stats


# ----------------------------------------------------------------------------- diffusion loss


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


# ----------------------------------------------------------------------------- AR training


def init_transformer(tr) -> None:
    """Upstream ``init_weights`` (VAR's): trunc-normal linears (std sqrt(1/3C)), zero biases, the
    head scaled by 0.02, AdaLN gates gamma ~ 1e-5 (each block starts as the identity), residual
    projections scaled by 1/sqrt(2 depth); the diffusion head as MAR (xavier, zeroed AdaLN and
    output layers)."""
    C = tr.C
    std = math.sqrt(1 / C / 3)
    with torch.no_grad():
        for name, m in tr.named_modules():
            if name.startswith("diffloss"):
                continue
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, torch.nn.Embedding):
                torch.nn.init.trunc_normal_(m.weight, std=std)
        tr.head.weight.mul_(0.02)
        tr.head_nm.ada_lin[-1].weight.mul_(0.5)
        for blk in tr.blocks:
            blk.attn.proj.weight.div_(math.sqrt(2 * tr.depth))
            for name in ("down_proj", "fc2"):
                if hasattr(blk.ffn, name):
                    getattr(blk.ffn, name).weight.div_(math.sqrt(2 * tr.depth))
            w = blk.ada_lin[-1].weight
            w[2 * C :].mul_(0.5)  # scales and shifts
            w[: 2 * C].mul_(1e-5)  # gamma1, gamma2
        net = tr.diffloss.net
        for m in net.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
        torch.nn.init.normal_(net.time_embed.mlp[0].weight, std=0.02)
        torch.nn.init.normal_(net.time_embed.mlp[2].weight, std=0.02)
        for blk in net.res_blocks:
            blk.adaLN_modulation[-1].weight.zero_()
            blk.adaLN_modulation[-1].bias.zero_()
        net.final_layer.adaLN_modulation[-1].weight.zero_()
        net.final_layer.adaLN_modulation[-1].bias.zero_()
        net.final_layer.linear.weight.zero_()
        net.final_layer.linear.bias.zero_()


def block_causal_bias(tr) -> Tensor:
    """Upstream ``attn_bias_for_masking``: query level >= key level -> 0, else -inf; [1,1,L,L]."""
    lvl = tr.lvl_1L[0]
    allowed = lvl[:, None] >= lvl[None, :]
    return torch.where(allowed, 0.0, -torch.inf).view(1, 1, len(lvl), len(lvl))


def rope_tables(tr, positions: np.ndarray) -> tuple[Tensor, Tensor]:
    """cos/sin [B, seq, head_dim] of a whole teacher-forced sequence: the context's 1-D positions,
    then every scale but the 1x1 at its 2-D coordinates offset by the last context position."""
    cfg = tr.cfg
    cos_parts, sin_parts = [], []
    c, s = rope_cos_sin_1d(positions, cfg.head_dim)
    cos_parts.append(c)
    sin_parts.append(s)
    offsets = positions[:, -1]
    for si in range(1, len(cfg.patch_nums)):
        c, s = rope_cos_sin_2d(stage_positions(cfg.patch_nums, si, offsets), cfg.head_dim)
        cos_parts.append(c)
        sin_parts.append(s)
    dev = tr.lvl_1L.device
    return (torch.from_numpy(np.concatenate(cos_parts, 1)).to(dev),
            torch.from_numpy(np.concatenate(sin_parts, 1)).to(dev))


def ar_losses(model: HART, context: Tensor, mask: Tensor, drop: Tensor, targets: Tensor, f_rest_last: Tensor,
              diffusion: DiffusionTrainingLoss, cfg: TrainConfig, gen: torch.Generator, bias: Tensor) -> dict[str, Tensor]:
    """Teacher-forced losses of one batch (upstream ``HARTForT2I.forward`` + ``forward_diff_loss``)."""
    tr, vae = model.transformer, model.vae
    T, pns = tr.T, tr.patch_nums
    B = context.shape[0]
    # Condition dropout as at inference: zero context (cond_BD = context_embed.bias), positions 0,
    # and the uncond rows' mask (only the first token; read by 'avg' pooling only).
    context = torch.where(drop.view(B, 1, 1), torch.zeros_like(context), context)
    uncond_mask = torch.zeros_like(mask)
    uncond_mask[:, 0] = True
    mask = torch.where(drop.view(B, 1), uncond_mask, mask)
    positions = np.cumsum(mask.cpu().numpy(), axis=1, dtype=np.int64) - 1
    positions[drop.cpu().numpy()] = 0

    cond_BD = tr.context_embed(tr.context_norm(context))
    block_mods, head_mod = tr.modulations(cond_BD, mask)
    split = [pn * pn for pn in pns]
    idx_list = list(targets.split(split, dim=1))
    with torch.no_grad():
        tf = vae.teacher_forcing_input(idx_list)  # [B, L-1, Cvae]
    x_img = tr.word_embed(tf) + tr.lvl_embed(tr.lvl_1L[0, T:])
    if tr.pos_1LC is not None:
        x_img = x_img + tr.pos_1LC[:, T:]
    x = torch.cat([tr.context_stage_input(cond_BD), x_img], dim=1)
    cos = sin = None
    if tr.cfg.attn_type == "llama":
        cos, sin = rope_tables(tr, positions)
    h, _, _ = tr.blocks_forward(x, block_mods, cos, sin, None, None, attn_bias=bias)

    logits = tr.logits(h[:, T - 1 :], head_mod)  # the last context position predicts the 1x1 scale
    ce_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce_tok.mean()
    if cfg.scale_weight:
        w = torch.cat([torch.full((n,), float(n) ** -cfg.scale_weight, device=ce_tok.device) for n in split])
        w = (w / w.mean()).repeat(B)
        ce_train = (ce_tok * w).mean()
    else:
        ce_train = ce
    with torch.no_grad():
        acc = (logits.argmax(-1) == targets).float().mean()

    # Residual diffusion head on the last scale.
    n_last = split[-1]
    codebook = vae.quantize.embedding.weight.detach()
    with torch.no_grad():
        last_logits = filter_top_k_top_p(logits[:, -n_last:].detach(), min(600, logits.shape[-1]), 0.96)
        idx_sampled = torch.multinomial(last_logits.softmax(-1).reshape(-1, logits.shape[-1]), 1,
                                        generator=gen).view(B, n_last)
    emb = F.embedding(idx_sampled, codebook)
    z = tr.decoder_norm(h[:, -n_last:] + tr.word_embed(emb))
    target = (f_rest_last - emb) / tr.diffloss.vae_scale
    mul = tr.cfg.diffusion_batch_mul
    diff = diffusion(tr.diffloss.net, target.reshape(B * n_last, -1).repeat(mul, 1),
                     z.reshape(B * n_last, -1).repeat(mul, 1), gen)
    return {"loss": ce_train + diff, "ce": ce, "diff": diff, "acc": acc}


def train_transformer(model: HART, cap_ids: Tensor, text: TextFeatures, targets: Tensor,
                      f_rest_last: Tensor, cfg: TrainConfig, log: dict) -> None:
    tr = model.transformer.train()
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    decay, no_decay = [], []
    for name, p in tr.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = list(tr.parameters())
    if text.trainable:
        text.encoder.train()
        groups.append({"params": list(text.encoder.parameters()), "weight_decay": 0.0,
                       "lr_scale": cfg.text_lr / cfg.ar_lr})
        params += list(text.encoder.parameters())
    opt = torch.optim.AdamW(groups, lr=cfg.ar_lr, betas=(0.9, 0.95))
    dev = torch.device(cfg.device)
    diffusion = DiffusionTrainingLoss().to(dev)
    # The batch draws stay on the CPU generator (the same rows on every device); in-loop sampling uses
    # one on the device (a CPU generator cannot feed CUDA kernels). On the CPU both are one generator.
    sample_gen = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(cfg.seed + 3)
    bias = block_causal_bias(tr)
    history = []
    total = cfg.ar_steps
    budget = StepBudget(cfg.ar_seconds, cfg.warmup) if cfg.ar_seconds > 0 else None
    pbar = bar(range(cfg.ar_steps), cfg, desc="transformer", unit="step")
    step = -1
    for step in pbar:
        if budget is not None and step == cfg.warmup:
            total = budget.steps(step, cfg.ar_steps, dev)
            pbar.total = total
            log["ar_seconds_chosen_steps"] = total
            log["ar_seconds_requested"] = cfg.ar_seconds
        if step >= total:
            break
        set_lr(opt, lr_at(step, total, cfg.ar_lr, cfg.warmup))
        if budget is not None:
            budget.tick(step, dev)
        rows = torch.randint(len(targets), (cfg.ar_batch,), generator=gen)
        context, mask = text(cap_ids[rows])
        drop = (torch.rand(cfg.ar_batch, generator=gen) < tr.cfg.cond_drop_rate).to(dev)
        rows = rows.to(dev)
        out = ar_losses(model, context, mask, drop, targets[rows], f_rest_last[rows], diffusion, cfg, sample_gen, bias)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if step % 20 == 0 or step == total - 1:
            rec = {k: float(v.detach()) for k, v in out.items()}
            history.append({"step": step, **rec})
            pbar.set_postfix(ce=f"{rec['ce']:.3f}", acc=f"{rec['acc']:.3f}", diff=f"{rec['diff']:.3f}")
        if PhaseStop.check(log, "transformer", step):
            break
    tr.eval()
    text.encoder.eval()
    log["transformer_history"] = history
    log["transformer_steps_done"] = step + 1 if step < total else total


class StepBudget:
    """``--ar-seconds``: times the second half of the warm-up and turns the rest of the budget into a
    step count at its end (the warm-up's rate does not depend on the total, so the chosen total fixes
    the whole schedule)."""

    def __init__(self, seconds: float, warmup: int) -> None:
        if warmup < 4:
            raise SystemExit("--ar-seconds needs a warm-up of at least 4 steps (--warmup) to time the steps")
        self.seconds, self.warmup = seconds, warmup
        self.start = time.time()
        self.mark: tuple[int, float] | None = None

    def tick(self, step: int, dev: torch.device) -> None:
        if step == self.warmup // 2:  # the first steps include one-off costs (allocations, kernel loads)
            self.mark = (step, self._now(dev))

    def steps(self, step: int, cap: int, dev: torch.device) -> int:
        """The total step count at ``step`` (end of warm-up), at most ``cap``."""
        assert self.mark is not None
        now = self._now(dev)
        rate = (step - self.mark[0]) / max(now - self.mark[1], 1e-6)
        left = self.seconds - (now - self.start)
        return max(step + 1, min(cap, step + int(left * rate)))

    @staticmethod
    def _now(dev: torch.device) -> float:
        if dev.type == "cuda":  # kernels run asynchronously: time what has finished
            torch.cuda.synchronize(dev)
        return time.time()


# ----------------------------------------------------------------------------- main


def shaped_preset(cfg: TrainConfig) -> Preset:
    """The preset with the transformer shape overrides of ``cfg`` applied."""
    spec = get_preset(cfg.preset)
    shape = {k: getattr(cfg, k) for k in ("embed_dim", "depth", "num_heads") if getattr(cfg, k)}
    text = {**spec.text, "num_layers": cfg.text_layers} if cfg.text_layers else spec.text
    if not shape:
        return replace(spec, text=text)
    hart = replace(spec.hart, **shape)
    if hart.embed_dim % hart.num_heads:
        raise SystemExit(f"--embed-dim {hart.embed_dim} is not a multiple of --num-heads {hart.num_heads}")
    return replace(spec, hart=hart, text=text)


def train(cfg: TrainConfig) -> Path:
    """Run every phase and write the checkpoint folder ``cfg.out``; returns its path."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    PhaseStop.install()
    spec = shaped_preset(cfg)
    size = image_size_of(spec)
    out = Path(cfg.out)
    log: dict = {"config": asdict(cfg), "image_size": size, "timings_s": {}}
    t_start = time.time()

    def lap(name: str, since: float) -> float:
        now = time.time()
        log["timings_s"][name] = round(now - since, 1)
        return now

    t = time.time()
    pool, captions, _ = scenes.dataset(cfg.num_images, seed=cfg.seed, split="train", image_size=size,
                                       two_shape_prob=cfg.two_shape_prob)
    t = lap("data", t)

    model = build_hart(spec.hart, spec.vae)
    init_transformer(model.transformer)
    if cfg.transformer_from:  # continue from a transformer trained earlier (same preset)
        from hartkit.model.checkpoint import load_hart

        model.transformer.load_state_dict(load_hart(cfg.transformer_from).transformer.state_dict())
        log["transformer_from"] = str(cfg.transformer_from)
    if cfg.tokenizer_from:  # continue from a tokenizer trained earlier (--vae-steps 0: reuse as is)
        from hartkit.model.checkpoint import load_hart

        model.vae.load_state_dict(load_hart(cfg.tokenizer_from).vae.state_dict())
        log["tokenizer_from"] = str(cfg.tokenizer_from)
    model.to(cfg.device)
    if cfg.vae_steps > 0:
        train_tokenizer(model, pool, cfg, log, init_codebook=not cfg.tokenizer_from)
    t = lap("tokenizer", t)
    # With --tokenizer-only the pool's tokens are not needed: tokenize a few batches for the PSNRs.
    targets, f_rest_last, rec_stats = tokenize_pool(model, pool[:1024] if cfg.tokenizer_only else pool, cfg)
    log["tokenizer_eval"] = rec_stats
    log["residual_over_vae_scale_abs_p99"] = float(
        (f_rest_last.reshape(-1, f_rest_last.shape[-1]) / 0.6).abs().quantile(0.99).item()
        if f_rest_last.numel() < 16_000_000 else float("nan"))
    t = lap("tokenize", t)

    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        text_dir = write_text_model(tmp / "text_model", spec, cfg.seed)
        if cfg.transformer_from:  # the text model that transformer was trained with (maybe fine-tuned)
            shutil.copyfile(Path(cfg.transformer_from) / "text_model" / "model.safetensors",
                            text_dir / "model.safetensors")
        encoder = TextEncoder.from_pretrained(text_dir).to(cfg.device)
        distinct = sorted(set(captions))
        text = TextFeatures(encoder, distinct, spec.hart.context_token, trainable=cfg.text_lr > 0)
        index = {c: i for i, c in enumerate(distinct)}
        cap_ids = torch.tensor([index[c] for c in captions])
        t = lap("text_features", t)

        if not cfg.tokenizer_only:
            train_transformer(model, cap_ids, text, targets, f_rest_last, cfg, log)
            t = lap("transformer", t)
            if "ar_seconds_chosen_steps" in log:  # record the replayable run: its step count, no budget
                cfg = replace(cfg, ar_steps=log["ar_seconds_chosen_steps"], ar_seconds=0.0)
                log["config"].update(ar_steps=cfg.ar_steps, ar_seconds=0.0)
        model.eval().to("cpu")
        encoder.cpu()
        if text.trainable and not cfg.tokenizer_only:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()},
                      str(text_dir / "model.safetensors"), metadata={"format": "pt"})
        save_hart(model, tmp)
        log["timings_s"]["total"] = round(time.time() - t_start, 1)
        log["num_parameters"] = {
            "transformer": sum(p.numel() for p in model.transformer.parameters()),
            "diffusion_head": sum(p.numel() for p in model.transformer.diffloss.parameters()),
            "tokenizer": sum(p.numel() for p in model.vae.parameters()),
            "text_model": sum(p.numel() for p in encoder.parameters()),
        }
        log["torch_version"] = torch.__version__
        log["device"] = (torch.cuda.get_device_name(torch.device(cfg.device))
                         if torch.device(cfg.device).type == "cuda" else cfg.device)
        log["stages"] = previous_stages(cfg)  # the runs this one continued from
        (tmp / "training.json").write_text(json.dumps(log, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, spec, log))
    print(f"wrote {out} in {log['timings_s']['total']:.0f} s "
          f"(tokenizer PSNR discrete {rec_stats['psnr_discrete_db']:.2f} dB, "
          f"hybrid {rec_stats['psnr_hybrid_db']:.2f} dB)", file=sys.stderr)
    return out


def previous_stages(cfg_or_log: TrainConfig | dict) -> list[dict]:
    """The training.json of every run this one continued from, oldest first, without their own nested
    stages: the provenance of a staged model. ``--transformer-from`` brings that checkpoint's whole
    history; ``--tokenizer-from`` only the runs that trained the tokenizer it reuses (a full checkpoint
    passed there contributes its tokenizer runs, not the transformer runs after them)."""
    config = asdict(cfg_or_log) if isinstance(cfg_or_log, TrainConfig) else cfg_or_log.get("config", {})
    stages: list[dict] = []
    for key, tokenizer_only in (("tokenizer_from", True), ("transformer_from", False)):
        for stage in _history(config.get(key)):
            trained_tokenizer = stage.get("config", {}).get("vae_steps", 0) > 0
            if (trained_tokenizer or not tokenizer_only) and stage not in stages:
                stages.append(stage)
    return stages


def _history(folder: str | None) -> list[dict]:
    """The runs a checkpoint folder records (its training.json's "stages", then itself), oldest first."""
    path = Path(folder) / "training.json" if folder else None
    if path is None or not path.is_file():
        return []
    log = json.loads(path.read_text())
    return (log.pop("stages", None) or []) + [log]


def _stage_row(index: int, log: dict) -> str:
    c, stopped = log["config"], log.get("stopped_early", {})
    vae = stopped.get("tokenizer", c["vae_steps"])
    ar = 0 if c.get("tokenizer_only") else stopped.get("transformer", c["ar_steps"])
    tok = f"{vae} x {c['vae_batch']} ({c['vae_lr']:g}, {c.get('fg_weight', 0):g})" if vae else "-"
    text = f", text model {c['text_lr']:g}" if c.get("text_lr") else ""
    weight = f", scale weight {c['scale_weight']:g}" if c.get("scale_weight") else ""
    tr = f"{ar} x {c['ar_batch']} ({c['ar_lr']:g}{text}{weight})" if ar else "-"
    where = log.get("device", "cpu")
    where = f"{c['threads']}" if where == "cpu" else f"{where} ({c['threads']} CPU threads)"
    return (f"| {index} | {tok} | {tr} | {c['num_images']} (seed {c.get('seed', 0)}) | {where} |"
            f" {log['timings_s'].get('total', 0) / 60:.1f} min |")


CFG_CHOICES = "1,1.5,2,3,4.5"  # guidance scales eval_demo_model.py --choose-cfg tries on training prompts


def model_card(cfg: TrainConfig, spec: Preset, log: dict) -> str:
    """README.md of the checkpoint: what it is, how it was made, and (filled in by
    examples/eval_demo_model.py --update-readme) what it scores."""
    n = log["num_parameters"]
    tok = log["tokenizer_eval"]
    hart, vae = spec.hart, spec.vae
    command = f"python examples/train_tiny_hart.py --out {cfg.out}" + (" --smoke" if cfg.preset == "tiny" else "")
    defaults = TrainConfig()
    for k, v in asdict(cfg).items():
        if k not in ("out", "progress", "overwrite") and getattr(defaults, k) != v and cfg.preset == "demo":
            command += f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}")
    stages = log.get("stages") or []
    # HART keeps its text encoder frozen; the demo model may train its tiny one jointly (--text-lr).
    joint = any(stage["config"].get("text_lr") for stage in stages + [log])
    text_state = "trained jointly with the transformer" if joint else "frozen, random weights"
    devices = {stage.get("device", "cpu") for stage in stages + [log]}
    trained_on = "on CPU" if devices == {"cpu"} else "on CPU and GPU" if "cpu" in devices else "on a GPU"
    if stages:
        intro = (f"This folder is the last of {len(stages) + 1} chained runs (each continues from the previous"
                 " one's weights; `training.json` keeps every stage's settings and losses under \"stages\").")
        if cfg.preset == "demo":
            intro += " The whole chain is `examples/reproduce_demo.sh`; this run's own command:"
    else:
        intro = "Reproduce:"
    return "\n".join([
        f"# hartkit demo model ({cfg.preset} preset)",
        "",
        f"A tiny HART trained from scratch {trained_on} on the procedural scenes of `hartkit.validate.scenes`",
        f"({log['image_size']}x{log['image_size']} px: one or two coloured circles, squares or triangles on a coloured",
        "background, e.g. \"a red circle above a blue square on a yellow background\"). It is the built-in",
        "default of `hartkit demo`, and a real (learned, not random) model for the export and quantization",
        "checks. Official HART layout: `llm/` (AR transformer + residual diffusion head), `tokenizer/`",
        f"(hybrid VQ tokenizer), `text_model/` (a tiny Qwen2, {text_state}; its BPE is trained on the",
        "captions so each word is one token). Only the vocabulary of the scenes means anything to it.",
        "",
        intro + " (seeds are fixed; float results vary slightly with the CPU and thread count)",
        "",
        "```bash",
        command,
        f"python examples/eval_demo_model.py --checkpoint {cfg.out} --choose-cfg {CFG_CHOICES} --train-prompts"
        " --update-readme   # guidance + the numbers below",
        "```",
        "",
        "| part | shape | parameters |",
        "|---|---|---|",
        f"| AR transformer | {hart.depth} blocks, width {hart.embed_dim}, {hart.num_heads} heads, llama attention/MLP,"
        f" {hart.context_token} context tokens, scales {list(hart.patch_nums)} | {n['transformer'] - n['diffusion_head']:,} |",
        f"| residual diffusion head | MLP width {hart.diff_width}, depth {hart.diff_depth}, {hart.num_sampling_steps} IDDPM steps |"
        f" {n['diffusion_head']:,} |",
        f"| tokenizer | ch {vae.ch}, ch_mult {list(vae.ch_mult)}, {vae.vocab_size} codes x {vae.z_channels} dims,"
        f" {vae.share_quant_resi} phi convs | {n['tokenizer']:,} |",
        f"| text model | Qwen2, hidden {spec.text.get('hidden_size')}, {spec.text.get('num_layers')} layers ({text_state}) |"
        f" {n['text_model']:,} |",
        "",
        "Training runs (wall times; CPU runs on a 2-core machine shared with other jobs):",
        "",
        "| run | tokenizer steps x batch (lr, shape-pixel weight) | transformer steps x batch (lr, text model lr, scale weight w: token CE weight n_s^-w) | images | threads (CPU) or device | wall time |",
        "|---|---|---|---|---|---|",
        *[_stage_row(i + 1, stage) for i, stage in enumerate(stages + [log])],
        "",
        f"Tokenizer PSNR on training images: {tok['psnr_discrete_db']:.2f} dB discrete-only,"
        f" {tok['psnr_hybrid_db']:.2f} dB hybrid. Losses and settings: `training.json`.",
        "",
        "## Evaluation",
        "",
        "<!-- eval:begin -->",
        "Not measured yet: run `python examples/eval_demo_model.py --update-readme`.",
        "<!-- eval:end -->",
        "",
    ])


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    p.add_argument("--out", default=defaults.out, help=f"output folder (default: {defaults.out})")
    p.add_argument("--smoke", action="store_true", help="a few steps of the tiny preset (for tests)")
    for name in ("seed", "threads", "num_images", "vae_steps", "vae_batch", "ar_steps", "ar_batch", "warmup",
                 "restart_every", "embed_dim", "depth", "num_heads", "text_layers"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    for name in ("vae_lr", "ar_lr", "fg_weight", "text_lr", "scale_weight", "two_shape_prob", "ar_seconds"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None)
    p.add_argument("--device", default=None, help="where to train: cpu (default), cuda, cuda:N")
    p.add_argument("--preset", default=None)
    p.add_argument("--tokenizer-only", action="store_true", help="stop after training the tokenizer")
    p.add_argument("--transformer-from", default=None, metavar="DIR",
                   help="continue training DIR/llm (a checkpoint written by this script) instead of a fresh one")
    p.add_argument("--tokenizer-from", default=None, metavar="DIR",
                   help="reuse DIR/tokenizer (a checkpoint written by this script) instead of training one")
    args = p.parse_args(argv)
    cfg = TrainConfig.smoke(args.out) if args.smoke else replace(defaults, out=args.out)
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("out", "smoke") and v is not None and not (isinstance(v, bool) and not v)}
    return replace(cfg, **overrides)


if __name__ == "__main__":
    train(parse_args())
