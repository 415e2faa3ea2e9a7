"""``hartkit export``: a checkpoint to ONNX, ExecuTorch and/or Core ML graphs, parity-checked, as one bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hartkit.cli.options import (RESOLUTION_HELP, add_bundle_options, add_export_options, parse_resolution,
                                 resolve_weights)
from hartkit.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX, ExecuTorch and/or Core ML",
        description="Cut HART into pure graphs (text encoder, condition, AR stages, head, residual update, "
                    "diffusion denoiser, VAE decoder), export them, and check every graph against PyTorch on "
                    "inputs recorded from the reference loop. The folder is written only if all checks pass.")
    add_bundle_options(
        p, required=True, out_aliases=("--bundle",),
        out_help="output bundle folder (new or empty, unless --force); every export is a verified bundle")
    p.add_argument("--resolution", type=parse_resolution, metavar="PX", help=RESOLUTION_HELP)
    add_export_options(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Also what ``hartkit quantize`` runs once its own checks pass: its parser has no --resolution."""
    from tqdm import tqdm

    from hartkit.export.exporter import check_target, export_checkpoint, parse_formats
    from hartkit.export.parity import format_table

    formats = parse_formats(args.format)
    if not args.out:
        raise UsageError("--out is empty; give a new folder for the bundle")
    check_target(Path(args.out), args.force)  # refuse before the progress bar; again under the lock
    checkpoint, text_model = resolve_weights(args)  # repo ids from the HF cache, before the progress bar
    bar = tqdm(desc="exporting", unit="step", file=sys.stderr, bar_format="{desc}: {n_fmt} steps [{elapsed}] {postfix}")
    try:
        def step(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        result = export_checkpoint(checkpoint, args.out, formats, text_model=text_model,
                                   overwrite=args.force, progress=step,
                                   recipe=args.recipe, calibration=args.calibration,
                                   resolution=getattr(args, "resolution", None))
    finally:
        bar.close()
    print(format_table(result.parity))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(result.formats)} export to {result.out}")
    return 0
