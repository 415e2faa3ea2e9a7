"""Reading, checking and (un)packing hartkit bundles — torch-free, so an app's build can run it.

A bundle is an export folder made self-describing: ``manifest.json`` (schema-versioned; the loop's
constants, every graph's files with sha256/size and I/O, the RNG contract, the recipe, library
versions), the tokenizer files, ``constants.npz`` and golden vectors (``golden/``: recorded inputs and
outputs of every graph and the sampled tokens of a whole generation) — like ExecuTorch's
BundledProgram, but for the whole loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Collection

import numpy as np

from hartkit.errors import HartkitError, UsageError
from hartkit.fsutil import _umask  # read without changing it: unpack may run beside other threads
from hartkit.loop.plan import MAX_CFG
from hartkit.loop.schedule import NUM_TRAIN_STEPS, space_timesteps
from hartkit.runtime.images import snr_db

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
ARCHIVE_SUFFIX = ".hartkit"


class BundleError(HartkitError):
    """A bundle is malformed, tampered with, or from a newer hartkit."""

    exit_code = 3


# Bounds of every manifest number that sizes an allocation or a loop. The largest real model, HART
# 0.7B at 1024 px (model/presets.py), has 14 scales up to 64x64 tokens, a 4096-entry codebook, 300
# context tokens, latent 32 and head dim 64; the bounds leave 10x or more headroom over it, so only a
# broken or hostile manifest meets them, and it is refused before anything is allocated.
MAX_MANIFEST_BYTES = 64 << 20  # the 0.7B manifest is well under 1 MB
MAX_SCALES = 64
MAX_PATCH = 1024  # side of a stage's token map
MAX_CONTEXT = 4096  # context tokens, system-prompt tokens
MAX_VOCAB = 1 << 16
MAX_LATENT = 1024
MAX_HEAD_DIM = 1024
MAX_PHIS = 64
MAX_IMAGE = 1 << 15  # pixels per side
MAX_STAGE_ELEMENTS = 1 << 28  # last stage's tokens x max(vocab, latent): one RNG draw (0.7B: 2**24)
MAX_DIFFUSION_ELEMENTS = 1 << 28  # last stage's tokens x latent x sampler steps, drawn up front (0.7B: 2**20)
MAX_TENSOR_DIM = 1 << 24  # one dimension of a graph's declared input or output
MAX_TENSOR_RANK = 8
MAX_GRAPHS = 1024
MAX_ARTIFACTS = 100_000
MAX_ARTIFACT_BYTES = 1 << 40
MAX_PATH_CHARS = 1024
MAX_TEXT_VOCAB = 1 << 24  # the text model's token ids (Qwen2: 151k)
MAX_TOLERANCE = 1e6
NAME_PATTERN = "^[a-z][a-z0-9_]*$"

_int = lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi}  # noqa: E731
_path = {"type": "string", "minLength": 1, "maxLength": MAX_PATH_CHARS}

# JSON Schema (draft 2020-12) of the manifest: checked with the jsonschema library. Sections the
# runtime does not read (parity, notes, recipe, ...) stay open; their size is bounded by the file's.
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "model", "loop", "graphs", "files", "artifacts", "rng", "prompt", "diffusion"],
    "properties": {
        "schema_version": _int(1, 1 << 31),
        "hartkit_version": {"type": "string", "maxLength": 64},
        "model": {"type": "object", "required": ["hart", "vae"]},
        "loop": {
            "type": "object",
            "required": ["patch_nums", "context_token", "vocab_size", "latent_dim", "head_dim", "attn_type",
                         "num_phis", "num_sampling_steps", "system_length"],
            "properties": {
                "patch_nums": {"type": "array", "items": _int(1, MAX_PATCH), "minItems": 2, "maxItems": MAX_SCALES},
                "context_token": _int(1, MAX_CONTEXT),
                "vocab_size": _int(1, MAX_VOCAB),
                "latent_dim": _int(1, MAX_LATENT),
                "head_dim": _int(2, MAX_HEAD_DIM),
                "attn_type": {"enum": ["llama", "gpt2"]},
                "num_phis": _int(1, MAX_PHIS),
                # upstream's respacing: "8", "10,15,20", "ddim25" or "" (no respacing)
                "num_sampling_steps": {"type": "string", "maxLength": 64,
                                       "pattern": "^(|ddim[0-9]{1,4}|[0-9]{1,4}(,[0-9]{1,4})*)$"},
                "system_length": _int(0, MAX_CONTEXT),
                "image_size": _int(1, MAX_IMAGE),
                "default_cfg": {"type": "number", "minimum": 0, "maximum": MAX_CFG},
                "stages_at_default_cfg": {"type": "array", "maxItems": MAX_SCALES},
            },
        },
        "graphs": {
            "type": "array",
            "maxItems": MAX_GRAPHS,
            "items": {
                "type": "object",
                "required": ["name", "inputs", "outputs"],
                "properties": {
                    "name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 64},
                    "inputs": {"type": "array", "items": {"$ref": "#/$defs/tensor"}, "maxItems": 64},
                    "outputs": {"type": "array", "items": {"$ref": "#/$defs/tensor"}, "maxItems": 64},
                },
            },
        },
        "files": {
            "type": "object",
            "maxProperties": 16,
            "propertyNames": {"pattern": NAME_PATTERN, "maxLength": 64},
            "additionalProperties": {"type": "object", "maxProperties": MAX_GRAPHS,
                                     "propertyNames": {"pattern": NAME_PATTERN, "maxLength": 64},
                                     "additionalProperties": _path},
        },
        "constants": _path,
        "tokenizer": _path,
        "artifacts": {
            "type": "array",
            "maxItems": MAX_ARTIFACTS,
            "items": {
                "type": "object",
                "required": ["path", "sha256", "size"],
                "properties": {
                    "path": _path,
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "size": _int(0, MAX_ARTIFACT_BYTES),
                },
            },
        },
        "golden": {
            "type": "object",
            "properties": {
                "graphs": {
                    "type": "object",
                    "maxProperties": MAX_GRAPHS,
                    "propertyNames": {"pattern": NAME_PATTERN, "maxLength": 64},
                    "properties": {"by_format": {
                        "type": "object",
                        "maxProperties": 16,
                        "additionalProperties": {"type": "object", "maxProperties": MAX_GRAPHS,
                                                 "additionalProperties": {"$ref": "#/$defs/golden_graph"}},
                    }},
                    "additionalProperties": {"$ref": "#/$defs/golden_graph"},
                },
                "loop": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/golden_loop"}]},
            },
        },
        "rng": {"type": "object"},
        "prompt": {
            "type": "object",
            "required": ["max_tokens", "system_prompt"],
            "properties": {
                "max_tokens": _int(1, MAX_CONTEXT),
                "system_prompt": {"type": "string", "maxLength": 1 << 20},
                "system_length": _int(0, MAX_CONTEXT),
                "pad_token_id": _int(0, MAX_TEXT_VOCAB),
            },
        },
        "diffusion": {
            "type": "object",
            "required": ["timesteps", "vae_scale"],
            "properties": {
                "timesteps": {"type": "array", "items": _int(0, NUM_TRAIN_STEPS - 1), "maxItems": NUM_TRAIN_STEPS},
                "vae_scale": {"type": "number", "minimum": -1e6, "maximum": 1e6},
                "tables": {"type": "object", "maxProperties": 64,
                           "additionalProperties": {"type": "array", "maxItems": NUM_TRAIN_STEPS}},
            },
        },
    },
    "$defs": {
        "tensor": {
            "type": "object",
            "required": ["name", "dtype", "shape"],
            "properties": {
                "name": {"type": "string", "maxLength": 256},
                "dtype": {"enum": ["float32", "float16", "int64", "int32"]},
                "shape": {"type": "array", "maxItems": MAX_TENSOR_RANK, "items": {"oneOf": [
                    _int(0, MAX_TENSOR_DIM),
                    {"type": "object", "required": ["dim", "min", "max"],
                     "properties": {"dim": {"type": "string", "maxLength": 64}, "min": _int(0, MAX_TENSOR_DIM),
                                    "max": _int(0, MAX_TENSOR_DIM)}},
                ]}},
            },
        },
        "golden_graph": {
            "type": "object",
            "required": ["file"],
            "properties": {"file": _path, "atol": {"type": "number", "minimum": 0, "maximum": MAX_TOLERANCE},
                           "rtol": {"type": "number", "minimum": 0, "maximum": MAX_TOLERANCE}},
        },
        "golden_loop": {
            "type": "object",
            "required": ["file", "prompt", "seed", "cfg"],
            "properties": {"file": _path, "prompt": {"type": "string", "maxLength": 1 << 16},
                           "seed": _int(0, (1 << 64) - 1), "cfg": {"type": "number", "minimum": 0, "maximum": MAX_CFG},
                           "more_smooth": {"type": "boolean"}},
        },
    },
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


MAX_INFLATION = 100  # uncompressed / stored bytes of one member; weights and golden vectors stay near 1


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read without pickles and without trusting its headers: a member
    that inflates past :data:`MAX_INFLATION` or declares more bytes than it holds is refused before
    anything is allocated. Every failure is a :class:`BundleError` naming the file."""
    import zlib

    from numpy.lib import format as npformat

    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.file_size > (1 << 20) and info.file_size > MAX_INFLATION * max(info.compress_size, 1):
                    raise BundleError(f"{path}: member {_short(info.filename)} inflates {info.compress_size} "
                                      f"bytes to {info.file_size}; refused")
                with zf.open(info) as f:
                    major, _minor = npformat.read_magic(f)
                    read_header = npformat.read_array_header_1_0 if major == 1 else npformat.read_array_header_2_0
                    shape, _fortran, dtype = read_header(f)
                    if dtype.hasobject:
                        raise BundleError(f"{path}: member {_short(info.filename)} holds Python objects; refused")
                    if int(np.prod(shape, dtype=object)) * dtype.itemsize > info.file_size:
                        raise BundleError(f"{path}: member {_short(info.filename)} declares shape {_short(shape)}, "
                                          f"more than its {info.file_size} bytes")
                with zf.open(info) as f:
                    name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                    out[name] = npformat.read_array(f, allow_pickle=False)
    except BundleError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError,
            MemoryError) as exc:
        raise BundleError(f"{path}: not a readable .npz file ({_short(exc)})") from None
    return out


def parse_manifest(text: str | bytes, source: str = MANIFEST) -> dict:
    """Parse and schema-check a manifest; every failure is a :class:`BundleError` naming the problem."""
    import jsonschema

    if len(text) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{source}: {len(text)} bytes, over the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may have")
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise BundleError(f"{source}: not valid JSON ({_short(exc)})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{source}: expected a JSON object, found {type(data).__name__}")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise BundleError(f"{source}: schema_version {version} is newer than this hartkit understands "
                          f"({SCHEMA_VERSION}); upgrade hartkit to read it")
    try:
        error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    except RecursionError:  # pathological nesting
        raise BundleError(f"{source}: manifest nested too deeply") from None
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        reason = error.message if len(error.message) <= 120 else \
            f"fails {error.validator} {_short(error.validator_value, 80)}"  # the value itself may be huge
        raise BundleError(f"{source}: invalid manifest at {_short(where)}: {_short(reason)}")
    _check_manifest(data, source)
    return data


def _short(text: object, limit: int = 200) -> str:
    """One line of at most ``limit`` characters: hostile values must not flood a message."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_VALIDATOR = None


def _validator():
    global _VALIDATOR
    if _VALIDATOR is None:
        import jsonschema

        _VALIDATOR = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
    return _VALIDATOR


def _check_manifest(data: dict, source: str) -> None:
    """What a schema cannot say: paths stay inside the bundle, names are unique, sizes multiply within bounds."""
    # NaN passes every numeric bound of a schema (comparisons with it are false); the sections the
    # runtime reads must not hold it (parity records may hold Infinity: an exact match's SNR).
    for key in RUNTIME_SECTIONS:
        bad = _non_finite(data.get(key))
        if bad is not None:
            raise BundleError(f"{source}: {key}{bad}: not a finite number")
    seen: dict[str, str] = {}
    for art in data["artifacts"]:
        rel = str(_safe_relpath(art["path"], source))
        if rel == MANIFEST:
            raise BundleError(f"{source}: the manifest lists itself as an artifact")
        # casefold: two names one letter-case apart are one file on macOS and Windows
        if rel.casefold() in seen:
            raise BundleError(f"{source}: artifact {rel!r} is listed twice (as {seen[rel.casefold()]!r})")
        seen[rel.casefold()] = rel
    folders = {str(parent).casefold() for rel in seen.values() for parent in PurePosixPath(rel).parents}
    clash = sorted(key for key in seen if key in folders)
    if clash:  # "a" and "a/b" cannot both be files
        raise BundleError(f"{source}: artifact {seen[clash[0]]!r} is listed both as a file and as a folder")
    for key in ("constants", "tokenizer"):
        if key in data:
            _safe_relpath(data[key], f"{source}: {key}")
    for fmt, graphs in data["files"].items():
        for graph, rel in graphs.items():
            _safe_relpath(rel, f"{source}: files.{fmt}.{graph}")
    for what, rel in _golden_files(data):
        _safe_relpath(rel, f"{source}: {what}")
    names = [g["name"] for g in data["graphs"]]
    if len(set(names)) != len(names):
        raise BundleError(f"{source}: a graph name appears twice in 'graphs'")
    loop = data["loop"]
    pns = loop["patch_nums"]
    if any(b <= a for a, b in zip(pns, pns[1:])):
        raise BundleError(f"{source}: loop.patch_nums {_short(pns)} must grow at every stage")
    tokens = pns[-1] ** 2
    if tokens * max(loop["vocab_size"], loop["latent_dim"]) > MAX_STAGE_ELEMENTS:
        raise BundleError(f"{source}: loop: {pns[-1]}x{pns[-1]} tokens x vocab {loop['vocab_size']} is over "
                          f"the {MAX_STAGE_ELEMENTS} elements one stage may draw")
    try:
        steps = len(space_timesteps(NUM_TRAIN_STEPS, loop["num_sampling_steps"]))
    except HartkitError as exc:
        raise BundleError(f"{source}: loop.num_sampling_steps: {exc}") from None
    if tokens * loop["latent_dim"] * steps > MAX_DIFFUSION_ELEMENTS:
        raise BundleError(f"{source}: loop: {steps} diffusion steps over {tokens} tokens of {loop['latent_dim']} "
                          f"channels is over the {MAX_DIFFUSION_ELEMENTS} elements the sampler may draw")


RUNTIME_SECTIONS = ("loop", "graphs", "files", "artifacts", "golden", "prompt", "diffusion")


def _non_finite(value: Any) -> str | None:
    """Where (".a.b[2]") the first NaN or infinity inside ``value`` is, or None."""
    stack = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where
        if isinstance(item, dict):
            stack.extend((f"{where}.{_short(k, 40)}", v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
    return None


def _golden_files(manifest: dict) -> list[tuple[str, str]]:
    """(what, relative path) of every golden vector file the manifest names."""
    golden = manifest.get("golden") or {}
    graphs = dict(golden.get("graphs") or {})
    out = []
    for fmt, entries in (graphs.pop("by_format", None) or {}).items():
        out += [(f"golden.graphs.by_format.{fmt}.{g}", e["file"]) for g, e in entries.items()]
    out += [(f"golden.graphs.{g}", e["file"]) for g, e in graphs.items()]
    if golden.get("loop"):
        out.append(("golden.loop", golden["loop"]["file"]))
    return out


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    return parse_manifest(_manifest_bytes(folder), str(folder / MANIFEST))


def _manifest_bytes(folder: Path) -> bytes:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: bundle folder not found")
    if path.is_symlink():
        raise BundleError(f"{path}: is a symbolic link; a bundle's manifest must be a file inside it")
    if not path.is_file():
        raise BundleError(f"{folder}: not a hartkit bundle (no {MANIFEST})")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path}: over the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may have")
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror or _short(exc)})") from None


def _safe_relpath(rel: str, source: str) -> PurePosixPath:
    """A path the manifest or an archive names: relative, in canonical POSIX form, inside the bundle."""
    if not isinstance(rel, str):
        raise BundleError(f"{source}: path {rel!r} is not a string")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in rel:
        raise BundleError(f"{source}: artifact path {_short(repr(rel))} escapes the bundle")
    # one spelling per file ("a//b", "./a", "a/" are refused), no control characters, no over-long names
    if str(p) != rel or any(ord(c) < 32 or c == "\x7f" for c in rel) or len(rel) > MAX_PATH_CHARS \
            or any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in p.parts):
        raise BundleError(f"{source}: path {_short(repr(rel))} is not a plain relative path")
    return p


def bundle_path(folder: str | Path, rel: str, what: str, contents: bool = False) -> Path:
    """``folder / rel`` for a path a manifest names, refused (:class:`BundleError`) unless it stays inside
    the bundle: relative, no ``..``, no backslash, and no symbolic link anywhere on the way (a link could
    point anywhere, and a bundle is meant to be copied whole). The file need not exist. ``contents``:
    a folder (the tokenizer's) must hold no link either."""
    folder = Path(folder)
    parts = _safe_relpath(rel, what).parts
    path = folder
    try:
        for part in parts:
            path = path / part
            if path.is_symlink():
                raise BundleError(f"{what}: {_short(rel)} is or passes through a symbolic link "
                                  f"({path.relative_to(folder).as_posix()}); refused")
        inside = path.resolve().is_relative_to(folder.resolve())
        if contents and path.is_dir():
            for root, dirs, files in os.walk(path):
                link = next((n for n in dirs + files if os.path.islink(os.path.join(root, n))), None)
                if link is not None:
                    raise BundleError(f"{what}: {_short(rel)} holds a symbolic link ({_short(link)}); refused")
    except (OSError, RuntimeError, ValueError) as exc:  # over-long names, symlink loops around the folder
        raise BundleError(f"{what}: cannot resolve {_short(rel)} ({_short(exc)})") from None
    if not inside:
        raise BundleError(f"{what}: {_short(rel)} resolves outside the bundle {folder}")
    return path


@dataclass
class VerifyReport:
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    checked_files: int = 0
    golden: list[dict] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.ok = False
        self.problems.append(message)


def verify_files(folder: Path, manifest: dict, report: VerifyReport) -> None:
    """Every listed artifact is a regular file inside the bundle with its size and sha256; every file
    the runtime reads (graphs, constants, tokenizer, golden vectors) is listed; nothing else is there."""
    from hartkit.runtime.pipeline import CONSTANTS, TOKENIZER_DIR

    folder = Path(folder)
    listed = {a["path"]: a for a in manifest["artifacts"]}
    for rel, art in listed.items():
        try:
            path = bundle_path(folder, rel, rel)
        except BundleError as exc:
            report.fail(str(exc))
            continue
        if not path.exists():
            report.fail(f"{rel}: missing")
            continue
        if not path.is_file():
            report.fail(f"{rel}: not a regular file")
            continue
        if path.stat().st_size != art["size"]:
            report.fail(f"{rel}: size {path.stat().st_size} != {art['size']} in the manifest (tampered or truncated)")
            continue
        if sha256_file(path) != art["sha256"]:
            report.fail(f"{rel}: sha256 does not match the manifest (tampered)")
            continue
        report.checked_files += 1

    def covered(rel: str) -> bool:  # a listed file, or a folder (a Core ML package) holding listed files
        return rel in listed or any(a.startswith(rel.rstrip("/") + "/") for a in listed)

    for fmt, graphs in manifest["files"].items():
        for graph, rel in graphs.items():
            if not covered(rel):
                report.fail(f"{fmt}/{graph}: file {rel} is not covered by the manifest's artifacts")
    names = {g["name"] for g in manifest["graphs"]}
    for fmt, graphs in manifest["files"].items():
        for graph in graphs:
            if graph not in names:
                report.fail(f"{fmt}: file listed for unknown graph {graph!r}")
    # The runtime reads these too: unlisted, their content would go unchecked.
    constants = manifest.get("constants", CONSTANTS)
    if constants not in listed:
        report.fail(f"constants {constants}: not among the manifest's artifacts (its sha256 would go unchecked)")
    tokenizer = manifest.get("tokenizer", TOKENIZER_DIR)
    if tokenizer in listed or not covered(tokenizer):
        report.fail(f"tokenizer {tokenizer}: not a folder of the manifest's artifacts (its files would go unchecked)")
    for what, rel in _golden_files(manifest):
        if rel not in listed:
            report.fail(f"{what} {rel}: not among the manifest's artifacts")
    extra = _unlisted_files(folder, set(listed))
    for rel in extra[:MAX_REPORTED_EXTRAS]:
        report.fail(f"{rel}: not listed in the manifest (an extra file or link: remove it, or re-export)")
    if len(extra) > MAX_REPORTED_EXTRAS:
        report.fail(f"... and {len(extra) - MAX_REPORTED_EXTRAS} more files not listed in the manifest")


MAX_REPORTED_EXTRAS = 20


def _unlisted_files(folder: Path, listed: set[str]) -> list[str]:
    """Files, links and special files under ``folder`` that are neither the manifest nor listed.

    Symbolic links are reported, never followed. Empty folders hold nothing to read and pass."""
    extra = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root).relative_to(folder)
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(root, d))):
            rel = (base / name).as_posix()
            if rel not in listed and rel != MANIFEST:
                extra.append(rel)
        dirs.sort()
    return sorted(extra)


def verify_golden(folder: Path, manifest: dict, backend, report: VerifyReport, fmt: str | None = None,
                  graphs: Collection[str] | None = None) -> None:
    """Run the recorded golden inputs of every graph (or of ``graphs``) on ``backend`` and compare
    within tolerance; each result records the output's SNR against the golden one in dB.

    Quantized bundles keep per-format goldens (``golden.graphs.by_format``): the eager-quantized outputs.
    """
    golden = dict(manifest.get("golden", {}).get("graphs", {}))
    by_format = golden.pop("by_format", None)
    if by_format is not None:
        golden = by_format.get(fmt, {}) if fmt else {}
    outputs = {g["name"]: [o["name"] for o in g["outputs"]] for g in manifest["graphs"]}
    for graph, entry in sorted(golden.items()):
        if graphs is not None and graph not in graphs:
            continue
        if graph not in outputs:
            report.fail(f"golden {graph}: no such graph in the manifest")
            continue
        try:
            data = load_npz(bundle_path(folder, entry["file"], f"golden {graph}"))
            feeds = {k[len("in."):]: v for k, v in data.items() if k.startswith("in.")}
            refs = [data[f"out.{name}"] for name in outputs[graph]]
        except (BundleError, KeyError) as exc:
            report.fail(f"golden {graph}: unreadable golden vectors ({_short(exc)})")
            continue
        try:
            got = backend.run(graph, feeds)
        except HartkitError as exc:
            report.fail(f"golden {graph}: could not run ({exc})")
            continue
        atol, rtol = float(entry.get("atol", 1e-4)), float(entry.get("rtol", 1e-4))
        worst, least_snr = 0.0, float("inf")
        ok = True
        for name, ref, out in zip(outputs[graph], refs, got):
            out = np.asarray(out)
            if out.shape != ref.shape:
                report.fail(f"golden {graph}.{name}: shape {out.shape} != {ref.shape}")
                ok = False
                continue
            err = float(np.abs(out.astype(np.float64) - ref).max(initial=0))
            snr = snr_db(ref, out)
            worst, least_snr = max(worst, err), min(least_snr, snr)
            if err > atol + rtol * float(np.abs(ref).max(initial=0)):
                report.fail(f"golden {graph}.{name}: {snr:.1f} dB from the golden output, max abs error "
                            f"{err:.3e} over the tolerance (atol {atol:g}, rtol {rtol:g})")
                ok = False
        report.golden.append({"graph": graph, "ok": ok, "max_abs_err": worst, "snr_db": least_snr,
                              "backend": getattr(backend, "name", str(backend))})


def verify_loop(folder: Path, manifest: dict, backend: str, report: VerifyReport) -> None:
    """Replay the recorded generation (prompt, seed): same tokens at every stage, image within 40 dB."""
    from hartkit.runtime.images import psnr
    from hartkit.runtime.pipeline import Pipeline

    entry = manifest.get("golden", {}).get("loop")
    if not entry:
        return
    try:
        data = load_npz(bundle_path(folder, entry["file"], "golden loop"))
        tokens = [data[f"tokens.{i}"] for i in range(len(manifest["loop"]["patch_nums"]))]
        ref_image = data["image"]
        pipe = Pipeline.from_exported(folder, backend=backend)
        image, trace = pipe.generate(entry["prompt"], seed=int(entry["seed"]), cfg=float(entry["cfg"]),
                                     more_smooth=bool(entry.get("more_smooth", True)))
        first_bad = next((si for si, (a, b) in enumerate(zip(tokens, trace.tokens)) if not np.array_equal(a, b)),
                         None)
        quality = psnr(ref_image.reshape(image.shape), image)
    except (HartkitError, KeyError, ValueError, IndexError) as exc:
        # a manifest whose loop section disagrees with its graphs or golden files: a failed check, not a crash
        report.fail(f"golden loop: could not replay ({_short(exc)})")
        report.golden.append({"graph": "loop", "ok": False, "max_abs_err": None,
                              "first_divergent_stage": None, "psnr_db": float("nan")})
        return
    ok = first_bad is None and quality >= 40.0
    if not ok:
        report.fail(f"golden loop: " + (f"tokens differ from stage {first_bad} on" if first_bad is not None else
                                        f"image PSNR {quality:.1f} dB < 40 dB"))
    report.golden.append({"graph": "loop", "ok": ok, "max_abs_err": None,
                          "first_divergent_stage": first_bad, "psnr_db": quality})


# Which backend runs each export format (the inverse of backends.BACKEND_FORMAT, for messages).
FORMAT_BACKEND = {"onnx": "onnxruntime", "executorch": "executorch", "coreml": "coreml"}


def verify_bundle(folder: str | Path, backend: str | None = None) -> VerifyReport:
    """Hashes, schema, files vs manifest; with ``backend``, the golden vectors and the loop replay too.

    A backend whose format the bundle lacks is refused (:class:`UsageError`), and one for which no
    golden vector ran fails the report: "verified" always means something was run.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    report = VerifyReport()
    verify_files(folder, manifest, report)
    if backend is not None and report.ok:
        from hartkit.runtime.backends import BACKEND_FORMAT, open_backend

        fmt = BACKEND_FORMAT.get(backend)
        formats = sorted(f for f, graphs in manifest["files"].items() if graphs)
        if fmt in FORMAT_BACKEND and fmt not in formats:
            hint = ", ".join(FORMAT_BACKEND.get(f, f) for f in formats) or "none: the bundle has no graph files"
            raise UsageError(f"no golden vectors for backend {backend}: the bundle has formats {formats} and no "
                             f"{fmt} files (backends that can verify it: {hint})")
        runner = open_backend(folder, manifest, backend, {})
        ran = len(report.golden)
        verify_golden(folder, manifest, runner, report, fmt)
        verify_loop(folder, manifest, backend, report)
        if len(report.golden) == ran:
            by_format = sorted(((manifest.get("golden") or {}).get("graphs") or {}).get("by_format") or {})
            report.fail(f"no golden vectors for backend {backend}: the bundle has formats {formats}"
                        + (f", golden vectors for {by_format}" if by_format else ", and no golden vectors"))
    return report


# ----------------------------------------------------------------------------- archives


def default_archive(folder: str | Path) -> Path:
    """``NAME.hartkit`` beside the bundle folder ``NAME`` (also for ``.``, which has no name of its own)."""
    folder = Path(folder).resolve()
    if not folder.name:
        raise UsageError(f"{folder}: has no name to derive the archive's from; give --archive FILE")
    return folder.with_name(folder.name + ARCHIVE_SUFFIX)


def pack(folder: str | Path, archive: str | Path | None = None) -> Path:
    """Zip a verified bundle into one file, atomically: a temp file beside the archive, renamed at the end.

    What is packed is what the manifest lists, read without following links and hashed again on the
    way in: a file changed or swapped for a link after verification fails the pack. Nothing is left
    behind on failure (disk full included)."""
    folder = Path(folder)
    archive = default_archive(folder) if archive is None else Path(archive)
    _check_archive_target(folder, archive)
    report = verify_bundle(folder)
    if not report.ok:
        raise BundleError(f"{folder}: refusing to pack a bundle that does not verify: {report.problems[0]}")
    raw = _manifest_bytes(folder)
    manifest = parse_manifest(raw, str(folder / MANIFEST))
    made = _make_parents(archive.parent)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{archive.name[:64]}.tmp-", dir=archive.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
            info = zipfile.ZipInfo(MANIFEST, date_time=time.localtime()[:6])
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, raw)
            for art in manifest["artifacts"]:
                _pack_file(zf, folder, art)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the archive should look like any new file
        os.replace(tmp, archive)
    except OSError as exc:
        _remove(tmp, made)
        raise HartkitError(f"{archive}: cannot write the archive ({exc.strerror or _short(exc)})") from None
    except BaseException:
        _remove(tmp, made)
        raise
    return archive


def _check_archive_target(folder: Path, archive: Path) -> None:
    if not archive.name or archive.name in (".", ".."):
        raise UsageError(f"{str(archive)!r}: not a file name for the archive")
    _check_stat(archive)
    if archive.is_dir():
        raise UsageError(f"{archive}: is a folder; give the archive's file name, e.g. "
                         f"{archive / default_archive(folder).name}")
    if archive.exists() and not archive.is_file():
        raise UsageError(f"{archive}: exists and is not a regular file; refused")
    root = folder.resolve()
    where = archive.parent.resolve() / archive.name
    if where.is_relative_to(root):
        raise UsageError(f"{archive}: is inside the bundle it packs; write it beside the bundle, e.g. "
                         f"{default_archive(folder)}")


def _pack_file(zf: zipfile.ZipFile, folder: Path, art: dict) -> None:
    rel = art["path"]
    path = bundle_path(folder, rel, rel)
    try:  # O_NOFOLLOW: a link swapped in after verification is refused, never followed
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise BundleError(f"{rel}: cannot read ({exc.strerror or _short(exc)}); nothing packed") from None
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != art["size"]:
            raise BundleError(f"{rel}: changed since it was verified; nothing packed")
        info = zipfile.ZipInfo(rel, date_time=time.localtime(max(st.st_mtime, _ZIP_EPOCH))[:6])
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        info.file_size = st.st_size
        digest = hashlib.sha256()
        with zf.open(info, "w", force_zip64=st.st_size >= zipfile.ZIP64_LIMIT) as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
    if digest.hexdigest() != art["sha256"]:
        raise BundleError(f"{rel}: changed since it was verified; nothing packed")


_ZIP_EPOCH = 315_619_200  # 1980-01-02: ZIP dates start in 1980
DISK_MARGIN = 16 << 20  # left free after an unpack


def unpack(archive: str | Path, out: str | Path) -> Path:
    """Extract an archive into a new folder, then verify it; the folder appears only if it verifies.

    Before anything is written the archive is read in full: it must hold ``manifest.json`` and exactly
    the artifacts it lists (no other entry, no name twice, no link or special file, no path leaving
    the folder), each of the size listed, none inflating more than :data:`MAX_INFLATION` times, and the
    total must fit the free disk space. The result has the modes of any new folder (0755 folders and
    0644 files under the usual umask 022; the umask is respected). Nothing is left behind on failure."""
    archive, out = Path(archive), Path(out)
    if not out.name or out.name in (".", ".."):
        raise UsageError(f"{str(out)!r}: give the name of a new folder to unpack into")
    _check_stat(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty")
    if not archive.is_file():
        raise BundleError(f"{archive}: not a hartkit bundle archive (no such file)")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{archive}: not a hartkit bundle archive ({_short(exc)})") from None
    with zf:
        entries, total = _plan_unpack(zf, archive)
        where = _existing_ancestor(out.parent)
        free = shutil.disk_usage(where).free
        if total + DISK_MARGIN > free:
            raise BundleError(f"{archive}: unpacking needs {total / 1e6:.1f} MB, {where} has {free / 1e6:.1f} MB free")
        made = _make_parents(out.parent)
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}.tmp-", dir=out.parent))
            for rel, info in entries:
                target = tmp.joinpath(*PurePosixPath(rel).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                _extract(zf, info, target, archive)
            umask = _umask()
            for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700: apps and other users must read it
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
            report = verify_bundle(tmp)
            if not report.ok:
                raise BundleError(f"{archive}: unpacked bundle does not verify: {'; '.join(report.problems[:3])}")
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except OSError as exc:
            _remove(tmp, made)
            raise HartkitError(f"{out}: cannot unpack here ({exc.strerror or _short(exc)})") from None
        except BaseException:
            _remove(tmp, made)
            raise
    return out


def _plan_unpack(zf: zipfile.ZipFile, archive: Path) -> tuple[list[tuple[str, zipfile.ZipInfo]], int]:
    """The (path, entry) pairs to extract, manifest first, and their total size; refusals as BundleError."""
    infos = zf.infolist()
    if len(infos) > MAX_ARTIFACTS + 1:
        raise BundleError(f"{archive}: {len(infos)} entries, more than a bundle may hold ({MAX_ARTIFACTS + 1})")
    # Entries that share their bytes (overlapping ZIP records) would inflate without a high ratio.
    if sum(i.compress_size for i in infos) > archive.stat().st_size:
        raise BundleError(f"{archive}: entries overlap (a ZIP bomb?); refused")
    seen: dict[str, str] = {}
    files: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        is_dir = name.endswith("/")
        rel = str(_safe_relpath(name[:-1] if is_dir else name, f"{archive}: entry"))
        if rel.casefold() in seen:
            raise BundleError(f"{archive}: entry {_short(rel)!r} appears twice (as {seen[rel.casefold()]!r}); refused")
        seen[rel.casefold()] = rel
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise BundleError(f"{archive}: entry {_short(name)!r} is a symlink; refused")
        if info.flag_bits & 0x1:
            raise BundleError(f"{archive}: entry {_short(name)!r} is encrypted; refused")
        if is_dir:
            continue  # folders are made for the files in them
        if kind not in (0, stat.S_IFREG):
            raise BundleError(f"{archive}: entry {_short(name)!r} is not a regular file; refused")
        if info.file_size > (1 << 20) and info.file_size > MAX_INFLATION * max(info.compress_size, 1):
            raise BundleError(f"{archive}: entry {_short(rel)!r} inflates {info.compress_size} bytes to "
                              f"{info.file_size} (a ZIP bomb?); refused")
        files[rel] = info
    if MANIFEST not in files:
        raise BundleError(f"{archive}: no {MANIFEST} inside; not a hartkit bundle archive")
    head = files.pop(MANIFEST)
    if head.file_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{archive}: its {MANIFEST} is over the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may have")
    try:
        raw = zf.read(head)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise BundleError(f"{archive}: cannot read its {MANIFEST} ({_short(exc)})") from None
    manifest = parse_manifest(raw, f"{archive}: {MANIFEST}")
    listed = {a["path"]: a["size"] for a in manifest["artifacts"]}
    for rel, info in files.items():
        if rel not in listed:
            raise BundleError(f"{archive}: entry {_short(rel)!r} is not listed in its manifest; refused")
        if info.file_size != listed[rel]:
            raise BundleError(f"{archive}: entry {_short(rel)!r} holds {info.file_size} bytes, its manifest "
                              f"lists {listed[rel]}; refused")
    missing = [rel for rel in listed if rel not in files]
    if missing:
        raise BundleError(f"{archive}: {_short(missing[0])!r}, listed in its manifest, is not in the archive")
    total = head.file_size + sum(i.file_size for i in files.values())
    return [(MANIFEST, head), *sorted(files.items())], total


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path) -> None:
    """One entry to a new file, never more bytes than its header declares (checked against the manifest)."""
    import zlib

    left = info.file_size
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as dst:
        try:
            with zf.open(info) as src:
                while block := src.read(min(1 << 20, left + 1)):
                    left -= len(block)
                    if left < 0:
                        break
                    dst.write(block)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError, ValueError) as exc:
            raise BundleError(f"{archive}: entry {_short(info.filename)!r} is corrupt ({_short(exc)})") from None
    if left != 0:
        raise BundleError(f"{archive}: entry {_short(info.filename)!r} does not hold the {info.file_size} bytes "
                          "its header declares; refused")


def _check_stat(path: Path) -> None:
    """Refuse, as a usage error, a path the OS cannot even look up (a name too long, a file as a folder)."""
    try:
        path.lstat()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UsageError(f"{_short(path, 80)}: {exc.strerror or _short(exc)}") from None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the ones made, deepest first (to undo)."""
    missing = []
    path = folder
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    made: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            made.insert(0, path)
    except OSError as exc:
        _remove(None, made)
        raise UsageError(f"{folder}: cannot create this folder ({exc.strerror or _short(exc)})") from None
    return made


def _remove(tmp: Path | None, made: list[Path]) -> None:
    """Undo a failed write: the temp file or folder, then the folders made for it (if still empty)."""
    if tmp is not None:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
    for path in made:
        with contextlib.suppress(OSError):
            path.rmdir()
