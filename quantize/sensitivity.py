"""Per-layer sensitivity and mixed precision under a size budget.

:func:`analyze` quantizes one unit at a time (a layer, or a block of layers: ``blocks.3``,
``layers.7``, ``res_blocks.1``, a VAE up-block) with a *low* scheme in eager torch (the format's own
arithmetic, :mod:`hartkit.quantize.fakequant`; torchao for ExecuTorch) and measures, over a
calibration set:

* the graph outputs of the graphs that use the unit: NMSE = sum (q - ref)^2 / sum ref^2;
* the stage logits, teacher-forced: the AR chain (text encoder -> condition -> stage 0 -> every
  later stage, fed the recorded tokens' inputs) is re-run with the unit quantized and its logits at
  every stage are compared with the fp32 ones (NMSE, and the mean KL divergence of the softmaxes).

The ranking score is the logits NMSE for units upstream of the logits (text encoder, AR
transformer, the residual phi convs) and the graph-output NMSE for the others (diffusion head:
``denoise``; VAE decoder: the image). The two are different quantities: rank one kind at a time
(``components``) when that matters.

:func:`mixed_plan` then keeps the most sensitive units at a *high* scheme while the whole stays
under a budget (MB of the analysed components, or average stored bits per weight), and
:func:`sweep` measures the real error of mixes along the ranking (the error-vs-size curve of the
plot, with the reverse order for comparison).
"""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from hartkit.errors import UsageError
from hartkit.loop.metrics import kl_divergence, nmse
from hartkit.quantize import fakequant as fq
from hartkit.quantize.calibration import CalibrationSet
from hartkit.quantize.layers import LayerTable, discover, layer_modules
from hartkit.quantize.recipe import Recipe, fit_scheme
from hartkit.quantize.schemes import COMPONENTS, FORMATS, SUPPORT, Scheme, refusal, unknown
from hartkit.quantize.sizes import MB, layer_bytes, weight_bytes

LOGIT_GRAPHS = ("text_encoder", "condition", "ar_context", "ar_stage", "ar_head")
GRANULARITIES = ("layer", "block")
_BLOCK_RE = re.compile(r"^(?P<head>.*?(?:blocks|layers|res_blocks|up|block|attn)\.\d+)(?:\.|$)")


# ----------------------------------------------------------------------------- units


@dataclass
class Unit:
    name: str
    component: str
    layers: list[str]
    graphs: set[str] = field(default_factory=set)

    @property
    def affects_logits(self) -> bool:
        return any(g in LOGIT_GRAPHS or g.startswith("residual_") for g in self.graphs)


def make_units(layers: LayerTable, names: Sequence[str], granularity: str) -> list[Unit]:
    if granularity not in GRANULARITIES:
        raise UsageError(unknown("granularity", granularity, GRANULARITIES))
    units: dict[str, Unit] = {}
    for n in names:
        layer = layers[n]
        key = n
        if granularity == "block":
            m = _BLOCK_RE.match(layer.path)
            key = f"{layer.component}/{m.group('head')}" if m else n
        u = units.setdefault(key, Unit(key, layer.component, []))
        u.layers.append(n)
        u.graphs |= set(layer.graphs)
    return list(units.values())


# ----------------------------------------------------------------------------- quantizing in place


class Quantizer:
    """Applies a scheme to some layers of a model copy, temporarily (context manager)."""

    def __init__(self, model, encoder, layers: LayerTable, fmt: str) -> None:
        self.model, self.encoder, self.layers, self.fmt = model, encoder, layers, fmt
        self.mods = layer_modules(model, encoder)
        self.rules: dict[int, Callable] = {}
        self.active: dict[str, int] = {}  # graph -> number of quantized layers in it right now

    def effective(self, name: str, scheme: Scheme) -> Scheme:
        return fit_scheme(self.layers[name], scheme, self.fmt)[0]

    @contextmanager
    def applied(self, schemes: Mapping[str, Scheme]) -> Iterator[None]:
        with ExitStack() as stack:
            for name, scheme in schemes.items():
                stack.enter_context(contextmanager(self._one)(name, self.effective(name, scheme)))
            yield

    @property
    def modified_graphs(self) -> set[str]:
        return {g for g, n in self.active.items() if n > 0}

    def _one(self, name: str, scheme: Scheme) -> Iterator[None]:
        graphs = self.layers[name].graphs if scheme.name != "fp32" else ()
        for g in graphs:
            self.active[g] = self.active.get(g, 0) + 1
        try:
            yield from self._apply(name, scheme)
        finally:
            for g in graphs:
                self.active[g] -= 1

    def _apply(self, name: str, scheme: Scheme):
        mod = self.mods[name]
        kind = self.layers[name].kind
        if scheme.name == "fp32":
            yield
            return
        if self.fmt == "executorch" and scheme.name in ("8da8w", "8da4w"):
            yield from self._torchao(mod, scheme)
            return
        if self.fmt == "executorch" and scheme.name == "fp16":
            with fq.swapped_weight(mod, mod.weight.detach().half().float()):
                yield
            return
        if scheme.info.activations == "static":
            raise UsageError(f"sensitivity does not simulate {scheme.name} (its ranges need a calibration pass "
                             "per mix); estimate with w8a8")
        value = fq.fake_weight(mod.weight, kind, scheme, self.fmt)
        if scheme.info.activations == "dynamic":
            self.rules[id(mod.weight)] = fq.dynamic_rule(scheme, mod.weight)
        try:
            with fq.swapped_weight(mod, value):
                yield
        finally:
            self.rules.pop(id(mod.weight), None)

    def _torchao(self, mod: nn.Module, scheme: Scheme):
        import copy

        from torchao.quantization import quantize_

        from hartkit.quantize.apply import torchao_config

        twin = copy.deepcopy(mod)
        quantize_(twin, torchao_config(scheme))
        original = mod.weight
        mod.weight = twin.weight  # F.linear(x, mod.weight) now dispatches the quantized tensor
        try:
            yield
        finally:
            mod.weight = original


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    """Runs graphs and the teacher-forced AR chain on a calibration set, against fp32 references."""

    def __init__(self, model, encoder, system_length: int, calib: CalibrationSet, quantizer: Quantizer,
                 max_calls: int = 4) -> None:
        from hartkit.model.graphs import hart_graph_specs

        self.q = quantizer
        specs = hart_graph_specs(model, encoder, system_length)
        self.inputs = {s.name: [i.name for i in s.inputs] for s in specs}
        self.modules = {s.name: s.build().eval() for s in specs}
        self.calib = calib
        self.max_calls = max_calls
        self._graph_feeds: dict[str, list[dict]] = {}
        self._graph_ref: dict[str, list[list[np.ndarray]]] = {}
        self._cache: dict[int, dict] = {}
        self._chain_ref = [self._chain(p, reference=True) for p in range(len(calib.prompts))]

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad(), fq.ActivationQuant(self.q.rules, graph):
            out = self.modules[graph](*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.inputs[graph]])
        if isinstance(out, torch.Tensor):
            out = (out,)
        return [o.detach().float().numpy() for o in out]

    def prepare(self, graphs: Sequence[str]) -> None:
        """Feeds and fp32 outputs of these graphs' calibration calls (before anything is quantized)."""
        if self.q.modified_graphs:
            raise RuntimeError("references must be computed with nothing quantized")
        replay = {g: (lambda f, g=g: self.run(g, f)) for g in ("ar_context", "ar_stage")}
        for graph in graphs:
            if graph in self._graph_feeds or graph not in self.modules:
                continue
            feeds = list(self.calib.feeds(graph, replay, limit=self.max_calls * max(1, len(self.calib.prompts))))
            self._graph_feeds[graph] = feeds
            self._graph_ref[graph] = [self.run(graph, f) for f in feeds]

    def graph_nmse(self, graph: str) -> float:
        if graph not in self._graph_feeds:
            raise RuntimeError(f"graph {graph}: call prepare() first")
        got = [self.run(graph, f) for f in self._graph_feeds[graph]]
        ref = self._graph_ref[graph]
        return nmse([a for r in ref for a in r], [a for g in got for a in g])

    def _chain(self, prompt: int, reference: bool = False) -> list[np.ndarray]:
        """Teacher-forced stage logits of one prompt (the recorded tokens' inputs at every stage).

        Graphs with no quantized layer whose inputs did not change are not re-run: their fp32 values
        (kept from the reference pass) are reused, so quantizing the head costs only head runs.
        """
        M = set() if reference else self.q.modified_graphs
        if reference:
            cache: dict = {}
            self._cache[prompt] = cache
        else:
            cache = self._cache[prompt]
        calls = self.calib.prompt_calls(prompt)
        by_graph: dict[str, list[dict]] = {}
        for c in calls:
            by_graph.setdefault(c.graph, []).append({k: _f32(v) for k, v in c.feeds.items()})
        cond_feeds = by_graph["condition"][0]

        def get(key, dirty: bool, fn):
            if reference:
                cache[key] = fn()
                return cache[key], True
            if dirty:
                return fn(), True
            return cache[key], False

        if "text_encoder" in by_graph:
            context, d_ctx = get("context", "text_encoder" in M,
                                 lambda: self.run("text_encoder", by_graph["text_encoder"][0])[0])
        else:
            context, d_ctx = cond_feeds["context"], False
        (block_mods, head_mod, x), d_cond = get("cond", d_ctx or "condition" in M,
                                                lambda: self.run("condition", {**cond_feeds, "context": context}))
        ctx = by_graph["ar_context"][0]
        (h, k, v), d_h = get("s0", d_cond or "ar_context" in M,
                             lambda: self.run("ar_context", {**ctx, "x": x, "block_mods": block_mods}))
        d_head = d_cond or "ar_head" in M
        lg, _ = get("l0", d_h or d_head,
                    lambda: self.run("ar_head", {"h": np.ascontiguousarray(h[:, -1:]), "head_mod": head_mod})[0])
        logits = [lg]
        d_past = d_h
        for si, st in enumerate(by_graph.get("ar_stage", [])):
            res = by_graph.get(f"residual_{si}")
            if res:
                x_in, d_x = get(f"x{si}", f"residual_{si}" in M, lambda res=res: self.run(f"residual_{si}", res[0])[1])
            else:
                x_in, d_x = st["x"], False
            feeds = {**st, "x": x_in, "block_mods": block_mods, "past_k": k, "past_v": v}
            (h, nk, nv), d_h = get(f"s{si + 1}", d_x or d_cond or d_past or "ar_stage" in M,
                                   lambda feeds=feeds: self.run("ar_stage", feeds))
            lg, _ = get(f"l{si + 1}", d_h or d_head, lambda h=h: self.run("ar_head", {"h": h, "head_mod": head_mod})[0])
            logits.append(lg)
            d_past = d_past or d_h
            k, v = np.concatenate([k, nk], axis=3), np.concatenate([v, nv], axis=3)
        return logits

    def logits_error(self) -> tuple[float, float]:
        """(NMSE, mean KL) of the stage logits over all prompts and stages."""
        ref, got, kls = [], [], []
        for p in range(len(self.calib.prompts)):
            lg = self._chain(p)
            for a, b in zip(self._chain_ref[p], lg):
                ref.append(a)
                got.append(b)
                kls.append(float(np.mean(kl_divergence(a, b))))
        return nmse(ref, got), float(np.mean(kls)) if kls else 0.0


def _f32(v: np.ndarray) -> np.ndarray:
    if v.dtype == np.float16:
        return v.astype(np.float32)
    if v.dtype == np.int32:
        return v.astype(np.int64)
    return v


# ----------------------------------------------------------------------------- analysis


@dataclass
class UnitScore:
    unit: str
    component: str
    layers: list[str]
    params: int
    bytes_low: int  # weights + scales + biases
    bytes_high: int
    weight_bits_low: int  # stored bits of the weights (scales included, biases not): average-bit budgets
    weight_bits_high: int
    scheme_low: str
    scheme_high: str
    graph_nmse: dict[str, float]
    logits_nmse: float | None
    logits_kl: float | None
    score: float


@dataclass
class SensitivityReport:
    fmt: str
    low: str
    high: str
    granularity: str
    components: list[str]
    prompts: int
    units: list[UnitScore]  # most sensitive first
    fixed_bytes: int  # the analysed components' parameters outside layer weights (fp32)
    curve: list[dict] = field(default_factory=list)
    reverse_curve: list[dict] = field(default_factory=list)
    chosen: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        return json.loads(json.dumps(out, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x))

    def size_bytes(self, promoted: set[str]) -> int:
        return self.fixed_bytes + sum(u.bytes_high if u.unit in promoted else u.bytes_low for u in self.units)


def _check_schemes(fmt: str, low: Scheme, high: Scheme) -> None:
    if fmt not in FORMATS:
        raise UsageError(unknown("format", fmt, FORMATS))
    for s in (low, high):
        if (s.name, fmt) not in SUPPORT:
            raise UsageError(refusal(s.name, fmt))
    if high.bits < low.bits:
        raise UsageError(f"the high scheme ({high.label}) must keep at least as many bits as the low one ({low.label})")


def analyze(model, encoder, system_length: int, calib: CalibrationSet, *, components: Sequence[str] | None = None,
            low: Scheme | str = "int4", high: Scheme | str = "int8", fmt: str = "onnx", granularity: str = "layer",
            max_calls: int = 4, progress: Callable[[str], None] | None = None) -> tuple[SensitivityReport, "Evaluator"]:
    """Rank units by the error their quantization alone causes (see the module docstring)."""
    from hartkit.model.graphs import hart_graph_specs

    low, high = Scheme.parse(low, "low scheme"), Scheme.parse(high, "high scheme")
    _check_schemes(fmt, low, high)
    comps = list(components or COMPONENTS)
    for c in comps:
        if c not in COMPONENTS:
            raise UsageError(unknown("component", c, COMPONENTS))
    say = progress or (lambda _m: None)
    qmodel, qenc = fq.copy_models(model, encoder)
    specs = hart_graph_specs(qmodel, qenc, system_length)
    layers = discover(qmodel, qenc, specs)
    scope = [l.name for l in layers if l.component in comps
             and (low.name, fmt) in SUPPORT and l.kind in SUPPORT[(low.name, fmt)].kinds]
    if not scope:
        raise UsageError(f"no layer of {', '.join(comps)} can take {low.label} on {fmt}")
    quant = Quantizer(qmodel, qenc, layers, fmt)
    say("sensitivity: fp32 references")
    ev = Evaluator(qmodel, qenc, system_length, calib, quant, max_calls)
    units = make_units(layers, scope, granularity)
    ev.prepare(sorted({g for u in units for g in u.graphs}))
    scores = []
    for i, u in enumerate(units):
        say(f"sensitivity: {i + 1}/{len(units)} {u.name}")
        with quant.applied({n: low for n in u.layers}):
            graph_err = {g: ev.graph_nmse(g) for g in sorted(u.graphs)
                         if not (u.affects_logits and g == "ar_stage")}  # ar_stage: seen through the logits
            logits = ev.logits_error() if u.affects_logits else None
        lo = {n: quant.effective(n, low) for n in u.layers}
        hi = {n: quant.effective(n, high) for n in u.layers}
        score = logits[0] if logits else max(graph_err.values(), default=0.0)
        scores.append(UnitScore(
            u.name, u.component, u.layers, sum(layers[n].numel for n in u.layers),
            sum(layer_bytes(layers[n], lo[n], fmt) for n in u.layers),
            sum(layer_bytes(layers[n], hi[n], fmt) for n in u.layers),
            sum(8 * weight_bytes(layers[n], lo[n], fmt) for n in u.layers),
            sum(8 * weight_bytes(layers[n], hi[n], fmt) for n in u.layers),
            "/".join(sorted({s.label for s in lo.values()})), "/".join(sorted({s.label for s in hi.values()})),
            graph_err, logits[0] if logits else None, logits[1] if logits else None, score))
    scores.sort(key=lambda s: -s.score)
    fixed = sum(layers.other.get(c, 0) for c in comps) * 4
    # layers of the components that cannot take the low scheme stay fp32 (counted as fixed)
    fixed += sum(layer_bytes(l, Scheme("fp32"), fmt) for l in layers if l.component in comps and l.name not in scope)
    report = SensitivityReport(fmt, low.label, high.label, granularity, comps, len(calib.prompts), scores, fixed)
    ev.layers, ev.low, ev.high = layers, low, high  # for sweep()
    return report, ev


def mixed_plan(report: SensitivityReport, budget_mb: float | None = None, avg_bits: float | None = None) -> set[str]:
    """Units kept at the high scheme: most sensitive first, while the budget holds."""
    if (budget_mb is None) == (avg_bits is None):
        raise UsageError("give exactly one of a size budget (MB) or an average bit width")
    lowest = report.size_bytes(set())
    highest = report.size_bytes({u.unit for u in report.units})
    weights = sum(u.params for u in report.units)

    def bits(promoted):
        return sum(u.weight_bits_high if u.unit in promoted else u.weight_bits_low for u in report.units) / max(weights, 1)

    if budget_mb is not None:
        budget = budget_mb * MB
        if budget < lowest:
            raise UsageError(f"a budget of {budget_mb:g} MB is below what {report.low} can reach for "
                             f"{', '.join(report.components)}: {lowest / MB:.4f} MB with every layer at {report.low} "
                             f"(all at {report.high}: {highest / MB:.4f} MB)")
        fits = lambda p: report.size_bytes(p) <= budget  # noqa: E731
    else:
        low_bits, high_bits = bits(set()), bits({u.unit for u in report.units})
        if avg_bits < low_bits:
            raise UsageError(f"an average of {avg_bits:g} bits is below what {report.low} can reach: "
                             f"{low_bits:.3f} bits per weight (scales included; {report.high}: {high_bits:.3f})")
        fits = lambda p: bits(p) <= avg_bits  # noqa: E731
    promoted: set[str] = set()
    for u in report.units:  # most sensitive first; skip what does not fit, keep trying smaller ones
        if fits(promoted | {u.unit}):
            promoted.add(u.unit)
    return promoted


def _affects_logits(names: Sequence[str], layers: LayerTable) -> bool:
    return any(g in LOGIT_GRAPHS or g.startswith("residual_") for n in names for g in layers[n].graphs)


def plan_recipe(report: SensitivityReport, promoted: set[str], base: Recipe | None = None,
                name: str = "mixed") -> Recipe:
    """A recipe: the analysed components at the low scheme, the promoted units' layers at the high one."""
    data = base.to_dict() if base is not None else {"name": name, "default": "fp32"}
    data["name"] = name
    data["description"] = (f"mixed precision from `hartkit sensitivity` ({report.fmt}): {report.low} with "
                           f"{len(promoted)} of {len(report.units)} most sensitive {report.granularity}s at {report.high}")
    comps = dict(data.get("components", {}))
    for c in report.components:
        comps[c] = report.low
    data["components"] = comps
    layers = list(data.get("layers", []))
    for u in report.units:
        if u.unit in promoted:
            layers += [{"pattern": n, "scheme": report.high} for n in u.layers]
    data["layers"] = layers
    data.pop("formats", None)  # the mix is for one format
    return Recipe.from_dict(data, source=f"sensitivity ({report.fmt})")


def measure(ev: Evaluator, report: SensitivityReport, promoted: set[str]) -> dict:
    """The real error of a mix (all units quantized together): logits and graph NMSE."""
    schemes = {}
    for u in report.units:
        s = ev.high if u.unit in promoted else ev.low
        schemes.update({n: s for n in u.layers})
    graphs = sorted({g for u in report.units for n in u.layers for g in ev.layers[n].graphs})
    with ev.q.applied(schemes):
        logits = ev.logits_error() if any(_affects_logits(u.layers, ev.layers) for u in report.units) else None
        graph_err = {g: ev.graph_nmse(g) for g in graphs if g in ("denoise", "vae_decode", "diffusion_cond_embed")}
    err = logits[0] if logits else max(graph_err.values(), default=0.0)
    return {"promoted": len(promoted), "mb": report.size_bytes(promoted) / MB, "error": err,
            "logits_nmse": logits[0] if logits else None, "logits_kl": logits[1] if logits else None,
            "graph_nmse": graph_err}


def sweep(ev: Evaluator, report: SensitivityReport, points: int = 6, reverse: bool = True) -> None:
    """Fill ``report.curve`` (promote in ranking order) and ``reverse_curve`` (least sensitive first)."""
    n = len(report.units)
    ks = sorted({round(i * n / max(points - 1, 1)) for i in range(points)})
    order = [u.unit for u in report.units]
    report.curve = [measure(ev, report, set(order[:k])) for k in ks]
    if reverse:
        report.reverse_curve = [measure(ev, report, set(order[::-1][:k])) for k in ks]


def plot(report: SensitivityReport, path: Path, top: int = 30) -> Path:
    """Two panels: the top units' sensitivity, and error vs size along the ranking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1.3, 1]})
    units = report.units[:top]
    colors = {"text_encoder": "tab:blue", "ar_transformer": "tab:orange", "diffusion_head": "tab:green",
              "vae": "tab:purple"}
    ys = np.arange(len(units))[::-1]
    vals = [max(u.score, 1e-12) for u in units]
    ax1.barh(ys, vals, color=[colors.get(u.component, "gray") for u in units])
    ax1.set_yticks(ys)
    ax1.set_yticklabels([u.unit for u in units], fontsize=7)
    ax1.set_xscale("log")
    ax1.set_xlabel(f"error with only this {report.granularity} at {report.low} (NMSE; logits where upstream of them)")
    ax1.set_title(f"most sensitive {report.granularity}s ({report.fmt}, {report.prompts} prompts)")
    from matplotlib.patches import Patch

    ax1.legend(handles=[Patch(color=c, label=comp) for comp, c in colors.items()
                        if any(u.component == comp for u in units)], fontsize=8, loc="lower right")
    if report.curve:
        ax2.plot([p["mb"] for p in report.curve], [max(p["error"], 1e-12) for p in report.curve], "o-",
                 label=f"promote to {report.high}: most sensitive first")
    if report.reverse_curve:
        ax2.plot([p["mb"] for p in report.reverse_curve], [max(p["error"], 1e-12) for p in report.reverse_curve],
                 "s--", color="gray", label="least sensitive first (for comparison)")
    if report.chosen:
        ax2.plot([report.chosen["mb"]], [max(report.chosen["error"], 1e-12)], "r*", markersize=15,
                 label=f"chosen: {report.chosen['promoted']} at {report.high}, {report.chosen['mb']:.3f} MB")
        if report.chosen.get("budget_mb"):
            ax2.axvline(report.chosen["budget_mb"], color="red", linestyle=":", label="budget")
    ax2.set_yscale("log")
    ax2.set_xlabel(f"size of {', '.join(report.components)} (MB)")
    ax2.set_ylabel("error of the whole mix (NMSE)")
    ax2.set_title("error vs size")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    from hartkit.fsutil import atomic_file

    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- mixed recipes at export time


def expand_mixed(recipe: Recipe, model, encoder, system_length: int, calib: CalibrationSet, fmt: str,
                 progress: Callable[[str], None] | None = None) -> Recipe:
    """The recipe with its ``mixed`` section on ``fmt`` turned into layer entries for this checkpoint.

    The layers of the section's components that the recipe gives a 4-bit (low) scheme are ranked by
    :func:`analyze` on ``calib``; :func:`mixed_plan` keeps the most sensitive at ``high`` while the
    budget holds. The result records, per layer, its rank, its score and why it got its scheme
    (``mixed.expanded.why``: the manifest's plan shows it). A recipe without a mixed section on
    ``fmt``, or one already expanded, is returned as it is.
    """
    spec = recipe.mixed_for(fmt)
    if spec is None or spec.get("expanded"):
        return recipe
    default, components, _ = recipe.for_format(fmt)
    lows = {c: components.get(c, default) for c in spec["components"]}
    if len(set(lows.values())) != 1:
        raise UsageError(f"{recipe.source}: mixed on {fmt}: the ranked components must share one scheme to rank "
                         f"them together, got {', '.join(f'{c} {s.label}' for c, s in lows.items())}")
    low = next(iter(lows.values()))
    high = Scheme.parse(spec["high"], f"{recipe.source}: mixed.high")
    if low.is_float:
        raise UsageError(f"{recipe.source}: mixed on {fmt}: the ranked components are {low.label}; "
                         "mixed precision promotes layers of a quantized scheme")
    report, _ev = analyze(model, encoder, system_length, calib, components=spec["components"], low=low, high=high,
                          fmt=fmt, granularity=spec["granularity"], progress=progress)
    promoted = mixed_plan(report, budget_mb=spec.get("budget_mb"), avg_bits=spec.get("avg_bits"))
    weights = sum(u.params for u in report.units)
    bits = sum(u.weight_bits_high if u.unit in promoted else u.weight_bits_low for u in report.units) / max(weights, 1)
    budget = (f"{spec['avg_bits']:g} bits per weight" if spec.get("avg_bits") is not None
              else f"{spec['budget_mb']:g} MB")
    why: dict[str, str] = {}
    n = len(report.units)
    for rank, u in enumerate(report.units, 1):
        what = "teacher-forced logits NMSE" if u.logits_nmse is not None else "graph output NMSE"
        head = f"sensitivity rank {rank}/{n} ({what} {u.score:.3g} with only this {report.granularity} at {report.low})"
        tail = (f"kept at {report.high} within {budget}" if u.unit in promoted
                else f"{report.low}: {report.high} would not fit {budget} after the more sensitive ones")
        for layer in u.layers:
            why[layer] = f"{head}; {tail}"
    data = recipe.to_dict()
    section = data.setdefault("formats", {}).setdefault(fmt, {})
    entries = list(section.get("layers", []))
    if isinstance(entries, dict):
        entries = [{"pattern": p, "scheme": s} for p, s in entries.items()]
    for u in report.units:
        if u.unit in promoted:
            entries += [{"pattern": layer, "scheme": report.high} for layer in u.layers]
    section["layers"] = entries
    section["mixed"] = {**{k: v for k, v in spec.items() if k != "expanded"}, "expanded": {
        "low": report.low, "high": report.high, "units": n, "promoted": sorted(promoted),
        "avg_bits": round(bits, 4), "mb": round(report.size_bytes(promoted) / MB, 4),
        "calibration_prompts": len(calib.prompts), "why": why}}
    return Recipe.from_dict(data, source=recipe.source)
