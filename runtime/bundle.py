"""Reading, checking and (un)packing hartkit bundles — torch-free, so an app's build can run it.

A bundle is an export folder made self-describing: ``manifest.json`` (schema-versioned; the loop's
constants, every graph's files with sha256/size and I/O, the RNG contract, the recipe, library
versions), the tokenizer files, ``constants.npz`` and golden vectors (``golden/``: recorded inputs and
outputs of every graph and the sampled tokens of a whole generation) — like ExecuTorch's
BundledProgram, but for the whole loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from hartkit.errors import HartkitError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
ARCHIVE_SUFFIX = ".hartkit"


class BundleError(HartkitError):
    """A bundle is malformed, tampered with, or from a newer hartkit."""

    exit_code = 3


# JSON Schema (draft 2020-12) of the manifest: checked with the jsonschema library.
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "model", "loop", "graphs", "files", "artifacts", "rng", "prompt", "diffusion"],
    "properties": {
        "schema_version": {"type": "integer", "minimum": 1},
        "hartkit_version": {"type": "string"},
        "model": {"type": "object", "required": ["hart", "vae"]},
        "loop": {
            "type": "object",
            "required": ["patch_nums", "context_token", "vocab_size", "latent_dim", "head_dim", "attn_type",
                         "num_phis", "num_sampling_steps", "system_length"],
            "properties": {
                "patch_nums": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2},
                "context_token": {"type": "integer", "minimum": 1},
                "vocab_size": {"type": "integer", "minimum": 1},
                "latent_dim": {"type": "integer", "minimum": 1},
                "head_dim": {"type": "integer", "minimum": 1},
                "attn_type": {"enum": ["llama", "gpt2"]},
                "num_phis": {"type": "integer", "minimum": 1},
                "num_sampling_steps": {"type": "string"},
                "system_length": {"type": "integer", "minimum": 0},
            },
        },
        "graphs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "inputs", "outputs"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
                    "inputs": {"type": "array", "items": {"$ref": "#/$defs/tensor"}},
                    "outputs": {"type": "array", "items": {"$ref": "#/$defs/tensor"}},
                },
            },
        },
        "files": {
            "type": "object",
            "additionalProperties": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "artifacts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["path", "sha256", "size"],
                "properties": {
                    "path": {"type": "string"},
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "size": {"type": "integer", "minimum": 0},
                },
            },
        },
        "golden": {"type": "object"},
        "rng": {"type": "object"},
        "prompt": {"type": "object", "required": ["max_tokens", "system_prompt"]},
        "diffusion": {"type": "object", "required": ["timesteps", "vae_scale"]},
    },
    "$defs": {
        "tensor": {
            "type": "object",
            "required": ["name", "dtype", "shape"],
            "properties": {
                "name": {"type": "string"},
                "dtype": {"enum": ["float32", "float16", "int64", "int32"]},
                "shape": {"type": "array"},
            },
        }
    },
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def parse_manifest(text: str, source: str = MANIFEST) -> dict:
    """Parse and schema-check a manifest; every failure is a :class:`BundleError` naming the problem."""
    import jsonschema

    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{source}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{source}: expected a JSON object, found {type(data).__name__}")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise BundleError(f"{source}: schema_version {version} is newer than this hartkit understands "
                          f"({SCHEMA_VERSION}); upgrade hartkit to read it")
    try:
        jsonschema.validate(data, MANIFEST_SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise BundleError(f"{source}: invalid manifest at {where}: {exc.message}") from None
    except RecursionError as exc:  # pathological nesting
        raise BundleError(f"{source}: manifest nested too deeply") from exc
    for art in data["artifacts"]:
        _safe_relpath(art["path"], source)
    return data


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: bundle folder not found")
    if not path.is_file():
        raise BundleError(f"{folder}: not a hartkit bundle (no {MANIFEST})")
    return parse_manifest(path.read_text(), str(path))


def _safe_relpath(rel: str, source: str) -> PurePosixPath:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in rel:
        raise BundleError(f"{source}: artifact path {rel!r} escapes the bundle")
    return p


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
    """Every listed artifact exists with its size and sha256; every graph file is listed."""
    listed = {a["path"]: a for a in manifest["artifacts"]}
    for rel, art in listed.items():
        path = folder / rel
        if not path.is_file():
            report.fail(f"{rel}: missing")
            continue
        if path.stat().st_size != art["size"]:
            report.fail(f"{rel}: size {path.stat().st_size} != {art['size']} in the manifest (tampered or truncated)")
            continue
        if sha256_file(path) != art["sha256"]:
            report.fail(f"{rel}: sha256 does not match the manifest (tampered)")
            continue
        report.checked_files += 1
    for fmt, graphs in manifest["files"].items():
        for graph, rel in graphs.items():
            if rel not in listed and not any(a.startswith(rel.rstrip("/") + "/") for a in listed):
                report.fail(f"{fmt}/{graph}: file {rel} is not covered by the manifest's artifacts")
    names = {g["name"] for g in manifest["graphs"]}
    for fmt, graphs in manifest["files"].items():
        for graph in graphs:
            if graph not in names:
                report.fail(f"{fmt}: file listed for unknown graph {graph!r}")


def verify_golden(folder: Path, manifest: dict, backend, report: VerifyReport, fmt: str | None = None) -> None:
    """Run the recorded golden inputs of every graph on ``backend`` and compare within tolerance.

    Quantized bundles keep per-format goldens (``golden.graphs.by_format``): the eager-quantized outputs.
    """
    golden = dict(manifest.get("golden", {}).get("graphs", {}))
    by_format = golden.pop("by_format", None)
    if by_format is not None:
        golden = by_format.get(fmt, {}) if fmt else {}
    outputs = {g["name"]: [o["name"] for o in g["outputs"]] for g in manifest["graphs"]}
    for graph, entry in sorted(golden.items()):
        path = folder / _safe_relpath(entry["file"], MANIFEST)
        with np.load(path, allow_pickle=False) as data:
            feeds = {k[len("in."):]: data[k] for k in data.files if k.startswith("in.")}
            refs = [data[f"out.{name}"] for name in outputs[graph]]
        try:
            got = backend.run(graph, feeds)
        except HartkitError as exc:
            report.fail(f"golden {graph}: could not run ({exc})")
            continue
        atol, rtol = float(entry.get("atol", 1e-4)), float(entry.get("rtol", 1e-4))
        worst = 0.0
        ok = True
        for name, ref, out in zip(outputs[graph], refs, got):
            out = np.asarray(out)
            if out.shape != ref.shape:
                report.fail(f"golden {graph}.{name}: shape {out.shape} != {ref.shape}")
                ok = False
                continue
            err = float(np.abs(out.astype(np.float64) - ref).max(initial=0))
            worst = max(worst, err)
            if err > atol + rtol * float(np.abs(ref).max(initial=0)):
                report.fail(f"golden {graph}.{name}: max abs error {err:.3e} over the tolerance "
                            f"(atol {atol:g}, rtol {rtol:g})")
                ok = False
        report.golden.append({"graph": graph, "ok": ok, "max_abs_err": worst})


def verify_loop(folder: Path, manifest: dict, backend: str, report: VerifyReport) -> None:
    """Replay the recorded generation (prompt, seed): same tokens at every stage, image within 40 dB."""
    from hartkit.runtime.images import psnr
    from hartkit.runtime.pipeline import Pipeline

    entry = manifest.get("golden", {}).get("loop")
    if not entry:
        return
    with np.load(folder / _safe_relpath(entry["file"], MANIFEST), allow_pickle=False) as data:
        tokens = [data[f"tokens.{i}"] for i in range(len(manifest["loop"]["patch_nums"]))]
        ref_image = data["image"]
    pipe = Pipeline.from_exported(folder, backend=backend)
    image, trace = pipe.generate(entry["prompt"], seed=int(entry["seed"]), cfg=float(entry["cfg"]),
                                 more_smooth=bool(entry.get("more_smooth", True)))
    first_bad = next((si for si, (a, b) in enumerate(zip(tokens, trace.tokens)) if not np.array_equal(a, b)), None)
    quality = psnr(ref_image.reshape(image.shape), image)
    ok = first_bad is None and quality >= 40.0
    if not ok:
        report.fail(f"golden loop: " + (f"tokens differ from stage {first_bad} on" if first_bad is not None else
                                        f"image PSNR {quality:.1f} dB < 40 dB"))
    report.golden.append({"graph": "loop", "ok": ok, "max_abs_err": None,
                          "first_divergent_stage": first_bad, "psnr_db": quality})


def verify_bundle(folder: str | Path, backend: str | None = None) -> VerifyReport:
    """Hashes, schema, files vs manifest; with ``backend``, the golden vectors and the loop replay too."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    report = VerifyReport()
    verify_files(folder, manifest, report)
    if backend is not None and report.ok:
        from hartkit.runtime.backends import open_backend

        from hartkit.runtime.backends import BACKEND_FORMAT

        runner = open_backend(folder, manifest, backend, {})
        verify_golden(folder, manifest, runner, report, BACKEND_FORMAT.get(backend))
        verify_loop(folder, manifest, backend, report)
    return report


# ----------------------------------------------------------------------------- archives


def pack(folder: str | Path, archive: str | Path) -> Path:
    """Zip a bundle into one file (atomic), after checking it."""
    folder, archive = Path(folder), Path(archive)
    report = verify_bundle(folder)
    if not report.ok:
        raise BundleError(f"{folder}: refusing to pack a bundle that does not verify: {report.problems[0]}")
    manifest = read_manifest(folder)
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(folder / MANIFEST, MANIFEST)
        for art in manifest["artifacts"]:
            zf.write(folder / art["path"], art["path"])
    os.replace(tmp, archive)
    return archive


def unpack(archive: str | Path, out: str | Path) -> Path:
    """Extract an archive into a new folder, refusing entries that would escape it; then verify."""
    archive, out = Path(archive), Path(out)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not empty")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{archive}: not a hartkit bundle archive ({exc})") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with zf:
            for info in zf.infolist():
                rel = _safe_relpath(info.filename, str(archive))
                if info.is_dir():
                    continue
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise BundleError(f"{archive}: entry {info.filename!r} is a symlink; refused")
                target = tmp.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        report = verify_bundle(tmp)
        if not report.ok:
            raise BundleError(f"{archive}: unpacked bundle does not verify: {'; '.join(report.problems[:3])}")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
