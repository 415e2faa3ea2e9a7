"""The ExecuTorch target: one program ``executorch/hart.pte`` (a method per graph, XNNPACK-delegated), run
by ExecuTorch's runtime.

Quantization comes before lowering: the eager reference *is* what gets lowered, the models with
torchao's ``quantize_`` applied (8da8w / 8da4w: int8 dynamic activations, int8 or int4 grouped weights)
and fp16-stored weights where the plan says fp16.

Module: ``lower`` (export, lowering with fallback grouping, delegation report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from hartkit.export.targets.base import Exported, Target


class ExecuTorchTarget(Target):
    name = "executorch"
    libraries = ("executorch",)
    extra = "executorch"
    backend = "executorch"

    def quantize_eager(self, model, encoder, plan, ranges) -> dict:
        from hartkit.quantize.apply import torchao_quantize

        torchao_quantize(model, encoder, {n: a.scheme for n, a in plan.assignments.items()})
        return {}  # torchao's modules compute the activation quantization themselves

    def export(self, specs: Sequence, modules: Mapping, folder: Path, plan, say: Callable[[str], None]) -> Exported:
        from hartkit.export.targets.executorch.lower import export_executorch

        reference = plan.reference()  # fp32 plan: the fp32 graphs themselves
        return Exported(export_executorch(reference.specs, reference.modules, folder, progress=say))
