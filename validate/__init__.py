"""hartkit.validate: ``hartkit validate`` (core, metrics, thresholds, references, report) and the scene
dataset with its caption scorer (scenes, caption_score). Import the submodules; this package imports nothing."""
