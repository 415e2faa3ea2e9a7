#!/usr/bin/env bash
# The exact sequence of runs that produced assets/demo (see assets/demo/README.md), then its evaluation.
# Each stage continues from the previous one's weights; intermediate checkpoints go to runs/.
# One thread per run: on a shared 2-core machine that is faster than two (see train_tiny_hart.py).
# Wall time of the whole chain: about 3 hours on one thread (the table in assets/demo/README.md has
# each stage's time; run 5 takes ~1 h alone, run 6 ~35 min).
set -euo pipefail
cd "$(dirname "$0")/.."
T="python examples/train_tiny_hart.py --threads 1"

# 1-4: the hybrid tokenizer, in four stages (the first two before shape-pixel weighting existed).
$T --tokenizer-only --out runs/tok1 --vae-steps 1000 --fg-weight 0
$T --tokenizer-only --out runs/tok2 --tokenizer-from runs/tok1 --vae-steps 1500 --vae-lr 1e-3 --warmup 20 --fg-weight 0
$T --tokenizer-only --out runs/tok3 --tokenizer-from runs/tok2 --vae-steps 1500 --vae-lr 1e-3 --warmup 20 --restart-every 0
$T --tokenizer-only --out runs/tok4 --tokenizer-from runs/tok3 --vae-steps 1500 --vae-lr 1e-3 --warmup 20 --restart-every 0
# 5-6: the AR transformer and the residual diffusion head from scratch, with the 4-layer text model
#    trained jointly (HART keeps its text encoder frozen; a tiny random one did not bind colours and
#    shapes to objects) and the coarse scales' tokens up-weighted; then a second run at half the rate.
$T --out runs/ar1 --tokenizer-from runs/tok4 --vae-steps 0 --num-images 12000 --two-shape-prob 0.7 \
   --ar-steps 8000 --text-layers 4 --text-lr 3e-3 --scale-weight 0.5
$T --out assets/demo --tokenizer-from runs/tok4 --transformer-from runs/ar1 --vae-steps 0 --num-images 12000 \
   --two-shape-prob 0.7 --ar-steps 4500 --ar-lr 1e-3 --text-layers 4 --text-lr 1.5e-3 --scale-weight 0.5

python examples/eval_demo_model.py --train-prompts --update-readme --grid runs/demo_grid.png
