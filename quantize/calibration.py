"""Calibration data: the real inputs of every graph, recorded by running the reference loop on prompts.

:func:`record` runs the one sampling loop (:class:`~hartkit.loop.sampler.StagedLoop`) on the eager torch
graphs over a prompt set (a built-in varied default, or a user's file with one prompt per line) and
keeps, per prompt, the ordered calls of every graph. Static quantization (its activation ranges),
sensitivity analysis (graph outputs and teacher-forced stage logits) and validation all read it.

Stored compactly (``.npz``, compressed): float inputs as float16 where that is lossless enough to
calibrate (values beyond float16's range stay float32); the AR stages' past keys/values are not
stored at all — they are recomputed by replaying ``ar_context``/``ar_stage`` in order
(:meth:`CalibrationSet.feeds`), which is what makes a 1024-px model's calibration set small.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from hartkit.errors import HartkitError, UsageError

DEFAULT_PROMPTS = (
    "a red circle above a blue square on a yellow background",
    "a photo of a cat sitting on a wooden chair",
    "a mountain lake at sunrise, mist over the water",
    "a bowl of ramen with an egg, top view",
    "an astronaut riding a horse on the moon, digital art",
    "three green triangles on a white background",
    "a close-up portrait of an old man with a white beard",
    "a city street at night in the rain, neon signs",
    "a watercolor painting of a lighthouse",
    "a red sports car parked in front of a glass building",
    "",  # the empty prompt: the unconditional path's context, and padding everywhere
    "a very long prompt that goes on and on about a garden full of roses, tulips, sunflowers, "
    "daisies and lavender under a clear blue summer sky with a small stone fountain in the middle",
)
FORMAT_VERSION = 1
NOT_STORED = {"ar_stage": ("past_k", "past_v")}  # recomputed on load (see module docstring)
DEFAULT_MAX_CALLS = 4  # per graph and prompt; ar_context/ar_stage are always kept whole (the replay needs them)
ALWAYS_KEEP = ("ar_context", "ar_stage", "ar_head", "condition", "text_encoder")


def load_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"prompt file {p} not found")
    prompts = [line.rstrip("\n") for line in p.read_text().splitlines()]
    prompts = [s for s in prompts if s.strip() and not s.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"{p}: no prompts (one per line)")
    return prompts


@dataclass
class Call:
    prompt: int
    graph: str
    feeds: dict[str, np.ndarray]


@dataclass
class CalibrationSet:
    prompts: list[str]
    calls: list[Call] = field(default_factory=list)
    seed: int = 0
    cfg: float = 4.5

    # ------------------------------------------------------------------ access
    def graphs(self) -> list[str]:
        return list(dict.fromkeys(c.graph for c in self.calls))

    def count(self, graph: str) -> int:
        return sum(1 for c in self.calls if c.graph == graph)

    def feeds(self, graph: str, replay: Mapping[str, Callable] | None = None,
              limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Full float32 feeds of every recorded call of ``graph`` (in order).

        ``ar_stage`` needs ``replay``: graph -> fn(feeds) -> outputs for ``ar_context`` and
        ``ar_stage`` (the fp32 torch graphs), to rebuild the past keys/values of each stage.
        """
        n = 0
        if graph == "ar_stage":
            if replay is None:
                raise HartkitError("ar_stage calibration feeds need the ar_context/ar_stage graphs to replay")
            for feeds in self._replay_stages(replay):
                yield feeds
                n += 1
                if limit is not None and n >= limit:
                    return
            return
        for c in self.calls:
            if c.graph == graph:
                yield {k: _as_f32(v) for k, v in c.feeds.items()}
                n += 1
                if limit is not None and n >= limit:
                    return

    def _replay_stages(self, replay: Mapping[str, Callable]) -> Iterator[dict[str, np.ndarray]]:
        for pi in range(len(self.prompts)):
            past_k = past_v = None
            for c in self.calls:
                if c.prompt != pi or c.graph not in ("ar_context", "ar_stage"):
                    continue
                feeds = {k: _as_f32(v) for k, v in c.feeds.items()}
                if c.graph == "ar_context":
                    _, k, v = replay["ar_context"](feeds)
                else:
                    feeds = {**feeds, "past_k": past_k, "past_v": past_v}
                    yield feeds
                    _, k, v = replay["ar_stage"](feeds)
                past_k = k if past_k is None else np.concatenate([past_k, k], axis=3)
                past_v = v if past_v is None else np.concatenate([past_v, v], axis=3)

    def prompt_calls(self, prompt: int) -> list[Call]:
        return [c for c in self.calls if c.prompt == prompt]

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        index = []
        for i, c in enumerate(self.calls):
            names = []
            for k, v in c.feeds.items():
                arrays[f"c{i}/{k}"] = _compact(v)
                names.append(k)
            index.append({"prompt": c.prompt, "graph": c.graph, "inputs": names})
        meta = {"format_version": FORMAT_VERSION, "prompts": self.prompts, "seed": self.seed, "cfg": self.cfg,
                "calls": index}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        from hartkit.fsutil import atomic_file

        with atomic_file(path) as tmp:
            np.savez_compressed(tmp, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationSet":
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"calibration file {path} not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                if meta.get("format_version") != FORMAT_VERSION:
                    raise HartkitError(f"{path}: calibration format {meta.get('format_version')} is not "
                                       f"{FORMAT_VERSION}; record it again")
                calls = [Call(e["prompt"], e["graph"], {k: data[f"c{i}/{k}"] for k in e["inputs"]})
                         for i, e in enumerate(meta["calls"])]
        except (KeyError, ValueError, OSError) as exc:
            raise HartkitError(f"{path}: not a hartkit calibration file ({exc})") from None
        return cls(list(meta["prompts"]), calls, int(meta.get("seed", 0)), float(meta.get("cfg", 4.5)))


def _compact(v: np.ndarray) -> np.ndarray:
    if v.dtype == np.float32 and v.size and np.isfinite(v).all() and float(np.abs(v).max()) < 60000.0:
        return v.astype(np.float16)
    if v.dtype == np.int64 and v.size and v.min() >= np.iinfo(np.int32).min and v.max() <= np.iinfo(np.int32).max:
        return v.astype(np.int32)
    return v


def _as_f32(v: np.ndarray) -> np.ndarray:
    if v.dtype == np.float16:
        return v.astype(np.float32)
    if v.dtype == np.int32:
        return v.astype(np.int64)
    return v


class _Recorder:
    def __init__(self, inner, max_calls: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_calls = max_calls
        self.prompt = 0
        self.calls: list[Call] = []
        self._seen: dict[str, int] = {}

    def start(self, prompt: int) -> None:
        self.prompt = prompt
        self._seen = {}

    def run(self, graph, feeds):
        out = self.inner.run(graph, feeds)
        n = self._seen.get(graph, 0)
        if graph in ALWAYS_KEEP or n < self.max_calls:
            drop = NOT_STORED.get(graph, ())
            self.calls.append(Call(self.prompt, graph,
                                   {k: np.array(v, copy=True) for k, v in feeds.items() if k not in drop}))
        self._seen[graph] = n + 1
        return out


def record(model, encoder, system_length: int, prompts: Sequence[str] | None = None, *, seed: int = 0,
           cfg: float | None = None, max_calls: int = DEFAULT_MAX_CALLS,
           progress: Callable[[str], None] | None = None) -> CalibrationSet:
    """Run the reference loop (eager fp32 graphs) on every prompt and keep the graphs' inputs."""
    from hartkit.loop.plan import LoopInfo
    from hartkit.loop.sampler import StagedLoop
    from hartkit.model.torch_runner import TorchBackend

    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise UsageError("calibration needs at least one prompt")
    backend, info = TorchBackend.from_model(model, encoder, system_length)
    rec = _Recorder(backend, max_calls)
    pipe = StagedLoop(LoopInfo.from_dict(info["loop"]), rec.run, encoder.tokenizer, backend.codebook)
    cfg = pipe.loop.default_cfg if cfg is None else cfg  # calibrate at the guidance the model will run at
    import warnings

    for i, prompt in enumerate(prompts):
        if progress:
            progress(f"calibration prompt {i + 1}/{len(prompts)}")
        rec.start(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # long prompts are truncated on purpose
            pipe.generate(prompt, seed=seed + i, cfg=cfg)
    return CalibrationSet(prompts, rec.calls, seed, cfg)


def replay_fns(modules: Mapping[str, object], spec_inputs: Mapping[str, list[str]]) -> dict[str, Callable]:
    """graph -> fn(feeds) -> outputs, from eager torch wrappers (for :meth:`CalibrationSet.feeds`)."""
    from hartkit.model.graphs import run_graph

    def make(graph):
        names = spec_inputs[graph]
        return lambda feeds: run_graph(modules[graph], [feeds[n] for n in names])

    return {g: make(g) for g in ("ar_context", "ar_stage") if g in modules}


def activation_ranges(modules: Mapping[str, object], spec_inputs: Mapping[str, list[str]],
                      calib: CalibrationSet, weight_names: Mapping[int, str],
                      graphs: Sequence[str] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    """layer -> graph -> (min, max) of the layer's input over every calibration call of the graph.

    ``weight_names``: id(weight) -> layer for the layers of interest (in ``modules``' model).
    """
    import torch
    from torch.overrides import TorchFunctionMode

    from hartkit.quantize.layers import LAYER_FUNCS

    ranges: dict[str, dict[str, tuple[float, float]]] = {}
    current = {"graph": ""}

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in LAYER_FUNCS and LAYER_FUNCS[func] != "embedding":
                w = args[1] if len(args) > 1 else kwargs.get("weight")
                name = weight_names.get(id(w))
                if name is not None:
                    x = args[0]
                    lo, hi = ranges.setdefault(name, {}).get(current["graph"], (np.inf, -np.inf))
                    ranges[name][current["graph"]] = (min(lo, float(x.min())), max(hi, float(x.max())))
            return func(*args, **kwargs)

    replay = replay_fns(modules, spec_inputs)
    for graph in graphs or calib.graphs():
        if graph not in modules:
            continue
        current["graph"] = graph
        names = spec_inputs[graph]
        for feeds in calib.feeds(graph, replay):
            with torch.no_grad(), Watch():
                modules[graph](*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names])
    return ranges
