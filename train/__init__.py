"""hartkit.train: train a tiny HART end to end, on CPU or one GPU, and evaluate it (the demo model
shipped in ``assets/demo``). Needs torch. ``examples/train_tiny_hart.py`` and
``examples/eval_demo_model.py`` are the command lines over it; ``examples/reproduce_demo.sh`` replays
the runs that made the demo model.

Data: the procedural scenes of :mod:`hartkit.validate.scenes` (train split only). Three phases,
following the public HART/VAR code (``hart_transformer_t2i.py: forward``, ``hart_hybrid_quantize.py``,
``diffusion/gaussian_diffusion.py: training_losses``); HART's own training scripts are not public,
so loss weights and schedules are ours:

1. **Hybrid tokenizer** (:mod:`.tokenizer`; VAE encoder/decoder, multi-scale residual VQ with the
   phi convs): L1 + L2 reconstruction (shape pixels weighted ``1 + fg_weight``) + VAR's VQ loss
   ``mean_s [beta * |sg(f_hat_s) - f|^2 + |f_hat_s - sg(f)|^2]``, straight-through to the encoder.
   As HART's hybrid quantizer, the decoder sees the continuous latent (discrete + residual = f) or
   the discrete-only f_hat, half of the time each (per sample here, per batch upstream). No GAN,
   no perceptual loss. At this width (ch=32) every GroupNorm(32) of the full-resolution levels is a
   per-channel instance norm, which makes flat colours slow to learn: the tokenizer needs several
   thousand steps, and ``--tokenizer-only`` / ``--tokenizer-from`` let it be trained in stages.
2. **Text features** (:mod:`.text`): a tiny random Qwen2 encodes every caption with HART's system
   prompt, exactly as :class:`~hartkit.model.text_encoder.TextEncoder` does at inference; frozen as
   in HART, or trained with the transformer (``--text-lr``). Its tokenizer is a byte-level BPE
   trained on the captions (one token per word).
3. **AR transformer + residual diffusion head** (:mod:`.transformer`, :mod:`.diffusion`), jointly,
   with teacher forcing over all scales and upstream's block-causal mask (a token sees every token
   of its own and earlier scales; the context tokens are level 0). Cross-entropy on every scale's
   tokens (the last context position predicts the 1x1 scale); the diffusion head's DiffLoss
   (epsilon MSE + the learned-variance VB term, IDDPM cosine schedule, 1000 steps,
   ``diffusion_batch_mul`` copies per token) on the continuous residual
   ``f_rest_last - codebook[idx]`` / 0.6, conditioned on ``decoder_norm(h + word_embed(codebook[idx]))``
   where idx is *sampled* from the model's own last-scale logits (top-k 600, top-p 0.96), as
   upstream does. Conditioning dropout for CFG.

Deviations from upstream, on purpose: the dropped-condition rows get inference's unconditional
layout (zero context -> ``cond_BD = context_embed.bias``, RoPE positions 0) with probability
``cond_drop_rate`` (upstream tests ``randn < cond_drop_rate``, i.e. drops ~54 % of rows at 0.1);
no MaskGIT-style token dropping at the last scale (upstream trains on a random subset of the last
scale's tokens to save memory at 64x64 latents; ours has 8x8); the tokenizer's discrete path
applies no phi at the last scale, like inference and ``f_to_idxBl_and_frest`` (upstream's training
quantizer does apply it there); dead codebook entries are re-seeded from encoder outputs.

Modules: :mod:`.config` (settings and flags), :mod:`.schedule` (learning rate, step budget, early
stop), :mod:`.run` (a whole run and its checkpoint), :mod:`.demo_eval` (caption accuracy, guidance
choice, tokenizer PSNR).

On a shared machine prefer ``--threads 1``: with other jobs on the two cores, two torch threads
spend most of their time waiting for each other. ``kill -USR1 <pid>`` ends the running phase early
(the checkpoint is still written). ``--device cuda`` trains on a GPU; ``--ar-seconds S`` sizes the
transformer phase to about S seconds from the speed measured during its warm-up and records the step
count it chose, which ``--ar-steps`` replays.
"""
