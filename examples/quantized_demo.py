"""What int8 and int4 do to the demo model's *meaning*: the README table "What int8 and int4 do to it".

    python examples/quantized_demo.py                 # assets/demo, 50 held-out prompts, ~15 min on 2 cores
    python examples/quantized_demo.py --table-only    # re-print the table from an earlier run's report
    python examples/quantized_demo.py --methods       # int4 methods side by side (eager onnx arithmetic)

``--methods`` compares the ways of choosing int4 weights on one footing: each recipe's onnx
arithmetic emulated in eager torch (weights as the .onnx file stores them, int8 activations per row
and block as MatMulNBits computes them; the export's parity check holds files to this emulation),
generated over ``--n`` held-out prompts x ``--seeds``, the caption judge on every image, and the
teacher-forced top-1 agreement with fp32 per AR stage. Weight algorithms and the sensitivity pass
calibrate on the built-in prompt set, as ``hartkit export`` does by default.

Runs the user-facing commands: ``hartkit export`` of the checkpoint three times (fp32, ``laptop`` =
int8, ``phone`` = int4; ONNX and ExecuTorch in each bundle), then ``hartkit validate`` of the three
bundles on the first ``--n`` held-out prompts (one seed), and prints a Markdown table from its
``report.json``: each pipeline's caption accuracy (the pixel judge on its own images), the worst
teacher-forced top-1 agreement with fp32, the free-running token agreement at the last stage, and
the image PSNR vs fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("fp32", "laptop", "phone")


def run(cmd: list[str], log: Path) -> int:
    print("$ " + " ".join(cmd), flush=True)
    with log.open("w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def table(report: dict) -> str:
    """Markdown rows: torch fp32 reference, then each recipe with its onnx / executorch numbers."""
    rows = {(r["recipe"], r["format"]): r for r in report["rows"] if r["kind"] == "bundle" and r["status"] == "ok"}
    ref = report["reference"]["fp32"]["caption"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.0f} %"

    def pair(recipe, fn):
        return " / ".join(fn(rows[(recipe, fmt)]) if (recipe, fmt) in rows else "-" for fmt in ("onnx", "executorch"))

    def caption(row):
        return pct((row["caption"] or {}).get("accuracy"))

    def agree(row):
        return f"{100 * row['stages'][-1]['free_token_agreement']:.2f} %"

    def top1(row):
        return f"{row['summary']['tf_top1_min']:.2f}"

    def image_psnr(row):
        v = row["summary"].get("image_psnr_db_min")
        return "equal images" if v in (None, "inf") or (isinstance(v, float) and math.isinf(v)) else f"{v:.1f} dB"

    lines = [
        "| pipeline | caption accuracy | teacher-forced top-1 (worst stage) | free-running tokens agree (last stage)"
        " | image PSNR vs fp32 |",
        "|---|---|---|---|---|",
        f"| torch fp32 (reference, guidance {report['cfg']:g}) | {pct(ref['accuracy'])} | | | |",
    ]
    names = {"fp32": "fp32", "laptop": "`laptop` (int8)", "phone": "`phone` (int4)"}
    for recipe in RECIPES:
        lines.append(
            f"| onnxruntime / ExecuTorch {names[recipe]} | {pair(recipe, caption)}"
            f" | {pair(recipe, top1)}"
            f" | {pair(recipe, agree)}"
            f" | {pair(recipe, image_psnr)} |")
    return "\n".join(lines)


# name -> (recipe, what it is); every recipe's onnx section is what is measured
def _methods() -> dict[str, tuple[dict, str]]:
    import copy

    from hartkit.quantize.recipe import PRESETS

    phone, quality = PRESETS["phone"], PRESETS["phone-quality"]

    def with_algorithm(recipe: dict, algorithm: str, mixed: bool, name: str) -> dict:
        r = copy.deepcopy(recipe)
        r["name"] = name
        onnx = r["formats"]["onnx"]
        for c in ("text_encoder", "ar_transformer"):
            onnx["components"][c] = "8da4w-g64" + ("" if algorithm == "rtn" else f"-{algorithm}")
        if mixed:
            onnx["mixed"] = copy.deepcopy(quality["formats"]["onnx"]["mixed"])
        else:
            onnx.pop("mixed", None)
        r.pop("mixed", None)
        return r

    return {
        "fp32": ({"name": "fp32"}, "no quantization"),
        "laptop": (PRESETS["laptop"], "int8 (w8a8 AR, 8da8w text encoder)"),
        "phone": (with_algorithm(phone, "rtn", False, "phone"), "int4 round-to-nearest (8da4w-g64)"),
        "phone-hqq": (with_algorithm(phone, "hqq", False, "phone-hqq"), "int4 HQQ (onnxruntime)"),
        "phone-gptq": (with_algorithm(phone, "gptq", False, "phone-gptq"), "int4 GPTQ"),
        "phone-mixed": (with_algorithm(phone, "rtn", True, "phone-mixed"),
                        "int4 round-to-nearest + sensitivity-chosen 8da8w layers within 5.0 bits/weight"),
        "phone-quality": (quality, "int4 GPTQ + sensitivity-chosen 8da8w layers within 5.0 bits/weight"),
    }


def measure_methods(checkpoint: str, prompts: list[str], seeds: list[int], names: list[str],
                    say=print) -> dict:
    """Caption accuracy and per-stage teacher-forced top-1 of each method's eager onnx arithmetic."""
    import numpy as np

    from hartkit.loop.plan import LoopInfo
    from hartkit.model.checkpoint import load_hart
    from hartkit.model.text_encoder import TextEncoder
    from hartkit.loop.sampler import StagedLoop
    from hartkit.model.graphs import hart_graph_specs, loop_info
    from hartkit.model.torch_runner import TorchBackend, system_length_of
    from hartkit.quantize import fakequant as fq
    from hartkit.quantize.algorithms import calibrated_weights
    from hartkit.quantize.calibration import record
    from hartkit.quantize.layers import discover
    from hartkit.quantize.recipe import Recipe, resolve
    from hartkit.quantize.sensitivity import expand_mixed
    from hartkit.quantize.sizes import average_bits
    from hartkit.validate.caption_score import evaluate

    model = load_hart(checkpoint)
    encoder = TextEncoder.from_pretrained(Path(checkpoint) / "text_model")
    S = system_length_of(encoder.tokenizer, model.cfg.context_token)
    specs = hart_graph_specs(model, encoder, S)
    layers = discover(model, encoder, specs)
    io = {s.name: ([i.name for i in s.inputs], [o.name for o in s.outputs]) for s in specs}
    info = LoopInfo.from_dict(loop_info(model, S))
    say("recording calibration inputs (built-in prompts)")
    calib = record(model, encoder, S)
    runs = [(p, s) for p in prompts for s in seeds]

    def loop_of(qmodel, qenc, rules) -> StagedLoop:
        mods = {}
        for spec in hart_graph_specs(qmodel, qenc, S):
            m = spec.build().eval()
            mods[spec.name] = fq.EmulatedGraph(m, rules, spec.name).eval() if rules else m
        backend = TorchBackend(mods, io)
        return StagedLoop(info, backend.run, encoder.tokenizer,
                          model.vae.quantize.embedding.weight.detach().float().numpy())

    ref = loop_of(model, encoder, {})
    ref_logits, ref_trace = [], []
    for i, (p, s) in enumerate(runs):
        lg: list = []
        _, trace = ref.generate(p, seed=s, callback_on_stage_end=lambda si, st, lg=lg: lg.append(st["logits"]))
        ref_logits.append(lg)
        ref_trace.append(trace)
    results = {}
    ar = [l.name for l in layers if l.component == "ar_transformer" and l.kind == "linear"]
    for name in names:
        recipe_data, what = _methods()[name]
        say(f"{name}: {what}")
        recipe = expand_mixed(Recipe.from_dict(recipe_data, source=name), model, encoder, S, calib, "onnx")
        plan = resolve(recipe, layers, "onnx")
        schemes = {n: a.scheme for n, a in plan.assignments.items()}
        given = calibrated_weights(model, encoder, S, plan, calib)
        qmodel, qenc = fq.copy_models(model, encoder)
        fq.apply_weights(qmodel, qenc, {n: s for n, s in schemes.items() if s.name != "fp32"}, "onnx",
                         {n: a.layer.kind for n, a in plan.assignments.items()}, given=given)
        pipe = loop_of(qmodel, qenc, fq.activation_rules(qmodel, qenc, schemes, "onnx"))
        images, top1 = [], None
        for i, (p, s) in enumerate(runs):
            image, _ = pipe.generate(p, seed=s)
            images.append(image)
            agree: list = []

            def force(si, st, i=i, agree=agree):
                agree.append(float(np.mean(np.argmax(st["logits"], -1) == np.argmax(ref_logits[i][si], -1))))
                return {"tokens": ref_trace[i].tokens[si], "latents": ref_trace[i].latents[si]}

            pipe.generate(p, seed=s, callback_on_stage_end=force)
            top1 = [0.0] * len(agree) if top1 is None else top1
            top1 = [a + b / len(runs) for a, b in zip(top1, agree)]
        report = evaluate(images, [p for p, _ in runs])
        per_seed = [float(np.mean([it["caption"] for it, (_, s) in zip(report.items, runs) if s == seed]))
                    for seed in seeds]
        results[name] = {"what": what, "caption": report.accuracy, "caption_per_seed": per_seed,
                         "tf_top1": top1, "ar_avg_bits": average_bits({n: schemes[n] for n in ar},
                                                                      {n: layers[n] for n in ar}, "onnx"),
                         "promoted": (recipe.mixed_for("onnx") or {}).get("expanded", {}).get("promoted", [])}
        say(f"  caption {100 * report.accuracy:.1f} % ({', '.join(f'{100 * v:.0f}' for v in per_seed)}), "
            f"tf top-1 per stage {' '.join(f'{v:.2f}' for v in top1)}")
    return {"prompts": len(prompts), "seeds": seeds, "cfg": info.default_cfg, "methods": results}


def methods_table(res: dict) -> str:
    lines = ["| method (onnx arithmetic, eager) | AR bits / weight | caption accuracy (per seed set) | "
             "teacher-forced top-1 per stage |", "|---|---|---|---|"]
    for name, r in res["methods"].items():
        lines.append(f"| `{name}`: {r['what']} | {r['ar_avg_bits']:.2f} | {100 * r['caption']:.1f} % "
                     f"({' / '.join(f'{100 * v:.0f}' for v in r['caption_per_seed'])}) | "
                     f"{' '.join(f'{v:.2f}' for v in r['tf_top1'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "assets" / "demo"))
    p.add_argument("--out", default="runs/demo-quant", help="bundles, logs and the report (default: runs/demo-quant)")
    p.add_argument("--n", type=int, default=50, help="held-out prompts (default: 50)")
    p.add_argument("--table-only", action="store_true", help="print the table of an earlier run's report")
    p.add_argument("--methods", nargs="?", const="all", metavar="NAMES",
                   help="compare int4 methods in eager onnx arithmetic (comma-separated names or all: "
                        "fp32, laptop, phone, phone-hqq, phone-gptq, phone-mixed, phone-quality)")
    p.add_argument("--seeds", default="0,1", help="seed sets for --methods (default 0,1)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.methods:
        from hartkit.fsutil import write_json
        from hartkit.validate.scenes import heldout_prompts

        names = list(_methods()) if args.methods == "all" else [n.strip() for n in args.methods.split(",")]
        unknown = [n for n in names if n not in _methods()]
        if unknown:
            print(f"unknown method(s) {unknown}; choose from {', '.join(_methods())}", file=sys.stderr)
            return 2
        path = out / "methods.json"
        if not args.table_only:
            out.mkdir(parents=True, exist_ok=True)
            res = measure_methods(args.checkpoint, heldout_prompts(100)[: args.n],
                                  [int(s) for s in args.seeds.split(",")], names)
            write_json(path, res, indent=1)
        elif not path.is_file():
            print(f"{path}: no results (run without --table-only first)", file=sys.stderr)
            return 2
        print(methods_table(json.loads(path.read_text())))
        return 0
    report_path = out / "report" / "report.json"
    if not args.table_only:
        from hartkit.validate.scenes import heldout_prompts

        out.mkdir(parents=True, exist_ok=True)
        prompts = out / "prompts.json"
        prompts.write_text(json.dumps(heldout_prompts(100)[: args.n], indent=1) + "\n")
        hartkit = [sys.executable, "-m", "hartkit.cli"]
        for recipe in RECIPES:
            cmd = hartkit + ["export", "--checkpoint", args.checkpoint, "--format", "onnx,executorch",
                             "--out", str(out / recipe), "--force"] + ([] if recipe == "fp32" else ["--recipe", recipe])
            if run(cmd, out / f"export-{recipe}.log") != 0:
                print(f"export failed: see {out / f'export-{recipe}.log'}", file=sys.stderr)
                return 1
        # exit 3 = a validation bar missed (int4 misses the token bars by design): the report is still complete
        code = run(hartkit + ["validate", *(str(out / r) for r in RECIPES), "--prompts", str(prompts), "--seeds", "0",
                              "--out", str(out / "report")], out / "validate.log")
        if code not in (0, 3):
            print(f"validate failed (exit {code}): see {out / 'validate.log'}", file=sys.stderr)
            return 1
    if not report_path.is_file():
        print(f"{report_path}: no report (run without --table-only first)", file=sys.stderr)
        return 2
    print(table(json.loads(report_path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
