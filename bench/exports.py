"""The bundles a bench measures, exported on demand: one per (recipe, format), each in a fresh process
so its wall time and peak memory (what a user needs to know before exporting 0.7B on a laptop) are
measured alone. A bundle already in the work folder with the same recipe, format and resolution is
reused. An export that fails (e.g. killed for memory) is recorded with its reason and skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from hartkit.errors import HartkitError
from hartkit.fsutil import make_dir, write_text


STATS = "exports.json"  # beside the bundles (not inside: the bundle's checksums stay the bundle's)


def bundle_dir(work: Path, recipe: str, fmt: str, resolution: int | None) -> Path:
    return work / (f"{recipe}-{fmt}-{resolution}px" if resolution else f"{recipe}-{fmt}")


def _matches(bundle: Path, recipe: str, formats: Sequence[str], resolution: int | None) -> bool:
    from hartkit.bundle import peek_manifest

    manifest = peek_manifest(bundle)  # only to match; a reused bundle is read schema-checked when measured
    if manifest is None:
        return False
    got = manifest.get("recipe") or {}
    size_ok = resolution is None or manifest.get("loop", {}).get("image_size") == resolution
    # a preset whose schemes changed since the bundle was made is not the same recipe any more
    same = got.get("name", "fp32") == recipe and (recipe == "fp32" or got == _recipe_dict(recipe))
    return same and size_ok and set(formats) <= set(manifest.get("files", {}))


def _recipe_dict(recipe: str) -> dict | None:
    from hartkit.quantize.recipe import Recipe

    try:
        return Recipe.load(recipe).to_dict()
    except HartkitError:
        return None


def export_command(checkpoint: Path, out: Path, recipe: str, formats: Sequence[str],
                   resolution: int | None, text_model: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "hartkit.cli", "export", "--checkpoint", str(checkpoint), "--format",
           ",".join(formats), "--out", str(out), "--force"]
    if text_model is not None:
        cmd += ["--text-model", str(text_model)]
    if recipe != "fp32":  # fp32 = the plain export (no quantization pass)
        cmd += ["--recipe", recipe]
    if resolution:
        cmd += ["--resolution", str(resolution)]
    return cmd


def run_measured(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """(seconds, peak RSS bytes, exit code) of one child process (its own rusage via wait4).

    Linux carries ``ru_maxrss`` over fork + exec, so the figure is at least this (small, model-free)
    process's RSS at the fork; generation's peak is read in the child instead (run.own_peak_rss)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss * 1024, proc.returncode  # Linux: KiB


def failure_reason(code: int, log: Path) -> str:
    if code < 0:
        import signal

        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    tail = [line for line in log.read_text(errors="replace").strip().splitlines() if line.strip()][-1:]
    return f"exit {code}: {tail[0] if tail else ''}"


def prepare_bundles(checkpoint: str | Path, work: str | Path, recipes: Sequence[str], formats: Sequence[str],
                    resolution: int | None = None, progress: Callable[[str], None] | None = None,
                    text_model: str | Path | None = None) -> tuple[list[Path], list[dict]]:
    """Export (or reuse) one bundle per (recipe, format) under ``work``; returns the bundles that exist
    and one stats row per export (``failed`` holds the reason of one that did not finish)."""
    say = progress or (lambda _m: None)
    checkpoint, work = Path(checkpoint), Path(work)
    make_dir(work)  # a file or a read-only place: one line, before any export
    stats_path = work / STATS
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    bundles, rows = [], []
    for recipe in recipes:
        for fmt in formats:
            out = bundle_dir(work, recipe, fmt, resolution)
            key = out.name
            if _matches(out, recipe, [fmt], resolution) and key in stats and not stats[key].get("failed"):
                say(f"reusing {out}")
                rows.append({**stats[key], "reused": True})
                bundles.append(out)
                continue
            say(f"exporting {recipe} {fmt} -> {out}")
            log = work / f"{key}.export.log"
            seconds, rss, code = run_measured(export_command(checkpoint, out, recipe, [fmt], resolution,
                                                                Path(text_model) if text_model else None), log)
            row = {"recipe": recipe, "formats": [fmt], "resolution": resolution, "seconds": seconds,
                   "peak_rss_bytes": rss, "bundle": str(out)}
            if code != 0:
                row["failed"] = failure_reason(code, log)
                say(f"export {recipe} {fmt} failed: {row['failed']} (log: {log})")
            else:
                bundles.append(out)
            stats[key] = row
            write_text(stats_path, json.dumps(stats, indent=2))
            rows.append(row)
    return bundles, rows
