"""What a training run is told: :class:`TrainConfig` (one field per flag of
``examples/train_tiny_hart.py``), the flags themselves, and the model shape it implies."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from hartkit.model.presets import Preset, get_preset
from hartkit.validate import scenes

# The command line's description (its --help).
DESCRIPTION = "Train a tiny HART end to end, on CPU or one GPU: the demo model shipped in ``assets/demo``."


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


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=DESCRIPTION)
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

