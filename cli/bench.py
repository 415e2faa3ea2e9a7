"""``hartkit bench``: latency, FLOP/s, memory and size of bundles side by side, against torch eager."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hartkit.cli.options import RESOLUTION_HELP, add_checkpoint_options, parse_resolution, resolve_weights
from hartkit.errors import HartkitError, UsageError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure latency, FLOP/s, memory and size side by side",
        description="Per graph: median latency on each backend and in torch eager fp32 (ratios); end to end: the "
                    "runtime vs the eager torch graphs under the same loop with a per-part breakdown; AR stages' achieved FLOP/s "
                    "over this machine's measured fp32 GEMM throughput; peak RSS of a generation; bundle bytes "
                    "over the bit limit; with --recipes, each recipe's export time and peak memory. Writes bench.json, "
                    "bench.md (the table) and bench.png with --out.")
    add_checkpoint_options(p, required=True, checkpoint_help="the checkpoint the bundles were exported from: a folder, "
                                                             "upstream's .../llm folder or a repo id in the HF cache")
    p.add_argument("--bundle", action="append", metavar="DIR",
                   help="an export bundle (repeat for several; with --recipes: measured beside them)")
    p.add_argument("--recipes", metavar="R1,R2",
                   help="export these recipes first (fp32 = no quantization; e.g. fp32,laptop,phone) into --work")
    p.add_argument("--format", default="onnx,executorch",
                   help="with --recipes: formats to export (default: onnx,executorch)")
    p.add_argument("--resolution", type=parse_resolution, metavar="PX", help="with --recipes: " + RESOLUTION_HELP)
    p.add_argument("--work", metavar="DIR", help="with --recipes: bundle folder (bundles there are reused)")
    p.add_argument("--backend", default=None,
                   help="comma-separated backends to measure (default: every format in the bundles)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement, after one warm-up (default: 3)")
    p.add_argument("--out", metavar="DIR", help="write bench.json, bench.md and bench.png here")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hartkit.bench.run import format_report, run_bench

    backends = [b.strip() for b in args.backend.split(",") if b.strip()] if args.backend else None
    if not args.bundle and not args.recipes:
        raise UsageError("give --bundle DIR (one or more) and/or --recipes R1,R2 --work DIR (exports them first)")
    if args.out:
        from hartkit.fsutil import check_output_dir

        check_output_dir(args.out)  # before the minutes of measuring
    checkpoint, text_model = resolve_weights(args)  # repo ids from the HF cache, before the minutes of work
    bar = tqdm(desc="bench", unit="step", file=sys.stderr, bar_format="{desc}: {n_fmt} steps [{elapsed}] {postfix}")

    def step(message: str) -> None:
        bar.set_postfix_str(message)
        bar.update(1)

    try:
        exports: list[dict] = []
        failed: list[dict] = []
        bundles = list(args.bundle or [])
        if args.recipes:
            from hartkit.bench.exports import prepare_bundles
            from hartkit.export.exporter import parse_formats

            if not args.work:
                raise UsageError("--recipes needs --work DIR (where the bundles are exported and reused)")
            recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
            prepared, exports = prepare_bundles(checkpoint, args.work, recipes, parse_formats(args.format),
                                                args.resolution, progress=step, text_model=text_model)
            bundles = prepared + bundles
        elif args.resolution is not None:
            raise UsageError("--resolution applies with --recipes (a bundle's resolution is fixed at export)")
        failed = [e for e in exports if e.get("failed")]
        if not bundles:
            raise HartkitError("every export failed: " + "; ".join(f"{e['recipe']} {e['formats'][0]}: {e['failed']}"
                                                                    for e in failed))
        result = run_bench(checkpoint, bundles, backends, runs=args.runs, out=args.out,
                           measure_memory=not args.no_memory, exports=exports, progress=step, text_model=text_model)
    finally:
        bar.close()
    print(format_report(result))
    if args.out:
        print(f"wrote {Path(args.out) / 'bench.json'}, bench.md and bench.png")
    return 3 if failed else 0  # measured what exported; a failed export is a failed check
