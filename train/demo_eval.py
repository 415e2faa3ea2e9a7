"""Evaluate the demo model: caption accuracy on held-out prompts, and the tokenizer's PSNRs.

``examples/eval_demo_model.py`` is the command line over :func:`main`:

    python examples/eval_demo_model.py                       # assets/demo, 100 held-out prompts
    python examples/eval_demo_model.py --grid grid.png --json eval.json --update-readme

1. **Caption accuracy**: the reference sampler (``hartkit.model.sampler``, fixed seeds) draws one
   image for each of ``--n`` held-out prompts (captions of the test split of
   :mod:`hartkit.validate.scenes`, never seen in training), and
   :mod:`hartkit.validate.caption_score` checks each image against its prompt from the pixels.
   ``--train-prompts`` also scores as many training captions, to show the generalisation gap.
2. **Tokenizer PSNR** on held-out ground-truth scenes: discrete-only reconstruction (the multi-scale
   codes alone, f_hat) vs hybrid (codes + the continuous residual = the encoder's latent), i.e. what
   HART's residual tokens buy (HART reports rFID 2.11 -> 0.30 for its own tokenizer).
3. ``--teacher-stages 2,4,6``: where the model goes wrong. Each held-out prompt's scene is rendered and
   tokenized; the first K stages take those ground-truth tokens (teacher forcing), the rest are
   sampled. Accuracy rising steeply with K at the coarse stages means the model misreads the caption's
   layout; at the fine stages, that it cannot paint the shapes; K = all stages is the tokenizer's and
   the diffusion head's ceiling.

4. ``--choose-cfg 1,2,3,4.5``: the guidance scale the model should run at, chosen on ``--choose-n``
   *training* captions (never on the held-out ones it is then scored on) and written to
   ``<checkpoint>/llm/generation_config.json``, which every hartkit command, export and runtime reads
   as its default. HART's 4.5 was tuned for HART; a tiny model over-saturates at it.

``--update-readme`` rewrites the marked block of ``<checkpoint>/README.md`` with the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import hartkit.assets
from hartkit.loop.metrics import psnr
from hartkit.loop.plan import HART_DEFAULT_CFG
from hartkit.model.checkpoint import load_hart, write_default_cfg
from hartkit.model.sampler import SamplerOptions, generate_from_prompts
from hartkit.model.text_encoder import TextEncoder
from hartkit.runtime.images import caption_grid
from hartkit.train.tokenizer import to_model_range
from hartkit.validate import scenes
from hartkit.validate.caption_score import ATTRIBUTES, CaptionReport, evaluate

# The command line's description (its --help).
DESCRIPTION = "Evaluate the demo model: caption accuracy on held-out prompts, and the tokenizer's PSNRs."
DEFAULT_CHECKPOINT = Path(hartkit.assets.__file__).resolve().parent / "demo"
README_BEGIN = "<!-- eval:begin -->"
README_END = "<!-- eval:end -->"


def generate_all(model, encoder, prompts: list[str], *, seed: int, cfg: float, batch: int,
                 more_smooth: bool = True, forced: list[torch.Tensor] | None = None) -> np.ndarray:
    """One image per prompt; batch k uses seed ``seed + k`` (fixed, so reruns give the same images).
    ``forced``: per-stage token indices [len(prompts), pn*pn] for teacher forcing (see module doc)."""
    images = []
    options = SamplerOptions(cfg=cfg, more_smooth=more_smooth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, start in enumerate(range(0, len(prompts), batch)):
            rows = slice(start, start + batch)
            imgs, _ = generate_from_prompts(model, encoder, prompts[rows], seed=seed + k, options=options,
                                            forced_tokens=None if forced is None else [t[rows] for t in forced])
            images.append(imgs)
    return np.concatenate(images)


def _image_size(vae) -> int:
    return vae.downsample * vae.cfg.v_patch_nums[-1]


@torch.no_grad()
def scene_tokens(model, prompts: list[str], seed: int) -> list[torch.Tensor]:
    """Ground-truth token indices per stage of one rendered scene per prompt (scene i uses seed + i)."""
    vae = model.vae.eval()
    size = _image_size(vae)
    images = np.stack([scenes.make_scene(seed + i, spec=p, image_size=size)[0] for i, p in enumerate(prompts)])
    idx_list, _, _ = vae.quantize_residual(vae.encode(to_model_range(images)))
    return idx_list


def teacher_forced(model, encoder, prompts: list[str], stages: list[int], *, seed: int, cfg: float,
                   batch: int) -> dict[int, CaptionReport]:
    """Caption accuracy with the first K stages forced to a rendered scene's tokens, for each K."""
    tokens = scene_tokens(model, prompts, seed)
    return {k: evaluate(generate_all(model, encoder, prompts, seed=seed, cfg=cfg, batch=batch, forced=tokens[:k]),
                        prompts) for k in stages}


@torch.no_grad()
def tokenizer_psnr(model, n: int = 256, seed: int = 1) -> dict[str, float]:
    """Mean PSNR (dB, uint8 images as the sampler writes them) of held-out scenes through the
    tokenizer: discrete codes only vs codes + continuous residual."""
    vae = model.vae.eval()
    images, _, _ = scenes.dataset(n, seed=seed, split="test", image_size=_image_size(vae))
    x = to_model_range(images)

    def to_u8(img: torch.Tensor) -> np.ndarray:
        # the sampler's conversion: clamp, [0, 1], *255, truncate
        return (((vae.decode(img) + 1) * 0.5).permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy()

    out: dict[str, list[float]] = {"discrete": [], "hybrid": []}
    for i in range(0, n, 64):
        f = vae.encode(x[i : i + 64])
        _, f_hats, _ = vae.quantize_residual(f)
        for name, latent in (("discrete", f_hats[-1]), ("hybrid", f)):
            rec = to_u8(latent)
            out[name] += [psnr(rec[j], images[i + j]) for j in range(len(rec))]
    return {f"psnr_{k}_db": float(np.mean(v)) for k, v in out.items()}


def training_prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    train_specs = scenes.specs_of_split("train")
    return [train_specs[i].caption() for i in rng.permutation(len(train_specs))[:n]]


def choose_cfg(model, encoder, values: list[float], *, n: int, seed: int, batch: int) -> tuple[float, dict[str, float]]:
    """The guidance scale with the best caption accuracy on ``n`` training captions (seeds ``seed+2000``
    on; ties go to the smaller scale). -> (best, {value: accuracy})."""
    prompts = training_prompts(n, seed + 1)
    scores = {}
    for value in values:
        images = generate_all(model, encoder, prompts, seed=seed + 2000, cfg=value, batch=batch)
        scores[f"{value:g}"] = evaluate(images, prompts).accuracy
        print(f"  cfg {value:g}: {100 * scores[f'{value:g}']:.0f} % of {n} training prompts")
    best = max(sorted(values), key=lambda v: scores[f"{v:g}"])
    return best, scores


def report_dict(report: CaptionReport) -> dict:
    return {
        "n": report.n,
        "caption_accuracy": report.accuracy,
        "per_attribute": report.per_attribute,
        "chance": report.chance,
        "chance_per_attribute": report.chance_per_attribute,
        "by_kind": {
            kind: float(np.mean([it["caption"] for it in report.items
                                 if (it["relation"] is None) == (kind == "one_shape")] or [float("nan")]))
            for kind in ("one_shape", "two_shapes")
        },
    }


def readme_block(result: dict, command: str) -> str:
    h = result["heldout"]
    lines = [
        README_BEGIN,
        f"Measured with `{command}` (reference sampler, fp32, cfg {result['cfg']}, seeds {result['seed']}+batch;"
        f" {result['seconds']:.0f} s on {result['threads']} CPU thread(s)):",
        "",
        "| | held-out prompts | chance |",
        "|---|---|---|",
        f"| caption accuracy (all checks right) | **{100 * h['caption_accuracy']:.0f} %** ({h['n']} prompts) |"
        f" {100 * h['chance']:.2f} % |",
    ]
    for name in ATTRIBUTES:
        if name in h["per_attribute"]:
            lines.append(f"| {name} | {100 * h['per_attribute'][name]:.0f} % | {100 * h['chance_per_attribute'][name]:.1f} % |")
    lines.append(f"| one-shape / two-shape prompts | {100 * h['by_kind']['one_shape']:.0f} % /"
                 f" {100 * h['by_kind']['two_shapes']:.0f} % | |")
    if "train" in result:
        lines.append(f"| (training prompts, for comparison) | {100 * result['train']['caption_accuracy']:.0f} % | |")
    if "heldout_at_hart_cfg" in result:
        lines.append(f"| (at HART's guidance {HART_DEFAULT_CFG:g} instead) |"
                     f" {100 * result['heldout_at_hart_cfg']['caption_accuracy']:.0f} % | |")
    if "cfg_sweep_training_prompts" in result:
        sweep = ", ".join(f"{k}: {100 * v:.0f} %" for k, v in result["cfg_sweep_training_prompts"].items())
        lines += ["", f"Guidance {result['cfg']:g} (the checkpoint's `llm/generation_config.json`, the default of every"
                      f" hartkit command) was chosen on {result['cfg_choice_n']} *training* prompts: {sweep}."]
    t = result["tokenizer"]
    lines += [
        "",
        f"Tokenizer on {t['n']} held-out scenes: PSNR **{t['psnr_discrete_db']:.2f} dB** discrete-only"
        f" -> **{t['psnr_hybrid_db']:.2f} dB** hybrid (discrete + continuous residual),"
        f" +{t['psnr_hybrid_db'] - t['psnr_discrete_db']:.2f} dB.",
        README_END,
    ]
    return "\n".join(lines)


def update_readme(path: Path, block: str) -> None:
    text = path.read_text() if path.is_file() else ""
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        _, tail = rest.split(README_END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="checkpoint folder (default: assets/demo)")
    p.add_argument("--n", type=int, default=100, help="held-out prompts (default: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (default: the checkpoint's, as every hartkit command; HART's 4.5 without one)")
    p.add_argument("--choose-cfg", metavar="C1,C2",
                   help="choose the guidance scale on training prompts, write it to llm/generation_config.json")
    p.add_argument("--choose-n", type=int, default=300,
                   help="training prompts for --choose-cfg (default: 300; one sample each is noisy)")
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-prompts", action="store_true", help="also score --n training captions")
    p.add_argument("--teacher-stages", metavar="K1,K2",
                   help="also score with the first K stages teacher-forced to rendered scenes' tokens")
    p.add_argument("--grid", help="write a PNG grid of the first 20 held-out images with their prompts")
    p.add_argument("--json", help="write the numbers as JSON")
    p.add_argument("--update-readme", action="store_true", help="rewrite the numbers block of CHECKPOINT/README.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    ckpt = Path(args.checkpoint)
    model = load_hart(ckpt)
    encoder = TextEncoder.from_pretrained(ckpt / "text_model")
    result: dict = {"checkpoint": str(ckpt)}
    if args.choose_cfg:
        values = [float(v) for v in args.choose_cfg.split(",")]
        print(f"choosing the guidance scale on {args.choose_n} training prompts:")
        best, result["cfg_sweep_training_prompts"] = choose_cfg(model, encoder, values, n=args.choose_n,
                                                                 seed=args.seed, batch=args.batch)
        result["cfg_choice_n"] = args.choose_n
        write_default_cfg(ckpt / "llm", best, note=f"chosen by examples/eval_demo_model.py --choose-cfg "
                                                   f"{args.choose_cfg} on {args.choose_n} training prompts")
        model.default_cfg = best
        print(f"wrote {ckpt / 'llm' / 'generation_config.json'}: guidance_scale {best:g}")
    cfg = model.default_cfg if args.cfg is None else args.cfg
    prompts = scenes.heldout_prompts(args.n)
    images = generate_all(model, encoder, prompts, seed=args.seed, cfg=cfg, batch=args.batch)
    held = evaluate(images, prompts)
    result.update({"cfg": cfg, "seed": args.seed, "threads": args.threads, "heldout": report_dict(held)})
    print(f"held-out prompts (cfg {cfg:g}): " + held.summary())
    if cfg != HART_DEFAULT_CFG:
        at_hart = evaluate(generate_all(model, encoder, prompts, seed=args.seed, cfg=HART_DEFAULT_CFG,
                                        batch=args.batch), prompts)
        result["heldout_at_hart_cfg"] = report_dict(at_hart)
        print(f"held-out prompts at HART's cfg {HART_DEFAULT_CFG:g}: " + at_hart.summary())
    if args.train_prompts:
        train_prompts = training_prompts(args.n, args.seed)
        train_images = generate_all(model, encoder, train_prompts, seed=args.seed + 1000, cfg=cfg,
                                    batch=args.batch)
        train = evaluate(train_images, train_prompts)
        result["train"] = report_dict(train)
        print("training prompts: " + train.summary())
    if args.teacher_stages:
        stages = [int(k) for k in args.teacher_stages.split(",")]
        num_stages = len(model.cfg.patch_nums)
        if any(not 0 <= k <= num_stages for k in stages):
            p.error(f"--teacher-stages: each K must be in 0..{num_stages} (the model has {num_stages} stages)")
        forced = teacher_forced(model, encoder, prompts, stages, seed=args.seed, cfg=cfg, batch=args.batch)
        result["teacher_forced"] = {str(k): report_dict(r) for k, r in forced.items()}
        for k, r in forced.items():
            print(f"first {k} of {num_stages} stages teacher-forced: " + r.summary())
    tok = tokenizer_psnr(model)
    result["tokenizer"] = {"n": 256, **tok}
    print(f"tokenizer PSNR on 256 held-out scenes: discrete-only {tok['psnr_discrete_db']:.2f} dB, "
          f"hybrid {tok['psnr_hybrid_db']:.2f} dB (+{tok['psnr_hybrid_db'] - tok['psnr_discrete_db']:.2f} dB)")
    result["seconds"] = time.time() - t0
    result["items"] = held.items
    if args.grid:
        print(f"wrote {caption_grid(images[:20], prompts[:20], Path(args.grid))}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.update_readme:
        choose = f" --choose-cfg {args.choose_cfg}" if args.choose_cfg else ""
        command = ("python examples/eval_demo_model.py" + choose
                   + (" --train-prompts" if args.train_prompts else ""))
        update_readme(ckpt / "README.md", readme_block(result, command))
        print(f"updated {ckpt / 'README.md'}")
    return 0

