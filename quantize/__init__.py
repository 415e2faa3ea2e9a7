"""hartkit.quantize: quantization recipes for every component and export format.

=================  ===========================================================================
module             what it holds
=================  ===========================================================================
schemes            the schemes and THE support table of (scheme, format, layer kind) cells
recipe             recipes as data (JSON/YAML, presets ``laptop``/``phone``/``fp16``/``fp32``),
                   validated, and resolved per format into a per-layer :class:`~.recipe.Plan`
layers             the quantizable layers (``component/path``) and which graphs use them
fakequant          each format's arithmetic applied in eager torch (the reference exports are
                   checked against)
onnx_quant         onnxruntime.quantization on exported ONNX graphs (Gemm -> MatMul first); the
                   ONNX target calls it, the Core ML one compresses in export/targets/coreml
apply              eager references (a plan applied in torch as a format computes) and their bars
calibration        real graph inputs recorded from the reference loop over a prompt set (.npz)
sensitivity        per-layer sensitivity, mixed precision under a size budget, the plot
sizes              bytes per layer per (scheme, format): budgets and size checks
=================  ===========================================================================

The ``hartkit quantize`` and ``hartkit sensitivity`` verbs live in ``hartkit.cli.quantize``; nothing
here imports the command line. Modules load torch and the format libraries lazily.
"""
