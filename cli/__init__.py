"""The ``hartkit`` command line: one module per verb, the options they share in :mod:`.options`.

Each verb module holds ``add_parser(subparsers)`` and its ``cmd_*`` function; heavy libraries (torch, onnx,
hartkit.model, hartkit.export, ...) are imported inside the commands, so ``hartkit --help`` and
``hartkit generate --exported`` stay fast and torch-free.

Exit codes: 0 success, 1 internal error (a bug: traceback shown), 2 a user error (bad input, missing
file or library: one line, no traceback), 3 a failed check, 130 interrupted.
"""

from __future__ import annotations

import argparse

from hartkit import __version__
from hartkit.cli import bench, bundle, demo, export, generate, init_checkpoint, quantize, validate
from hartkit.cli.options import quiet_third_party, run_command

# The order `hartkit --help` lists the verbs in (quantize adds both quantize and sensitivity).
VERBS = (demo, init_checkpoint, generate, export, quantize, bench, bundle, validate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hartkit",
        description="Run, quantize and export HART (hybrid autoregressive text-to-image) for phones and laptops.",
    )
    parser.add_argument("--version", action="version", version=f"hartkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return run_command(args)


__all__ = ["build_parser", "main"]
