"""Checking a bundle: its files against the manifest's sha256, its golden vectors, the replay of its loop.

``verify_bundle(folder)`` needs nothing but the files; with ``backend`` it also runs every graph's
recorded inputs on that backend and replays the recorded generation, so "verified" always means
something was run: on the graph runners of :mod:`hartkit.backends`, under the one sampling loop
(:class:`hartkit.loop.sampler.StagedLoop`), both below this package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

import numpy as np

from hartkit.backends import BACKEND_FORMAT, FORMAT_BACKEND, open_backend
from hartkit.bundle.format import CONSTANTS, MANIFEST, TOKENIZER_DIR, BundleError, one_line, sha256_file
from hartkit.bundle.read import (bundle_path, golden_files, load_codebook, load_golden, load_npz, read_manifest,
                                 tokenizer_dir)
from hartkit.errors import HartkitError, UsageError
from hartkit.loop.metrics import psnr, snr_db
from hartkit.loop.plan import LoopInfo


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
    for what, rel in golden_files(manifest):
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
            feeds, recorded = load_golden(folder, entry["file"], f"golden {graph}")
            refs = [recorded[name] for name in outputs[graph]]
        except (BundleError, KeyError) as exc:
            report.fail(f"golden {graph}: unreadable golden vectors ({one_line(exc)})")
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
    from hartkit.loop.prompt import PromptTokenizer
    from hartkit.loop.sampler import StagedLoop

    entry = manifest.get("golden", {}).get("loop")
    if not entry:
        return
    try:
        data = load_npz(bundle_path(folder, entry["file"], "golden loop"))
        tokens = [data[f"tokens.{i}"] for i in range(len(manifest["loop"]["patch_nums"]))]
        ref_image = data["image"]
        loop = LoopInfo.from_dict(manifest["loop"])
        runner = open_backend(folder, manifest, backend, {}, generation=True)
        codebook = load_codebook(folder, manifest, loop)
        tokenizer = PromptTokenizer.from_dir(tokenizer_dir(folder, manifest))
        sampler = StagedLoop(loop, runner.run, tokenizer, codebook)
        image, trace = sampler.generate(entry["prompt"], seed=int(entry["seed"]), cfg=float(entry["cfg"]),
                                     more_smooth=bool(entry.get("more_smooth", True)))
        first_bad = next((si for si, (a, b) in enumerate(zip(tokens, trace.tokens)) if not np.array_equal(a, b)),
                         None)
        quality = psnr(ref_image.reshape(image.shape), image)
    except (HartkitError, KeyError, ValueError, IndexError) as exc:
        # a manifest whose loop section disagrees with its graphs or golden files: a failed check, not a crash
        report.fail(f"golden loop: could not replay ({one_line(exc)})")
        report.golden.append({"graph": "loop", "ok": False, "max_abs_err": None,
                              "first_divergent_stage": None, "psnr_db": float("nan")})
        return
    ok = first_bad is None and quality >= 40.0
    if not ok:
        report.fail("golden loop: " + (f"tokens differ from stage {first_bad} on" if first_bad is not None else
                                        f"image PSNR {quality:.1f} dB < 40 dB"))
    report.golden.append({"graph": "loop", "ok": ok, "max_abs_err": None,
                          "first_divergent_stage": first_bad, "psnr_db": quality})


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
