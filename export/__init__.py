"""hartkit.export."""
