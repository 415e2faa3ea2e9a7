"""Writing a bundle: the manifest, the constants, golden vectors and the checksums of every file.

The exporter calls these in order: :func:`write_constants`, then :func:`build_export_info` (the
sections the backends read while the export is checked), the golden vectors, and last
:func:`build_manifest` + :func:`write_manifest`, which hash every file written before them.
The model is read through its attributes only, so this module imports no torch.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from hartkit import __version__
from hartkit.bundle.cpu import cpu_description
from hartkit.bundle.format import (CONSTANTS, GOLDEN_DIR, GOLDEN_LOOP, MANIFEST, SCHEMA_VERSION, TOKENIZER_DIR,
                                   sha256_file)
from hartkit.fsutil import write_json
from hartkit.loop.plan import stage_plan
from hartkit.loop.prompt import HART_SYSTEM_PROMPT
from hartkit.loop.rng import describe_contract
from hartkit.loop.rope import describe_rope
from hartkit.loop.schedule import VAE_SCALE, IDDPMSchedule

if TYPE_CHECKING:
    from hartkit.model.graphs import GraphSpec
    from hartkit.model.checkpoint import HART

LIBRARIES = ("torch", "numpy", "transformers", "tokenizers", "onnx", "onnxruntime", "onnxscript", "executorch",
             "torchao", "coremltools", "safetensors")
# Golden-vector tolerances per format family: fp32 exports replay to ~1e-6; these leave room for
# other CPUs/threads but catch a wrong or perturbed graph.
GOLDEN_ATOL, GOLDEN_RTOL = 1e-3, 1e-3
# Quantized graphs replay against their eager-quantized outputs; activation quantization flips
# roundings between runtimes, so the bar is looser but still catches a broken graph.
QUANTIZED_GOLDEN_TOL = (2e-2, 0.15)
TARGETS = {"coreml": {"minimum_deployment_target": "iOS17", "compute_precision": "float16"},
           "executorch": {"delegate": "XnnpackBackend"}, "onnx": {"opset": 18}}


def build_export_info(model: "HART", system_length: int, specs: Sequence["GraphSpec"],
                      files: dict[str, dict[str, str]] | None = None) -> dict:
    """What an export folder holds: the ``loop`` section, every graph's declared inputs/outputs, the
    file of each graph per format. :func:`build_manifest` adds the rest once the files are written."""
    from hartkit.model.graphs import loop_info  # the loop section is read off the torch model (export time only)

    return {
        "hartkit_version": __version__,
        "model": {"hart": model.cfg.to_dict(), "vae": model.vae_cfg.to_dict()},
        "loop": loop_info(model, system_length),
        "graphs": [s.to_json() for s in specs],
        "files": files or {},
        "constants": CONSTANTS,
        "tokenizer": TOKENIZER_DIR,
        "rng": describe_contract(),
    }


def write_constants(folder: Path, codebook: np.ndarray) -> None:
    np.savez(folder / CONSTANTS, codebook=codebook)


def write_manifest(folder: Path, manifest: dict) -> None:
    write_json(folder / MANIFEST, manifest, indent=2, sort_keys=True)


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def write_golden(folder: Path, recorded: Mapping[str, list[tuple[dict, list[np.ndarray]]]],
                 output_names: Mapping[str, list[str]], subdir: str = GOLDEN_DIR,
                 tolerance: tuple[float, float] | None = None) -> dict:
    """One npz per graph (its first recorded call): ``in.<name>`` and ``out.<name>`` arrays."""
    atol, rtol = tolerance or (GOLDEN_ATOL, GOLDEN_RTOL)
    sub = folder / subdir
    sub.mkdir(parents=True, exist_ok=True)
    entries = {}
    for graph, calls in sorted(recorded.items()):
        feeds, outs = calls[min(1, len(calls) - 1)] if graph == "ar_stage" else calls[0]
        arrays = {f"in.{k}": v for k, v in feeds.items()}
        arrays.update({f"out.{n}": o for n, o in zip(output_names[graph], outs)})
        path = sub / f"{graph}.npz"
        np.savez_compressed(path, **arrays)
        entries[graph] = {"file": f"{subdir}/{graph}.npz", "atol": atol, "rtol": rtol}
    return entries


def write_loop_golden(folder: Path, prompt: str, seed: int, cfg: float, tokens: list[np.ndarray],
                      image: np.ndarray) -> dict:
    path = folder / GOLDEN_LOOP
    path.parent.mkdir(exist_ok=True)
    np.savez_compressed(path, image=image, **{f"tokens.{i}": t for i, t in enumerate(tokens)})
    return {"file": GOLDEN_LOOP, "prompt": prompt, "seed": seed, "cfg": cfg, "more_smooth": True,
            "note": "tokens must match exactly on fp32 backends; the image within PSNR 40 dB"}


def artifacts(folder: Path) -> list[dict]:
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        out.append({"path": rel, "sha256": sha256_file(path), "size": path.stat().st_size})
    return out


def build_manifest(info: dict, tokenizer, golden_graphs: dict, golden_loop: dict, recipe: dict | None,
                   model_name: str, folder: Path, checkpoint_path: Path | None = None,
                   text_model_path: Path | None = None, self_check: Mapping[str, list[str]] | None = None,
                   source: Mapping[str, object] | None = None) -> dict:
    """The export info plus everything a Swift/Kotlin port needs to reproduce an image.

    ``self_check``: per format, the graphs whose results depend on the CPU's integer kernels; a
    runtime runs their golden vectors when it loads the bundle (``golden.self_check``).

    ``source`` (``model.source``): where the weights came from without this machine's paths (a repo id
    and revision, or a folder's name and content hash: ``hartkit.model.hub.describe_source``).
    ``checkpoint_path``/``text_model_path`` are the older, absolute record; bundles holding them still
    load, and new exports pass ``source`` instead.
    """
    loop = info["loop"]
    sched = IDDPMSchedule.create(loop["num_sampling_steps"])
    plan = stage_plan(loop["patch_nums"], loop["context_token"], loop["vocab_size"], loop["default_cfg"],
                      loop["num_phis"])
    manifest = dict(info)
    manifest.update({
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {**info["model"], "name": model_name,
                  **({"checkpoint_path": str(checkpoint_path)} if checkpoint_path is not None else {}),
                  **({"text_model_path": str(text_model_path)} if text_model_path is not None else {}),
                  **({"source": dict(source)} if source is not None else {})},
        "loop": {
            **loop,
            "rules": {
                "ratio": "si / (SN - 1) for si < SN - 1; the final stage reuses the previous stage's ratio",
                "cfg_scale": "t = cfg * ratio; logits = (1 + t) * cond - t * uncond",
                "top_k": "min(600 if si < 7 else 300, V); keep logits >= k-th largest (ties survive)",
                "top_p": "0 (off) by default",
                "gumbel_tau": "max(0.27 * (1 - 0.95 * ratio), 0.005)",
                "gumbel_logit_scale": "1 + ratio (applied to the top-k-masked logits)",
                "phi": "argmin |ticks - si/(SN-1)| in float64 (ticks: linspace(1/3K, 1-1/3K, K) if K==4 else linspace(1/2K, 1-1/2K, K))",
                "sampling": "idx = argmax(softmax(masked) / E_sample); more_smooth: latents = softmax((masked*(1+ratio) - log E_gumbel)/tau) @ codebook",
                # How the graphs are wired into one generation (what a port in another language needs):
                "stage_constants": "stages_at_default_cfg: ratio, top_k, gumbel_tau, logit_scale per stage do not "
                                   "depend on the guidance; cfg_scale = cfg * ratio",
                "text_encoder": "input_ids = [system ids; prompt ids] int64 [1, S+T], attention_mask = [ones(S); "
                                "prompt ids != pad_token_id]; output context [1, T, D]",
                "condition": "context_mask_2b = float32 [2, T]: row 0 the prompt mask, row 1 zeros except [1, 0] = 1",
                "stage0": "ar_context on the T context rows (or ar_stage with an empty past, identical); "
                          "ar_head reads h[:, -1:] only (one sampled position)",
                "kv_cache": "past_k/past_v of ar_stage = every non-final stage's new_k/new_v concatenated on axis 3",
                "residual": "f_hat starts as zeros [1, Cvae, last, last]; after non-final stage si: "
                            "f_hat, x = residual_si(f_hat, latents [1, n, Cvae])",
                "final_stage": "z = diffusion_condition(h, codebook[idx]); residual = diffusion sampler * vae_scale "
                               "(diffusion section); f_hat += (latents + residual) as [1, Cvae, last, last] "
                               "(token n = row-major position)",
                "image": "vae_decode(f_hat) -> float32 [1, 3, H, W] in [0, 1]; uint8 = trunc(float32(x * 255))",
                "float32": "host math in float32: every product, sum and quotient rounded to float32 as numpy does",
            },
            "stages_at_default_cfg": [s.to_dict() for s in plan],
            **({"rope": describe_rope()} if loop["attn_type"] == "llama" else {}),
        },
        "diffusion": {
            "timesteps": [int(t) for t in sched.timesteps],
            "tables": sched.as_table(),
            "vae_scale": VAE_SCALE,
            "clip_denoised": True,
            "cfg_rule": "eps = (1 + t) * eps_cond - t * eps_uncond; no guidance when t == 1.0 exactly",
            "sampler": "z rows [2n, Dz] (cond; uncond); cond_embedding = diffusion_cond_embed(all rows if guided else "
                       "the first n); x = diffusion.init draw [n, Cvae]; for j = S-1 .. 0 (S = len(timesteps)): "
                       "out = denoise([x; x] if guided else x, t = float32 [timesteps[j]], cond_embedding); "
                       "eps = out[:n, :Cvae], v = out[:n, Cvae:]; guided eps by cfg_rule with out[n:, :Cvae]; "
                       "x = step(j, x, eps, v, diffusion.step(S-1-j) draw)",
            "step": "float32 per element, constants float32(tables.*[j]): x0 = clip(sqrt_recip_alphas_cumprod*x - "
                    "sqrt_recipm1_alphas_cumprod*eps, -1, 1); mean = posterior_mean_coef1*x0 + posterior_mean_coef2*x; "
                    "j == 0: x = mean; else frac = (v + 1) / 2, logvar = frac*log_betas + (1 - frac)*"
                    "posterior_log_variance_clipped, x = mean + exp(0.5*logvar) * noise",
        },
        "prompt": {
            "system_prompt": HART_SYSTEM_PROMPT,
            "use_system_prompt": True,
            "max_tokens": loop["context_token"],
            "system_length": loop["system_length"],
            "padding_side": tokenizer.padding_side,
            "truncation_side": tokenizer.truncation_side,
            "pad_token_id": int(tokenizer.pad_token_id),
            "context_mask": "ids != pad_token_id; positions = cumsum(mask) - 1",
        },
        "golden": {"graphs": golden_graphs, "loop": golden_loop,
                   "self_check": {fmt: list(graphs) for fmt, graphs in (self_check or {}).items()},
                   "self_check_rule": "at load, run these graphs' golden vectors (golden.graphs.by_format) on "
                                      "the backend that will run them; refuse the bundle if one misses its "
                                      "tolerance: integer kernels differ between CPUs"},
        "exported_on": cpu_description(),
        "recipe": recipe,
        "libraries": library_versions(),
        "targets": {fmt: TARGETS[fmt] for fmt in info.get("files", {}) if fmt in TARGETS},
    })
    manifest["artifacts"] = artifacts(folder)
    return manifest


# ----------------------------------------------------------------------------- model card and licence

MODEL_CARD = "README.md"
LICENCE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "LICENCE.md", "LICENCE.txt", "COPYING")


def find_licence(folder: Path | None) -> Path | None:
    """A weights folder's licence file (upstream repos keep one at the top), if any."""
    if folder is None:
        return None
    for name in LICENCE_NAMES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def card_licence(folder: Path | None) -> str | None:
    """The ``license:`` a Hugging Face model card (``README.md`` front matter) declares, if any."""
    import yaml

    card = Path(folder) / "README.md" if folder is not None else None
    if card is None or not card.is_file():
        return None
    try:
        text = card.read_text(encoding="utf-8", errors="replace")
        if not text.startswith("---"):
            return None
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (OSError, yaml.YAMLError, IndexError):
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if isinstance(value, (str, int, float)) and str(value).strip() else None


def _source_line(source: Mapping[str, object] | None) -> str:
    if not source:
        return "not recorded"
    if source.get("repo_id"):
        return (f"Hugging Face `{source['repo_id']}`" + (f"/{source['subfolder']}" if source.get("subfolder") else "")
                + f", revision `{source.get('revision')}`")
    return f"local folder `{source.get('name')}` (sha256 of its files `{source.get('sha256')}`)"


def _num(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value or "")


def write_model_card(folder: Path, info: dict, model_name: str, sources: Mapping[str, Mapping[str, object] | None],
                     recipe: dict | None, weights_dirs: Mapping[str, Path | None]) -> list[str]:
    """Write the bundle's ``README.md`` (what model, which recipe, measured parity, how to run it,
    limitations) and copy each weights folder's licence file beside it (``LICENSE`` for the checkpoint,
    ``LICENSE.<part>`` for the others). ``sources``/``weights_dirs`` are keyed by part ("checkpoint",
    "text_model"). Returns the files written. Call it before :func:`build_manifest` (which hashes them)."""
    from hartkit.fsutil import atomic_file, write_text

    written = []
    licences = []
    for part, src_dir in weights_dirs.items():
        found = find_licence(src_dir)
        declared = card_licence(src_dir)
        name = "LICENSE" if part == "checkpoint" else f"LICENSE.{part}"
        if found is not None:
            with atomic_file(folder / name) as tmp:
                tmp.write_bytes(found.read_bytes())
            written.append(name)
            licences.append(f"- {part}: `{name}` (copied from the weights' `{found.name}`)"
                            + (f"; the source's model card declares `{declared}`" if declared else ""))
        elif declared:
            licences.append(f"- {part}: `{declared}` as declared by the source's model card (no licence file "
                            "came with the weights)")
        else:
            src = sources.get(part) or {}
            page = f"https://huggingface.co/{src['repo_id']}" if src.get("repo_id") else "the upstream model page"
            licences.append(f"- {part}: unknown: the weights came without a licence file or a declared licence; "
                            f"check {page} before you redistribute or ship them")
    loop = info["loop"]
    formats = sorted(info.get("files", {}))
    parity = info.get("parity") or []
    rows = [f"| {r.get('format', '')} | {r.get('graph', '')} | {r.get('calls', '')} | "
            f"{_num(r.get('max_abs_err'))} | {_num(r.get('min_snr_db'))} | {'pass' if r.get('ok') else 'FAIL'} |"
            for r in parity if isinstance(r, Mapping)]
    recipe_line = (f"`{recipe.get('name', 'custom')}` (quantized; `recipe.json` holds every layer's scheme)"
                   if recipe else "none: fp32 weights (fp16 where a format stores them so)")
    lines = [
        f"# {model_name}: a hartkit bundle",
        "",
        "HART (hybrid autoregressive text-to-image: next-scale AR transformer, residual diffusion head, "
        "VQ-VAE decoder, Qwen2 text encoder) exported by hartkit "
        f"{info.get('hartkit_version', '')} for a torch-free runtime.",
        "",
        "## Model",
        f"- checkpoint: {_source_line(sources.get('checkpoint'))}",
        f"- text model: {_source_line(sources.get('text_model'))}",
        f"- image size {loop.get('image_size')} px, {len(loop.get('patch_nums', []))} scales, "
        f"default guidance {loop.get('default_cfg')}",
        f"- formats: {', '.join(formats) or 'none'}",
        f"- quantization recipe: {recipe_line}",
        "",
        "## Parity (measured at export, each graph against PyTorch on the reference loop's inputs)",
        "",
    ]
    if rows:
        lines += ["| format | graph | calls | max abs error | min SNR (dB) | |", "|---|---|---|---|---|---|", *rows]
    else:
        lines.append("not recorded")
    lines += [
        "",
        "`manifest.json` holds the same numbers, the golden vectors and every file's sha256; "
        "`hartkit bundle verify .` re-checks them, `hartkit validate .` measures fidelity per stage and image.",
        "",
        "## Run it",
        "",
        "```bash",
        "hartkit generate --exported . --backend onnxruntime --prompt \"a red circle\" --seed 0 --out out.png",
        "```",
        "",
        "```python",
        "from hartkit.runtime.pipeline import Pipeline",
        "pipe = Pipeline.from_pretrained(\"path/to/this/bundle\", backend=\"onnxruntime\")",
        "image = pipe(\"a red circle\", seed=0).images[0]",
        "```",
        "",
        "## Limitations",
        f"- one resolution ({loop.get('image_size')} px): the graphs are exported for its scales only.",
        "- the same seed gives the same image on the same backend and CPU class; quantized integer graphs "
        "are self-checked on the CPU that loads them (`hartkit generate --exported` does it).",
        "- images of a random-weight or small demo checkpoint are not meaningful; a quantized bundle draws "
        "other samples than fp32 (see the parity bars above and `hartkit validate`).",
        "",
        "## Licence",
        *licences,
        "",
    ]
    write_text(folder / MODEL_CARD, "\n".join(lines))
    return [MODEL_CARD, *written]
