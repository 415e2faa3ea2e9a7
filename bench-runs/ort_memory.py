"""Before/after of the onnxruntime runtime's memory settings, side by side on one bundle.

    python bench-runs/ort_memory.py BUNDLE [--runs 2]

Each setting runs in a fresh process (peak RSS = VmHWM of that process): two generations of one prompt,
the second one timed. Settings (runtime/backends.py, OnnxRuntimeBackend):

- ``arena``: each InferenceSession keeps a CPU memory arena sized to its largest run (onnxruntime's
  default); off, a graph's buffers go back when it ends.
- ``context_on_stage``: stage 0 runs on the ar_stage graph with an empty past instead of ar_context,
  so one session (not two) prepacks the AR weights.

The last row is what the runtime does now (both changes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SETTINGS = [(True, False), (False, False), (True, True), (False, True)]  # (arena, context_on_stage)

CHILD = r"""
import json, sys, time
bundle, arena, ctx, runs = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4])
import hartkit.backends as B
B.OnnxRuntimeBackend.use_arena = arena
B.OnnxRuntimeBackend.context_on_stage_graph = ctx
from hartkit.runtime.pipeline import Pipeline
pipe = Pipeline.from_bundle(bundle, verify=False)
times, tokens = [], None
for _ in range(runs):
    t0 = time.perf_counter()
    _, trace = pipe.generate("a red circle above a blue square", seed=0)
    times.append(time.perf_counter() - t0)
    tokens = [t.tolist() for t in trace.tokens]
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": min(times[1:] or times), "peak_bytes": hwm * 1024, "tokens": tokens}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--runs", type=int, default=2, help="generations per setting; the first is a warm-up")
    args = p.parse_args(argv)
    rows = []
    for arena, ctx in SETTINGS:
        out = subprocess.run([sys.executable, "-c", CHILD, args.bundle, str(int(arena)), str(int(ctx)), str(args.runs)],
                             check=True, capture_output=True, text=True).stdout
        rows.append({"arena": arena, "context_on_stage": ctx, **json.loads(out.strip().splitlines()[-1])})
    base = rows[0]
    print("| arena | stage 0 on | seconds | vs before | peak RSS (GB) | vs before | tokens as before |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['arena'] else 'off'} | {'ar_stage' if r['context_on_stage'] else 'ar_context'} | "
              f"{r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f}x | {r['peak_bytes'] / 1e9:.2f} | "
              f"{r['peak_bytes'] / base['peak_bytes']:.2f}x | {'yes' if r['tokens'] == base['tokens'] else 'NO'} |")
    return 0 if all(r["tokens"] == base["tokens"] for r in rows) else 3


if __name__ == "__main__":
    sys.exit(main())
