"""hartkit.quantize."""
