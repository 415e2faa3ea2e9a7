"""Quantization schemes and the one table of which (scheme, format, layer kind) cells exist.

A *scheme* says what happens to a layer's weights (and activations); a *format* realises it with its
own library. The table below is the single source of truth: the recipe resolver, the exporters'
hooks, the CLI's ``--list`` and the tests all read it. A cell that is not in the table is refused
with its reason and the alternatives — never silently run in float.

Layer kinds: ``linear`` (nn.Linear: MatMul/Gemm in ONNX), ``conv`` (nn.Conv2d) and ``embedding``
(nn.Embedding used as a lookup: Gather in ONNX).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Mapping

from hartkit.errors import UsageError

FORMATS = ("onnx", "executorch", "coreml")
COMPONENTS = ("text_encoder", "ar_transformer", "diffusion_head", "vae")
KINDS = ("linear", "conv", "embedding")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32
# What most of a component's weights are: a scheme must cover this kind to be accepted for the
# component; its other layers (e.g. the token embedding) fall back, and the plan says so.
MAIN_KIND = {"text_encoder": "linear", "ar_transformer": "linear", "diffusion_head": "linear", "vae": "conv"}


@dataclass(frozen=True)
class SchemeInfo:
    bits: int  # bits per stored weight (before scales)
    grouped: bool  # takes a group size (int4, 8da4w)
    activations: str  # "float" | "dynamic" | "static"
    description: str


SCHEMES: dict[str, SchemeInfo] = {
    "fp32": SchemeInfo(32, False, "float", "float32 weights (no quantization)"),
    "fp16": SchemeInfo(16, False, "float", "float16 weights"),
    "int8": SchemeInfo(8, False, "float", "int8 weights, symmetric, one scale per output channel; float activations"),
    "w8a8": SchemeInfo(8, False, "dynamic", "int8 per-channel weights (7-bit range: exact on every CPU) and uint8 "
                                            "activations quantized at run time"),
    "w8a8_static": SchemeInfo(8, False, "static",
                              "int8 per-channel weights (7-bit range) and uint8 activations with scales calibrated "
                              "on real inputs"),
    "int4": SchemeInfo(4, True, "float", "int4 weights, symmetric, one scale per group of input channels"),
    "8da8w": SchemeInfo(8, False, "dynamic", "int8 dynamic activations (per token; onnx: per token and block), "
                                             "int8 weights"),
    "8da4w": SchemeInfo(4, True, "dynamic", "int8 dynamic activations (per token; onnx: per token and group), "
                                            "int4 per-group weights"),
    "palettize4": SchemeInfo(4, False, "float", "Core ML k-means palettization: 16-entry lookup table per tensor"),
    "palettize6": SchemeInfo(6, False, "float", "Core ML k-means palettization: 64-entry lookup table per tensor"),
    "palettize8": SchemeInfo(8, False, "float", "Core ML k-means palettization: 256-entry lookup table per tensor"),
}


FLOAT_KERNELS = "float kernels on every ISA: results differ between CPUs by float rounding only"
# Measured on an AVX512-VNNI EPYC and the same wheels under an emulated AVX2-only CPU (qemu-x86_64
# -cpu Haswell): the uint8 x int8 dot product of 64 all-maximum pairs is 2,072,640 on VNNI and
# 1,048,544 on AVX2 (int16 saturation), reproduced by fakequant.u8s8_dot; 7-bit weights are exact on both.
U8S8_KERNELS = ("MLAS uint8 x int8 GEMM: AVX512-VNNI/AVX-VNNI VPDPBUSD (exact int32 sums); AVX2 and "
                "AVX-512 without VNNI VPMADDUBSW (neighbouring products summed with int16 saturation); "
                "ARM64 UDOT/SDOT or widening multiplies (exact). Weights are 7-bit (reduce_range, |q| <= 64), "
                "so no pair exceeds 2*255*64 = 32640 and every ISA sums exactly (emulated AVX2 = VNNI, bit for bit)")
COMPINT8_KERNELS = ("MLAS MatMulNBits CompInt8: activations quantized to int8 per row and block, int8 x int4/int8 "
                    "products in int32 (AVX512-VNNI, AVX-VNNI, AVX2 sign-trick VPMADDUBSW with |a| <= 127 and "
                    "|b| <= 128: no int16 overflow; ARM64 SDOT); emulated AVX2 vs AVX512-VNNI: 114-130 dB apart "
                    "per MatMul (summation order only)")
XNNPACK_QD8_KERNELS = ("XNNPACK qd8-f32-qc8w/qb4w GEMMs (int8 dynamic activations): int32 accumulation on every "
                       "ISA (AVX512-VNNI, AVX-VNNI, AVX2 via 16-bit widening multiplies, ARM64 SDOT/I8MM)")


@dataclass(frozen=True)
class Cell:
    kinds: frozenset[str]  # layer kinds the format quantizes with this scheme
    how: str  # the library call that does it
    exact: bool  # the eager emulation reproduces the format's arithmetic up to float rounding
    # Which kernels run it on which CPU, and whether the result depends on the CPU beyond float
    # rounding. A bundle runs on CPUs its exporter never saw: presets may use only cells whose result
    # does not depend on the ISA (tested), and every bundle self-checks its quantized graphs at load.
    kernels: str = FLOAT_KERNELS
    isa_independent: bool = True


def _cell(kinds: str, how: str, exact: bool = True, kernels: str = "", isa_independent: bool = True) -> Cell:
    return Cell(frozenset(kinds.split()), how, exact, kernels or FLOAT_KERNELS, isa_independent)




# ------------------------------------------------------------------------------------------------
# THE SUPPORT TABLE. (scheme, format) -> Cell. Everything absent is refused (see REFUSED for why).
# ------------------------------------------------------------------------------------------------
SUPPORT: dict[tuple[str, str], Cell] = {
    # ONNX: onnxruntime.quantization. Gemm nodes are rewritten to MatMul (+Add) first, so 2-D
    # Linear calls (the diffusion head, the AdaLN projections) are quantized too.
    ("fp32", "onnx"): _cell("linear conv embedding", "export as is"),
    ("fp16", "onnx"): _cell("linear conv embedding",
                            "weights stored as float16 initializers + Cast to float32 (compute stays fp32; "
                            "onnxconverter-common is not used)"),
    ("int8", "onnx"): _cell("linear", "MatMulNBitsQuantizer(bits=8, symmetric; block = the largest power-of-two "
                                      "divisor of K up to 256 (onnxruntime's limit): one scale per output channel "
                                      "when K is a power of two <= 256, e.g. 6 per channel for K=1536)"),
    ("int4", "onnx"): _cell("linear embedding", "MatMulNBitsQuantizer(bits=4, symmetric, block_size = group size); "
                                                "embeddings: GatherBlockQuantized (int4 rows, blocks along the hidden size)"),
    # accuracy_level=4: MLAS quantizes each activation row per weight block to int8 and runs integer
    # dot products. fakequant.blockwise_int8 emulates one MatMul to ~90 dB (tested), but a float
    # difference of one ulp can flip an activation's rounding, and those flips compound over a deep
    # stack: the bar is relative, as for every activation-quantizing cell.
    ("8da8w", "onnx"): _cell("linear", "MatMulNBitsQuantizer(bits=8, symmetric, block as int8, accuracy_level=4): "
                                       "int8 activations per row and block at run time", exact=False,
                             kernels=COMPINT8_KERNELS),
    ("8da4w", "onnx"): _cell("linear", "MatMulNBitsQuantizer(bits=4, symmetric, block_size = group size, "
                                       "accuracy_level=4): int8 activations per row and group at run time",
                             exact=False, kernels=COMPINT8_KERNELS),
    ("w8a8", "onnx"): _cell("linear conv", "quantize_dynamic(per_channel=True, weight_type=QInt8, reduce_range=True): "
                                           "MatMulInteger/ConvInteger, 7-bit weights, uint8 per-tensor activations",
                            exact=False, kernels=U8S8_KERNELS),
    ("w8a8_static", "onnx"): _cell("linear conv", "quantize_static(QDQ, per_channel=True, reduce_range=True, MinMax "
                                                  "calibration on recorded real inputs)", exact=False,
                                   kernels=U8S8_KERNELS),
    # ExecuTorch: torchao configs on the wrapper modules before torch.export, lowered to XNNPACK.
    ("fp32", "executorch"): _cell("linear conv embedding", "export as is"),
    ("fp16", "executorch"): _cell("linear conv embedding",
                                  "weights stored in float16, read as float32 by a parametrization (a cast in the "
                                  "program; compute stays fp32)"),
    ("8da8w", "executorch"): _cell("linear", "torchao Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0))",
                                   exact=False, kernels=XNNPACK_QD8_KERNELS),
    ("8da4w", "executorch"): _cell("linear", "torchao Int8DynamicActivationIntxWeightConfig(int4, PerGroup(g))",
                                   exact=False, kernels=XNNPACK_QD8_KERNELS),
    # Core ML: coremltools.optimize.coreml on the converted packages.
    # The Core ML exporter always converts with compute_precision=FLOAT16: fp32 and fp16 both give
    # fp16 weights and fp16 compute there (the plan says so in its notes).
    ("fp32", "coreml"): _cell("linear conv embedding", "export as is (the Core ML exporter computes in float16)"),
    ("fp16", "coreml"): _cell("linear conv embedding", "float16 weights and compute (the exporter's default)"),
    ("int8", "coreml"): _cell("linear conv embedding",
                              "OpLinearQuantizerConfig(linear_symmetric, int8, per_channel)"),
    ("int4", "coreml"): _cell("linear conv embedding",
                              "OpLinearQuantizerConfig(linear_symmetric, int4, per_block, block_size = group), iOS18"),
    ("palettize4", "coreml"): _cell("linear conv embedding", "OpPalettizerConfig(kmeans, nbits=4)"),
    ("palettize6", "coreml"): _cell("linear conv embedding", "OpPalettizerConfig(kmeans, nbits=6)"),
    ("palettize8", "coreml"): _cell("linear conv embedding", "OpPalettizerConfig(kmeans, nbits=8)"),
}

# Why the absent cells are absent (shown in the error together with the alternatives).
_WEIGHT_ONLY_ET = ("weight-only int8/int4 (torchao IntxWeightOnlyConfig) lowered to XNNPACK gives silently wrong "
                   "outputs in this version set (executorch 1.5.1, torchao 0.18: errors of 1e3 and more, measured)")
REFUSED: dict[tuple[str, str], str] = {
    ("int8", "executorch"): _WEIGHT_ONLY_ET + "; use 8da8w",
    ("int4", "executorch"): _WEIGHT_ONLY_ET + "; use 8da4w",
    ("w8a8", "executorch"): "ExecuTorch's int8-activation scheme is torchao's 8da8w (per-token activations)",
    ("w8a8_static", "executorch"): "static activation quantization (PT2E) is not wired for XNNPACK here; use 8da8w",
    ("8da8w", "coreml"): "Core ML quantizes activations only statically; use int8 (weights) instead",
    ("8da4w", "coreml"): "Core ML quantizes activations only statically; use int4 (weights) instead",
    ("w8a8", "coreml"): "Core ML has no dynamic activation quantization; use int8",
    ("w8a8_static", "coreml"): "Core ML activation quantization is not wired here; use int8",
}
for _n in (4, 6, 8):
    REFUSED[(f"palettize{_n}", "onnx")] = "palettization (k-means lookup tables) is a Core ML compression"
    REFUSED[(f"palettize{_n}", "executorch")] = "palettization (k-means lookup tables) is a Core ML compression"


# ------------------------------------------------------------------------------------------------
# WEIGHT ALGORITHMS: how a scheme's integer weights are chosen. (algorithm, format) -> (schemes, how).
# ``rtn`` (round to nearest, the format's own rule) is every cell's default. The others need 4-bit
# grouped weights: the error they remove is the one int4 makes.
# ------------------------------------------------------------------------------------------------
ALGORITHMS: dict[str, str] = {
    "rtn": "round to nearest with the format's own scale rule (no calibration)",
    "gptq": "GPTQ: columns rounded one by one, each rounding error fed back into the columns not yet rounded "
            "through the inverse Hessian of the layer's recorded inputs (needs calibration prompts)",
    "hqq": "HQQ: half-quadratic optimisation of each group's scale and zero point against the weights "
           "(asymmetric, zero points stored; no calibration)",
}
CALIBRATED_ALGORITHMS = ("gptq",)
ALGORITHM_SCHEMES = ("int4", "8da4w")  # the 4-bit grouped schemes


@dataclass(frozen=True)
class AlgorithmCell:
    schemes: frozenset[str]
    how: str


ALGORITHM_SUPPORT: dict[tuple[str, str], AlgorithmCell] = {
    **{("rtn", f): AlgorithmCell(frozenset(SCHEMES), "the cell's own rounding (see the support table)") for f in FORMATS},
    # onnxruntime's bundled GPTQ (neural_compressor.gptq_quantize) rounds GPTQ's output a second time on
    # another grid (scale max|w|/7.5, +7.5 clipped): 1.9x the output error of plain rounding on the demo
    # model's layers (measured), so the error feedback is done here on MatMulNBits' own grid instead.
    ("gptq", "onnx"): AlgorithmCell(frozenset(ALGORITHM_SCHEMES),
                                    "quantize.algorithms.gptq on MatMulNBits' symmetric grid (each group's scale "
                                    "from its largest weight, kept at -8), inputs recorded by onnxruntime on the "
                                    "calibration feeds; then MatMulNBitsQuantizer rounds the result unchanged"),
    ("hqq", "onnx"): AlgorithmCell(frozenset(ALGORITHM_SCHEMES),
                                   "MatMulNBitsQuantizer(HQQWeightOnlyQuantConfig(bits=4, block_size = group)): "
                                   "asymmetric with zero points (8da4w: accuracy_level=4 set on the nodes)"),
}
REFUSED_ALGORITHMS: dict[tuple[str, str], str] = {
    ("gptq", "executorch"): ("torchao's 8da4w rounds with scale max|w|/7.5, a grid no pre-rounded weight survives, "
                             "and torchao's GPTQ flow is not wired here"),
    ("hqq", "executorch"): "XNNPACK's 8da4w takes symmetric weights only (no zero points)",
    ("gptq", "coreml"): "coremltools' GPTQ (coremltools.optimize.torch) works on torch models before conversion, "
                        "not wired here",
    ("hqq", "coreml"): "Core ML's int4 here is linear_symmetric (no zero points)",
}


def algorithm_refusal(algorithm: str, scheme: str, fmt: str, what: str = "") -> str:
    """Why ``algorithm`` cannot run for ``scheme`` on ``fmt``, and what can."""
    where = f" for {what}" if what else ""
    c = ALGORITHM_SUPPORT.get((algorithm, fmt))
    if c is None:
        why = REFUSED_ALGORITHMS.get((algorithm, fmt), f"{fmt} has no {algorithm}")
    else:
        why = f"{algorithm} on {fmt} applies to {'/'.join(sorted(c.schemes))} weights only"
    here = [a for a in ALGORITHMS if (a, fmt) in ALGORITHM_SUPPORT and scheme in ALGORITHM_SUPPORT[(a, fmt)].schemes]
    elsewhere = [f for f in FORMATS if (algorithm, f) in ALGORITHM_SUPPORT]
    return (f"algorithm {algorithm} is not available on {fmt} with {scheme}{where}: {why}. "
            f"Algorithms {fmt} offers for {scheme}: {', '.join(here)}"
            + (f"; formats with {algorithm}: {', '.join(elsewhere)}" if elsewhere else ""))


def algorithm_supported(algorithm: str, scheme: str, fmt: str) -> bool:
    c = ALGORITHM_SUPPORT.get((algorithm, fmt))
    return c is not None and scheme in c.schemes


def supported_schemes(fmt: str, kind: str | None = None) -> list[str]:
    return [s for s in SCHEMES if (s, fmt) in SUPPORT and (kind is None or kind in SUPPORT[(s, fmt)].kinds)]


def cell(scheme: str, fmt: str) -> Cell | None:
    return SUPPORT.get((scheme, fmt))


def float_fallback(fmt: str, kind: str) -> "Scheme":
    """Where a layer goes when its scheme cannot take it: float16 if the format stores it, else fp32."""
    if kind in SUPPORT[("fp16", fmt)].kinds:
        return Scheme("fp16")
    return Scheme("fp32")


def refusal(scheme: str, fmt: str, kind: str | None = None, what: str = "") -> str:
    """The error text of a refused cell: why, and what the format offers instead."""
    where = f" for {what}" if what else ""
    base = SCHEMES[scheme]
    if (scheme, fmt) in SUPPORT and kind is not None:
        why = f"{fmt} quantizes only {'/'.join(sorted(SUPPORT[(scheme, fmt)].kinds))} layers with {scheme}"
    else:
        why = REFUSED.get((scheme, fmt), f"{fmt} has no {scheme}")
    alts = supported_schemes(fmt, kind)
    # nearest alternatives first: same bit width, then the rest
    alts.sort(key=lambda s: (abs(SCHEMES[s].bits - base.bits), s))
    kind_txt = f" {kind}" if kind else ""
    return (f"scheme {scheme} is not available on {fmt}{where}: {why}. "
            f"Schemes {fmt} supports for{kind_txt} layers: {', '.join(alts)}")


# ----------------------------------------------------------------------------- a scheme with its options

_SCHEME_RE = re.compile(r"^(?P<base>[a-z0-9_]+?)(?:[-_/]g(?P<group>\d+))?$")


@dataclass(frozen=True)
class Scheme:
    """A scheme name plus its group size (int4 / 8da4w only), e.g. ``Scheme("int4", 64)``."""

    name: str
    group_size: int | None = None
    algorithm: str = "rtn"  # how the integer weights are chosen (ALGORITHMS)

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise UsageError(unknown("scheme", self.name, SCHEMES))
        if self.algorithm not in ALGORITHMS:
            raise UsageError(unknown("algorithm", self.algorithm, ALGORITHMS))
        if self.algorithm != "rtn" and self.name not in ALGORITHM_SCHEMES:
            raise UsageError(f"scheme {self.name}: algorithm {self.algorithm} applies to 4-bit grouped weights only "
                             f"({', '.join(ALGORITHM_SCHEMES)}); {self.name} takes rtn")
        info = SCHEMES[self.name]
        if info.grouped:
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            elif self.group_size not in GROUP_SIZES:
                raise UsageError(f"scheme {self.name}: group size {self.group_size} is not one of "
                                 f"{', '.join(map(str, GROUP_SIZES))}")
        elif self.group_size is not None:
            raise UsageError(f"scheme {self.name} takes no group size (only "
                             f"{', '.join(n for n, i in SCHEMES.items() if i.grouped)} do)")

    @property
    def info(self) -> SchemeInfo:
        return SCHEMES[self.name]

    @property
    def bits(self) -> int:
        return self.info.bits

    @property
    def is_float(self) -> bool:
        return self.name in ("fp32", "fp16")

    @property
    def label(self) -> str:
        base = f"{self.name}-g{self.group_size}" if self.info.grouped else self.name
        return base if self.algorithm == "rtn" else f"{base}-{self.algorithm}"

    @property
    def calibrated(self) -> bool:
        """The algorithm needs the layer's recorded inputs."""
        return self.algorithm in CALIBRATED_ALGORITHMS

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, value: Any, where: str = "") -> "Scheme":
        """``"int4"``, ``"int4-g64"``, ``"int4-g64-gptq"``, ``{"scheme": "int4", "group_size": 64,
        "algorithm": "gptq"}`` or a Scheme."""
        if isinstance(value, Scheme):
            return value
        prefix = f"{where}: " if where else ""
        if isinstance(value, Mapping):
            extra = sorted(set(value) - {"scheme", "group_size", "algorithm"})
            if extra:
                raise UsageError(f"{prefix}unknown key(s) {extra} in a scheme entry; "
                                 "a scheme entry has 'scheme' and optionally 'group_size' and 'algorithm'")
            if "scheme" not in value:
                raise UsageError(f"{prefix}a scheme entry needs a 'scheme' key, got {dict(value)}")
            group = value.get("group_size")
            if group is not None and (not isinstance(group, int) or isinstance(group, bool)):
                raise UsageError(f"{prefix}group_size must be an integer, got {group!r}")
            algorithm = value.get("algorithm")
            if algorithm is not None and not isinstance(algorithm, str):
                raise UsageError(f"{prefix}algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
            name = value["scheme"]
            if not isinstance(name, str):
                raise UsageError(f"{prefix}scheme must be a string, got {name!r}")
            try:
                return cls(name.strip().lower(), group,
                           algorithm.strip().lower() if algorithm is not None else "rtn")
            except UsageError as exc:
                raise UsageError(f"{prefix}{exc}") from None
        if not isinstance(value, str):
            raise UsageError(f"{prefix}a scheme is a name like 'int8', 'int4-g64' or 'int4-g64-gptq', got {value!r}")
        text = value.strip().lower()
        algorithm = "rtn"
        head, _, tail = text.rpartition("-")
        if head and tail in ALGORITHMS:
            text, algorithm = head, tail
        m = _SCHEME_RE.match(text)
        if text in SCHEMES or not m or m.group("base") not in SCHEMES:
            base, group = text, None
        else:
            base, group = m.group("base"), int(m.group("group"))
        try:
            return cls(base, group, algorithm)
        except UsageError as exc:
            raise UsageError(f"{prefix}{exc}") from None


def unknown(what: str, name: object, choices) -> str:
    """'unknown scheme 'int5' (did you mean int4?); choose from ...'."""
    choices = list(choices)
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=2, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"unknown {what} {name!r}{hint}; choose from {', '.join(map(str, choices))}"


def support_table() -> str:
    """A readable version of the table (``hartkit quantize --list``)."""
    lines = [f"{'scheme':12} " + " ".join(f"{f:26}" for f in FORMATS)]
    for s in SCHEMES:
        row = []
        for f in FORMATS:
            c = SUPPORT.get((s, f))
            row.append(f"{'/'.join(k for k in KINDS if k in c.kinds):26}" if c else f"{'-':26}")
        lines.append(f"{s:12} " + " ".join(row))
    lines.append("")
    lines.append("how each supported cell is done:")
    for (s, f), c in SUPPORT.items():
        lines.append(f"  {s:12} {f:11} {c.how}")
    lines.append("kernels per CPU (ISA) of the integer cells:")
    for (s, f), c in SUPPORT.items():
        if c.kernels != FLOAT_KERNELS:
            lines.append(f"  {s:12} {f:11} {'' if c.isa_independent else '[DEPENDS ON THE CPU] '}{c.kernels}")
    lines.append("refused cells:")
    for (s, f), why in REFUSED.items():
        lines.append(f"  {s:12} {f:11} {why}")
    lines.append("weight algorithms (a scheme's 'algorithm', e.g. int4-g64-gptq):")
    for (a, f), c in ALGORITHM_SUPPORT.items():
        if a != "rtn":
            lines.append(f"  {a:5} {f:11} {'/'.join(sorted(c.schemes)):12} {c.how}")
    for (a, f), why in REFUSED_ALGORITHMS.items():
        lines.append(f"  {a:5} {f:11} refused: {why}")
    return "\n".join(lines)
