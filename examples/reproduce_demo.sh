#!/usr/bin/env bash
# The exact sequence of runs that produced assets/demo (see assets/demo/README.md), then its evaluation.
# Each stage continues from the previous one's weights; intermediate checkpoints go to runs/.
# One thread per run: on a shared 2-core machine that is faster than two (train/__init__.py says why).
# Wall time: the tokenizer runs 1-4 about 80 min on one CPU thread, the transformer runs 5-6 11 min on
# one GPU, run 7 about an hour on one CPU thread (assets/demo/README.md has each run's time and device).
set -euo pipefail
cd "$(dirname "$0")/.."
T="python examples/train_tiny_hart.py --threads 1"

# 1-4: the hybrid tokenizer, in four stages (the first two before shape-pixel weighting existed).
$T --tokenizer-only --out runs/tok1 --vae-steps 1000 --fg-weight 0
$T --tokenizer-only --out runs/tok2 --tokenizer-from runs/tok1 --vae-steps 1500 --vae-lr 1e-3 --warmup 20 --fg-weight 0
$T --tokenizer-only --out runs/tok3 --tokenizer-from runs/tok2 --vae-steps 1500 --vae-lr 1e-3 --warmup 20 --restart-every 0
$T --tokenizer-only --out runs/tok4 --tokenizer-from runs/tok3 --vae-steps 1500 --vae-lr 1e-3 --warmup 20 --restart-every 0
# 5-6: the AR transformer (the demo preset: 6 blocks of width 128) and the residual diffusion head
#    from scratch, with the 4-layer text model trained jointly (HART keeps its text encoder frozen; a
#    tiny random one did not bind colours and shapes to objects), on 40000 fresh images, batch 256,
#    every token weighted alike (upstream's loss). These two ran on one GPU (an H100, three other runs
#    beside them: 6.9 + 4.2 min). Their step counts are what `--ar-seconds 330` / `--ar-seconds 170`
#    chose from the measured speed; fixed here, they replay the same schedule. Without a GPU, set
#    DEVICE=cpu: about 2 s per 64 images on one CPU thread, i.e. some 6-7 h for the two.
G="python examples/train_tiny_hart.py --threads 2 --device ${DEVICE:-cuda}"
$G --out runs/ar1 --tokenizer-from runs/tok4 --vae-steps 0 --num-images 40000 --two-shape-prob 0.7 --seed 5 \
   --ar-steps 1646 --ar-batch 256 --warmup 200 --ar-lr 2e-3 --text-lr 2e-3
$G --out runs/ar2 --tokenizer-from runs/ar1 --transformer-from runs/ar1 --vae-steps 0 --num-images 40000 \
   --two-shape-prob 0.7 --seed 6 --ar-steps 1377 --ar-batch 256 --ar-lr 1e-3 --text-lr 1e-3
# 7: one more hour on one CPU thread, fresh images, batch 64 at 4e-4 (the step count is what
#    `--ar-seconds 3600` chose, replayed here).
$T --out assets/demo --tokenizer-from runs/ar2 --transformer-from runs/ar2 --vae-steps 0 --num-images 16000 \
   --two-shape-prob 0.7 --seed 7 --ar-steps 1893 --ar-batch 64 --warmup 60 --ar-lr 4e-4 --text-lr 4e-4

# The guidance scale the model runs at by default (chosen on training prompts, written to
# assets/demo/llm/generation_config.json), then the held-out numbers of assets/demo/README.md.
python examples/eval_demo_model.py --choose-cfg 1,1.5,2,3,4.5 --train-prompts --update-readme --grid runs/demo_grid.png
