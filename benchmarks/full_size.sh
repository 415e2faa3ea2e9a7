#!/usr/bin/env bash
# The README's performance tables: HART 0.7B shapes (random weights in the official layout, with a
# Qwen2-1.5B-shaped text encoder), torch eager fp32 against the exported graphs, measured side by
# side, one `hartkit bench` run per resolution:
#   256 px:  onnxruntime and ExecuTorch at fp32, `laptop` (int8) and `phone` (int4)
#   1024 px: onnxruntime fp32 (the quantized exports already peak at 24.8 GB at 256 px)
# Needs ~25 GiB of memory (the quantized exports peak there) and ~45 GB of disk; several hours on 2
# cores (mostly the exports and ExecuTorch's AR graphs; bundles in $WORK are reused by later runs).
set -euo pipefail
CK=${CK:-/tmp/hart-0.7b}
WORK=${WORK:-/tmp/hart-0.7b-bench}
RES=${RES:-256 1024}
[ -f "$CK/llm/config.json" ] || hartkit init-checkpoint "$CK" --preset hart-0.7b-1024px
for r in $RES; do
  if [ "$r" = 1024 ]; then recipes=fp32; formats=onnx; else recipes=fp32,laptop,phone; formats=onnx,executorch; fi
  hartkit bench --checkpoint "$CK" --recipes "$recipes" --format "$formats" --resolution "$r" --work "$WORK" \
    --runs 1 --out "benchmarks/results/hart-0.7b-${r}px"
done
