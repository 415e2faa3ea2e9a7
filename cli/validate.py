"""``hartkit validate``: bundles against the fp32/fp16 torch reference; a JSON + HTML pass/fail report.

Exit 0: every bundle row passes; 3: a bar was missed (the failing metric and stage are printed); 2: usage or
bundle errors.
"""

from __future__ import annotations

import argparse
import sys

from hartkit.cli.options import (BACKENDS, CFG_HELP, add_checkpoint_options, add_graph_backend_option, parse_cfg,
                                 parse_graph_backends)


def add_parser(sub) -> None:
    from hartkit.validate.thresholds import describe  # torch-free: the bars' table is the help's epilog

    p = sub.add_parser(
        "validate", help="compare bundles against the fp32/fp16 torch reference; pass/fail report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run each bundle (every format it holds, or --backend's) and the torch reference of the same "
                    "checkpoint on a fixed prompt x seed set; compare graphs on recorded inputs, stages "
                    "teacher-forced and free-running, the diffusion head's residual and the final images; write "
                    "OUT/report.json and OUT/report.html. Exit 0 when every bundle clears every bar, 3 when one "
                    "misses a bar, 2 on a usage error.",
        epilog="thresholds (NAME, default, meaning):\n" + describe())
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folder(s); several give a parity matrix")
    add_checkpoint_options(
        p, checkpoint_help="the checkpoint the bundles were exported from (default: the one their manifest records)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="run only this backend's format (default: every format the bundle holds that runs here)")
    add_graph_backend_option(p)
    p.add_argument("--prompts", metavar="FILE", help="prompts: one per line, or a JSON list (default: built-in set)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    p.add_argument("--cfg", type=parse_cfg, default=None, help=CFG_HELP)
    p.add_argument("--threshold", action="append", metavar="NAME=VALUE",
                   help="override one bar, e.g. tf_top1_min=0.9 or image_ssim_min=none (repeatable)")
    p.add_argument("--thresholds", metavar="JSON", help="a JSON file {name: value} of bars to override")
    p.add_argument("--no-fp16", action="store_true", help="skip the fp16 reference row (faster)")
    p.add_argument("--samples", type=_positive, default=1, metavar="K",
                   help="images per prompt and seed for the caption score: the run's own and K-1 more seeds "
                        "(free-running only; default 1)")
    ray = p.add_argument_group("sharding over a Ray cluster (pip install 'hartkit[ray]')")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run the work on Ray actors: ADDRESS of a running cluster (HOST:PORT of `ray start --head`, "
                          "ray://HOST:PORT or auto), or none for a local cluster on this machine; finished chunks are "
                          "appended to OUT/results.jsonl and the same command resumes from them")
    ray.add_argument("--workers", type=_positive, default=None, metavar="N",
                     help="Ray actors (default: one per CPU of the cluster)")
    ray.add_argument("--chunk", type=_positive, default=None, metavar="PROMPTS",
                     help="prompts per Ray task (default: 4)")
    p.add_argument("--out", default="hartkit-validate", help="report folder (default: hartkit-validate)")
    p.set_defaults(func=cmd_validate)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def cmd_validate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hartkit.fsutil import check_output_dir
    from hartkit.validate import thresholds as T
    from hartkit.validate.core import DEFAULT_PROMPTS, parse_seeds, read_prompts, validate

    overrides = T.load_file(args.thresholds) if args.thresholds else {}
    overrides.update(T.parse_assignments(args.threshold or []))
    T.resolve(overrides)  # refuse a typo before the minutes of work
    check_output_dir(args.out)  # and an output folder that cannot be written
    prompts = read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    checkpoint, text_model = args.checkpoint, args.text_model
    if checkpoint:  # repo ids from the HF cache (fetched first with --allow-download)
        from hartkit.cli.options import resolve_weights

        checkpoint, text_model = resolve_weights(args)
    seeds = parse_seeds(args.seeds)
    if args.ray is None and (args.workers is not None or args.chunk is not None):
        from hartkit.errors import UsageError

        raise UsageError("--workers and --chunk shard the work over Ray: add --ray [ADDRESS]")
    bars: list = []  # the progress bar starts once the amount of work is known (after the checks)
    if args.ray is not None:
        from hartkit.validate.sweep import DEFAULT_CHUNK, sweep

        result = sweep(args.bundles, checkpoint, text_model=text_model, backend=args.backend,
                       graph_backends=parse_graph_backends(args.graph_backend), prompts=prompts, seeds=seeds,
                       cfg=args.cfg, thresholds=overrides, fp16=not args.no_fp16, samples=args.samples,
                       out=args.out, address=None if args.ray == "local" else args.ray, workers=args.workers,
                       chunk_size=args.chunk or DEFAULT_CHUNK)
        report = result.report
        s = result.stats
        print(f"ray: {s.workers} workers, {s.tasks_run} tasks in {s.seconds:.1f} s "
              f"({s.chunks_skipped} chunks resumed from {result.results_path})", file=sys.stderr)
        return _finish(report, args.out)
    try:
        def on_total(total: int) -> None:
            bars.append(tqdm(total=total, desc="validating", unit="step", file=sys.stderr))

        def step(message: str) -> None:
            if bars:
                bars[0].set_postfix_str(message)
                bars[0].update(1)

        report = validate(args.bundles, checkpoint, text_model=text_model, backend=args.backend,
                          graph_backends=parse_graph_backends(args.graph_backend), prompts=prompts, seeds=seeds,
                          cfg=args.cfg, thresholds=overrides, fp16=not args.no_fp16, progress=step,
                          on_total=on_total, samples=args.samples)
    finally:
        for bar in bars:
            bar.close()
    return _finish(report, args.out)


def _finish(report, out) -> int:
    from hartkit.validate.report import summary_lines, verdict_lines, write_report

    json_path, html_path = write_report(report, out)
    print("\n".join(summary_lines(report)))
    for note in report.notes:
        print(f"note: {note}")
    print("\n".join(verdict_lines(report)))
    print(f"{'PASS' if report.passed else 'FAIL'}: report at {html_path.resolve().as_uri()} (data: {json_path})")
    return 0 if report.passed else 3  # a failed check, like parity and bundle verification
