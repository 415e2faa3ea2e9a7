"""hartkit.model: HART's inference path in PyTorch (reference), its checkpoints and presets.

Submodules import torch; this package's __init__ does not, so ``hartkit.model.config`` stays light.
"""
