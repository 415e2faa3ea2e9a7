"""``hartkit export``: one straight line from a checkpoint to a bundle.

load -> record (the reference loop on the eager graphs) -> transform (the quantization plan; fp32 is
the empty plan) -> export (every target) -> check (every target, against the plan's reference) ->
write the bundle (through :mod:`hartkit.bundle`). The formats are the targets of
:mod:`hartkit.export.targets`; nothing here asks which one it holds.

The export folder is written in a temp folder beside the target and renamed only when every format
exported and passed its parity check, so a failed or interrupted export leaves nothing behind.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hartkit.bundle import (MANIFEST, TOKENIZER_DIR, build_export_info, build_manifest, read_manifest,
                            write_constants, write_loop_golden, write_manifest)
from hartkit.errors import HartkitError, UsageError
from hartkit.export.parity import GraphParity, ParityError, format_table
from hartkit.export.targets import FORMATS, parse_formats, targets_of  # noqa: F401 - parse_formats: the CLI reads it here

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
RECORD_PROMPT = "a red circle above a blue square on a yellow background"
MAX_CALLS_PER_GRAPH = 3
ALWAYS_RECORD_BYTES = 2 << 30


class RecordingBackend:
    """Wraps a backend and keeps the inputs/outputs of the first calls of every graph; the graphs in
    ``always`` (ar_stage: one shape per stage) are kept for every call while they fit ``budget`` bytes.

    The budget is what keeps a 1024 px export of the 0.7B model in 24 GiB: its 13 ar_stage calls
    carry ~11 GB of KV cache (the 256 px loop's 8 carry ~1.5 GB and all fit)."""

    def __init__(self, inner, max_calls: int = MAX_CALLS_PER_GRAPH, always: Sequence[str] = ("ar_stage",),
                 budget: int = ALWAYS_RECORD_BYTES) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_calls = max_calls
        self.always = set(always)
        self.budget = budget
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, list[tuple[dict, list[np.ndarray]]]] = {}

    def run(self, graph, feeds):
        out = self.inner.run(graph, feeds)
        seen = self.calls.setdefault(graph, [])
        size = sum(np.asarray(v).nbytes for v in feeds.values()) + sum(np.asarray(o).nbytes for o in out)
        within = graph in self.always and self.bytes.get(graph, 0) + size <= self.budget
        if within or len(seen) < self.max_calls:
            seen.append(({k: np.array(v, copy=True) for k, v in feeds.items()}, [np.array(o, copy=True) for o in out]))
            self.bytes[graph] = self.bytes.get(graph, 0) + size
        return out


@dataclass
class ExportResult:
    out: Path
    formats: list[str]
    parity: list[GraphParity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def replaceable_export(out: Path) -> str | None:
    """None when ``out`` holds a previous hartkit export and nothing else (what ``--force`` may
    replace); otherwise why not."""
    import os

    if not (out / MANIFEST).is_file():
        return f"it holds no {MANIFEST}"
    try:
        manifest = read_manifest(out)
    except (HartkitError, OSError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"its {MANIFEST} is not a hartkit manifest ({detail})"
    listed = {a["path"] for a in manifest["artifacts"]} | {MANIFEST}
    extra = []
    for root, dirs, files in os.walk(out):  # links are not followed, and count as files
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(root, name).relative_to(out).as_posix()
            if rel not in listed:
                extra.append(rel)
    if extra:
        return f"it also holds files no export wrote ({', '.join(sorted(extra)[:5])})"
    return None


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse to clobber. Without ``--force`` the target must be new or empty; with it, it may also be
    a previous hartkit export (its manifest parses, nothing else inside). Never any other folder, nor
    ``/``, the home folder, the current folder or one of its parents."""
    from hartkit import fsutil

    out = Path(out)
    protected = fsutil.protected_reason(fsutil.absolute(out))
    if not protected and not overwrite and out.is_dir() and (out / MANIFEST).is_file():
        raise UsageError(f"{out}: already holds an export (of another model or an older run); "
                         "choose another folder or pass --force to replace it")
    fsutil.check_dir_target(out, overwrite, replaceable_export, what="a previous hartkit export", shown=out)


def _hold_target_lock(export):
    """Hold the target's lock for the whole export (:func:`hartkit.fsutil.target_lock`): a second export
    of the same path fails at once naming the first, and a read-only parent fails before the work."""
    import functools

    @functools.wraps(export)
    def locked(checkpoint, out, *args, **kwargs):
        from hartkit.fsutil import target_lock

        with target_lock(out, what="export"):
            return export(checkpoint, out, *args, **kwargs)

    return locked


@_hold_target_lock
def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    formats: Sequence[str] = FORMATS,
    *,
    text_model: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    record_prompt: str = RECORD_PROMPT,
    seed: int = 0,
    recipe: "str | Path | dict | None" = None,
    calibration: "str | Path | Sequence[str] | None" = None,
    resolution: int | None = None,
) -> ExportResult:
    from hartkit.bundle.write import write_model_card
    from hartkit.export.quantization import QuantizationPlan
    from hartkit.fsutil import atomic_dir
    from hartkit.loop.plan import LoopInfo
    from hartkit.loop.sampler import StagedLoop
    from hartkit.model.checkpoint import load_hart
    from hartkit.model.graphs import hart_graph_specs
    from hartkit.model.hub import resolve_checkpoint, resolve_text_model
    from hartkit.model.text_encoder import TextEncoder
    from hartkit.model.torch_runner import TorchBackend, system_length_of

    targets = targets_of(formats)
    for target in targets:
        target.require()
    out = Path(out)
    check_target(out, overwrite)
    # A folder, upstream's .../llm folder or a repo id in the local Hugging Face cache (hartkit.model.hub).
    checkpoint = resolve_checkpoint(checkpoint)
    text_dir = resolve_text_model(text_model, checkpoint)
    say = progress or (lambda _m: None)

    say("loading checkpoint")
    # resolution: the same weights on fewer scales (load_hart); the manifest's loop section then
    # carries the shorter patch_nums and the smaller image_size, so the runtime follows.
    model = load_hart(checkpoint, resolution=resolution)
    encoder = TextEncoder.from_pretrained(text_dir)
    system_length = system_length_of(encoder.tokenizer, model.cfg.context_token)
    specs = hart_graph_specs(model, encoder, system_length)
    torch_backend, reference_info = TorchBackend.from_model(model, encoder, system_length)
    output_names = {s.name: [o.name for o in s.outputs] for s in specs}

    say("recording graph inputs from the reference loop")
    recorder = RecordingBackend(torch_backend)
    loop = StagedLoop(LoopInfo.from_dict(reference_info["loop"]), recorder.run, encoder.tokenizer,
                      torch_backend.codebook)
    ref_image, ref_trace = loop.generate(record_prompt, seed=seed, cfg=model.default_cfg)

    # Resolved for every target now, so a refused (scheme, format) cell fails before anything is written.
    plan = QuantizationPlan.prepare(recipe, model, encoder, system_length, specs, torch_backend.modules, targets,
                                    recorder.calls, say, calibration)

    result = ExportResult(out, [t.name for t in targets])
    with atomic_dir(out, overwrite=overwrite, replaceable=replaceable_export,
                    what="a previous hartkit export") as tmp:
        _copy_tokenizer(text_dir, tmp / TOKENIZER_DIR)
        write_constants(tmp, torch_backend.codebook)
        files: dict[str, dict[str, str]] = {}
        sections: dict = {}
        for target in targets:
            exported = target.export(specs, torch_backend.modules, tmp, plan[target.name], say)
            files[target.name] = exported.files
            sections.update(exported.info)
            result.notes.extend(exported.notes)
        info = {**build_export_info(model, system_length, specs, files), **sections}
        write_manifest(tmp, info)  # the backends below read it
        plan.release_weights(model.transformer, model.vae, encoder)
        for target in targets:
            say(f"parity: {target.name}")
            checked = target.check(tmp, info, recorder.calls, output_names, plan[target.name])
            result.notes.extend(checked.notes)
            result.parity.extend(checked.parity)
            failed = [r for r in checked.parity if not r.ok]
            if failed:
                raise ParityError(f"{target.name} export missed the parity bar; nothing was written to {out}:\n"
                                  + format_table(failed))
        info["parity"] = [r.to_json() for r in result.parity]
        result.notes.extend(plan.write(tmp, info))
        info["notes"] = result.notes
        golden_graphs, golden_loop = plan.golden(
            tmp, recorder.calls, output_names,
            lambda: write_loop_golden(tmp, record_prompt, seed, model.default_cfg, ref_trace.tokens, ref_image))
        sources = export_sources(checkpoint, text_dir)
        model_name = sources["checkpoint"].get("repo_id") or checkpoint.resolve().name
        write_model_card(tmp, info, model_name, sources, plan.recipe_dict(),
                         {"checkpoint": checkpoint, "text_model": text_dir})
        manifest = build_manifest(info, encoder.tokenizer, golden_graphs, golden_loop, plan.recipe_dict(),
                                  model_name, tmp, self_check=plan.self_check(), source=sources)
        write_manifest(tmp, manifest)
    return result


def export_sources(checkpoint: Path, text_dir: Path) -> dict[str, dict]:
    """Where the weights came from, without this machine's paths (repo id + revision, or name + sha256)."""
    from hartkit.model.hub import describe_source

    return {"checkpoint": describe_source(checkpoint, subfolders=("llm", "tokenizer")),
            "text_model": describe_source(text_dir)}


def _copy_tokenizer(text_dir: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    found = False
    for name in TOKENIZER_FILES:
        if (text_dir / name).is_file():
            shutil.copy2(text_dir / name, dst / name)
            found = True
    if not found:
        raise HartkitError(f"{text_dir}: no tokenizer files found ({', '.join(TOKENIZER_FILES)})")
