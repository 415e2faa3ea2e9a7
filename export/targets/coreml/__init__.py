"""The Core ML target: ``coreml/<graph>.mlpackage`` (mlprogram, fp16 compute, iOS17) plus iOS18
multifunction packages per weight group, run by Core ML on macOS and checked here without it.

Quantization comes after lowering: ``coremltools.optimize.coreml`` compresses each converted package's
layer weights (:mod:`.compress`), and its eager reference is :mod:`hartkit.quantize.fakequant`
computing as Core ML does. Linux cannot run Core ML, so the check re-computes every package's MIL
program in numpy (:mod:`.mil`).

Modules: ``lower`` (conversion, packages, the fp32 check), ``mil`` (reading a package back and
interpreting its program), ``compress`` (weight compression and the quantized check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from hartkit.export.targets.base import Checked, Exported, Target


class CoreMLTarget(Target):
    name = "coreml"
    libraries = ("coremltools",)
    extra = "coreml"
    backend = "coreml"

    def quantize_eager(self, model, encoder, plan, ranges) -> dict:
        from hartkit.quantize import fakequant as fq

        schemes = {n: a.scheme for n, a in plan.assignments.items()}
        fq.apply_weights(model, encoder, {n: s for n, s in schemes.items() if s.name != "fp32"}, self.name,
                         {n: a.layer.kind for n, a in plan.assignments.items()})
        return fq.activation_rules(model, encoder, schemes, self.name, ranges)

    def plan_notes(self, plan) -> list[str]:
        if any(a.scheme.name == "fp32" for a in plan.assignments.values()):
            return ["quantize coreml: fp32 layers are stored and computed in float16 (the Core ML exporter "
                    "converts with compute_precision=FLOAT16)"]
        return []

    def export(self, specs: Sequence, modules: Mapping, folder: Path, plan, say: Callable[[str], None]) -> Exported:
        from hartkit.export.targets.coreml.compress import compressor, deployment_target
        from hartkit.export.targets.coreml.lower import export_coreml

        return Exported(export_coreml(specs, modules, folder, progress=say, target=deployment_target(plan),
                                      transform=compressor(plan)))

    def check(self, folder: Path, info: dict, recorded, output_names, plan) -> Checked:
        """Core ML cannot predict on Linux: the packages' MIL programs are re-computed in numpy instead
        (fp32 plan: against the recorded outputs; quantized: weights and programs against the eager reference)."""
        from hartkit.export.targets.coreml.compress import check_coreml_quantized
        from hartkit.export.targets.coreml.lower import verify_coreml

        if not plan.quantized:
            rows, notes = verify_coreml(folder, info, recorded, output_names)
            return Checked(rows, notes)
        input_names = {g["name"]: [i["name"] for i in g["inputs"]] for g in info["graphs"]}
        rows, plan.report, notes = check_coreml_quantized(plan, folder, info, recorded, output_names, input_names)
        plan.done()
        return Checked(rows, notes)
