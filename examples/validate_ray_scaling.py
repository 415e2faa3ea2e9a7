"""Throughput of ``hartkit validate --ray`` with 1 and 2 workers, measured side by side in one run.

    python examples/validate_ray_scaling.py [--bundle DIR] [--prompts N] [--work DIR]

On the demo model (``assets/demo``; its fp32 ONNX bundle is exported into --work unless --bundle is given):
one local Ray cluster with 2 CPUs, the same sweep (N held-out-style scene captions, seed 0, no fp16 row) run
with 1 worker and with 2, each into a fresh results folder. Prints seconds, bundle runs per second and the ratio,
and checks that both sweeps built the same report.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="an fp32 bundle of assets/demo (default: export one into --work)")
    ap.add_argument("--prompts", type=int, default=8, help="scene captions to validate on (default 8)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import ray

    from hartkit.bundle import MANIFEST
    from hartkit.validate import scenes
    from hartkit.validate.report import report_dict
    from hartkit.validate.sweep import sweep

    work = Path(args.work or tempfile.mkdtemp(prefix="hartkit-ray-bench-"))
    bundle = Path(args.bundle) if args.bundle else work / "demo-onnx"
    if not args.bundle and not (bundle / MANIFEST).is_file():
        from hartkit.export.exporter import export_checkpoint

        export_checkpoint(DEMO, bundle, ["onnx"])
    import numpy as np

    rng = np.random.default_rng(7)
    prompts = [scenes.random_spec(rng).caption() for _ in range(args.prompts)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    reports = []
    for workers in (1, 2):
        t = time.perf_counter()
        result = sweep([bundle], DEMO, prompts=prompts, seeds=[0], fp16=False, out=work / f"w{workers}",
                       workers=workers, chunk_size=1, progress=False)
        seconds = time.perf_counter() - t
        rows.append((workers, seconds, len(prompts) / seconds))
        d = report_dict(result.report)
        d.pop("created")
        reports.append(d)
    ray.shutdown()
    print(f"demo model, {len(prompts)} prompts x 1 seed, fp32 ONNX bundle, no fp16 row, chunk 1 prompt")
    print("| workers | seconds | bundle runs/s |")
    print("|---|---|---|")
    for workers, seconds, rate in rows:
        print(f"| {workers} | {seconds:.1f} | {rate:.2f} |")
    print(f"speed-up 2 vs 1 workers: {rows[0][1] / rows[1][1]:.2f}x; same report: {reports[0] == reports[1]}")


if __name__ == "__main__":
    main()
