"""Torch-free constants and math of the staged sampling loop, shared by the PyTorch reference
(hartkit.model) and the exported-graph runtime (hartkit.runtime). Nothing here imports torch."""
