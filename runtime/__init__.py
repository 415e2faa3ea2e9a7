"""hartkit.runtime: ``Pipeline`` (loading, one generation at a time) over the one loop of
:mod:`hartkit.loop.sampler`, on the graph runners of :mod:`hartkit.backends`. Must import without torch."""
