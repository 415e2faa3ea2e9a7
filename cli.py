"""The ``hartkit`` command line. Heavy libraries are imported inside each command, so ``--help`` is fast.

Exit codes: 0 success, 1 internal error (a bug: traceback shown), 2 a user error (bad input, missing
file or library: one line, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from hartkit import __version__
from hartkit.errors import HartkitError, UsageError

DEFAULT_PROMPT = "a red circle above a blue square on a yellow background"
DEFAULT_DEMO_DIR = Path("hartkit-demo")


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**64), got {value}")
    return value


def _resolution(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be a whole number of pixels, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"resolution must be positive, got {value}")
    return value


RESOLUTION_HELP = ("run the same weights on fewer scales, up to this image size in px (e.g. 256 for the "
                   "1024 px model); the valid sizes are listed on error (default: the model's own)")


CFG_HELP = ("classifier-free guidance scale (default: the model's recommendation, guidance_scale in the "
            "checkpoint's llm/generation_config.json or the bundle's manifest; HART's 4.5 without one)")


def _cfg(text: str) -> float:
    from hartkit.loop.plan import MAX_CFG  # torch-free: `generate --exported` runs without torch

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cfg must be a number, got {text!r}") from None
    if not 0.0 <= value <= MAX_CFG:
        raise argparse.ArgumentTypeError(f"cfg must be in [0, {MAX_CFG}], got {value}")
    return value


# ----------------------------------------------------------------------------- commands


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    from hartkit.model.presets import init_checkpoint

    out = init_checkpoint(args.preset, args.out, seed=args.seed, overwrite=args.force,
                          with_text_model=not args.no_text_model)
    print(f"wrote a random-weight '{args.preset}' checkpoint to {out} (llm/, tokenizer/, text_model/)")
    return 0


def _text_model_dir(checkpoint: Path, text_model: str | None) -> Path:
    if text_model:
        return Path(text_model)
    default = checkpoint / "text_model"
    if default.is_dir():
        return default
    if not checkpoint.is_dir():
        raise UsageError(f"{checkpoint}: checkpoint folder not found")
    raise UsageError(f"{checkpoint}: no text_model/ folder inside; pass --text-model DIR (a Qwen2 model folder)")


def _load_reference(checkpoint: Path, text_model: Path, resolution: int | None = None):
    """(model, text encoder) for the PyTorch reference sampler."""
    from hartkit.model.checkpoint import load_hart
    from hartkit.model.text_encoder import TextEncoder

    return load_hart(checkpoint, resolution=resolution), TextEncoder.from_pretrained(text_model)


def _generate_images(checkpoint: Path, text_model: Path, prompts: list[str], seed: int, cfg: float | None,
                     more_smooth: bool, top_p: float, resolution: int | None = None, loaded=None):
    """``loaded``: a (model, encoder) pair from :func:`_load_reference`, to reuse instead of loading."""
    from tqdm import tqdm

    from hartkit.model.sampler import SamplerOptions, generate_from_prompts

    model, encoder = loaded or _load_reference(checkpoint, text_model, resolution)
    bar = tqdm(total=model.cfg.num_stages, desc="generating", unit="stage", file=sys.stderr)
    try:
        images, _ = generate_from_prompts(
            model, encoder, prompts, seed=seed,
            options=SamplerOptions(cfg=cfg, more_smooth=more_smooth, top_p=top_p),
            progress=lambda _msg: bar.update(1),
        )
    finally:
        bar.close()
    return images


def _image_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


def _check_generate_inputs(args: argparse.Namespace) -> None:
    """Refuse, before loading anything, prompts that are not text and outputs that cannot be written."""
    from hartkit.fsutil import check_output_file
    from hartkit.loop.prompt import check_prompts

    check_prompts(args.prompt)
    if not args.out:
        raise UsageError("--out is empty; give an image path (e.g. --out image.png)")
    check_output_file(args.out)
    for path in _image_paths(Path(args.out), len(args.prompt)):
        check_output_file(path)


def _save_images(images, out: Path) -> list[Path]:
    from hartkit.runtime.images import save_png

    paths = _image_paths(out, len(images))
    for image, path in zip(images, paths):
        save_png(image, path)
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    if bool(args.checkpoint) == bool(args.exported):
        raise UsageError("give exactly one of --checkpoint DIR (PyTorch reference) or --exported DIR (runtime)")
    if args.exported and args.resolution is not None:
        raise UsageError("--resolution applies to --checkpoint; an export has its resolution fixed "
                         "(export it with `hartkit export --resolution PX`)")
    _check_generate_inputs(args)
    if args.exported:
        images = _generate_exported(Path(args.exported), args.backend, _graph_backends(args.graph_backend),
                                    args.prompt, args.seed, args.cfg, not args.no_smooth, args.top_p,
                                    self_check=not args.no_self_check)
    else:
        checkpoint = Path(args.checkpoint)
        text_model = _text_model_dir(checkpoint, args.text_model)
        images = _generate_images(checkpoint, text_model, args.prompt, args.seed, args.cfg,
                                  not args.no_smooth, args.top_p, args.resolution)
    for path in _save_images(images, Path(args.out)):
        print(f"wrote {path}")
    return 0


def _graph_backends(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        graph, sep, backend = item.partition("=")
        if not sep or not graph or not backend:
            raise UsageError(f"--graph-backend takes GRAPH=BACKEND (e.g. vae_decode=onnxruntime), got {item!r}")
        out[graph] = backend
    return out


def _generate_exported(export_dir: Path, backend: str, graph_backends: dict[str, str], prompts: list[str],
                       seed: int, cfg: float | None, more_smooth: bool, top_p: float, self_check: bool = True):
    import numpy as np
    from tqdm import tqdm

    from hartkit.runtime.pipeline import Pipeline

    # A bundle is checked where it runs: file hashes, then its integer graphs' golden vectors on this CPU.
    pipe = Pipeline.from_bundle(export_dir, backend=backend, graph_backends=graph_backends, self_check=self_check)
    images = []
    for prompt in prompts:
        bar = tqdm(total=len(pipe.loop.patch_nums), desc=f"generating ({backend})", unit="stage", file=sys.stderr)
        try:
            image, _ = pipe.generate(prompt, seed=seed, cfg=cfg, more_smooth=more_smooth, top_p=top_p,
                                     progress=lambda _m: bar.update(1))
        finally:
            bar.close()
        images.append(image)
    return np.stack(images)


def cmd_bundle(args: argparse.Namespace) -> int:
    import json

    from hartkit.runtime import bundle as B

    if args.action == "verify":
        report = B.verify_bundle(args.path, backend=None if args.backend == "none" else args.backend)
        print(f"{args.path}: {report.checked_files} files match their sha256")
        for g in report.golden:
            if g["graph"] == "loop":
                print(f"  golden loop: tokens {'identical at every stage' if g['first_divergent_stage'] is None else 'differ from stage %d' % g['first_divergent_stage']}, "
                      f"image PSNR {g['psnr_db']:.1f} dB  {'ok' if g['ok'] else 'FAILED'}")
                continue
            print(f"  golden {g['graph']:24} max abs err {g['max_abs_err']:.2e}  {'ok' if g['ok'] else 'FAILED'}")
        for problem in report.problems:
            print(f"  problem: {problem}", file=sys.stderr)
        print("bundle OK" if report.ok else "bundle FAILED verification")
        return 0 if report.ok else 3
    if args.action == "inspect":
        manifest = B.read_manifest(Path(args.path))
        loop = manifest["loop"]
        print(f"model      {manifest['model'].get('name', '?')}  (schema {manifest['schema_version']}, "
              f"hartkit {manifest.get('hartkit_version', '?')})")
        print(f"scales     {loop['patch_nums']}  image {loop.get('image_size', '?')} px  vocab {loop['vocab_size']}")
        print(f"formats    {', '.join(manifest['files'])}")
        print(f"graphs     {', '.join(g['name'] for g in manifest['graphs'])}")
        size = sum(a['size'] for a in manifest['artifacts'])
        print(f"files      {len(manifest['artifacts'])} ({size / 1e6:.1f} MB)")
        print(f"recipe     {json.dumps(manifest.get('recipe')) if manifest.get('recipe') else 'fp32 (none)'}")
        return 0
    if args.action == "pack":
        out = B.pack(args.path, args.archive)  # no --archive: NAME.hartkit beside the folder (also for `pack .`)
        print(f"wrote {out}")
        return 0
    if args.action == "unpack":
        if not args.out:
            raise UsageError("unpack needs --out DIR")
        print(f"unpacked and verified {B.unpack(args.path, args.out)}")
        return 0
    raise UsageError(f"unknown bundle action {args.action}")  # pragma: no cover


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hartkit.bench.run import format_report, run_bench

    backends = [b.strip() for b in args.backend.split(",") if b.strip()] if args.backend else None
    if not args.bundle and not args.recipes:
        raise UsageError("give --bundle DIR (one or more) and/or --recipes R1,R2 --work DIR (exports them first)")
    if args.out:
        from hartkit.fsutil import check_output_dir

        check_output_dir(args.out)  # before the minutes of measuring
    bar = tqdm(desc="bench", unit="step", file=sys.stderr, bar_format="{desc}: {n_fmt} steps [{elapsed}] {postfix}")

    def step(message: str) -> None:
        bar.set_postfix_str(message)
        bar.update(1)

    try:
        exports: list[dict] = []
        failed: list[dict] = []
        bundles = list(args.bundle or [])
        if args.recipes:
            from hartkit.bench.exports import prepare_bundles
            from hartkit.export.exporter import parse_formats

            if not args.work:
                raise UsageError("--recipes needs --work DIR (where the bundles are exported and reused)")
            recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
            prepared, exports = prepare_bundles(args.checkpoint, args.work, recipes, parse_formats(args.format),
                                                args.resolution, progress=step)
            bundles = prepared + bundles
        elif args.resolution is not None:
            raise UsageError("--resolution applies with --recipes (a bundle's resolution is fixed at export)")
        failed = [e for e in exports if e.get("failed")]
        if not bundles:
            raise HartkitError("every export failed: " + "; ".join(f"{e['recipe']} {e['formats'][0]}: {e['failed']}"
                                                                    for e in failed))
        result = run_bench(args.checkpoint, bundles, backends, runs=args.runs, out=args.out,
                           measure_memory=not args.no_memory, exports=exports, progress=step)
    finally:
        bar.close()
    print(format_report(result))
    if args.out:
        print(f"wrote {Path(args.out) / 'bench.json'}, bench.md and bench.png")
    return 3 if failed else 0  # measured what exported; a failed export is a failed check


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hartkit.export.exporter import check_target, export_checkpoint, parse_formats
    from hartkit.export.parity import format_table

    formats = parse_formats(args.format)
    if not args.out:
        raise UsageError("--out is empty; give a new folder for the bundle")
    check_target(Path(args.out), args.force)  # refuse before the progress bar; again under the lock
    bar = tqdm(desc="exporting", unit="step", file=sys.stderr, bar_format="{desc}: {n_fmt} steps [{elapsed}] {postfix}")
    try:
        def step(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        result = export_checkpoint(args.checkpoint, args.out, formats, text_model=args.text_model,
                                   overwrite=args.force, progress=step,
                                   # quantization hook (issue 4): --recipe / --calibration
                                   recipe=getattr(args, "recipe", None), calibration=getattr(args, "calibration", None),
                                   resolution=args.resolution)
    finally:
        bar.close()
    print(format_table(result.parity))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {', '.join(result.formats)} export to {result.out}")
    return 0


def demo_checkpoint() -> Path:
    """The built-in demo model shipped as package data (assets/demo, see its README.md)."""
    import hartkit.assets

    return Path(hartkit.assets.__file__).resolve().parent / "demo"


def cmd_demo(args: argparse.Namespace) -> int:
    from hartkit.fsutil import check_output_dir
    from hartkit.loop.prompt import check_prompts

    check_prompts([args.prompt])
    out_dir = check_output_dir(args.out)  # before the work: a file or a read-only place fails now
    checkpoint = demo_checkpoint()
    if not (checkpoint / "llm" / "config.json").is_file():
        # Only a broken install lacks the asset; still show the pipeline running, and say so.
        from hartkit.model.presets import init_checkpoint

        print(f"hartkit demo: the built-in demo model is missing ({checkpoint}); using a random-weight 'tiny' "
              f"checkpoint instead, which draws noise", file=sys.stderr)
        checkpoint = out_dir / "checkpoint-tiny"
        if not (checkpoint / "llm" / "config.json").is_file():
            init_checkpoint("tiny", checkpoint, seed=0, overwrite=True)
    loaded = _load_reference(checkpoint, checkpoint / "text_model")
    images = _generate_images(checkpoint, checkpoint / "text_model", [args.prompt], args.seed, args.cfg, True, 0.0,
                              loaded=loaded)
    paths = _save_images(images, out_dir / "demo.png")
    guidance = loaded[0].default_cfg if args.cfg is None else args.cfg
    print(f"prompt: {args.prompt!r}  seed: {args.seed}  guidance: {guidance:g}")
    print(f"wrote {paths[0]} from checkpoint {checkpoint} (PyTorch reference sampler)")
    if checkpoint == demo_checkpoint():
        _demo_grid(checkpoint, out_dir, args, images[0], loaded)
    if args.quick:
        return 0
    return _demo_exported(checkpoint, out_dir, args, images[0])


def _demo_grid(checkpoint: Path, out_dir: Path, args: argparse.Namespace, image, loaded) -> None:
    """What the demo model can and cannot draw: the caption judge's verdict on the main image, and a grid
    of held-out prompts (never seen in training) with each verdict."""
    from hartkit.runtime.images import caption_grid
    from hartkit.validate import caption_score, scenes

    def verdict(result: dict) -> str:
        failed = [k for k in caption_score.ATTRIBUTES if result.get(k) is False]
        return "caption right" if result["caption"] else "wrong " + ", ".join(failed)

    try:
        print(f"caption judge on {out_dir / 'demo.png'}: {verdict(caption_score.score(image, args.prompt))}")
    except ValueError:  # a prompt outside the scenes' grammar: nothing to judge
        print("caption judge: the prompt is outside the demo model's scene vocabulary (see assets/demo/README.md)")
    held = scenes.heldout_prompts(100)
    prompts = held[:4] + held[9:13]  # four one-shape and four two-shape captions
    grid = _generate_images(checkpoint, checkpoint / "text_model", prompts, args.seed, args.cfg, True, 0.0,
                            loaded=loaded)
    results = [caption_score.score(img, p) for img, p in zip(grid, prompts)]
    path = caption_grid(grid, [f"{p} [{verdict(r)}]" for p, r in zip(prompts, results)], out_dir / "demo-grid.png",
                        cols=4, scale=2)
    right = sum(r["caption"] for r in results)
    print(f"wrote {path}: 8 held-out prompts, {right} of 8 drawn as captioned by the pixel judge "
          f"(the demo model's numbers: assets/demo/README.md)")


def _demo_exported(checkpoint: Path, out_dir: Path, args: argparse.Namespace, reference) -> int:
    """The rest of the product on the same prompt: export -> torch-free runtime -> validation report."""
    import numpy as np

    from hartkit.export.exporter import export_checkpoint
    from hartkit.runtime.bundle import verify_bundle
    from hartkit.runtime.images import psnr
    from hartkit.validate.core import validate
    from hartkit.validate.report import verdict_lines, write_report

    bundle = out_dir / "bundle-onnx"
    print(f"exporting to ONNX (graphs + parity checks + golden vectors) -> {bundle} ...", file=sys.stderr)
    export_checkpoint(checkpoint, bundle, ["onnx"], overwrite=True)
    print(f"wrote the bundle {bundle}: {verify_bundle(bundle).checked_files} files, checksums verified")
    images = _generate_exported(bundle, "onnxruntime", {}, [args.prompt], args.seed, args.cfg, True, 0.0)
    path = _save_images(images, out_dir / "demo-onnxruntime.png")[0]
    same = np.array_equal(images[0], reference)
    print(f"wrote {path} from the exported bundle on onnxruntime (torch-free runtime): "
          + ("identical to the reference" if same else f"PSNR {psnr(reference, images[0]):.1f} dB vs the reference"))
    print("validating the bundle against the fp32/fp16 references ...", file=sys.stderr)
    report = validate([bundle], checkpoint, text_model=checkpoint / "text_model", prompts=[args.prompt],
                      seeds=(args.seed,), cfg=args.cfg)
    _, html = write_report(report, out_dir / "report")
    print("\n".join(verdict_lines(report)))
    print(f"validation report: {html.resolve().as_uri()}")
    return 0


# ----------------------------------------------------------------------------- validate (begin)
# `hartkit validate`: owned with validate/ (issue 5, validation half). Exit 0: every bundle row passes;
# 3: a bar was missed (the failing metric and stage are printed); 2: usage or bundle errors.


def cmd_validate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hartkit.validate import thresholds as T
    from hartkit.validate.core import DEFAULT_PROMPTS, parse_seeds, read_prompts, validate
    from hartkit.validate.report import summary_lines, verdict_lines, write_report

    overrides = T.load_file(args.thresholds) if args.thresholds else {}
    overrides.update(T.parse_assignments(args.threshold or []))
    T.resolve(overrides)  # refuse a typo before the minutes of work
    from hartkit.fsutil import check_output_dir

    check_output_dir(args.out)  # and an output folder that cannot be written
    prompts = read_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    seeds = parse_seeds(args.seeds)
    bars: list = []  # the progress bar starts once the amount of work is known (after the checks)
    try:
        def on_total(total: int) -> None:
            bars.append(tqdm(total=total, desc="validating", unit="step", file=sys.stderr))

        def step(message: str) -> None:
            if bars:
                bars[0].set_postfix_str(message)
                bars[0].update(1)

        report = validate(args.bundles, args.checkpoint, text_model=args.text_model, backend=args.backend,
                          graph_backends=_graph_backends(args.graph_backend), prompts=prompts, seeds=seeds,
                          cfg=args.cfg, thresholds=overrides, fp16=not args.no_fp16, progress=step,
                          on_total=on_total)
    finally:
        for bar in bars:
            bar.close()
    json_path, html_path = write_report(report, args.out)
    print("\n".join(summary_lines(report)))
    for note in report.notes:
        print(f"note: {note}")
    print("\n".join(verdict_lines(report)))
    print(f"{'PASS' if report.passed else 'FAIL'}: report at {html_path.resolve().as_uri()} (data: {json_path})")
    return 0 if report.passed else 3  # a failed check, like parity and bundle verification


def _add_validate_parser(sub) -> None:
    from hartkit.validate.thresholds import describe

    p = sub.add_parser(
        "validate", help="compare bundles against the fp32/fp16 torch reference; pass/fail report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run each bundle (every format it holds, or --backend's) and the torch reference of the same "
                    "checkpoint on a fixed prompt x seed set; compare graphs on recorded inputs, stages "
                    "teacher-forced and free-running, the diffusion head's residual and the final images; write "
                    "OUT/report.json and OUT/report.html. Exit 0 when every bundle clears every bar, 3 when one "
                    "misses a bar, 2 on a usage error.",
        epilog="thresholds (NAME, default, meaning):\n" + describe())
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folder(s); several give a parity matrix")
    add_checkpoint_options(
        p, checkpoint_help="the checkpoint the bundles were exported from (default: the one their manifest records)")
    p.add_argument("--backend", choices=["onnxruntime", "executorch", "coreml"],
                   help="run only this backend's format (default: every format the bundle holds that runs here)")
    p.add_argument("--graph-backend", action="append", metavar="GRAPH=BACKEND",
                   help="run one graph on another backend, e.g. vae_decode=onnxruntime (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="prompts: one per line, or a JSON list (default: built-in set)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    p.add_argument("--cfg", type=_cfg, default=None, help=CFG_HELP)
    p.add_argument("--threshold", action="append", metavar="NAME=VALUE",
                   help="override one bar, e.g. tf_top1_min=0.9 or image_ssim_min=none (repeatable)")
    p.add_argument("--thresholds", metavar="JSON", help="a JSON file {name: value} of bars to override")
    p.add_argument("--no-fp16", action="store_true", help="skip the fp16 reference row (faster)")
    p.add_argument("--out", default="hartkit-validate", help="report folder (default: hartkit-validate)")
    p.set_defaults(func=cmd_validate)


# ----------------------------------------------------------------------------- validate (end)


# ----------------------------------------------------------------------------- parser


def add_checkpoint_options(p: argparse.ArgumentParser, *, required: bool = False,
                           checkpoint_help: str = "folder with llm/ and tokenizer/") -> None:
    """``--checkpoint DIR`` and ``--text-model DIR`` (generate, export, validate, quantize, sensitivity)."""
    p.add_argument("--checkpoint", required=required, metavar="DIR", help=checkpoint_help)
    p.add_argument("--text-model", metavar="DIR", help="Qwen2 text model folder (default: DIR/text_model)")


def add_bundle_options(p: argparse.ArgumentParser, *, required: bool, out_help: str,
                       out_aliases: tuple[str, ...] = ()) -> None:
    """What ``export`` and ``quantize`` share: the checkpoint, ``--format``, ``--out`` and ``--force``."""
    add_checkpoint_options(p, required=required)
    p.add_argument("--format", default="onnx", help="comma-separated: onnx,executorch,coreml (default: onnx)")
    p.add_argument("--out", *out_aliases, dest="out", required=required, metavar="DIR", help=out_help)
    p.add_argument("--force", action="store_true", help="replace an existing export in OUT")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hartkit",
        description="Run, quantize and export HART (hybrid autoregressive text-to-image) for phones and laptops.",
    )
    parser.add_argument("--version", action="version", version=f"hartkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="generate an image from the built-in default model (no arguments needed)",
                       description="Generate one image with the built-in default model and print where it went.")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    p.add_argument("--cfg", type=_cfg, default=None, help=CFG_HELP)
    p.add_argument("--out", default=str(DEFAULT_DEMO_DIR), help=f"output folder (default: {DEFAULT_DEMO_DIR})")
    p.add_argument("--quick", action="store_true",
                   help="only the PyTorch reference image (skip the ONNX export, runtime run and validation report)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "init-checkpoint", help="write a random-weight checkpoint of a preset in HART's official layout",
        description="Write OUT/llm, OUT/tokenizer and OUT/text_model with random weights of a preset shape. "
                    "Useful to test the toolkit end to end without the real weights.")
    p.add_argument("out", help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--preset", default="tiny", help="model shape: tiny (default) or hart-0.7b-1024px")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-text-model", action="store_true", help="skip writing OUT/text_model")
    p.set_defaults(func=cmd_init_checkpoint)

    p = sub.add_parser(
        "generate", help="generate images from a checkpoint folder",
        description="Generate an image with the PyTorch reference sampler from a checkpoint in HART's "
                    "official layout (DIR/llm, DIR/tokenizer). The same seed gives the same image.")
    add_checkpoint_options(p, checkpoint_help="folder with llm/ and tokenizer/ (PyTorch reference sampler)")
    p.add_argument("--exported", metavar="DIR", help="an export folder from `hartkit export` (torch-free runtime)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "executorch", "coreml"],
                   help="runtime backend with --exported (default: onnxruntime)")
    p.add_argument("--graph-backend", action="append", metavar="GRAPH=BACKEND",
                   help="run one graph on another backend, e.g. vae_decode=onnxruntime (repeatable)")
    p.add_argument("--no-self-check", action="store_true",
                   help="with --exported: skip running the bundle's integer graphs on their golden vectors at load "
                        "(the check that this CPU computes them as the exporting one did; exit 3 when it does not)")
    p.add_argument("--prompt", required=True, action="append",
                   help="text prompt; repeat for a batch (images are numbered)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    p.add_argument("--cfg", type=_cfg, default=None, help=CFG_HELP)
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling threshold, 0 = off (default, as upstream)")
    p.add_argument("--resolution", type=_resolution, metavar="PX", help=RESOLUTION_HELP + " (with --checkpoint)")
    p.add_argument("--no-smooth", action="store_true",
                   help="hard codebook lookups instead of upstream's default Gumbel smoothing (more_smooth)")
    p.add_argument("--out", default="hartkit.png", help="output PNG path (default: hartkit.png)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX, ExecuTorch and/or Core ML",
        description="Cut HART into pure graphs (text encoder, condition, AR stages, head, residual update, "
                    "diffusion denoiser, VAE decoder), export them, and check every graph against PyTorch on "
                    "inputs recorded from the reference loop. The folder is written only if all checks pass.")
    add_bundle_options(
        p, required=True, out_aliases=("--bundle",),
        out_help="output bundle folder (new or empty, unless --force); every export is a verified bundle")
    p.add_argument("--resolution", type=_resolution, metavar="PX", help=RESOLUTION_HELP)
    # --- quantization hook (issue 4): --recipe/--calibration here, `quantize` and `sensitivity` commands
    from hartkit.quantize.cli import add_export_options, add_parsers as add_quantize_parsers

    add_export_options(p)
    add_quantize_parsers(sub)
    # --- end quantization hook
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "bench", help="measure latency, FLOP/s, memory and size side by side",
        description="Per graph: median latency on each backend and in torch eager fp32 (ratios); end to end: the "
                    "runtime vs the torch reference sampler with a per-part breakdown; AR stages' achieved FLOP/s "
                    "over this machine's measured fp32 GEMM throughput; peak RSS of a generation; bundle bytes "
                    "over the bit limit; with --recipes, each recipe's export time and peak memory. Writes bench.json, "
                    "bench.md (the table) and bench.png with --out.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="the checkpoint the bundles were exported from")
    p.add_argument("--bundle", action="append", metavar="DIR",
                   help="an export bundle (repeat for several; with --recipes: measured beside them)")
    p.add_argument("--recipes", metavar="R1,R2",
                   help="export these recipes first (fp32 = no quantization; e.g. fp32,laptop,phone) into --work")
    p.add_argument("--format", default="onnx,executorch",
                   help="with --recipes: formats to export (default: onnx,executorch)")
    p.add_argument("--resolution", type=_resolution, metavar="PX", help="with --recipes: " + RESOLUTION_HELP)
    p.add_argument("--work", metavar="DIR", help="with --recipes: bundle folder (bundles there are reused)")
    p.add_argument("--backend", default=None,
                   help="comma-separated backends to measure (default: every format in the bundles)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per measurement, after one warm-up (default: 3)")
    p.add_argument("--out", metavar="DIR", help="write bench.json, bench.md and bench.png here")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "bundle", help="verify, inspect, pack or unpack a bundle",
        description="verify: recompute every sha256, check the manifest against its schema and the files against "
                    "the manifest, and run the golden vectors on a backend. inspect: summary. pack/unpack: one-file "
                    "archive (unpack refuses paths that escape the target).")
    p.add_argument("action", choices=["verify", "inspect", "pack", "unpack"])
    p.add_argument("path", help="bundle folder (verify, inspect, pack) or archive file (unpack)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "executorch", "coreml", "none"],
                   help="verify: backend for the golden vectors, or none (default: onnxruntime)")
    p.add_argument("--archive", help="pack: archive path (default: PATH.hartkit)")
    p.add_argument("--out", help="unpack: target folder")
    p.set_defaults(func=cmd_bundle)
    _add_validate_parser(sub)  # hartkit validate (see the validate block above)
    return parser


# Third-party log lines that say nothing to a hartkit user, dropped by message (not by level, so
# that their real errors still show): torchao's optional CUDA kernels that cannot load on a CPU
# machine, and torch's pytree deprecation note about enums torchao registers.
_NOISE = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropNoise:
    def __init__(self, fragments: tuple[str, ...]) -> None:
        self.fragments = fragments

    def filter(self, record) -> bool:
        try:
            text = str(record.msg)
        except Exception:  # a record we cannot read is kept
            return True
        return not any(f in text for f in self.fragments)


def _quiet_third_party() -> None:
    import logging

    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name)  # the libraries log through these same objects once imported
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(fragments))


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    warnings.filterwarnings("ignore", category=FutureWarning)
    if hasattr(sys.stdout, "reconfigure"):  # a path from undecodable argv bytes prints, escaped, not as a traceback
        sys.stdout.reconfigure(errors="backslashreplace")
    warnings.formatwarning = lambda message, category, *_a, **_k: f"hartkit: warning: {message}\n"
    try:
        return int(args.func(args) or 0)
    except HartkitError as exc:
        print(f"hartkit {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
