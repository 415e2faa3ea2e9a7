"""The staged sampling loop (``sampler.StagedLoop``, over graphs run by name) and its torch-free
constants and math, shared by the eager torch oracle (hartkit.model), export recording, calibration
and the runtime. Nothing here imports torch."""
