"""hartkit.validate."""
