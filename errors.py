"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits non-zero."""


class HartkitError(Exception):
    """Base class: a problem with the user's input, files or environment, not a bug."""

    exit_code = 2


class CheckpointError(HartkitError):
    """A checkpoint folder, config or weight file is missing, corrupt, unsafe or mismatched."""


class UsageError(HartkitError):
    """An argument is out of range or inconsistent."""


class MissingDependencyError(HartkitError):
    """An optional library (onnxruntime, executorch, coremltools, ...) is needed but not installed."""


class OutputError(HartkitError):
    """An output cannot be written: read-only folder, disk full, a name too long, a path in use."""


class BundleError(HartkitError):
    """A bundle is malformed, tampered with, or from a newer hartkit (or names a path outside itself)."""

    exit_code = 3
