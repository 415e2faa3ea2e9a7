"""The quantization plan of one export: a recipe resolved for every target, or none (fp32).

``export_checkpoint`` asks the plan, never whether there is one: an fp32 export is the empty plan
(:meth:`QuantizationPlan.none`), whose reference is the fp32 graphs, whose bar is the fp32 parity
bar, and whose bundle carries the fp32 golden vectors and the loop replay. A recipe
(:meth:`QuantizationPlan.prepare`) resolves per target first (every refusal before anything is
written), records calibration inputs when a static scheme, a calibrated weight algorithm (gptq) or a
mixed section needs them, ranks each format's mixed section on this checkpoint
(:func:`~hartkit.quantize.sensitivity.expand_mixed`: the saved recipe is the expanded one), and gives
each target a :class:`FormatPlan`: the layers and their schemes, the weights an algorithm chose, the
eager reference (model copies quantized as that format computes, with those weights, built on first
use) and the bar its files are held to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hartkit.bundle import QUANTIZED_GOLDEN_TOL, write_golden
from hartkit.export.parity import GraphParity, check_backend, check_quantized
from hartkit.quantize.apply import Realization, realize
from hartkit.quantize.layers import LayerTable, discover, layer_modules
from hartkit.quantize.recipe import RECIPE_FILE, Plan, Recipe, resolve
from hartkit.quantize.sizes import MB, plan_bytes

Recorded = Mapping[str, list[tuple[dict, list[np.ndarray]]]]


@dataclass
class FormatPlan:
    """One target's share of the plan. ``plan`` None: fp32 (nothing quantized, the fp32 bar)."""

    target: Any
    plan: Plan | None
    owner: "QuantizationPlan"
    report: dict[str, Any] = field(default_factory=dict)  # per graph: bars and SNRs (quantized plans)
    extra: dict[str, Any] = field(default_factory=dict)  # the target's own records (e.g. per-file reports)
    eager_outputs: dict[str, list] = field(default_factory=dict)  # graph -> [(feeds, eager-quantized outputs)]
    work: dict[str, Any] = field(default_factory=dict)  # what the target keeps between export and check
    # layer -> the dequantized weight an algorithm chose (gptq, hqq), as the files store it: the eager
    # reference takes these as they are, so parity compares the same weights
    given: dict[str, np.ndarray] = field(default_factory=dict)
    _reference: Realization | None = field(default=None, repr=False)

    @property
    def quantized(self) -> bool:
        return self.plan is not None

    @property
    def layers(self) -> LayerTable:
        return self.owner.layers

    def scheme_of(self, layer: str):
        return self.plan.scheme_of(layer)

    def layer_weights(self, graph: str) -> dict[str, np.ndarray]:
        """fp32 weight of every quantizable layer ``graph`` uses, by layer name."""
        mods = layer_modules(self.owner.model, self.owner.encoder)
        return {l.name: mods[l.name].weight.detach().float().numpy() for l in self.layers.of_graph(graph)}

    def calibration_feeds(self, graph: str) -> Callable[[], Any] | None:
        """Calibration inputs of ``graph`` (static activation ranges, gptq), or None without calibration."""
        return self.owner.calibration_feeds(graph)

    def algorithm_weights(self) -> dict[str, np.ndarray]:
        """layer -> the dequantized weight its algorithm chooses (:func:`~hartkit.quantize.algorithms.calibrated_weights`:
        gptq from Hessians over every graph that uses the layer, hqq), computed once per plan; empty when
        every layer rounds to nearest."""
        if "algorithm_weights" not in self.work:
            from hartkit.quantize.algorithms import calibrated_weights

            out: dict[str, np.ndarray] = {}
            if self.plan is not None and any(a.scheme.algorithm != "rtn" for a in self.plan.assignments.values()):
                o = self.owner
                o.say(f"quantize {self.target.name}: calibrated weights ({', '.join(sorted(self.algorithms()))})")
                out = calibrated_weights(o.model, o.encoder, o.system_length, self.plan, o.calibration)
            self.work["algorithm_weights"] = out
        return self.work["algorithm_weights"]

    def algorithms(self) -> set[str]:
        return {a.scheme.algorithm for a in self.plan.assignments.values()} - {"rtn"} if self.plan else set()

    def reference(self) -> Realization:
        """The eager reference the files must agree with: the fp32 graphs, or model copies quantized as
        this target computes (built on first use, dropped once checked: one deep copy at a time)."""
        if self._reference is None:
            if self.plan is None:
                o = self.owner
                self._reference = Realization(self.target.name, None, o.model, o.encoder, list(o.specs), dict(o.modules))
            else:
                self.owner.say(f"quantize: eager reference for {self.target.name}")
                self._reference = realize(self.owner.model, self.owner.encoder, self.owner.system_length, self.plan,
                                          self.owner.ranges, self.target.quantize_eager, given=self.given or None)
        return self._reference

    def check(self, backend, info: dict, recorded: Recorded, output_names: Mapping[str, list[str]]) -> list[GraphParity]:
        """Every recorded call on ``backend``: fp32 bars against the recorded outputs, or the scheme's
        bars against the eager reference (whose outputs become this format's golden vectors)."""
        if self.plan is None:
            return check_backend(backend, self.target.name, recorded, output_names)
        input_names = {g["name"]: [i["name"] for i in g["inputs"]] for g in info["graphs"]}
        rows, self.report = check_quantized(backend, self.reference(), recorded, output_names, input_names,
                                            eager_outputs=self.eager_outputs)
        self.done()
        return rows

    def done(self) -> None:
        """Drop the eager reference (a deep copy of the models)."""
        self._reference = None

    def integer_graphs(self) -> list[str]:
        """The graphs with a layer that computes in integers (activations quantized): their results depend
        on the CPU's integer kernels, so a bundle self-checks them where it is loaded."""
        if self.plan is None:
            return []
        return sorted({g for a in self.plan.assignments.values() if a.scheme.info.activations != "float"
                       for g in a.layer.graphs})

    def to_json(self) -> dict:
        sizes = plan_bytes(self.plan)
        return {**self.plan.to_json(), "estimated_mb": {c: round(b / MB, 4) for c, b in sizes.items()},
                "parity": self.report, **self.extra}


@dataclass
class QuantizationPlan:
    """The plan of every target of one export (see the module docstring)."""

    model: Any
    encoder: Any
    system_length: int
    specs: list
    modules: dict
    recipe: Recipe | None = None
    layers: LayerTable = field(default_factory=LayerTable)
    formats: dict[str, FormatPlan] = field(default_factory=dict)
    calibration: Any = None
    ranges: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    say: Callable[[str], None] = field(default=lambda _m: None, repr=False)
    _replay: Any = field(default=None, repr=False)  # fp32 graphs that rebuild the AR stages' calibration feeds

    @property
    def plans(self) -> dict[str, Plan]:
        return {name: f.plan for name, f in self.formats.items() if f.plan is not None}

    def __getitem__(self, fmt: str) -> FormatPlan:
        return self.formats[fmt]

    # ------------------------------------------------------------------ construction
    @classmethod
    def none(cls, model, encoder, system_length: int, specs: Sequence, modules: Mapping, targets: Sequence) -> "QuantizationPlan":
        """The fp32 export: nothing quantized."""
        qp = cls(model, encoder, system_length, list(specs), dict(modules))
        qp.formats = {t.name: FormatPlan(t, None, qp) for t in targets}
        return qp

    @classmethod
    def prepare(cls, recipe, model, encoder, system_length: int, specs: Sequence, modules: Mapping, targets: Sequence,
                recorded: Recorded | None = None, progress: Callable[[str], None] | None = None,
                calibration=None) -> "QuantizationPlan":
        """Resolve ``recipe`` (a preset name, a file, a dict or a Recipe) for every target; ``None`` is fp32."""
        say = progress or (lambda _m: None)
        if recipe is None:
            return cls.none(model, encoder, system_length, specs, modules, targets)
        recipe = Recipe.load(recipe)
        say(f"quantize: recipe '{recipe.name}'")
        inputs = {}
        for s in specs:
            calls = (recorded or {}).get(s.name)
            if calls:
                inputs[s.name] = [calls[0][0][i.name] for i in s.inputs]
        layers = discover(model, encoder, specs, inputs)
        names = [t.name for t in targets]
        # Every refusal the mixed sections do not decide comes before the (slow) calibration recording.
        for name in names:
            resolve(_without_mixed(recipe), layers, name)
        qp = cls(model, encoder, system_length, list(specs), dict(modules), recipe, layers, say=say)
        if recipe.uses_calibration(names):
            qp.calibration = qp._record_calibration(calibration, say)
            qp.recipe = recipe = qp._expand_mixed(recipe, names)
        qp.formats = {t.name: FormatPlan(t, resolve(recipe, layers, t.name), qp) for t in targets}
        for name, fp in qp.formats.items():
            qp.notes += [f"quantize {name}: {line}" for line in fp.plan.fallback_summary()]
        for fp in qp.formats.values():
            qp.notes += fp.target.plan_notes(fp.plan)
        if qp.calibration is not None:
            qp._activation_ranges()
        return qp

    def _expand_mixed(self, recipe: Recipe, formats: Sequence[str]) -> Recipe:
        """The recipe with each format's mixed section ranked on this checkpoint and the calibration set
        (the saved recipe.json and the manifest then say what each layer got and why)."""
        from hartkit.quantize.sensitivity import expand_mixed

        for fmt in formats:
            spec = recipe.mixed_for(fmt)
            if spec is None or spec.get("expanded"):
                continue
            self.say(f"quantize {fmt}: sensitivity pass for the mixed section ({', '.join(spec['components'])})")
            recipe = expand_mixed(recipe, self.model, self.encoder, self.system_length, self.calibration, fmt,
                                  progress=self.say)
            done = recipe.mixed_for(fmt)["expanded"]
            self.notes.append(f"quantize {fmt}: mixed: {len(done['promoted'])} of {done['units']} units kept at "
                              f"{done['high']}, {done['avg_bits']:g} bits per weight ({done['mb']:g} MB)")
        return recipe

    def _activation_ranges(self) -> None:
        from hartkit.quantize.calibration import activation_ranges

        static = {n for p in self.plans.values() for n, a in p.assignments.items() if a.scheme.info.activations == "static"}
        if not static:
            return
        fp32_modules = {s.name: s.build().eval() for s in self.specs}
        spec_inputs = {s.name: [i.name for i in s.inputs] for s in self.specs}
        names = layer_modules(self.model, self.encoder)
        self.ranges = activation_ranges(fp32_modules, spec_inputs, self.calibration,
                                        {id(names[n].weight): n for n in static})

    def _record_calibration(self, calibration, say):
        from hartkit.quantize.calibration import CalibrationSet, load_prompts, record, replay_fns

        if calibration is None:
            say("quantize: recording calibration inputs (built-in prompts)")
            calib = record(self.model, self.encoder, self.system_length, progress=say)
        elif isinstance(calibration, CalibrationSet):
            calib = calibration
        elif isinstance(calibration, (str, Path)) and str(calibration).endswith(".npz"):
            calib = CalibrationSet.load(calibration)
        elif isinstance(calibration, (list, tuple)):
            calib = record(self.model, self.encoder, self.system_length, list(calibration), progress=say)
        else:
            calib = record(self.model, self.encoder, self.system_length, load_prompts(calibration), progress=say)
        fp32_modules = {s.name: s.build().eval() for s in self.specs}
        self._replay = replay_fns(fp32_modules, {s.name: [i.name for i in s.inputs] for s in self.specs})
        return calib

    def calibration_feeds(self, graph: str) -> Callable[[], Any] | None:
        if self.calibration is None:
            return None
        return lambda: self.calibration.feeds(graph, self._replay)

    # ------------------------------------------------------------------ the bundle
    def release_weights(self, *modules) -> None:
        """Free the torch weights once the files are written, if nothing will run them again: the checks of
        an fp32 export compare with the recorded outputs, so a 0.7B model + its text encoder (9 GB) need not
        sit beside the backends' copies; a quantized export still builds its eager references from them."""
        if self.recipe is not None:
            return
        import gc

        import torch

        with torch.no_grad():
            for module in modules:
                for t in list(module.parameters()) + list(module.buffers()):
                    t.data = torch.empty(0, dtype=t.dtype)
        gc.collect()

    def golden(self, folder: Path, recorded: Recorded, output_names: Mapping[str, list[str]],
               write_loop: Callable[[], dict]) -> tuple[dict, dict | None]:
        """(golden.graphs, golden.loop) of the manifest. A quantized graph's golden outputs are the
        eager-quantized ones, per format; the fp32 loop replay does not apply to a quantized bundle
        (quantized tokens legitimately differ), so it has none."""
        graphs = write_golden(folder, recorded, output_names)
        loop = write_loop()
        if self.recipe is None:
            return graphs, loop
        by_format = {name: write_golden(folder, fp.eager_outputs, output_names, subdir=f"golden/{name}",
                                        tolerance=QUANTIZED_GOLDEN_TOL)
                     for name, fp in self.formats.items()}
        return {"by_format": by_format, **graphs}, None

    def self_check(self) -> dict[str, list[str]]:
        """Per format, the graphs a runtime reruns at load (``golden.self_check``); none for fp32."""
        if self.recipe is None:
            return {}
        return {name: fp.integer_graphs() for name, fp in self.formats.items()}

    def recipe_dict(self) -> dict | None:
        return self.recipe.to_dict() if self.recipe is not None else None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"recipe": self.recipe.to_dict(), "recipe_file": RECIPE_FILE,
                               "formats": {name: fp.to_json() for name, fp in self.formats.items()}}
        if self.calibration is not None:
            out["calibration"] = {"prompts": len(self.calibration.prompts), "calls": len(self.calibration.calls)}
        out["notes"] = self.notes
        return out

    def write(self, folder: Path, info: dict) -> list[str]:
        """A quantized export's ``recipe.json`` and the manifest's ``quantization`` section; -> its notes."""
        if self.recipe is None:
            return []
        self.recipe.save(Path(folder) / RECIPE_FILE)
        info["quantization"] = self.to_json()
        return list(self.notes)


def _without_mixed(recipe: Recipe) -> Recipe:
    """The recipe less its mixed sections: what resolves before the sensitivity pass has run."""
    data = recipe.to_dict()
    data.pop("mixed", None)
    for section in (data.get("formats") or {}).values():
        section.pop("mixed", None)
    return Recipe.from_dict(data, source=recipe.source)
