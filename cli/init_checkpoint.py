"""``hartkit init-checkpoint``: a random-weight checkpoint of a preset shape in HART's official layout."""

from __future__ import annotations

import argparse

from hartkit.cli.options import parse_seed


def add_parser(sub) -> None:
    p = sub.add_parser(
        "init-checkpoint", help="write a random-weight checkpoint of a preset in HART's official layout",
        description="Write OUT/llm, OUT/tokenizer and OUT/text_model with random weights of a preset shape. "
                    "Useful to test the toolkit end to end without the real weights.")
    p.add_argument("out", help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--preset", default="tiny", help="model shape: tiny (default) or hart-0.7b-1024px")
    p.add_argument("--seed", type=parse_seed, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-text-model", action="store_true", help="skip writing OUT/text_model")
    p.set_defaults(func=cmd_init_checkpoint)


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    from hartkit.model.presets import init_checkpoint

    out = init_checkpoint(args.preset, args.out, seed=args.seed, overwrite=args.force,
                          with_text_model=not args.no_text_model)
    print(f"wrote a random-weight '{args.preset}' checkpoint to {out} (llm/, tokenizer/, text_model/)")
    return 0
