"""hartkit.runtime: the staged sampling loop over exported graphs, in numpy. Must import without torch."""
