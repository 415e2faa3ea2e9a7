#!/usr/bin/env bash
# The README's performance table: HART 0.7B shapes (random weights in the official layout, with a
# Qwen2-1.5B-shaped text encoder) at 256 px, torch eager fp32 vs onnxruntime and ExecuTorch at
# fp32 / laptop (int8 AR) / phone (int4 AR + text encoder), in one `hartkit bench` run.
# Needs ~24 GiB of memory and ~30 GB of disk; about 1.5 h on 2 cores (the exports are most of it;
# bundles in $WORK are reused by later runs).
set -euo pipefail
CK=${CK:-/tmp/hart-0.7b}
WORK=${WORK:-/tmp/hart-0.7b-bench}
OUT=${OUT:-benchmarks/results/hart-0.7b-256px}
[ -f "$CK/llm/config.json" ] || hartkit init-checkpoint "$CK" --preset hart-0.7b-1024px
hartkit bench --checkpoint "$CK" --recipes fp32,laptop,phone --format onnx,executorch --resolution 256 \
  --work "$WORK" --runs 1 --out "$OUT"
