"""``hartkit quantize`` and ``hartkit sensitivity``: recipes listed, dry-run or exported; per-layer sensitivity
and a mixed recipe under a size budget."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hartkit.cli.options import add_bundle_options, add_checkpoint_options, add_export_options


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def add_parser(sub) -> None:
    """Both verbs: ``quantize`` then ``sensitivity``."""
    p = sub.add_parser(
        "quantize", help="export a checkpoint with a quantization recipe (or list / dry-run recipes)",
        description="Quantize and export: `hartkit quantize --checkpoint DIR --recipe phone --format onnx --out OUT` "
                    "is `hartkit export ... --recipe phone`. --list prints the presets and the support table; "
                    "--dry-run resolves a recipe for a checkpoint and prints every layer's scheme, the fallbacks "
                    "and the estimated sizes, without exporting.")
    add_bundle_options(p, required=False, out_help="output bundle folder (new or empty, unless --force)")
    add_export_options(p)
    p.add_argument("--list", action="store_true", help="print the presets and the (scheme, format) support table")
    p.add_argument("--dry-run", action="store_true", help="resolve the recipe and print the plan; export nothing")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "sensitivity", help="rank layers by quantization sensitivity and build a mixed recipe under a budget",
        description="Quantize one layer (or block) at a time with --scheme and measure the error it causes on the "
                    "graph outputs and on the teacher-forced stage logits over a calibration set; rank; keep the "
                    "most sensitive at --high while the analysed components fit --budget-mb (or --avg-bits). "
                    "Writes OUT/sensitivity.json, OUT/sensitivity.png, OUT/recipe.json and OUT/calibration.npz.")
    add_checkpoint_options(p, required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--components", default="text_encoder,ar_transformer",
                   help="comma-separated components to analyse (default: text_encoder,ar_transformer)")
    p.add_argument("--format", default="onnx", help="whose arithmetic to simulate: onnx, executorch, coreml")
    p.add_argument("--scheme", default=None, help="the low scheme (default: int4; 8da4w on executorch)")
    p.add_argument("--high", default=None, help="the scheme sensitive layers keep (default: int8; 8da8w on executorch)")
    p.add_argument("--granularity", default="layer", choices=["layer", "block"], help="rank layers or blocks")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--budget-mb", type=_positive, help="size budget of the analysed components in MB")
    group.add_argument("--avg-bits", type=_positive, help="average stored bits per weight (scales included)")
    p.add_argument("--prompts", metavar="FILE", help="calibration prompts, one per line (default: built-in set)")
    p.add_argument("--calibration", metavar="FILE.npz", help="reuse a calibration file instead of recording")
    p.add_argument("--points", type=int, default=6, help="mixes measured along the error-vs-size curve (default 6)")
    p.add_argument("--base", metavar="NAME|FILE", help="recipe for the components not analysed (default: fp32)")
    p.add_argument("--threads", type=int, help="torch threads (small models run fastest on 1; default: torch's)")
    p.set_defaults(func=cmd_sensitivity)


def _load(args: argparse.Namespace):
    from hartkit.cli.options import resolve_weights
    from hartkit.model.checkpoint import load_hart
    from hartkit.model.text_encoder import TextEncoder
    from hartkit.model.torch_runner import system_length_of

    ck, text = resolve_weights(args)  # folders, .../llm or repo ids in the HF cache
    model = load_hart(ck)
    encoder = TextEncoder.from_pretrained(text)
    return model, encoder, system_length_of(encoder.tokenizer, model.cfg.context_token)


def cmd_quantize(args: argparse.Namespace) -> int:
    from hartkit.errors import UsageError
    from hartkit.quantize.recipe import PRESETS, Recipe
    from hartkit.quantize.schemes import support_table

    if args.list:
        print("presets:")
        for name in PRESETS:
            r = Recipe.load(name)
            print(f"  {name:8} {r.description}")
            print(f"           {json.dumps(r.to_dict().get('components', {}))}"
                  + (f" default {r.default.label}" if r.default.name != "fp32" else ""))
            for fmt, over in r.to_dict().get("formats", {}).items():
                print(f"           on {fmt}: {json.dumps(over.get('components', {}))}")
        print()
        print(support_table())
        return 0
    if not args.recipe:
        raise UsageError("give --recipe NAME|FILE (or --list)")
    if not args.checkpoint:
        raise UsageError("give --checkpoint DIR")
    if args.dry_run:
        return _dry_run(args)
    if not args.out:
        raise UsageError("give --out DIR (or --dry-run)")
    from hartkit.cli.export import cmd_export

    return cmd_export(args)


def _dry_run(args: argparse.Namespace) -> int:
    from hartkit.export.exporter import parse_formats
    from hartkit.model.graphs import hart_graph_specs
    from hartkit.quantize.layers import discover
    from hartkit.quantize.recipe import Recipe, resolve
    from hartkit.quantize.sizes import MB, layer_bytes, plan_bytes

    recipe = Recipe.load(args.recipe)
    model, encoder, system_length = _load(args)
    layers = discover(model, encoder, hart_graph_specs(model, encoder, system_length))
    for fmt in parse_formats(args.format):
        plan = resolve(recipe, layers, fmt)
        print(f"== {recipe.name} on {fmt}")
        for name, a in plan.assignments.items():
            note = f"  <- {a.requested.label}: {a.reason}" if a.fell_back else ""
            print(f"  {name:58} {a.scheme.label:10} {layer_bytes(a.layer, a.scheme, fmt) / 1e3:10.1f} kB{note}")
        for line in plan.fallback_summary():
            print(f"  fallback: {line}")
        sizes = plan_bytes(plan)
        print("  estimated: " + ", ".join(f"{c} {b / MB:.3f} MB" for c, b in sizes.items())
              + f"; total {sum(sizes.values()) / MB:.3f} MB")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from hartkit.errors import UsageError
    from hartkit.fsutil import write_json
    from hartkit.quantize import sensitivity as sv
    from hartkit.quantize.calibration import CalibrationSet, load_prompts, record
    from hartkit.quantize.recipe import Recipe
    from hartkit.quantize.sizes import MB

    fmt = args.format
    low = args.scheme or ("8da4w" if fmt == "executorch" else "int4")
    high = args.high or ("8da8w" if fmt == "executorch" else "int8")
    base = Recipe.load(args.base) if args.base else None
    if args.points < 2:
        raise UsageError("--points must be at least 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, encoder, system_length = _load(args)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    if args.calibration:
        calib = CalibrationSet.load(args.calibration)
    else:
        prompts = load_prompts(args.prompts) if args.prompts else None
        calib = record(model, encoder, system_length, prompts, progress=say)
        calib.save(out / "calibration.npz")
    report, ev = sv.analyze(model, encoder, system_length, calib, components=_csv(args.components), low=low, high=high,
                            fmt=fmt, granularity=args.granularity, progress=say)
    promoted = None
    if args.budget_mb is not None or args.avg_bits is not None:
        promoted = sv.mixed_plan(report, budget_mb=args.budget_mb, avg_bits=args.avg_bits)
        report.chosen = {**sv.measure(ev, report, promoted), "budget_mb": args.budget_mb, "avg_bits": args.avg_bits}
    say("sensitivity: measuring the error-vs-size curve")
    sv.sweep(ev, report, points=args.points)
    write_json(out / "sensitivity.json", report.to_json(), indent=2)
    sv.plot(report, out / "sensitivity.png")
    print(f"{'unit':58} {'score':>10} {report.low + ' kB':>12} {report.high + ' kB':>12}")
    for u in report.units[:20]:
        print(f"{u.unit:58} {u.score:10.3e} {u.bytes_low / 1e3:12.1f} {u.bytes_high / 1e3:12.1f}")
    if len(report.units) > 20:
        print(f"... {len(report.units) - 20} more in {out / 'sensitivity.json'}")
    if promoted is not None:
        recipe = sv.plan_recipe(report, promoted, base, name=f"mixed-{fmt}")
        recipe.save(out / "recipe.json")
        c = report.chosen
        print(f"mixed recipe: {len(promoted)} of {len(report.units)} at {report.high}, {c['mb']:.4f} MB "
              f"(error {c['error']:.3e}) -> {out / 'recipe.json'}")
    print(f"wrote {out / 'sensitivity.json'} and {out / 'sensitivity.png'}"
          f" (sizes: all {report.low} {report.size_bytes(set()) / MB:.4f} MB, all {report.high} "
          f"{report.size_bytes({u.unit for u in report.units}) / MB:.4f} MB)")
    return 0
