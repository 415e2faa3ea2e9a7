"""hartkit.bench: speed, memory and size measured side by side (hartkit bench)."""
