"""``hartkit demo``: the built-in demo model end to end, reference image -> ONNX bundle -> runtime -> report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hartkit.cli.generate import generate_exported, generate_images, load_reference, save_images
from hartkit.cli.options import CFG_HELP, parse_cfg, parse_seed

DEFAULT_PROMPT = "a red circle above a blue square on a yellow background"
DEFAULT_DEMO_DIR = Path("hartkit-demo")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="generate an image from the built-in default model (no arguments needed)",
                       description="Generate one image with the built-in default model and print where it went.")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--seed", type=parse_seed, default=0, help="random seed (default: 0)")
    p.add_argument("--cfg", type=parse_cfg, default=None, help=CFG_HELP)
    p.add_argument("--out", default=str(DEFAULT_DEMO_DIR), help=f"output folder (default: {DEFAULT_DEMO_DIR})")
    p.add_argument("--quick", action="store_true",
                   help="only the PyTorch reference image (skip the ONNX export, runtime run and validation report)")
    p.set_defaults(func=cmd_demo)


def demo_checkpoint() -> Path:
    """The built-in demo model shipped as package data (assets/demo, see its README.md)."""
    import hartkit.assets

    return Path(hartkit.assets.__file__).resolve().parent / "demo"


def cmd_demo(args: argparse.Namespace) -> int:
    from hartkit.fsutil import check_output_dir
    from hartkit.loop.prompt import check_prompts

    check_prompts([args.prompt])
    out_dir = check_output_dir(args.out)  # before the work: a file or a read-only place fails now
    checkpoint = demo_checkpoint()
    if not (checkpoint / "llm" / "config.json").is_file():
        # Only a broken install lacks the asset; still show the pipeline running, and say so.
        from hartkit.model.presets import init_checkpoint

        print(f"hartkit demo: the built-in demo model is missing ({checkpoint}); using a random-weight 'tiny' "
              f"checkpoint instead, which draws noise", file=sys.stderr)
        checkpoint = out_dir / "checkpoint-tiny"
        if not (checkpoint / "llm" / "config.json").is_file():
            init_checkpoint("tiny", checkpoint, seed=0, overwrite=True)
    loaded = load_reference(checkpoint, checkpoint / "text_model")
    images = generate_images(checkpoint, checkpoint / "text_model", [args.prompt], args.seed, args.cfg, True, 0.0,
                             loaded=loaded)
    paths = save_images(images, out_dir / "demo.png")
    guidance = loaded.loop.default_cfg if args.cfg is None else args.cfg
    print(f"prompt: {args.prompt!r}  seed: {args.seed}  guidance: {guidance:g}")
    print(f"wrote {paths[0]} from checkpoint {checkpoint} (eager PyTorch graphs)")
    if checkpoint == demo_checkpoint():
        demo_grid(checkpoint, out_dir, args, images[0], loaded)
    if args.quick:
        return 0
    return demo_exported(checkpoint, out_dir, args, images[0])


def demo_grid(checkpoint: Path, out_dir: Path, args: argparse.Namespace, image, loaded) -> None:
    """What the demo model can and cannot draw: the caption judge's verdict on the main image, and a grid
    of held-out prompts (never seen in training) with each verdict."""
    from hartkit.runtime.images import caption_grid
    from hartkit.validate import caption_score, scenes

    def verdict(result: dict) -> str:
        failed = [k for k in caption_score.ATTRIBUTES if result.get(k) is False]
        return "caption right" if result["caption"] else "wrong " + ", ".join(failed)

    try:
        print(f"caption judge on {out_dir / 'demo.png'}: {verdict(caption_score.score(image, args.prompt))}")
    except ValueError:  # a prompt outside the scenes' grammar: nothing to judge
        print("caption judge: the prompt is outside the demo model's scene vocabulary (see assets/demo/README.md)")
    held = scenes.heldout_prompts(100)
    prompts = held[:4] + held[9:13]  # four one-shape and four two-shape captions
    grid = generate_images(checkpoint, checkpoint / "text_model", prompts, args.seed, args.cfg, True, 0.0,
                           loaded=loaded)
    results = [caption_score.score(img, p) for img, p in zip(grid, prompts)]
    path = caption_grid(grid, [f"{p} [{verdict(r)}]" for p, r in zip(prompts, results)], out_dir / "demo-grid.png",
                        cols=4, scale=2)
    right = sum(r["caption"] for r in results)
    print(f"wrote {path}: 8 held-out prompts, {right} of 8 drawn as captioned by the pixel judge "
          f"(the demo model's numbers: assets/demo/README.md)")


def demo_exported(checkpoint: Path, out_dir: Path, args: argparse.Namespace, reference) -> int:
    """The rest of the product on the same prompt: export -> torch-free runtime -> validation report."""
    import numpy as np

    from hartkit.export.exporter import export_checkpoint
    from hartkit.bundle import verify_bundle
    from hartkit.loop.metrics import psnr
    from hartkit.validate.core import validate
    from hartkit.validate.report import verdict_lines, write_report

    bundle = out_dir / "bundle-onnx"
    print(f"exporting to ONNX (graphs + parity checks + golden vectors) -> {bundle} ...", file=sys.stderr)
    export_checkpoint(checkpoint, bundle, ["onnx"], overwrite=True)
    print(f"wrote the bundle {bundle}: {verify_bundle(bundle).checked_files} files, checksums verified")
    images = generate_exported(bundle, "onnxruntime", {}, [args.prompt], args.seed, args.cfg, True, 0.0)
    path = save_images(images, out_dir / "demo-onnxruntime.png")[0]
    same = np.array_equal(images[0], reference)
    print(f"wrote {path} from the exported bundle on onnxruntime (torch-free runtime): "
          + ("identical to the reference" if same else f"PSNR {psnr(reference, images[0]):.1f} dB vs the reference"))
    print("validating the bundle against the fp32/fp16 references ...", file=sys.stderr)
    report = validate([bundle], checkpoint, text_model=checkpoint / "text_model", prompts=[args.prompt],
                      seeds=(args.seed,), cfg=args.cfg)
    _, html = write_report(report, out_dir / "report")
    print("\n".join(verdict_lines(report)))
    print(f"validation report: {html.resolve().as_uri()}")
    return 0
