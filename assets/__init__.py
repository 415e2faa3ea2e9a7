"""hartkit.assets."""
