"""What int8 and int4 do to the demo model's *meaning*: the README table "What int8 and int4 do to it".

    python examples/quantized_demo.py                 # assets/demo, 50 held-out prompts, ~15 min on 2 cores
    python examples/quantized_demo.py --table-only    # re-print the table from an earlier run's report

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "assets" / "demo"))
    p.add_argument("--out", default="runs/demo-quant", help="bundles, logs and the report (default: runs/demo-quant)")
    p.add_argument("--n", type=int, default=50, help="held-out prompts (default: 50)")
    p.add_argument("--table-only", action="store_true", help="print the table of an earlier run's report")
    args = p.parse_args(argv)
    out = Path(args.out)
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
