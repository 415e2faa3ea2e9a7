"""hartkit: take HART (hybrid autoregressive text-to-image) to phones and laptops.

Subpackages: ``model`` (PyTorch reference), ``quantize``, ``export``, ``bundle`` (the bundle format,
torch-free), ``runtime`` (torch-free), ``validate``. Importing ``hartkit`` itself imports nothing heavy.
"""

__version__ = "0.1.0"
