"""The export formats, one :class:`~hartkit.export.targets.base.Target` each: the registry.

A fourth format is one new module here (a :class:`Target` subclass: its libraries, its backend, its
lowering, its quantization transform and its check) and one line in :data:`TARGETS`. Everything else
(``hartkit export --format``, ``export_checkpoint``, the manifest's ``files`` section, the quantization
plan) reads this table. Imports without torch.
"""

from __future__ import annotations

from typing import Sequence

from hartkit.errors import UsageError
from hartkit.export.targets.base import Checked, Exported, Target
from hartkit.export.targets.coreml import CoreMLTarget
from hartkit.export.targets.executorch import ExecuTorchTarget
from hartkit.export.targets.onnx import OnnxTarget

TARGETS: dict[str, Target] = {t.name: t for t in (
    OnnxTarget(),
    ExecuTorchTarget(),
    CoreMLTarget(),
)}
FORMATS = tuple(TARGETS)


def parse_formats(text: str | Sequence[str]) -> list[str]:
    """``"onnx,coreml"`` or a list -> known format names, in order, each once."""
    items = text.split(",") if isinstance(text, str) else list(text)
    formats = [f.strip().lower() for f in items if f.strip()]
    bad = [f for f in formats if f not in TARGETS]
    if bad or not formats:
        raise UsageError(f"unknown export format(s) {bad or formats}; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def targets_of(formats: str | Sequence[str]) -> list[Target]:
    return [TARGETS[f] for f in parse_formats(formats)]


__all__ = ["FORMATS", "TARGETS", "Checked", "CoreMLTarget", "ExecuTorchTarget", "Exported", "OnnxTarget", "Target",
           "parse_formats", "targets_of"]
