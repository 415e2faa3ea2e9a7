#!/usr/bin/env bash
# The README's performance table: HART 0.7B shapes (random weights in the official layout, with a
# Qwen2-1.5B-shaped text encoder) at 256 px: torch eager fp32 vs onnxruntime fp32 and `laptop`
# (int8 AR) and ExecuTorch fp32, measured side by side in one `hartkit bench` run.
# Needs ~24 GiB of memory and ~30 GB of disk; about 1 h on 2 cores (mostly the exports; bundles in
# $WORK are reused by later runs). Not yet in the table (see README): `phone` (its ONNX export misses
# the parity bar at this size) and the quantized ExecuTorch recipes (fp16 parts run on portable kernels).
set -euo pipefail
CK=${CK:-/tmp/hart-0.7b}
WORK=${WORK:-/tmp/hart-0.7b-bench}
OUT=${OUT:-benchmarks/results/hart-0.7b-256px}
[ -f "$CK/llm/config.json" ] || hartkit init-checkpoint "$CK" --preset hart-0.7b-1024px
[ -f "$WORK/fp32-executorch-256px/manifest.json" ] || \
  hartkit export --checkpoint "$CK" --format executorch --resolution 256 --out "$WORK/fp32-executorch-256px"
hartkit bench --checkpoint "$CK" --recipes fp32,laptop --format onnx --resolution 256 --work "$WORK" \
  --bundle "$WORK/fp32-executorch-256px" --runs 1 --out "$OUT"
