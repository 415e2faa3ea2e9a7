#!/usr/bin/env bash
# The README's performance tables: HART 0.7B shapes (random weights in the official layout, with a
# Qwen2-1.5B-shaped text encoder), torch eager fp32 against the exported graphs, measured side by
# side, one `hartkit bench` run per resolution:
#   256 px:  onnxruntime and ExecuTorch at fp32, `laptop` (int8) and `phone` (int4)
#   1024 px: onnxruntime fp32 (the quantized exports already peak at 24-25 GB at 256 px)
# Needs ~25 GiB of memory and ~50 GB of disk; about 2.5 h on 2 cores, mostly the exports (bundles in
# $WORK are reused by later runs, and re-exported when a preset's schemes change). Run it on an
# otherwise idle machine: the ratios are only as good as the two sides' shared conditions.
set -euo pipefail
CK=${CK:-/tmp/hart-0.7b}
WORK=${WORK:-/tmp/hart-0.7b-bench}
[ -f "$CK/llm/config.json" ] || hartkit init-checkpoint "$CK" --preset hart-0.7b-1024px
hartkit bench --checkpoint "$CK" --recipes fp32,laptop,phone --format onnx,executorch \
  --resolution 256 --work "$WORK" --runs 1 --out bench-runs/results/hart-0.7b-256px
hartkit bench --checkpoint "$CK" --recipes fp32 --format onnx --resolution 1024 --work "$WORK" \
  --runs 1 --out bench-runs/results/hart-0.7b-1024px
