"""A whole training run: data, the three phases in order, and the checkpoint folder with its
``training.json`` and model card.

Writes ``OUT/llm``, ``OUT/tokenizer`` (official layout, safetensors), ``OUT/text_model``,
``OUT/training.json`` (settings, losses, timings) and ``OUT/README.md``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from hartkit.model.checkpoint import atomic_dir, build_hart, save_hart
from hartkit.model.presets import Preset
from hartkit.model.text_encoder import TextEncoder
from hartkit.train.config import TrainConfig, shaped_preset
from hartkit.train.schedule import PhaseStop
from hartkit.train.text import TextFeatures, write_text_model
from hartkit.train.tokenizer import tokenize_pool, train_tokenizer
from hartkit.train.transformer import init_transformer, train_transformer
from hartkit.validate import scenes


def image_size_of(spec: Preset) -> int:
    return spec.vae.downsample * spec.vae.v_patch_nums[-1]


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

