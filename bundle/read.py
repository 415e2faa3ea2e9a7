"""Reading a bundle: its manifest (the one reader, always schema-checked), paths inside it, npz files.

Everything a manifest names is untrusted until checked here: the schema bounds every number that
sizes an allocation or a loop, every path stays inside the bundle with no link on the way, and npz
files are read without pickles and without trusting their headers.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import numpy as np

from hartkit.bundle.format import CONSTANTS, MANIFEST, SCHEMA_VERSION, TOKENIZER_DIR, BundleError, one_line
from hartkit.bundle.schema import (MAX_DIFFUSION_ELEMENTS, MAX_INFLATION, MAX_MANIFEST_BYTES,
                                   MAX_STAGE_ELEMENTS, validator)
from hartkit.errors import HartkitError
from hartkit.fsutil import confined_path as bundle_path
from hartkit.fsutil import safe_relpath
from hartkit.loop.plan import LoopInfo
from hartkit.loop.schedule import NUM_TRAIN_STEPS, space_timesteps


# ----------------------------------------------------------------------------- the manifest


def read_manifest(folder: str | Path) -> dict:
    """A bundle's (or export folder's) manifest, parsed and schema-checked: the only way hartkit reads one."""
    folder = Path(folder)
    return parse_manifest(manifest_bytes(folder), str(folder / MANIFEST))


def manifest_bytes(folder: Path) -> bytes:
    """The manifest file's bytes, refused when missing, a link or over the size bound (not yet parsed)."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: bundle folder not found")
    if path.is_symlink():
        raise BundleError(f"{path}: is a symbolic link; a bundle's manifest must be a file inside it")
    if not path.is_file():
        raise BundleError(f"{folder}: not a hartkit export (no {MANIFEST})")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path}: over the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may have")
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror or one_line(exc)})") from None


def peek_manifest(folder: str | Path) -> dict | None:
    """The manifest as plain JSON, *not* schema-checked, or None when there is none or it is not a JSON
    object. Only for asking what a folder was exported as (``hartkit bench`` reuses a bundle whose recipe,
    formats and size match); whatever loads or runs a bundle reads it with :func:`read_manifest`."""
    try:
        data = json.loads(manifest_bytes(Path(folder)))
    except (BundleError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


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
        raise BundleError(f"{source}: not valid JSON ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{source}: expected a JSON object, found {type(data).__name__}")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise BundleError(f"{source}: schema_version {version} is newer than this hartkit understands "
                          f"({SCHEMA_VERSION}); upgrade hartkit to read it")
    try:
        error = jsonschema.exceptions.best_match(validator().iter_errors(data))
    except RecursionError:  # pathological nesting
        raise BundleError(f"{source}: manifest nested too deeply") from None
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        reason = error.message if len(error.message) <= 120 else \
            f"fails {error.validator} {one_line(error.validator_value, 80)}"  # the value itself may be huge
        raise BundleError(f"{source}: invalid manifest at {one_line(where)}: {one_line(reason)}")
    _check_manifest(data, source)
    return data


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
        rel = str(safe_relpath(art["path"], source))
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
            safe_relpath(data[key], f"{source}: {key}")
    for fmt, graphs in data["files"].items():
        for graph, rel in graphs.items():
            safe_relpath(rel, f"{source}: files.{fmt}.{graph}")
    for what, rel in golden_files(data):
        safe_relpath(rel, f"{source}: {what}")
    names = [g["name"] for g in data["graphs"]]
    if len(set(names)) != len(names):
        raise BundleError(f"{source}: a graph name appears twice in 'graphs'")
    loop = data["loop"]
    pns = loop["patch_nums"]
    if any(b <= a for a, b in zip(pns, pns[1:])):
        raise BundleError(f"{source}: loop.patch_nums {one_line(pns)} must grow at every stage")
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
            stack.extend((f"{where}.{one_line(k, 40)}", v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
    return None


def golden_files(manifest: dict) -> list[tuple[str, str]]:
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


# ----------------------------------------------------------------------------- paths and files


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
                    raise BundleError(f"{path}: member {one_line(info.filename)} inflates {info.compress_size} "
                                      f"bytes to {info.file_size}; refused")
                with zf.open(info) as f:
                    major, _minor = npformat.read_magic(f)
                    read_header = npformat.read_array_header_1_0 if major == 1 else npformat.read_array_header_2_0
                    shape, _fortran, dtype = read_header(f)
                    if dtype.hasobject:
                        raise BundleError(f"{path}: member {one_line(info.filename)} holds Python objects; refused")
                    if int(np.prod(shape, dtype=object)) * dtype.itemsize > info.file_size:
                        raise BundleError(f"{path}: member {one_line(info.filename)} declares shape {one_line(shape)}, "
                                          f"more than its {info.file_size} bytes")
                with zf.open(info) as f:
                    name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                    out[name] = npformat.read_array(f, allow_pickle=False)
    except BundleError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError,
            MemoryError) as exc:
        raise BundleError(f"{path}: not a readable .npz file ({one_line(exc)})") from None
    return out


def load_golden(folder: Path, file: str, what: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A golden vector file's recorded inputs and outputs by name (``in.<name>`` / ``out.<name>`` inside)."""
    data = load_npz(bundle_path(folder, file, what))
    split = lambda prefix: {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}  # noqa: E731
    return split("in."), split("out.")


# ----------------------------------------------------------------------------- what the host loop reads


def load_codebook(folder: Path, manifest: Mapping[str, Any], loop: LoopInfo) -> np.ndarray:
    """The VQ codebook from the bundle's constants file, checked against the loop's vocabulary and latent size."""
    path = bundle_path(folder, manifest.get("constants", CONSTANTS), "constants")
    if not path.is_file():
        raise HartkitError(f"{path}: constants file not found")
    codebook = load_npz(path).get("codebook")
    want = (loop.vocab_size, loop.latent_dim)
    if codebook is None or codebook.shape != want or codebook.dtype.kind != "f":
        got = "none" if codebook is None else f"{codebook.dtype}{list(codebook.shape)}"
        raise HartkitError(f"{path}: expected a float codebook of shape {list(want)} (loop section), found {got}")
    return codebook


def tokenizer_dir(folder: Path, manifest: Mapping[str, Any]) -> Path:
    """The tokenizer folder, inside the bundle and holding no link."""
    return bundle_path(folder, manifest.get("tokenizer", TOKENIZER_DIR), "tokenizer", contents=True)
