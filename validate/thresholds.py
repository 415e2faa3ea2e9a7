"""The pass/fail bars of ``hartkit validate`` — every default lives here, with what it means.

Every bar compares a candidate row (a bundle on one backend, or the fp16 reference) with the **fp32
torch reference** on the same checkpoint, prompts and seeds. Names ending in ``_min`` are lower
bounds, ``_max`` upper bounds; a value of ``None`` turns a bar off. Override on the command line
(``--threshold tf_top1_min=0.8``, repeatable, ``none`` turns one off) or with a JSON file of
``{"name": value}`` (``--thresholds FILE``).

The defaults are meant for CI on real checkpoints: an fp32 export clears them by orders of
magnitude, a sound int8/int4 recipe should clear them, and a wrong graph (perturbed weights, a bad
kernel) should not. They are starting points — tighten them per recipe once you know its numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from hartkit.errors import UsageError
from hartkit.loop.metrics import finite_or_none

# name -> (default, what it bounds). Keep this table the one place defaults are written.
THRESHOLDS: dict[str, tuple[float | None, str]] = {
    "graph_snr_db_min": (
        15.0, "per graph: SNR (dB) of every output on the recorded inputs, worst call and output"),
    "graph_cosine_min": (
        0.99, "per graph: cosine similarity of every output on the recorded inputs, worst call and output"),
    "tf_kl_max": (
        0.05, "teacher-forced, per stage: mean KL(P_ref || P_cand) in nats of the CFG-mixed logits"),
    "tf_top1_min": (
        0.80, "teacher-forced, per stage: share of token positions where the argmax logit agrees"),
    "tf_topk_min": (
        0.70, "teacher-forced, per stage: mean overlap of the top-k logit sets (k in report's 'topk')"),
    "free_token_agreement_min": (
        0.50, "free-running, per stage: share of sampled tokens equal to the reference's (same seed)"),
    "residual_snr_db_min": (
        15.0, "teacher-forced: SNR (dB) of the residual diffusion head's output, worst prompt x seed"),
    "image_psnr_db_min": (
        20.0, "free-running: PSNR (dB) of the final image vs the fp32 image, from the mean squared error over "
              "prompts x seeds"),
    "image_ssim_min": (
        0.70, "free-running: SSIM of the final image vs the fp32 image, mean over prompts x seeds"),
    "image_psnr_vs_fp16_db_min": (
        None, "free-running: PSNR (dB) of the final image vs the fp16 reference image, pooled as above "
              "(off by default)"),
    "image_ssim_vs_fp16_min": (
        None, "free-running: SSIM of the final image vs the fp16 reference image, mean (off by default)"),
    "caption_accuracy_drop_max": (
        0.25, "caption accuracy (validate.caption_score's, when present) may fall at most this much below fp32's"),
}

DEFAULTS: dict[str, float | None] = {name: default for name, (default, _) in THRESHOLDS.items()}


def _parse_value(name: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off", "")):
        return None
    if isinstance(value, bool):
        raise UsageError(f"threshold {name}: expected a number or none, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"threshold {name}: expected a number or none, got {value!r}") from None
    if math.isnan(number):
        raise UsageError(f"threshold {name}: NaN is not a threshold")
    return number


def resolve(overrides: Mapping[str, Any] | None = None) -> dict[str, float | None]:
    """Defaults with ``overrides`` applied; unknown names are refused with the list of known ones."""
    out = dict(DEFAULTS)
    for name, value in (overrides or {}).items():
        if name not in THRESHOLDS:
            raise UsageError(f"unknown threshold {name!r}; known: {', '.join(THRESHOLDS)}")
        out[name] = _parse_value(name, value)
    return out


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """``["tf_top1_min=0.9", ...]`` -> ``{"tf_top1_min": "0.9"}`` (values checked by :func:`resolve`)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--threshold takes NAME=VALUE (e.g. tf_top1_min=0.9), got {item!r}")
        out[name.strip()] = value.strip()
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: thresholds file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object of threshold names to numbers")
    return data


@dataclass
class Failure:
    """One bar a row missed; ``where`` is a stage index, a graph name, or None for whole-run metrics."""

    row: str
    metric: str
    value: float
    threshold: float
    stage: int | None = None
    graph: str | None = None
    detail: str = ""

    def message(self) -> str:
        return f"{self.row}: {self.describe()}"

    def describe(self) -> str:
        """The miss without the row's name."""
        if self.metric == "status":
            return f"could not be validated: {self.detail}"
        bound = ">=" if self.metric.endswith("_min") else "<="
        where = ""
        if self.stage is not None:
            where = f" at stage {self.stage}"
        elif self.graph is not None:
            where = f" in graph {self.graph}"
        return (f"{self.metric}{where}: {self.value:.4g} (needs {bound} {self.threshold:g})"
                + (f" — {self.detail}" if self.detail else ""))

    def to_json(self) -> dict:
        return {"row": self.row, "metric": self.metric, "stage": self.stage, "graph": self.graph,
                "value": finite_or_none(self.value), "threshold": finite_or_none(self.threshold),
                "message": self.message()}


def misses(metric: str, value: float | None, bars: Mapping[str, float | None]) -> bool:
    """Whether ``value`` misses the bar ``metric`` (a missing value or a bar that is off never does)."""
    bar = bars.get(metric)
    if bar is None or value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return True
    return value < bar if metric.endswith("_min") else value > bar


def describe() -> str:
    """The table of bars for ``--help`` and the report."""
    width = max(len(n) for n in THRESHOLDS)
    return "\n".join(f"{name:{width}}  {'off' if d is None else f'{d:g}':>6}  {text}"
                     for name, (d, text) in THRESHOLDS.items())
