"""hartkit.runtime: ``Pipeline`` (loading, one generation at a time) and the backends that run a bundle's
graphs under the one loop of :mod:`hartkit.loop.sampler`. Must import without torch."""
