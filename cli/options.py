"""What the verbs share: option groups, argument types, third-party noise, and errors -> exit codes.

Imports nothing heavy: every verb module builds its parser from here, and ``hartkit --help`` builds them all.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from hartkit.errors import HartkitError, UsageError

RESOLUTION_HELP = ("run the same weights on fewer scales, up to this image size in px (e.g. 256 for the "
                   "1024 px model); the valid sizes are listed on error (default: the model's own)")

CFG_HELP = ("classifier-free guidance scale (default: the model's recommendation, guidance_scale in the "
            "checkpoint's llm/generation_config.json or the bundle's manifest; HART's 4.5 without one)")

BACKENDS = ["onnxruntime", "executorch", "coreml"]


# ----------------------------------------------------------------------------- argument types


def parse_seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**64), got {value}")
    return value


def parse_resolution(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be a whole number of pixels, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"resolution must be positive, got {value}")
    return value


def parse_cfg(text: str) -> float:
    from hartkit.loop.plan import MAX_CFG  # torch-free: `generate --exported` runs without torch

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cfg must be a number, got {text!r}") from None
    if not 0.0 <= value <= MAX_CFG:
        raise argparse.ArgumentTypeError(f"cfg must be in [0, {MAX_CFG}], got {value}")
    return value


def parse_graph_backends(items: list[str] | None) -> dict[str, str]:
    """``--graph-backend GRAPH=BACKEND`` (repeatable) as {graph: backend}."""
    out = {}
    for item in items or []:
        graph, sep, backend = item.partition("=")
        if not sep or not graph or not backend:
            raise UsageError(f"--graph-backend takes GRAPH=BACKEND (e.g. vae_decode=onnxruntime), got {item!r}")
        out[graph] = backend
    return out


# ----------------------------------------------------------------------------- option groups


CHECKPOINT_HELP = ("folder with llm/ and tokenizer/, upstream's .../llm folder, or a Hugging Face repo id "
                   "(e.g. mit-han-lab/hart-0.7b-1024px) in the local cache")


def add_checkpoint_options(p: argparse.ArgumentParser, *, required: bool = False,
                           checkpoint_help: str = CHECKPOINT_HELP, text_model: bool = True) -> None:
    """``--checkpoint DIR|REPO_ID``, ``--text-model DIR|REPO_ID`` and ``--allow-download`` (generate,
    export, validate, quantize, sensitivity, bench); read with :func:`resolve_weights`."""
    p.add_argument("--checkpoint", required=required, metavar="DIR|REPO_ID", help=checkpoint_help)
    if text_model:
        p.add_argument("--text-model", metavar="DIR|REPO_ID",
                       help="Qwen2 text model: a folder or a repo id (default: DIR/text_model, else upstream's "
                            "mit-han-lab/Qwen2-VL-1.5B-Instruct from the local Hugging Face cache)")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch a repo id that is not in the Hugging Face cache (default: offline, the cache only; "
                        "HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE apply)")


def resolve_weights(args: argparse.Namespace) -> tuple[Path, Path]:
    """(checkpoint root, text model folder) of ``--checkpoint``/``--text-model``, as local folders: repo
    ids from the Hugging Face cache (fetched first with ``--allow-download``), ``.../llm`` -> its parent."""
    from hartkit.model.hub import resolve_checkpoint, resolve_text_model

    allow = bool(getattr(args, "allow_download", False))
    checkpoint = resolve_checkpoint(args.checkpoint, allow_download=allow)
    return checkpoint, resolve_text_model(getattr(args, "text_model", None), checkpoint, allow_download=allow)


def add_bundle_options(p: argparse.ArgumentParser, *, required: bool, out_help: str,
                       out_aliases: tuple[str, ...] = ()) -> None:
    """What ``export`` and ``quantize`` share: the checkpoint, ``--format``, ``--out`` and ``--force``."""
    add_checkpoint_options(p, required=required)
    p.add_argument("--format", default="onnx", help="comma-separated: onnx,executorch,coreml (default: onnx)")
    p.add_argument("--out", *out_aliases, dest="out", required=required, metavar="DIR", help=out_help)
    p.add_argument("--force", action="store_true", help="replace an existing export in OUT")


def add_export_options(p: argparse.ArgumentParser) -> None:
    """``--recipe`` and ``--calibration`` (on ``hartkit export`` and ``hartkit quantize``)."""
    p.add_argument("--recipe", metavar="NAME|FILE",
                   help="quantization recipe: a preset (laptop, phone, fp16, fp32) or a .json/.yaml file; "
                        "`hartkit quantize --list` shows the presets and what each format supports")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration data for static schemes: a prompt file (one per line) or a .npz from "
                        "`hartkit sensitivity` (default: the built-in prompt set)")


def add_graph_backend_option(p: argparse.ArgumentParser) -> None:
    """``--graph-backend GRAPH=BACKEND`` (generate, validate); read with :func:`parse_graph_backends`."""
    p.add_argument("--graph-backend", action="append", metavar="GRAPH=BACKEND",
                   help="run one graph on another backend, e.g. vae_decode=onnxruntime (repeatable)")


# ----------------------------------------------------------------------------- third-party noise

# Third-party log lines that say nothing to a hartkit user, dropped by message (not by level, so
# that their real errors still show): torchao's optional CUDA kernels that cannot load on a CPU
# machine, and torch's pytree deprecation note about enums torchao registers.
NOISE = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class DropNoise:
    def __init__(self, fragments: tuple[str, ...]) -> None:
        self.fragments = fragments

    def filter(self, record) -> bool:
        try:
            text = str(record.msg)
        except Exception:  # a record we cannot read is kept
            return True
        return not any(f in text for f in self.fragments)


def quiet_third_party() -> None:
    import logging

    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)  # the libraries log through these same objects once imported
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise(fragments))


# ----------------------------------------------------------------------------- errors -> exit codes


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed verb: 0 success, 2 a user error and 3 a failed check (one line each, from
    :class:`HartkitError`'s exit code), 130 interrupted; anything else is a bug and keeps its traceback."""
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
