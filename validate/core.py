"""``hartkit validate``: a bundle (any format, any backend) against the torch references, in numbers.

For a fixed set of prompts x seeds:

1. the **fp32 reference** (eager torch, same graph cut, same host loop) generates every image; a
   :class:`~hartkit.export.exporter.RecordingBackend` keeps the real inputs of every graph call;
2. every **row** — the fp16 reference and each (bundle, format) — is scored against it:

   - *per graph*: the recorded inputs through the row's backend; max abs error, cosine and SNR of
     every output (worst over calls and outputs);
   - *teacher-forced, per stage*: the row generates with the fp32 run's tokens and latents forced at
     every stage (a ``callback_on_stage_end`` that returns them), so each stage sees the reference's inputs;
     its CFG-mixed logits against the reference's: KL, top-1 agreement, top-k overlap; and the
     residual diffusion head's output (same tokens, same noise draws) against the reference's;
   - *free-running*: the row generates on its own with the same seed; token agreement per stage,
     the first stage whose tokens differ, and the final image's PSNR/SSIM vs the fp32 and fp16 images;
   - *caption accuracy* of the free-running images when the caption scorer
     (:mod:`hartkit.validate.caption_score`) is installed and the prompts are scene captions;
3. the bars of :mod:`hartkit.validate.thresholds` turn the numbers into pass/fail.

Only bundle rows decide the verdict; the fp16 row is scored the same way for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from hartkit.errors import HartkitError, MissingDependencyError, UsageError
from hartkit.export.exporter import RecordingBackend
from hartkit.loop.sampler import Trace
from hartkit.runtime.pipeline import Pipeline
from hartkit.loop import metrics as M
from hartkit.validate.references import References
from hartkit.validate.thresholds import Failure, misses, resolve

# Scene captions (validate.scenes' grammar, so the caption scorer can read them) with one and two shapes.
DEFAULT_PROMPTS = (
    "a red circle above a blue square on a yellow background",
    "a green triangle on a white background",
    "a white square to the left of a black circle on a blue background",
)
DEFAULT_SEEDS = (0, 1)
TOPK = 10  # top-k overlap: the head of the distribution, where a trained model's mass sits
RECORD_BUDGET_MB = 1024.0  # recorded graph inputs/outputs kept for the per-graph scores
# Graph inputs are recorded from the first runs only: every graph runs at least once per run, so three runs
# fill the recorder's three calls per graph, and a sharded sweep records exactly what one machine does.
RECORD_RUNS = 3
FORMAT_BACKEND = {"onnx": "onnxruntime", "executorch": "executorch", "coreml": "coreml"}

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- inputs


def read_prompts(path: str | Path) -> list[str]:
    """A prompts file: a JSON list of strings, or one prompt per line (blank and ``#`` lines skipped)."""
    import json

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: prompts file not found") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: looks like JSON but does not parse ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise UsageError(f"{path}: a JSON prompts file must be a list of strings")
        prompts = [p for p in data if p.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"{path}: no prompts in the file")
    return prompts


def parse_seeds(text: str | Iterable[int]) -> list[int]:
    if isinstance(text, str):
        items = [s.strip() for s in text.split(",") if s.strip()]
        try:
            seeds = [int(s, 0) for s in items]
        except ValueError:
            raise UsageError(f"--seeds takes comma-separated integers (e.g. 0,1), got {text!r}") from None
    else:
        seeds = [int(s) for s in text]
    if not seeds or any(not 0 <= s < 2**64 for s in seeds):
        raise UsageError(f"seeds must be one or more integers in [0, 2**64), got {text!r}")
    return list(dict.fromkeys(seeds))


# ----------------------------------------------------------------------------- results


@dataclass
class GraphScore:
    graph: str
    calls: int = 0
    max_abs_err: float = 0.0
    cosine_min: float = 1.0
    snr_db_min: float = math.inf
    outputs: list[dict] = field(default_factory=list)  # per call and output
    error: str | None = None

    def to_json(self) -> dict:
        f = M.finite_or_none
        return {"graph": self.graph, "calls": self.calls, "max_abs_err": f(self.max_abs_err),
                "cosine_min": f(self.cosine_min), "snr_db_min": f(self.snr_db_min), "error": self.error,
                "outputs": [{k: (f(v) if isinstance(v, float) else v) for k, v in o.items()} for o in self.outputs]}


@dataclass
class StageScore:
    stage: int
    pn: int
    tf_kl: float = 0.0  # mean over positions and runs
    tf_kl_max: float = 0.0  # worst position
    tf_top1: float = 1.0
    tf_topk: float = 1.0
    tf_logits_max_abs_err: float = 0.0
    free_token_agreement: float = 1.0

    def to_json(self) -> dict:
        return {k: (M.finite_or_none(v) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class RunScore:
    """One (prompt, seed): free-running and teacher-forced results."""

    prompt: str
    seed: int
    first_divergent_stage: int | None = None
    free_token_agreement: list[float] = field(default_factory=list)
    image_psnr_db: float = math.inf
    image_ssim: float = 1.0
    image_psnr_vs_fp16_db: float | None = None
    image_ssim_vs_fp16: float | None = None
    tf_image_psnr_db: float = math.inf
    residual_snr_db: float = math.inf
    residual_max_abs_err: float = 0.0
    residual_cosine: float = 1.0

    def to_json(self) -> dict:
        out = {}
        for k, v in self.__dict__.items():
            if isinstance(v, list):
                v = [M.finite_or_none(x) for x in v]
            elif isinstance(v, float):
                v = M.finite_or_none(v)
            out[k] = v
        return out


@dataclass
class Row:
    """One line of the parity matrix: a reference or a (bundle, format, backend, recipe)."""

    label: str
    kind: str  # "reference" | "bundle"
    format: str
    backend: str
    recipe: str
    bundle: str | None = None
    status: str = "ok"  # "ok" | "skipped" (cannot run here) | "error" (could not be validated)
    reason: str = ""
    graphs: list[GraphScore] = field(default_factory=list)
    stages: list[StageScore] = field(default_factory=list)
    runs: list[RunScore] = field(default_factory=list)
    caption: dict | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # free-running, one per run (not in JSON)

    @property
    def passed(self) -> bool:
        return self.status == "ok" and not self.failures

    @property
    def first_divergent_stage(self) -> int | None:
        found = [r.first_divergent_stage for r in self.runs if r.first_divergent_stage is not None]
        return min(found) if found else None

    def summary(self) -> dict[str, float | None]:
        """The parity matrix's columns: one number per metric, worst or mean as each bar reads it."""
        if self.status != "ok" or not self.runs:
            return {}
        runs = self.runs
        graph_ok = [g for g in self.graphs if g.error is None]
        out: dict[str, float | None] = {
            "graph_snr_db_min": min((g.snr_db_min for g in graph_ok), default=None),
            "graph_cosine_min": min((g.cosine_min for g in graph_ok), default=None),
            "tf_kl_max": max((s.tf_kl for s in self.stages), default=None),
            "tf_top1_min": min((s.tf_top1 for s in self.stages), default=None),
            "tf_topk_min": min((s.tf_topk for s in self.stages), default=None),
            "free_token_agreement_min": min((s.free_token_agreement for s in self.stages), default=None),
            "first_divergent_stage": self.first_divergent_stage,
            "residual_snr_db_min": min(r.residual_snr_db for r in runs),
            "image_psnr_db_min": M.pooled_psnr([r.image_psnr_db for r in runs]),
            "image_ssim_min": _mean([r.image_ssim for r in runs]),
            "image_psnr_vs_fp16_db_min": M.pooled_psnr([r.image_psnr_vs_fp16_db for r in runs]),
            "image_ssim_vs_fp16_min": _mean([r.image_ssim_vs_fp16 for r in runs]),
            "tf_image_psnr_db": M.pooled_psnr([r.tf_image_psnr_db for r in runs]),
        }
        if self.caption is not None:
            out["caption_accuracy"] = self.caption["accuracy"]
            out["caption_accuracy_drop_max"] = self.caption.get("drop")
        return out

    def to_json(self) -> dict:
        f = M.finite_or_none
        return {
            "label": self.label, "kind": self.kind, "format": self.format, "backend": self.backend,
            "recipe": self.recipe, "bundle": self.bundle, "status": self.status, "reason": self.reason,
            "passed": self.passed, "first_divergent_stage": self.first_divergent_stage,
            "summary": {k: (f(v) if isinstance(v, float) else v) for k, v in self.summary().items()},
            "graphs": [g.to_json() for g in self.graphs],
            "stages": [s.to_json() for s in self.stages],
            "runs": [r.to_json() for r in self.runs],
            "caption": self.caption, "notes": self.notes,
            "failures": [x.to_json() for x in self.failures],
        }


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return float(np.mean(vals))  # inf stays inf (identical images), which is what it means


# ----------------------------------------------------------------------------- the references


@dataclass
class ReferenceRuns:
    """The fp32 reference's generations (the teacher), recorded graph inputs, and the fp16 row."""

    refs: References
    prompts: list[str]
    seeds: list[int]
    cfg: float
    topk: int
    runs: list[tuple[str, int]]
    fp32: list[tuple[np.ndarray, Trace]]
    recorded: dict[str, list[tuple[dict, list[np.ndarray]]]]
    fp16: Row | None = None
    fp32_caption: dict | None = None
    notes: list[str] = field(default_factory=list)
    fp32_logits: list[list[np.ndarray]] = field(default_factory=list)  # per run, per stage: CFG-mixed logits
    samples: int = 1  # images per run for the caption score (the run's own, then extra seeds)
    fp32_captions: list[list[dict | None]] = field(default_factory=list)  # per run, per sample: caption checks
    recorded_counts: dict[str, int] | None = None  # calls per graph, where ``recorded`` was not kept (a sweep)

    @property
    def fp16_images(self) -> list[np.ndarray] | None:
        return self.fp16.images if self.fp16 is not None else None

    def record_counts(self) -> dict[str, int]:
        if self.recorded_counts is not None:
            return dict(self.recorded_counts)
        return {g: len(c) for g, c in self.recorded.items()}


class BudgetRecorder(RecordingBackend):
    """:class:`RecordingBackend` that stops keeping new calls once ``budget_bytes`` are held
    (the first call of every graph is always kept, so every graph gets a per-graph score)."""

    def __init__(self, inner, budget_bytes: int) -> None:
        super().__init__(inner, max_calls=3, always=("ar_stage",))
        self.budget = budget_bytes
        self.held = 0

    def run(self, graph, feeds):
        seen = len(self.calls.get(graph, []))
        size = sum(np.asarray(v).nbytes for v in feeds.values())
        if seen and self.held + size > self.budget:
            return self.inner.run(graph, feeds)
        out = super().run(graph, feeds)
        if len(self.calls.get(graph, [])) > seen:
            self.held += size + sum(np.asarray(o).nbytes for o in out)
        return out


def keep_logits(into: list):
    """A stage callback that appends each stage's CFG-mixed logits to ``into``."""

    def keep(si: int, state: dict) -> None:
        into.append(state["logits"])

    return keep


def teacher_forced(teacher: Trace, logits_into: list):
    """A stage callback that keeps the logits and feeds on the teacher's tokens and latents at every stage."""

    def force(si: int, state: dict) -> dict:
        logits_into.append(state["logits"])
        return {"tokens": teacher.tokens[si], "latents": teacher.latents[si]}

    return force


def sample_seed(seed: int, k: int) -> int:
    """The seed of a run's k-th extra caption sample (k >= 1); k = 0 is the run's own seed."""
    if k == 0:
        return seed
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0])


def check_samples(samples: int) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UsageError(f"samples per prompt must be an integer >= 1, got {samples!r}")
    return samples


def record_graph_inputs(refs: References, runs: Sequence[tuple[str, int]], cfg: float,
                        budget_bytes: int) -> tuple[dict, list[tuple[np.ndarray, Trace, list[np.ndarray]]]]:
    """The fp32 reference on the first :data:`RECORD_RUNS` runs with every graph's inputs recorded.

    Recording: every ``ar_stage`` call of the first run (so each scale is covered) and the first
    three calls of every other graph, within the budget — the per-graph numbers need real inputs,
    not all of them (a full-size model's KV caches of the late stages are gigabytes per call).
    Returns the recorded calls and each run's (image, trace, logits).
    """
    recorder = BudgetRecorder(refs.torch_backend, budget_bytes=budget_bytes)
    pipe = Pipeline(refs.loop, recorder, refs.fp32.tokenizer, refs.codebook)
    outs = []
    for i, (prompt, seed) in enumerate(runs[:RECORD_RUNS]):
        if i == 1:
            recorder.always = set()
        logits: list[np.ndarray] = []
        image, trace = pipe.generate(prompt, seed=seed, cfg=cfg, callback_on_stage_end=keep_logits(logits))
        outs.append((image, trace, logits))
    return recorder.calls, outs


def reference_samples(pipe: Pipeline, prompt: str, seed: int, cfg: float, samples: int,
                      first: np.ndarray) -> list[dict | None]:
    """Caption checks of a run's ``samples`` images: ``first`` (its own) and the extra seeds' generations."""
    images = [first] + [pipe.generate(prompt, seed=sample_seed(seed, k), cfg=cfg)[0] for k in range(1, samples)]
    return caption_items(images, [prompt] * len(images))


def run_references(refs: References, prompts: Sequence[str] = DEFAULT_PROMPTS, seeds: Sequence[int] = DEFAULT_SEEDS,
                   cfg: float | None = None, *, fp16: bool = True, topk: int = TOPK,
                   record_budget_mb: float = RECORD_BUDGET_MB, samples: int = 1,
                   progress: Progress | None = None) -> ReferenceRuns:
    """Generate every (prompt, seed) with the fp32 reference (recording graph inputs), then score fp16.

    ``samples``: images per run for the caption score (the run's own and ``samples - 1`` more seeds).
    """
    if not prompts:
        raise UsageError("no prompts to validate on")
    samples = check_samples(samples)
    say = progress or (lambda _m: None)
    runs = [(p, s) for p in prompts for s in seeds]
    cfg = refs.loop.default_cfg if cfg is None else cfg  # the checkpoint's recommended guidance
    recorded, first = record_graph_inputs(refs, runs, cfg, int(record_budget_mb * 2**20))
    fp32, fp32_logits, captions = [], [], []
    for i, (prompt, seed) in enumerate(runs):
        if i < len(first):
            image, trace, logits = first[i]
        else:
            logits = []
            image, trace = refs.fp32.generate(prompt, seed=seed, cfg=cfg, callback_on_stage_end=keep_logits(logits))
        fp32.append((image, trace))
        fp32_logits.append(logits)
        captions.append(reference_samples(refs.fp32, prompt, seed, cfg, samples, image))
        say(f"fp32 reference {i + 1}/{len(runs)}")
    out = ReferenceRuns(refs, list(prompts), list(seeds), cfg, topk, runs, fp32, recorded,
                        fp32_logits=fp32_logits, samples=samples, fp32_captions=captions)
    out.fp32_caption = caption_summary([c for run in captions for c in run], out.notes)
    if fp16:
        row = Row("torch (fp16 autocast)", "reference", "torch", "torch-fp16", "fp16")
        score_row(row, refs.fp16, out, progress=say)
        row.notes.extend(fp16_notes(refs.fp16_backend.fallbacks))
        out.fp16 = row
    return out


def fp16_notes(fallbacks: Mapping[str, str]) -> list[str]:
    return [f"graph {graph} ran in fp32: no fp16 CPU kernel ({why})" for graph, why in sorted(fallbacks.items())]


def caption_items(images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[dict | None]:
    """Per image, the caption scorer's checks; None where the prompt is not a scene caption.

    ``{"error": ...}`` where the scorer failed, or is not installed (``{"missing": ...}``)."""
    try:
        from hartkit.validate import caption_score, scenes
    except ImportError as exc:
        return [{"missing": str(exc)} for _ in prompts]
    out: list[dict | None] = []
    for image, prompt in zip(images, prompts):
        try:
            scenes.parse_caption(prompt)
        except ValueError:
            out.append(None)
            continue
        try:
            out.append({k: (None if v is None else bool(v)) for k, v in caption_score.score(image, prompt).items()})
        except Exception as exc:  # the scorer is another module's code: a failure there must not sink the report
            out.append({"error": f"{type(exc).__name__}: {exc}"})
    return out


def caption_summary(items: Sequence[dict | None], notes: list[str] | None = None) -> dict | None:
    """Caption accuracy over the images whose prompt is a scene caption; None when none is or no scorer runs."""
    missing = next((it["missing"] for it in items if it is not None and "missing" in it), None)
    if missing is not None:
        if notes is not None and not any("caption" in n for n in notes):
            notes.append(f"caption accuracy skipped: hartkit.validate.caption_score is not available ({missing})")
        return None
    kept = [it for it in items if it is not None]
    if not kept:
        if notes is not None and not any("caption" in n for n in notes):
            notes.append("caption accuracy skipped: no prompt is a scene caption (hartkit.validate.scenes grammar)")
        return None
    failed = next((it["error"] for it in kept if "error" in it), None)
    if failed is not None:
        if notes is not None:
            notes.append(f"caption accuracy failed: {failed}")
        return None
    from hartkit.validate.caption_score import ATTRIBUTES, chance_level

    per_attribute = {}
    for name in ATTRIBUTES:
        values = [it[name] for it in kept if it[name] is not None]
        if values:
            per_attribute[name] = float(np.mean(values))
    return {"accuracy": float(np.mean([it["caption"] for it in kept])), "n": len(kept),
            "chance": float(chance_level()["caption"]), "per_attribute": per_attribute}


def caption_accuracy(images: Sequence[np.ndarray], prompts: Sequence[str], notes: list[str] | None = None,
                     ) -> dict | None:
    """Caption accuracy over the prompts that are scene captions; None when the scorer is unavailable."""
    return caption_summary(caption_items(images, prompts), notes)


# ----------------------------------------------------------------------------- scoring one row


def score_graphs(backend, recorded: Mapping[str, list[tuple[dict, list[np.ndarray]]]],
                 output_names: Mapping[str, list[str]]) -> list[GraphScore]:
    scores = []
    for graph, calls in recorded.items():
        gs = GraphScore(graph)
        for ci, (feeds, ref_outs) in enumerate(calls):
            try:
                got = backend.run(graph, feeds)
            except Exception as exc:  # noqa: BLE001 - any backend failure on real inputs is the bundle's
                gs.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                break
            for name, ref, out in zip(output_names[graph], ref_outs, got):
                out = np.asarray(out)
                if out.shape != ref.shape:
                    gs.error = f"output {name}: shape {list(out.shape)} != {list(ref.shape)}"
                    break
                err, cos, snr = M.max_abs_err(ref, out), M.cosine(ref, out), M.snr_db(ref, out)
                gs.outputs.append({"call": ci, "output": name, "max_abs_err": err, "cosine": cos, "snr_db": snr})
                gs.max_abs_err = max(gs.max_abs_err, err)
                gs.cosine_min = min(gs.cosine_min, cos)
                gs.snr_db_min = min(gs.snr_db_min, snr)
            if gs.error:
                break
            gs.calls += 1
        scores.append(gs)
    return scores


class GenerationFailed(HartkitError):
    """A row's backend raised while generating: the row is an error (a failure), not a crash."""


@dataclass
class RunRecord:
    """One (prompt, seed) of one row before pooling: what :func:`score_run` returns (a sweep's unit)."""

    run: RunScore
    image: np.ndarray  # free-running
    kl: list[np.ndarray]  # per stage: teacher-forced KL per position
    top1: list[np.ndarray]  # per stage: teacher-forced top-1 agreement per position
    topk: list[np.ndarray]  # per stage: teacher-forced top-k overlap per position
    tokens: list[np.ndarray]  # per stage: free-running token equal to the reference's, per position
    logit_err: list[float]  # per stage: max |logit error|
    kl_worst: list[float]  # per stage: worst position's KL
    captions: list[dict | None]  # per caption sample: the scorer's checks


def score_run(pipe: Pipeline, loop, prompt: str, seed: int, cfg: float, topk: int, ref_image: np.ndarray,
              ref_trace: Trace, ref_logits: Sequence[np.ndarray], fp16_image: np.ndarray | None = None, *,
              is_reference: bool = False, samples: int = 1) -> RunRecord:
    """Every per-run metric of ``pipe`` against one fp32 reference run (raises :class:`GenerationFailed`)."""
    try:
        tf_logits: list[np.ndarray] = []
        tf_image, tf_trace = pipe.generate(prompt, seed=seed, cfg=cfg,
                                           callback_on_stage_end=teacher_forced(ref_trace, tf_logits))
        image, trace = pipe.generate(prompt, seed=seed, cfg=cfg)
        extra = [pipe.generate(prompt, seed=sample_seed(seed, k), cfg=cfg)[0] for k in range(1, samples)]
    except Exception as exc:  # noqa: BLE001 - a backend that cannot run the loop: the row fails
        raise GenerationFailed(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
    n_stages = len(loop.patch_nums)
    rec = RunRecord(RunScore(prompt, seed), image, [], [], [], [], [], [], caption_items(
        [image, *extra], [prompt] * (1 + len(extra))))
    run = rec.run
    for si in range(n_stages):
        a, b = ref_logits[si], tf_logits[si]
        kl = M.kl_divergence(a, b)
        rec.kl.append(kl.ravel())
        rec.kl_worst.append(float(kl.max(initial=0.0)))
        rec.top1.append((np.argmax(a, -1) == np.argmax(b, -1)).ravel())
        rec.topk.append(M.topk_overlaps(a, b, topk))
        rec.logit_err.append(M.max_abs_err(a, b))
        same = (np.asarray(ref_trace.tokens[si]) == np.asarray(trace.tokens[si])).ravel()
        rec.tokens.append(same)
        run.free_token_agreement.append(float(same.mean()))
    run.first_divergent_stage = M.first_divergent_stage(ref_trace.tokens, trace.tokens)
    run.residual_snr_db = M.snr_db(ref_trace.residual, tf_trace.residual)
    run.residual_max_abs_err = M.max_abs_err(ref_trace.residual, tf_trace.residual)
    run.residual_cosine = M.cosine(ref_trace.residual, tf_trace.residual)
    run.image_psnr_db = M.psnr(ref_image, image)
    run.image_ssim = M.ssim(ref_image, image)
    run.tf_image_psnr_db = M.psnr(ref_image, tf_image)
    if fp16_image is not None:
        run.image_psnr_vs_fp16_db = M.psnr(fp16_image, image)
        run.image_ssim_vs_fp16 = M.ssim(fp16_image, image)
    elif is_reference:
        run.image_psnr_vs_fp16_db, run.image_ssim_vs_fp16 = math.inf, 1.0  # it is the fp16 image
    return rec


def finish_row(row: Row, graphs: list[GraphScore], records: Sequence[RunRecord], patch_nums: Sequence[int],
               fp32_caption: dict | None) -> Row:
    """Pool per-run records (in run order) into the row's per-stage scores and caption accuracy."""
    row.graphs = graphs
    row.runs = [r.run for r in records]
    row.images = [r.image for r in records]
    row.stages = []  # per stage, pooled over every run's token positions
    for si, pn in enumerate(patch_nums):
        row.stages.append(StageScore(
            stage=si, pn=pn,
            tf_kl=float(np.concatenate([r.kl[si] for r in records]).mean()),
            tf_kl_max=max([0.0] + [r.kl_worst[si] for r in records]),
            tf_top1=float(np.concatenate([r.top1[si] for r in records]).mean()),
            tf_topk=float(np.concatenate([r.topk[si] for r in records]).mean()),
            tf_logits_max_abs_err=max([0.0] + [r.logit_err[si] for r in records]),
            free_token_agreement=float(np.concatenate([r.tokens[si] for r in records]).mean())))
    captions = caption_summary([c for r in records for c in r.captions])
    if captions is not None and fp32_caption is not None:
        captions["drop"] = fp32_caption["accuracy"] - captions["accuracy"]
    row.caption = captions
    return row


def score_row(row: Row, pipe: Pipeline, ref: ReferenceRuns, progress: Progress | None = None) -> Row:
    """Fill ``row`` with every metric of ``pipe`` against the fp32 reference runs.

    A run that cannot generate raises :class:`GenerationFailed` with the row's graphs scored and no runs.
    """
    say = progress or (lambda _m: None)
    loop = ref.refs.loop
    row.graphs = score_graphs(pipe.backend, ref.recorded, ref.refs.output_names)
    say(f"{row.label}: graphs")
    fp16_images = ref.fp16_images
    records = []
    for i, ((prompt, seed), (ref_image, ref_trace), ref_logits) in enumerate(zip(ref.runs, ref.fp32, ref.fp32_logits)):
        records.append(score_run(pipe, loop, prompt, seed, ref.cfg, ref.topk, ref_image, ref_trace, ref_logits,
                                 fp16_images[i] if fp16_images is not None else None,
                                 is_reference=row.kind == "reference", samples=ref.samples))
        say(f"{row.label}: {i + 1}/{len(ref.runs)}")
    return finish_row(row, row.graphs, records, loop.patch_nums, ref.fp32_caption)


def judge(row: Row, bars: Mapping[str, float | None]) -> list[Failure]:
    """Every bar the row misses, naming the stage or graph; stages and graphs in loop order."""
    failures: list[Failure] = []
    if row.status != "ok":
        return failures
    for g in row.graphs:
        if g.error is not None:
            failures.append(Failure(row.label, "graph_snr_db_min", -math.inf, bars.get("graph_snr_db_min") or 0.0,
                                    graph=g.graph, detail=f"could not run: {g.error}"))
            continue
        for metric, value in (("graph_snr_db_min", g.snr_db_min), ("graph_cosine_min", g.cosine_min)):
            if misses(metric, value, bars):
                failures.append(Failure(row.label, metric, value, bars[metric], graph=g.graph))
    first = row.first_divergent_stage
    for s in row.stages:
        for metric, value in (("tf_kl_max", s.tf_kl), ("tf_top1_min", s.tf_top1), ("tf_topk_min", s.tf_topk),
                              ("free_token_agreement_min", s.free_token_agreement)):
            if misses(metric, value, bars):
                detail = f"scale {s.pn}x{s.pn}"
                if metric == "free_token_agreement_min" and first is not None:
                    detail += f"; tokens first diverge at stage {first}"
                failures.append(Failure(row.label, metric, value, bars[metric], stage=s.stage, detail=detail))
    summary = row.summary()
    for metric in ("residual_snr_db_min", "image_psnr_db_min", "image_ssim_min", "image_psnr_vs_fp16_db_min",
                   "image_ssim_vs_fp16_min", "caption_accuracy_drop_max"):
        value = summary.get(metric)
        if misses(metric, value, bars):
            detail = f"tokens first diverge at stage {first}" if first is not None and "image" in metric else ""
            failures.append(Failure(row.label, metric, value, bars[metric], detail=detail))
    return failures


# ----------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    row: Row
    pipeline: Pipeline | None = None


def recipe_name(manifest: Mapping) -> str:
    recipe = manifest.get("recipe")
    if not recipe:
        return "fp32"
    if isinstance(recipe, Mapping):
        return str(recipe.get("name") or recipe.get("preset") or "custom")
    return str(recipe)


@dataclass
class CandidatePlan:
    """A (bundle, format, backend) to validate, from its manifest alone (no model, no backend opened)."""

    folder: Path
    format: str
    backend: str
    label: str
    recipe: str

    def new_row(self) -> Row:
        return Row(self.label, "bundle", self.format, self.backend, self.recipe, bundle=str(self.folder))


def plan_candidates(bundles: Sequence[str | Path], backend: str | None = None,
                    ) -> list[tuple[Path, dict, list[CandidatePlan]]]:
    """Per bundle: its folder, manifest and candidates — every format whose backend hartkit knows, or only
    ``backend``'s format when given (a bundle without it is a usage error)."""
    from hartkit.backends import BACKEND_FORMAT
    from hartkit.bundle import read_manifest

    out = []
    labels: dict[str, int] = {}
    for path in bundles:
        folder = Path(path)
        manifest = read_manifest(folder)  # BundleError (exit 3) for a missing or malformed bundle
        recipe = recipe_name(manifest)
        formats = list(manifest.get("files", {}))
        if backend is not None:
            fmt = BACKEND_FORMAT.get(backend)
            if fmt not in formats:
                raise UsageError(f"{folder}: has no {fmt} files for backend {backend!r} (formats: {', '.join(formats) or 'none'})")
            picks = [(fmt, backend)]
        else:
            picks = [(fmt, FORMAT_BACKEND[fmt]) for fmt in formats if fmt in FORMAT_BACKEND]
        if not picks:
            raise UsageError(f"{folder}: the bundle lists no graph files in a known format")
        plans = []
        for fmt, be in picks:
            label = f"{folder.name} ({fmt}, {recipe})"
            labels[label] = labels.get(label, 0) + 1
            if labels[label] > 1:
                label = f"{label} #{labels[label]}"
            plans.append(CandidatePlan(folder, fmt, be, label, recipe))
        out.append((folder, manifest, plans))
    return out


def open_candidate(plan: CandidatePlan, verified_ok: bool, problems: Sequence[str], explicit_backend: bool,
                   graph_backends: Mapping[str, str] | None = None) -> Candidate:
    """The row and, when it can run here, the pipeline of one planned candidate."""
    from hartkit.bundle import BundleError

    row = plan.new_row()
    cand = Candidate(row)
    if not verified_ok:
        row.status, row.reason = "error", "bundle does not verify: " + "; ".join(list(problems)[:5])
        return cand
    try:
        cand.pipeline = Pipeline.from_exported(plan.folder, backend=plan.backend, graph_backends=graph_backends)
    except (MissingDependencyError, HartkitError) as exc:
        if explicit_backend or isinstance(exc, BundleError):
            raise
        row.status, row.reason = "skipped", f"backend {plan.backend} cannot run here: {exc}"
    return cand


def open_candidates(bundles: Sequence[str | Path], refs: References, backend: str | None = None,
                    graph_backends: Mapping[str, str] | None = None) -> list[Candidate]:
    """One candidate per (bundle, format): every format of each bundle whose backend runs on this
    machine (a format that cannot run here is a *skipped* row), or only ``backend``'s format when
    given (then a bundle without it, or a backend that cannot start, is an error)."""
    from hartkit.bundle import verify_bundle

    out: list[Candidate] = []
    for folder, manifest, plans in plan_candidates(bundles, backend):
        refs.check_bundle(folder, manifest)
        report = verify_bundle(folder)
        out.extend(open_candidate(plan, report.ok, report.problems, backend is not None, graph_backends)
                   for plan in plans)
    return out


# ----------------------------------------------------------------------------- the whole validation


@dataclass
class ValidationReport:
    reference: ReferenceRuns
    rows: list[Row]  # the fp16 reference first (when computed), then the bundles
    thresholds: dict[str, float | None]
    notes: list[str] = field(default_factory=list)

    @property
    def bundle_rows(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "bundle"]

    @property
    def passed(self) -> bool:
        ran = [r for r in self.bundle_rows if r.status != "skipped"]
        return bool(ran) and all(r.passed for r in ran)

    @property
    def failures(self) -> list[Failure]:
        out = []
        for r in self.bundle_rows:
            if r.status == "error":
                out.append(Failure(r.label, "status", math.nan, math.nan, detail=r.reason))
            out.extend(r.failures)
        return out

    def failure_lines(self) -> list[str]:
        lines = []
        for r in self.bundle_rows:
            if r.status == "error":
                lines.append(f"{r.label}: could not be validated: {r.reason}")
            lines.extend(f.message() for f in r.failures)
        return lines


def validate(bundles: Sequence[str | Path], checkpoint: str | Path | None = None, *,
             text_model: str | Path | None = None, backend: str | None = None,
             graph_backends: Mapping[str, str] | None = None, prompts: Sequence[str] = DEFAULT_PROMPTS,
             seeds: Sequence[int] = DEFAULT_SEEDS, cfg: float | None = None,
             thresholds: Mapping[str, object] | None = None, fp16: bool = True, topk: int = TOPK,
             reference: ReferenceRuns | None = None, progress: Progress | None = None,
             on_total: Callable[[int], None] | None = None, samples: int = 1) -> ValidationReport:
    """Validate bundles against the references; ``reference`` reuses earlier reference runs.

    ``progress`` is called once per unit of work, ``on_total`` once the number of units is known.
    ``samples``: images per (prompt, seed) for the caption score (1 + extra seeds; see :func:`sample_seed`).
    """
    samples = check_samples(samples)
    bars = resolve(thresholds)
    if not bundles:
        raise UsageError("give at least one bundle to validate")
    if reference is None:
        if checkpoint is None:
            checkpoint, text_model = checkpoint_from_manifests(bundles, text_model)
        refs = References(checkpoint, text_model)
    else:
        refs = reference.refs
    candidates = open_candidates(bundles, refs, backend, graph_backends)
    live = [c for c in candidates if c.pipeline is not None]
    n_runs = len(prompts) * len(seeds) if reference is None else len(reference.runs)
    if on_total is not None:
        ref_units = 0 if reference is not None else n_runs + (n_runs + 1 if fp16 else 0)
        on_total(ref_units + len(live) * (n_runs + 1))
    if reference is None:
        reference = run_references(refs, prompts, seeds, cfg, fp16=fp16, topk=topk, samples=samples,
                                   progress=progress)
    notes = list(reference.notes)
    for cand in live:
        try:
            score_row(cand.row, cand.pipeline, reference, progress)
        except GenerationFailed as exc:  # a graph that cannot run on its inputs: the bundle is broken
            cand.row.status, cand.row.reason = "error", f"generation failed: {exc}"
    rows = ([reference.fp16] if reference.fp16 is not None else []) + [c.row for c in candidates]
    return assemble_report(reference, rows, bars)


def assemble_report(reference: ReferenceRuns, rows: list[Row], bars: Mapping[str, float | None]) -> ValidationReport:
    """Judge the scored rows and collect the notes: the last step of a validation, on one machine or many."""
    notes = list(reference.notes)
    for row in rows:
        row.failures = judge(row, bars)
    for row in rows:
        if row.status == "skipped":
            notes.append(f"{row.label}: skipped ({row.reason})")
        notes.extend(f"{row.label}: {note}" for note in row.notes)
    return ValidationReport(reference, rows, dict(bars), notes)


def checkpoint_from_manifests(bundles: Sequence[str | Path], text_model: str | Path | None,
                              ) -> tuple[Path, Path | None]:
    """The checkpoint the bundles were exported from, when their manifests record one that exists here.

    Bundles exported by older hartkit versions record none; every bundle that records one must name
    the same folder (validating bundles of different models against one reference is meaningless).
    """
    from hartkit.bundle import read_manifest

    found: dict[str, dict] = {}
    for bundle in bundles:
        model = read_manifest(Path(bundle)).get("model", {})
        source = model.get("source") if isinstance(model.get("source"), dict) else {}
        hub = source.get("checkpoint") if isinstance(source.get("checkpoint"), dict) else {}
        if hub.get("repo_id"):  # exported from the Hugging Face cache: found there again by id and revision
            found.setdefault(f"{hub['repo_id']}@{hub.get('revision') or 'main'}", model)
        elif model.get("checkpoint_path"):  # bundles of older versions recorded an absolute path
            found.setdefault(str(model["checkpoint_path"]), model)
    if not found:
        raise UsageError("the bundles' manifests name no checkpoint this machine can find (a local folder is "
                         "recorded by name and content hash only); pass --checkpoint DIR (the checkpoint they were "
                         "exported from)")
    if len(found) > 1:
        raise UsageError(f"the bundles were exported from different checkpoints ({', '.join(sorted(found))}); "
                         "validate them separately or pass --checkpoint DIR")
    path, model = next(iter(found.items()))
    if not model.get("checkpoint_path"):
        from hartkit.model.hub import resolve_checkpoint, resolve_text_model

        text = model["source"].get("text_model") or {}
        if text_model is None and text.get("repo_id") and not text.get("subfolder"):
            text_model = resolve_text_model(f"{text['repo_id']}@{text.get('revision') or 'main'}", Path("."))
        return resolve_checkpoint(path), (Path(text_model) if text_model else None)
    if not Path(path).is_dir():
        raise UsageError(f"the bundles' manifests name checkpoint {path}, which is not a folder here; "
                         "pass --checkpoint DIR")
    if text_model is None and model.get("text_model_path") and Path(model["text_model_path"]).is_dir():
        text_model = Path(model["text_model_path"])
    return Path(path), (Path(text_model) if text_model else None)
