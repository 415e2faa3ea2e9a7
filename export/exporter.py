"""``hartkit export``: checkpoint -> graphs -> ONNX / ExecuTorch / Core ML files, checked for parity.

The export folder is written in a temp folder beside the target and renamed only when every format
exported and passed its parity check, so a failed or interrupted export leaves nothing behind.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hartkit.bundle import (MANIFEST, QUANTIZED_GOLDEN_TOL, TOKENIZER_DIR, LoopInfo, build_export_info,
                            build_manifest, read_manifest, write_constants, write_golden,
                            write_loop_golden, write_manifest)
from hartkit.errors import HartkitError, MissingDependencyError, UsageError
from hartkit.model.graphs import GraphSpec, hart_graph_specs, loop_info
from hartkit.export.parity import GraphParity, ParityError, check_backend, format_table

FORMATS = ("onnx", "executorch", "coreml")
FORMAT_LIBRARIES = {
    "onnx": (("onnx", "onnxscript", "onnxruntime"), "pip install 'hartkit[onnx]'"),
    "executorch": (("executorch",), "pip install 'hartkit[executorch]'"),
    "coreml": (("coremltools",), "pip install 'hartkit[coreml]'"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
RECORD_PROMPT = "a red circle above a blue square on a yellow background"
MAX_CALLS_PER_GRAPH = 3
ALWAYS_RECORD_BYTES = 2 << 30


def parse_formats(text: str | Sequence[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    formats = [f.strip().lower() for f in items if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UsageError(f"unknown export format(s) {bad or formats}; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(formats))


def require_format_libraries(formats: Sequence[str]) -> None:
    import importlib.util

    for fmt in formats:
        mods, hint = FORMAT_LIBRARIES[fmt]
        missing = [m for m in mods if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingDependencyError(f"format '{fmt}' needs {', '.join(missing)} (not installed): {hint}")


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
    from hartkit.fsutil import atomic_dir
    from hartkit.model.checkpoint import load_hart
    from hartkit.model.text_encoder import TextEncoder
    from hartkit.model.torch_runner import TorchBackend, system_length_of
    from hartkit.loop.sampler import StagedLoop

    formats = parse_formats(formats)
    require_format_libraries(formats)
    out = Path(out)
    check_target(out, overwrite)
    from hartkit.bundle.write import write_model_card
    from hartkit.model.hub import resolve_checkpoint, resolve_text_model

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
    torch_backend, _ = TorchBackend.from_model(model, encoder, system_length)
    modules = torch_backend.modules

    say("recording graph inputs from the reference loop")
    recorder = RecordingBackend(torch_backend)
    loop = StagedLoop(_loop_from(model, system_length), recorder.run, encoder.tokenizer, torch_backend.codebook)
    ref_image, ref_trace = loop.generate(record_prompt, seed=seed, cfg=model.default_cfg)

    # --- quantization hook (issue 4, hartkit.quantize): resolve the recipe for every format now,
    # so a refused (scheme, format) cell fails before anything is written.
    quant = None
    if recipe is not None:
        from hartkit.quantize.apply import QuantizedExport

        quant = QuantizedExport.prepare(recipe, model, encoder, system_length, specs, formats, recorder.calls,
                                        say, calibration)
    # --- end quantization hook

    result = ExportResult(out, formats)
    with atomic_dir(out, overwrite=overwrite, replaceable=replaceable_export,
                    what="a previous hartkit export") as tmp:
        _copy_tokenizer(text_dir, tmp / TOKENIZER_DIR)
        write_constants(tmp, torch_backend.codebook)
        files: dict[str, dict[str, str]] = {}
        for fmt in formats:
            if quant is not None:  # quantization hook (issue 4)
                files[fmt] = quant.export(fmt, specs, modules, tmp, say)
            else:
                files[fmt] = _export_format(fmt, specs, modules, tmp, say)
        shared = _share_onnx_weights(tmp, files["onnx"], specs, result, say) if "onnx" in files else None
        info = build_export_info(model, system_length, specs, files)
        if shared is not None:
            info["onnx_weights"] = shared
        write_manifest(tmp, info)  # the backends below read it
        if quant is None:
            # The checks below compare against the recorded outputs: the torch weights are not read
            # again, and a 0.7B model + its text encoder (9 GB) would sit beside the backends' copies.
            _release_weights(model.transformer, model.vae, encoder)
        output_names = {s.name: [o.name for o in s.outputs] for s in specs}
        for fmt in formats:
            say(f"parity: {fmt}")
            if quant is not None:  # quantization hook (issue 4): bars against the eager-quantized modules
                results = quant.check(fmt, tmp, info, recorder.calls, output_names, result)
            else:
                results = _check_format(fmt, tmp, info, recorder.calls, output_names, result)
            result.parity.extend(results)
            failed = [r for r in results if not r.ok]
            if failed:
                raise ParityError(f"{fmt} export missed the parity bar; nothing was written to {out}:\n"
                                  + format_table(failed))
        info["parity"] = [r.to_json() for r in result.parity]
        if quant is not None:  # quantization hook (issue 4): recipe.json + export.json "quantization"
            quant.write(tmp, info)
            result.notes.extend(quant.notes)
        info["notes"] = result.notes
        golden_graphs = write_golden(tmp, recorder.calls, output_names)
        golden_loop = write_loop_golden(tmp, record_prompt, seed, model.default_cfg, ref_trace.tokens, ref_image)
        if quant is not None:
            # A quantized graph's golden outputs are the eager-quantized ones, per format; the fp32
            # loop replay does not apply (quantized tokens legitimately differ).
            golden_graphs = {
                "by_format": {fmt: write_golden(tmp, quant.golden_calls(fmt), output_names, subdir=f"golden/{fmt}",
                                                tolerance=QUANTIZED_GOLDEN_TOL)
                              for fmt in formats},
                **golden_graphs,
            }
            golden_loop = None
        self_check = {fmt: quant.integer_graphs(fmt) for fmt in formats} if quant is not None else {}
        recipe_dict = quant.recipe.to_dict() if quant is not None else None  # issue 4 hook
        sources = export_sources(checkpoint, text_dir)
        model_name = sources["checkpoint"].get("repo_id") or checkpoint.resolve().name
        write_model_card(tmp, info, model_name, sources, recipe_dict, {"checkpoint": checkpoint, "text_model": text_dir})
        manifest = build_manifest(info, encoder.tokenizer, golden_graphs, golden_loop, recipe_dict,
                                  model_name, tmp, self_check=self_check, source=sources)
        write_manifest(tmp, manifest)
    return result


def export_sources(checkpoint: Path, text_dir: Path) -> dict[str, dict]:
    """Where the weights came from, without this machine's paths (repo id + revision, or name + sha256)."""
    from hartkit.model.hub import describe_source

    return {"checkpoint": describe_source(checkpoint, subfolders=("llm", "tokenizer")),
            "text_model": describe_source(text_dir)}


def _release_weights(*modules) -> None:
    """Free the parameters and buffers of torch modules in place (every wrapper sharing them sees empty
    tensors); for use once nothing will run them again."""
    import gc

    import torch

    with torch.no_grad():
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                t.data = torch.empty(0, dtype=t.dtype)
    gc.collect()


def _loop_from(model, system_length: int):
    return LoopInfo.from_dict(loop_info(model, system_length))


def _copy_tokenizer(text_dir: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    found = False
    for name in TOKENIZER_FILES:
        if (text_dir / name).is_file():
            shutil.copy2(text_dir / name, dst / name)
            found = True
    if not found:
        raise HartkitError(f"{text_dir}: no tokenizer files found ({', '.join(TOKENIZER_FILES)})")


def _share_onnx_weights(folder: Path, graph_files: dict[str, str], specs: list[GraphSpec], result: ExportResult,
                        say) -> dict:
    """Store every large ONNX initializer once, in ``onnx/weights.bin`` (see export/onnx_share.py).

    Returns the stats for the manifest (``onnx_weights``), with ``component_bytes``: the bytes on disk
    of each weight component's graphs, the shared ranges they read counted once."""
    from hartkit.export.onnx_share import share_onnx_weights, stored_bytes

    say("onnx: sharing weights between graphs")
    stats = share_onnx_weights(folder / "onnx")
    stats.pop("by_graph", None)
    by_component: dict[str, list[str]] = {}
    for spec in specs:
        if spec.weights and spec.name in graph_files:
            by_component.setdefault(spec.weights, []).append(spec.name)
    stats["component_bytes"] = {c: stored_bytes(folder / graph_files[g] for g in graphs)
                                for c, graphs in by_component.items()}
    result.notes.append(
        f"onnx: {stats['tensors']} initializers stored in onnx/{stats['file']} as {stats['unique_tensors']} "
        f"unique tensors ({stats['shared_tensors']} copies shared); ONNX files "
        f"{stats['bytes_before'] / 1e6:.2f} MB -> {stats['bytes_after'] / 1e6:.2f} MB")
    return stats


def _export_format(fmt: str, specs: list[GraphSpec], modules, folder: Path, say) -> dict[str, str]:
    if fmt == "onnx":
        from hartkit.export.onnx_export import export_onnx

        return export_onnx(specs, modules, folder, progress=say)
    if fmt == "executorch":
        from hartkit.export.executorch_export import export_executorch

        return export_executorch(specs, modules, folder, progress=say)
    if fmt == "coreml":
        from hartkit.export.coreml_export import export_coreml

        return export_coreml(specs, modules, folder, progress=say)
    raise UsageError(f"unknown format {fmt}")  # pragma: no cover - parse_formats guards


def _check_format(fmt: str, folder: Path, info: dict, recorded, output_names, result: ExportResult) -> list[GraphParity]:
    if fmt == "onnx":
        from hartkit.backends import OnnxRuntimeBackend

        return check_backend(OnnxRuntimeBackend(folder, info), fmt, recorded, output_names)
    if fmt == "executorch":
        from hartkit.backends import ExecuTorchBackend

        return check_backend(ExecuTorchBackend(folder, info), fmt, recorded, output_names)
    if fmt == "coreml":
        from hartkit.export.coreml_export import verify_coreml

        results, notes = verify_coreml(folder, info, recorded, output_names)
        result.notes.extend(notes)
        return results
    raise UsageError(f"unknown format {fmt}")  # pragma: no cover
