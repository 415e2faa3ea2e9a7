"""Quantization recipes as data: which scheme each component (and optionally each layer) gets.

A recipe is a small JSON or YAML file::

    name: my-phone
    description: int4 transformer, int8 head
    components:                 # every component not listed gets `default` (fp32 unless given)
      text_encoder: int4        # "int4" = int4 with group 32; "int4-g64" or {scheme: int4, group_size: 64}
      ar_transformer: int4
      diffusion_head: int8
      vae: fp16
    layers:                     # optional; glob patterns on "component/path"; later entries win
      "ar_transformer/head": int8
      "ar_transformer/blocks.*.attn.*": {scheme: int4, group_size: 64, algorithm: gptq}
    mixed:                      # optional: per-layer bits from a sensitivity pass on the checkpoint at hand
      components: [ar_transformer, text_encoder]
      high: int8                # the most sensitive layers get this, while the mix stays within
      avg_bits: 5.0             # stored bits per weight (scales included) of those components
    formats:                    # optional per-format overrides, same keys as above
      executorch:
        components: {text_encoder: 8da4w, ar_transformer: 8da4w, diffusion_head: 8da8w}

A scheme's ``algorithm`` (``rtn``, the default; ``gptq``; ``hqq``: see ``schemes.ALGORITHMS``) says how
its integer weights are chosen; ``"int4-g64-gptq"`` is short for ``{scheme: int4, group_size: 64,
algorithm: gptq}``. A format that lacks the algorithm is refused with the ones it has.

A ``mixed`` section is expanded into layer entries by :func:`hartkit.quantize.sensitivity.expand_mixed`
(it needs the model and calibration inputs); the expanded section (``mixed.expanded``, per format)
records the ranking, the budget reached and why each layer got its scheme, and :func:`resolve`
refuses a recipe whose ``mixed`` section was not expanded.

:func:`resolve` turns a recipe into a :class:`Plan` for one format and one model: the scheme of every
layer, with every fallback spelled out (a group size that does not divide a layer, a layer kind the
format cannot quantize with the scheme). A scheme the format cannot do for a component's main layers,
a pattern that matches nothing, a typo: a :class:`~hartkit.errors.UsageError` with the valid choices.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from hartkit.errors import UsageError
from hartkit.quantize.layers import Layer, LayerTable
from hartkit.quantize.schemes import (
    COMPONENTS, FORMATS, GROUP_SIZES, MAIN_KIND, SUPPORT, Scheme, algorithm_refusal, algorithm_supported, cell,
    float_fallback, refusal, unknown,
)

RECIPE_KEYS = ("name", "description", "default", "components", "layers", "mixed", "formats")
OVERRIDE_KEYS = ("default", "components", "layers", "mixed")
MIXED_KEYS = ("components", "high", "avg_bits", "budget_mb", "granularity", "expanded")
# Components whose layers a mixed section may rank: the ones the sampling chain's logits pass through.
MIXED_COMPONENTS = ("text_encoder", "ar_transformer")
RECIPE_FILE = "recipe.json"

PRESETS: dict[str, dict] = {
    "fp32": {
        "name": "fp32", "description": "no quantization (the reference)", "default": "fp32",
    },
    "fp16": {
        "name": "fp16", "description": "float16 weights everywhere", "default": "fp16",
    },
    "laptop": {
        "name": "laptop",
        "description": "int8 text encoder and AR transformer with int8 compute, fp16 diffusion head and VAE",
        "default": "fp16",
        "components": {"text_encoder": "int8", "ar_transformer": "int8"},
        "formats": {
            # onnxruntime computes in int8 only with activations quantized too: the AR transformer takes
            # quantize_dynamic's MatMulInteger (3.7x the fp32 MatMul on AVX-512 VNNI), the text encoder
            # MatMulNBits with per-block activations (1.9x), whose per-block scales keep an LLM's outlier
            # channels from flattening a whole row (onnxruntime-genai quantizes Qwen2 the same way).
            # The token embedding (a fifth of a Qwen2-1.5B) is looked up, not multiplied: int4 rows
            # (GatherBlockQuantized; onnxruntime quantizes Gather in 4 bits only) instead of fp16.
            "onnx": {"components": {"text_encoder": "8da8w", "ar_transformer": "w8a8"},
                     "layers": {"text_encoder/embed_tokens": "int4"}},
            # XNNPACK gives wrong results with weight-only int8 (see schemes.REFUSED): 8da8w there; its
            # fp16 weights are cast to fp32 in the program, which keeps those layers out of the delegate.
            "executorch": {"default": "fp32", "components": {"text_encoder": "8da8w", "ar_transformer": "8da8w"}},
        },
    },
    "phone": {
        "name": "phone",
        "description": "int4 AR transformer and text encoder, int8 diffusion head, fp16 VAE",
        "components": {"text_encoder": "int4", "ar_transformer": "int4", "diffusion_head": "int8", "vae": "fp16"},
        "formats": {
            # int8 compute on int4 weights (MatMulNBits accuracy_level=4), as onnxruntime-genai builds its
            # int4 CPU models: what ARM phones run fast (int8 dot products). Groups of 64: onnxruntime
            # keeps one fp32 scale per group (fp16 in Core ML), so 64 costs what 32 costs there.
            "onnx": {"components": {"text_encoder": "8da4w-g64", "ar_transformer": "8da4w-g64",
                                    "diffusion_head": "8da8w"},
                     "layers": {"text_encoder/embed_tokens": "int4-g64"}},
            # fp32 VAE on ExecuTorch: XNNPACK does not take the fp16 program's convolutions, and the
            # portable kernels ran the 0.7B decoder in minutes (the first phone ExecuTorch bench).
            "executorch": {"default": "fp32", "components": {"text_encoder": "8da4w", "ar_transformer": "8da4w",
                                                             "diffusion_head": "8da8w", "vae": "fp32"}},
        },
    },
    "phone-quality": {
        "name": "phone-quality",
        "description": "phone with GPTQ int4 weights (onnx) and the layers that hurt most at int8, chosen per "
                       "checkpoint by a sensitivity pass within 1.25x the int4 bit limit",
        "components": {"text_encoder": "int4", "ar_transformer": "int4", "diffusion_head": "int8", "vae": "fp16"},
        "formats": {
            # 5.0 stored bits per weight = 1.25x the int4 limit: 8da4w-g64 costs 4.5 (fp32 scale per 64),
            # so about 14 % of the text encoder's and AR transformer's weights can go to 8 bits.
            "onnx": {"components": {"text_encoder": "8da4w-g64-gptq", "ar_transformer": "8da4w-g64-gptq",
                                    "diffusion_head": "8da8w"},
                     "layers": {"text_encoder/embed_tokens": "int4-g64"},
                     "mixed": {"components": ["text_encoder", "ar_transformer"], "high": "8da8w", "avg_bits": 5.0}},
            # torchao's 8da4w-g32 already stores 5.25 bits per weight (fp32 scale and zero point per 32):
            # the same share of 8-bit layers costs 5.75 there.
            "executorch": {"default": "fp32", "components": {"text_encoder": "8da4w", "ar_transformer": "8da4w",
                                                             "diffusion_head": "8da8w", "vae": "fp32"},
                           "mixed": {"components": ["text_encoder", "ar_transformer"], "high": "8da8w",
                                     "avg_bits": 5.75}},
        },
    },
}


@dataclass
class Recipe:
    name: str
    description: str = ""
    default: Scheme = field(default_factory=lambda: Scheme("fp32"))
    components: dict[str, Scheme] = field(default_factory=dict)
    layers: list[tuple[str, Scheme]] = field(default_factory=list)  # (glob pattern, scheme), in order
    formats: dict[str, dict] = field(default_factory=dict)  # fmt -> {"default", "components", "layers", "mixed"}
    source: str = ""  # preset name or file path (for messages)
    mixed: dict | None = None  # see MIXED_KEYS; None: no sensitivity pass

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe") -> "Recipe":
        if not isinstance(data, Mapping):
            raise UsageError(f"{source}: a recipe is a mapping with keys {', '.join(RECIPE_KEYS)}, "
                             f"got {type(data).__name__}")
        _check_keys(data, RECIPE_KEYS, f"{source}: recipe key")
        name = data.get("name", Path(source).stem if source else "custom")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{source}: 'name' must be a non-empty string")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise UsageError(f"{source}: 'description' must be a string")
        default, components, layers = _parse_section(data, source)
        mixed = _parse_mixed(data.get("mixed"), source)
        formats: dict[str, dict] = {}
        raw_formats = data.get("formats") or {}
        if not isinstance(raw_formats, Mapping):
            raise UsageError(f"{source}: 'formats' must map a format ({', '.join(FORMATS)}) to overrides")
        for fmt, section in raw_formats.items():
            if fmt not in FORMATS:
                raise UsageError(f"{source}: " + unknown("format", fmt, FORMATS))
            if not isinstance(section, Mapping):
                raise UsageError(f"{source}: formats.{fmt} must be a mapping with keys {', '.join(OVERRIDE_KEYS)}")
            _check_keys(section, OVERRIDE_KEYS, f"{source}: formats.{fmt} key")
            d, c, l = _parse_section(section, f"{source}: formats.{fmt}")
            formats[fmt] = {"default": d if "default" in section else None, "components": c, "layers": l,
                            "mixed": _parse_mixed(section.get("mixed"), f"{source}: formats.{fmt}")}
        return cls(name, description, default or Scheme("fp32"), components, layers, formats, source, mixed)

    @classmethod
    def load(cls, spec: "str | Path | Mapping | Recipe") -> "Recipe":
        """A preset name, a JSON/YAML file, a dict, or a Recipe."""
        if isinstance(spec, Recipe):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        text = str(spec)
        if text in PRESETS:
            return cls.from_dict(copy.deepcopy(PRESETS[text]), source=f"preset '{text}'")
        path = Path(text)
        if not path.is_file():
            if path.suffix.lower() in (".json", ".yaml", ".yml") or "/" in text:
                raise UsageError(f"recipe file {path} not found")
            raise UsageError(unknown("recipe", text, list(PRESETS)) + " (or a .json/.yaml recipe file)")
        return cls.from_dict(_read_file(path), source=str(path))

    def to_dict(self) -> dict:
        def sec(default, components, layers, mixed) -> dict:
            out: dict[str, Any] = {}
            if default is not None:
                out["default"] = default.label
            if components:
                out["components"] = {c: s.label for c, s in components.items()}
            if layers:
                out["layers"] = [{"pattern": p, "scheme": s.label} for p, s in layers]
            if mixed is not None:
                out["mixed"] = copy.deepcopy(mixed)
            return out

        out = {"name": self.name, "description": self.description}
        out.update(sec(self.default, self.components, self.layers, self.mixed))
        if self.formats:
            out["formats"] = {f: sec(o["default"], o["components"], o["layers"], o.get("mixed"))
                              for f, o in self.formats.items()}
        return out

    def save(self, path: Path) -> None:
        from hartkit.fsutil import write_json

        write_json(path, self.to_dict(), indent=2)

    # ------------------------------------------------------------------ per format
    def for_format(self, fmt: str) -> tuple[Scheme, dict[str, Scheme], list[tuple[str, Scheme]]]:
        """(default, components, layers) with the format's overrides applied."""
        default, components, layers = self.default, dict(self.components), list(self.layers)
        over = self.formats.get(fmt)
        if over:
            if over["default"] is not None:
                default = over["default"]
            components.update(over["components"])
            layers = layers + list(over["layers"])
        return default, components, layers

    def uses_calibration(self, formats) -> bool:
        """Recorded inputs are needed: static activation ranges, a calibrated weight algorithm (gptq) or
        a mixed section still to expand (its sensitivity pass)."""
        return any(s.info.activations == "static" or s.calibrated for f in formats for s in self._all_schemes(f)) \
            or any(self.mixed_for(f) is not None and not self.mixed_for(f).get("expanded") for f in formats)

    def mixed_for(self, fmt: str) -> dict | None:
        """The mixed section that applies on ``fmt`` (the format's own, else the recipe's)."""
        over = self.formats.get(fmt)
        if over and over.get("mixed") is not None:
            return over["mixed"]
        return self.mixed

    def algorithms(self, fmt: str) -> set[str]:
        return {s.algorithm for s in self._all_schemes(fmt)}

    def _all_schemes(self, fmt: str) -> list[Scheme]:
        d, c, l = self.for_format(fmt)
        return [d, *c.values(), *(s for _, s in l)]


def _check_keys(data: Mapping, allowed, what: str) -> None:
    """``what`` is 'where: kind of key' -> 'where: unknown kind of key 'x' (did you mean ...)'."""
    where, _, kind = what.rpartition(": ")
    for key in data:
        if key not in allowed:
            raise UsageError((f"{where}: " if where else "") + unknown(kind, key, allowed))


def _parse_mixed(raw: Any, where: str) -> dict | None:
    """A ``mixed`` section, checked: components to rank, the high scheme, exactly one budget."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise UsageError(f"{where}: 'mixed' must be a mapping with keys {', '.join(MIXED_KEYS[:-1])}")
    _check_keys(raw, MIXED_KEYS, f"{where}: mixed key")
    comps = raw.get("components", list(MIXED_COMPONENTS))
    if isinstance(comps, str):
        comps = [comps]
    if not isinstance(comps, list) or not comps:
        raise UsageError(f"{where}: mixed.components must be a list of {', '.join(MIXED_COMPONENTS)}")
    for c in comps:
        if c not in MIXED_COMPONENTS:
            raise UsageError(f"{where}: mixed.components: " + unknown("component", c, MIXED_COMPONENTS))
    if "high" not in raw:
        raise UsageError(f"{where}: mixed needs 'high': the scheme the most sensitive layers keep (e.g. int8)")
    high = Scheme.parse(raw["high"], f"{where}: mixed.high")
    budgets = [k for k in ("avg_bits", "budget_mb") if raw.get(k) is not None]
    if len(budgets) != 1:
        raise UsageError(f"{where}: mixed needs exactly one budget, avg_bits (stored bits per weight) or "
                         f"budget_mb (MB of the ranked components); got {budgets or 'none'}")
    value = raw[budgets[0]]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
        raise UsageError(f"{where}: mixed.{budgets[0]} must be a positive number, got {value!r}")
    granularity = raw.get("granularity", "layer")
    if granularity not in ("layer", "block"):
        raise UsageError(f"{where}: mixed.granularity: " + unknown("granularity", granularity, ("layer", "block")))
    out = {"components": list(comps), "high": high.label, budgets[0]: float(value), "granularity": granularity}
    if raw.get("expanded") is not None:
        exp = raw["expanded"]
        why = exp.get("why", {}) if isinstance(exp, Mapping) else None
        if not isinstance(why, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in why.items()):
            raise UsageError(f"{where}: mixed.expanded must be a mapping whose 'why' maps layers to reasons "
                             "(written by the sensitivity pass)")
        out["expanded"] = copy.deepcopy(dict(raw["expanded"]))
    return out


def _parse_section(data: Mapping, where: str) -> tuple[Scheme | None, dict[str, Scheme], list[tuple[str, Scheme]]]:
    default = Scheme.parse(data["default"], f"{where}: default") if data.get("default") is not None else None
    components: dict[str, Scheme] = {}
    raw = data.get("components") or {}
    if not isinstance(raw, Mapping):
        raise UsageError(f"{where}: 'components' must map a component to a scheme")
    for comp, scheme in raw.items():
        if comp not in COMPONENTS:
            raise UsageError(f"{where}: " + unknown("component", comp, COMPONENTS))
        components[comp] = Scheme.parse(scheme, f"{where}: components.{comp}")
    layers: list[tuple[str, Scheme]] = []
    raw_layers = data.get("layers") or []
    if isinstance(raw_layers, Mapping):
        raw_layers = [{"pattern": k, "scheme": v} for k, v in raw_layers.items()]
    if not isinstance(raw_layers, list):
        raise UsageError(f"{where}: 'layers' must be a mapping pattern -> scheme or a list of "
                         "{pattern, scheme[, group_size]} entries")
    for i, entry in enumerate(raw_layers):
        if not isinstance(entry, Mapping) or "pattern" not in entry:
            raise UsageError(f"{where}: layers[{i}] must have a 'pattern' (e.g. 'ar_transformer/head')")
        _check_keys(entry, ("pattern", "scheme", "group_size", "algorithm"), f"{where}: layers[{i}] key")
        pattern = entry["pattern"]
        if not isinstance(pattern, str) or "/" not in pattern:
            raise UsageError(f"{where}: layers[{i}]: pattern {pattern!r} must look like 'component/path-glob' "
                             f"with component one of {', '.join(COMPONENTS)} (or '*')")
        comp = pattern.split("/", 1)[0]
        if not any(fnmatch.fnmatchcase(c, comp) for c in COMPONENTS):
            raise UsageError(f"{where}: layers[{i}]: " + unknown("component", comp, COMPONENTS))
        if "scheme" not in entry:
            raise UsageError(f"{where}: layers[{i}] ({pattern}) needs a 'scheme'")
        scheme = entry["scheme"]
        extra = {k: entry[k] for k in ("group_size", "algorithm") if k in entry}
        if extra:
            if not isinstance(scheme, str):
                raise UsageError(f"{where}: layers[{i}]: give {' and '.join(extra)} once")
            scheme = {"scheme": scheme, **extra}
        layers.append((pattern, Scheme.parse(scheme, f"{where}: layers[{i}] ({pattern})")))
    return default, components, layers


def _read_file(path: Path) -> Any:
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc})") from None
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - PyYAML is a dependency of the quantize extra
        raise UsageError(f"{path}: reading YAML recipes needs PyYAML (or write the recipe as .json)") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({exc})") from None


# ----------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class Assignment:
    layer: Layer
    requested: Scheme
    scheme: Scheme  # what the layer gets
    source: str  # "default" | "component" | the matching pattern
    reason: str = ""  # why scheme != requested

    @property
    def fell_back(self) -> bool:
        return self.scheme != self.requested


@dataclass
class Plan:
    """A recipe resolved for one format and one model: every layer's scheme."""

    recipe: Recipe
    fmt: str
    assignments: dict[str, Assignment]
    other: dict[str, int]  # component -> params outside layer weights

    def scheme_of(self, layer: str) -> Scheme:
        return self.assignments[layer].scheme

    def fallbacks(self) -> list[Assignment]:
        return [a for a in self.assignments.values() if a.fell_back]

    def fallback_summary(self) -> list[str]:
        """One line per (requested -> got, reason), listing the layers."""
        groups: dict[tuple[str, str, str], list[str]] = {}
        for a in self.fallbacks():
            groups.setdefault((a.requested.label, a.scheme.label, a.reason), []).append(a.layer.name)
        lines = []
        for (req, got, why), names in groups.items():
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            lines.append(f"{fmt_count(len(names))} fall back from {req} to {got} ({why}): {shown}")
        return lines

    def schemes_used(self) -> set[str]:
        return {a.scheme.name for a in self.assignments.values()}

    def graph_schemes(self, graph: str) -> set[Scheme]:
        return {a.scheme for a in self.assignments.values() if graph in a.layer.graphs}

    def why(self) -> dict[str, str]:
        """layer -> why a sensitivity pass gave it its scheme (an expanded mixed section)."""
        mixed = self.recipe.mixed_for(self.fmt) or {}
        return dict((mixed.get("expanded") or {}).get("why", {}))

    def to_json(self) -> dict:
        why = self.why()
        mixed = self.recipe.mixed_for(self.fmt)
        summary = None
        if mixed:
            summary = {k: v for k, v in mixed.items() if k != "expanded"}
            summary.update({k: v for k, v in (mixed.get("expanded") or {}).items() if k != "why"})
        return {
            "format": self.fmt,
            "layers": {n: {"scheme": a.scheme.label, "requested": a.requested.label, "source": a.source,
                           **({"fallback": a.reason} if a.fell_back else {}),
                           **({"why": why[n]} if n in why else {})}
                       for n, a in self.assignments.items()},
            **({"mixed": summary} if summary else {}),
            "fallbacks": self.fallback_summary(),
        }


def fmt_count(n: int) -> str:
    return f"{n} layer{'s' if n != 1 else ''}"


def resolve(recipe: Recipe, layers: LayerTable, fmt: str) -> Plan:
    """Every layer's scheme on ``fmt``, or a UsageError naming what cannot be done and the choices."""
    if fmt not in FORMATS:
        raise UsageError(unknown("format", fmt, FORMATS))
    mixed = recipe.mixed_for(fmt)
    if mixed is not None and not mixed.get("expanded"):
        raise UsageError(f"{recipe.source}: recipe '{recipe.name}' takes per-layer bits from a sensitivity pass on "
                         f"{fmt} (its 'mixed' section): expand it for the checkpoint first "
                         "(hartkit.quantize.sensitivity.expand_mixed)")
    default, components, patterns = recipe.for_format(fmt)
    # 1. Components: the scheme must cover the component's main layer kind on this format.
    for comp in sorted({l.component for l in layers}):
        scheme = components.get(comp, default)
        what = f"component {comp} ({MAIN_KIND[comp]} layers)"
        c = cell(scheme.name, fmt)
        src = "components" if comp in components else "default"
        if c is None or MAIN_KIND[comp] not in c.kinds:
            raise UsageError(f"{recipe.source}: {src}: " + refusal(scheme.name, fmt, MAIN_KIND[comp] if c else None, what))
        if not algorithm_supported(scheme.algorithm, scheme.name, fmt):
            raise UsageError(f"{recipe.source}: {src}: " + algorithm_refusal(scheme.algorithm, scheme.name, fmt, what))
    # 2. Patterns must match something, and their scheme must be possible for what they match.
    matched: dict[str, tuple[str, Scheme]] = {}
    names = [l.name for l in layers]
    for pattern, scheme in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UsageError(f"{recipe.source}: layer pattern {pattern!r} matches no layer of this model; "
                             + _layer_hint(pattern, names))
        c = cell(scheme.name, fmt)
        kinds = {layers[n].kind for n in hits}
        if c is None or not (kinds & c.kinds):
            raise UsageError(f"{recipe.source}: layers {pattern!r}: "
                             + refusal(scheme.name, fmt, sorted(kinds)[0] if c else None, f"{pattern}"))
        if not algorithm_supported(scheme.algorithm, scheme.name, fmt):
            raise UsageError(f"{recipe.source}: layers {pattern!r}: "
                             + algorithm_refusal(scheme.algorithm, scheme.name, fmt, pattern))
        for n in hits:
            matched[n] = (pattern, scheme)
    # 3. Each layer: requested scheme, then fallbacks that are reported.
    out: dict[str, Assignment] = {}
    for layer in layers:
        if layer.name in matched:
            source, requested = matched[layer.name]
        elif layer.component in components:
            source, requested = "component", components[layer.component]
        else:
            source, requested = "default", default
        scheme, reason = fit_scheme(layer, requested, fmt)
        if scheme.algorithm != "rtn" and layer.kind != "linear":
            scheme, reason = Scheme(scheme.name, scheme.group_size), (f"{scheme.algorithm} applies to linear layers "
                                                                     f"(it weighs the layer's inputs); {layer.kind} "
                                                                     "layers are rounded to nearest")
        out[layer.name] = Assignment(layer, requested, scheme, source, reason)
    return Plan(recipe, fmt, out, dict(layers.other))


def fit_scheme(layer: Layer, scheme: Scheme, fmt: str) -> tuple[Scheme, str]:
    """The scheme a layer actually gets, and why it differs from the requested one."""
    c = SUPPORT[(scheme.name, fmt)] if (scheme.name, fmt) in SUPPORT else None
    if c is None or layer.kind not in c.kinds:
        fb = float_fallback(fmt, layer.kind)
        return fb, f"{fmt} does not quantize {layer.kind} layers with {scheme.name}"
    if scheme.info.grouped:
        k = layer.in_features
        if k % scheme.group_size:
            smaller = [g for g in GROUP_SIZES if g < scheme.group_size and k % g == 0]
            if smaller:
                return (Scheme(scheme.name, max(smaller), scheme.algorithm),
                        f"{k} input channels are not a multiple of {scheme.group_size}")
            wider = {"int4": "int8", "8da4w": "8da8w"}[scheme.name]
            if (wider, fmt) in SUPPORT and layer.kind in SUPPORT[(wider, fmt)].kinds:
                return Scheme(wider), f"{k} input channels are not a multiple of any group size {GROUP_SIZES}"
            return float_fallback(fmt, layer.kind), f"{k} input channels fit no group size {GROUP_SIZES}"
    return scheme, ""


def _layer_hint(pattern: str, names: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
    comps = sorted({n.split("/", 1)[0] for n in names})
    example = next((n for n in names if n.startswith(pattern.split("/", 1)[0] + "/")), names[0] if names else "")
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (f"{hint}layer names look like {example!r} (components: {', '.join(comps)}; "
            "`hartkit quantize --checkpoint DIR --recipe R --dry-run` lists them)")
