"""Phase 3, the AR transformer and its residual diffusion head, trained jointly with teacher forcing
over all scales under upstream's block-causal mask."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hartkit.loop.rope import rope_cos_sin_1d, rope_cos_sin_2d, stage_positions
from hartkit.model.checkpoint import HART
from hartkit.model.sampler import filter_top_k_top_p
from hartkit.train.config import TrainConfig
from hartkit.train.diffusion import DiffusionTrainingLoss
from hartkit.train.schedule import PhaseStop, StepBudget, bar, lr_at, set_lr
from hartkit.train.text import TextFeatures


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

