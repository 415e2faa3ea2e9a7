#!/usr/bin/env bash
# The exact sequence of runs that produced assets/demo (see assets/demo/README.md), then its evaluation.
# Each stage continues from the previous one's weights; intermediate checkpoints go to runs/.
# One thread per run: on a shared 2-core machine that is faster than two (see train_tiny_hart.py).
# Wall time of the whole chain: about 6 hours on one thread (the table in assets/demo/README.md has
# each stage's time; run 5 takes ~1 h alone, run 8 ~70 min).
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
$T --out runs/ar2 --tokenizer-from runs/tok4 --transformer-from runs/ar1 --vae-steps 0 --num-images 12000 \
   --two-shape-prob 0.7 --ar-steps 4500 --ar-lr 1e-3 --text-layers 4 --text-lr 1.5e-3 --scale-weight 0.5
# 7: 3000 more steps at 7e-4.
$T --out runs/ar3 --tokenizer-from runs/ar2 --transformer-from runs/ar2 --vae-steps 0 --num-images 12000 \
   --two-shape-prob 0.7 --ar-steps 3000 --ar-lr 7e-4 --text-layers 4 --text-lr 1e-3 --scale-weight 0.5
# 8-9: fresh images each run (--seed), every token weighted alike again (upstream's loss: the fine
#    scales, where the shapes are painted, hold most tokens), at 1e-3 then 5e-4.
$T --out runs/ar4 --tokenizer-from runs/ar3 --transformer-from runs/ar3 --vae-steps 0 --num-images 16000 \
   --two-shape-prob 0.7 --ar-steps 8000 --ar-lr 1e-3 --text-layers 4 --text-lr 1e-3 --seed 1
$T --out assets/demo --tokenizer-from runs/ar4 --transformer-from runs/ar4 --vae-steps 0 --num-images 16000 \
   --two-shape-prob 0.7 --ar-steps 5000 --ar-lr 5e-4 --text-layers 4 --text-lr 5e-4 --seed 2

# The guidance scale the model runs at by default (chosen on training prompts, written to
# assets/demo/llm/generation_config.json), then the held-out numbers of assets/demo/README.md.
python examples/eval_demo_model.py --choose-cfg 1,1.5,2,3,4.5 --train-prompts --update-readme --grid runs/demo_grid.png
