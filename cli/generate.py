"""``hartkit generate``: images from a checkpoint (PyTorch reference) or a bundle (torch-free runtime).

The helpers that load and run either side are shared with ``hartkit demo``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hartkit.cli.options import (BACKENDS, CFG_HELP, RESOLUTION_HELP, add_checkpoint_options,
                                 add_graph_backend_option, parse_cfg, parse_graph_backends, parse_resolution,
                                 parse_seed, resolve_weights)
from hartkit.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate images from a checkpoint folder",
        description="Generate an image with the sampling loop on the eager PyTorch graphs of a checkpoint in HART's "
                    "official layout (DIR/llm, DIR/tokenizer). The same seed gives the same image.")
    add_checkpoint_options(p, checkpoint_help="eager PyTorch graphs of a folder with llm/ and tokenizer/, "
                                              "upstream's .../llm folder, or a Hugging Face repo id in the local cache")
    p.add_argument("--exported", metavar="DIR", help="an export folder from `hartkit export` (torch-free runtime)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="runtime backend with --exported (default: onnxruntime)")
    add_graph_backend_option(p)
    p.add_argument("--no-self-check", action="store_true",
                   help="with --exported: skip running the bundle's integer graphs on their golden vectors at load "
                        "(the check that this CPU computes them as the exporting one did; exit 3 when it does not)")
    p.add_argument("--prompt", required=True, action="append",
                   help="text prompt; repeat for a batch (images are numbered)")
    p.add_argument("--seed", type=parse_seed, default=0, help="random seed (default: 0)")
    p.add_argument("--cfg", type=parse_cfg, default=None, help=CFG_HELP)
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling threshold, 0 = off (default, as upstream)")
    p.add_argument("--resolution", type=parse_resolution, metavar="PX", help=RESOLUTION_HELP + " (with --checkpoint)")
    p.add_argument("--no-smooth", action="store_true",
                   help="hard codebook lookups instead of upstream's default Gumbel smoothing (more_smooth)")
    p.add_argument("--out", default="hartkit.png", help="output PNG path (default: hartkit.png)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    if bool(args.checkpoint) == bool(args.exported):
        raise UsageError("give exactly one of --checkpoint DIR (PyTorch reference) or --exported DIR (runtime)")
    if args.exported and args.resolution is not None:
        raise UsageError("--resolution applies to --checkpoint; an export has its resolution fixed "
                         "(export it with `hartkit export --resolution PX`)")
    check_generate_inputs(args)
    if args.exported:
        images = generate_exported(Path(args.exported), args.backend, parse_graph_backends(args.graph_backend),
                                   args.prompt, args.seed, args.cfg, not args.no_smooth, args.top_p,
                                   self_check=not args.no_self_check)
    else:
        checkpoint, text_model = resolve_weights(args)  # folders, .../llm or repo ids in the HF cache
        images = generate_images(checkpoint, text_model, args.prompt, args.seed, args.cfg,
                                 not args.no_smooth, args.top_p, args.resolution)
    for path in save_images(images, Path(args.out)):
        print(f"wrote {path}")
    return 0


def load_reference(checkpoint: Path, text_model: Path, resolution: int | None = None):
    """The PyTorch reference: the one sampling loop over the checkpoint's eager torch graphs."""
    from hartkit.runtime.pipeline import Pipeline

    return Pipeline.from_checkpoint(checkpoint, text_model, resolution=resolution)


def generate_images(checkpoint: Path, text_model: Path, prompts: list[str], seed: int, cfg: float | None,
                    more_smooth: bool, top_p: float, resolution: int | None = None, loaded=None):
    """``loaded``: a Pipeline from :func:`load_reference`, to reuse instead of loading."""
    pipe = loaded or load_reference(checkpoint, text_model, resolution)
    return run_prompts(pipe, prompts, seed, cfg, more_smooth, top_p, "generating")


def generate_exported(export_dir: Path, backend: str, graph_backends: dict[str, str], prompts: list[str],
                      seed: int, cfg: float | None, more_smooth: bool, top_p: float, self_check: bool = True):
    from hartkit.runtime.pipeline import Pipeline

    # A bundle is checked where it runs: file hashes, then its integer graphs' golden vectors on this CPU.
    pipe = Pipeline.from_bundle(export_dir, backend=backend, graph_backends=graph_backends, self_check=self_check)
    return run_prompts(pipe, prompts, seed, cfg, more_smooth, top_p, f"generating ({backend})")


def run_prompts(pipe, prompts: list[str], seed: int, cfg: float | None, more_smooth: bool, top_p: float,
                desc: str):
    """One image per prompt, each with ``seed`` (as if generated alone), under a progress bar per image."""
    import numpy as np
    from tqdm import tqdm

    images = []
    for prompt in prompts:
        bar = tqdm(total=len(pipe.loop.patch_nums), desc=desc, unit="stage", file=sys.stderr)
        try:
            image, _ = pipe.generate(prompt, seed=seed, cfg=cfg, more_smooth=more_smooth, top_p=top_p,
                                     progress=lambda _m: bar.update(1))
        finally:
            bar.close()
        images.append(image)
    return np.stack(images)


def image_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


def check_generate_inputs(args: argparse.Namespace) -> None:
    """Refuse, before loading anything, prompts that are not text and outputs that cannot be written."""
    from hartkit.fsutil import check_output_file
    from hartkit.loop.prompt import check_prompts

    check_prompts(args.prompt)
    if not args.out:
        raise UsageError("--out is empty; give an image path (e.g. --out image.png)")
    check_output_file(args.out)
    for path in image_paths(Path(args.out), len(args.prompt)):
        check_output_file(path)


def save_images(images, out: Path) -> list[Path]:
    from hartkit.runtime.images import save_png

    paths = image_paths(out, len(images))
    for image, path in zip(images, paths):
        save_png(image, path)
    return paths
