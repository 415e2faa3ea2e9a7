"""``report.json`` and a self-contained ``report.html`` (inline PNGs, no scripts, no network).

The HTML is for a person deciding whether a bundle is good enough: the verdict and what failed
first, the parity matrix (one row per reference/format/recipe, failing cells in red), per-stage
agreement plots, per-graph SNRs, and the images side by side (fp32 | fp16 | each bundle, with a
difference map against fp32) for every prompt x seed.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from hartkit import __version__
from hartkit.loop.metrics import finite_or_none
from hartkit.validate.core import ValidationReport
from hartkit.validate.thresholds import THRESHOLDS, misses

REPORT_SCHEMA = "hartkit.validate/1"
JSON_NAME, HTML_NAME = "report.json", "report.html"
DISPLAY_MIN_PX = 160  # small images are shown enlarged (pixelated), so a 32 px image is still readable
DIFF_GAIN = 4.0  # difference maps show |candidate - fp32| x 4, clipped at 255

# The parity matrix's columns: (summary key, header, format, bar name or None).
COLUMNS: tuple[tuple[str, str, str, str | None], ...] = (
    ("graph_snr_db_min", "graph SNR min (dB)", "{:.1f}", "graph_snr_db_min"),
    ("graph_cosine_min", "graph cosine min", "{:.5f}", "graph_cosine_min"),
    ("tf_kl_max", "TF KL max (nats)", "{:.2e}", "tf_kl_max"),
    ("tf_top1_min", "TF top-1 min", "{:.3f}", "tf_top1_min"),
    ("tf_topk_min", "TF top-k min", "{:.3f}", "tf_topk_min"),
    ("free_token_agreement_min", "free tokens min", "{:.3f}", "free_token_agreement_min"),
    ("first_divergent_stage", "first divergent stage", "{}", None),
    ("residual_snr_db_min", "residual SNR (dB)", "{:.1f}", "residual_snr_db_min"),
    ("image_psnr_db_min", "PSNR vs fp32 (dB)", "{:.1f}", "image_psnr_db_min"),
    ("image_ssim_min", "SSIM vs fp32", "{:.4f}", "image_ssim_min"),
    ("image_psnr_vs_fp16_db_min", "PSNR vs fp16 (dB)", "{:.1f}", "image_psnr_vs_fp16_db_min"),
    ("image_ssim_vs_fp16_min", "SSIM vs fp16", "{:.4f}", "image_ssim_vs_fp16_min"),
    ("caption_accuracy", "caption accuracy", "{:.2f}", None),
)


# ----------------------------------------------------------------------------- JSON


def _clean(value: Any) -> Any:
    """Recursively make a structure strict-JSON safe (no inf/nan, no numpy scalars)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return finite_or_none(float(value))
    return str(value)


def report_dict(report: ValidationReport) -> dict:
    ref = report.reference
    refs = ref.refs
    matrix = [{"label": r.label, "kind": r.kind, "format": r.format, "backend": r.backend, "recipe": r.recipe,
               "status": r.status, "passed": r.passed, **r.summary()} for r in report.rows]
    return _clean({
        "schema": REPORT_SCHEMA,
        "passed": report.passed,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hartkit_version": __version__,
        "checkpoint": str(refs.checkpoint),
        "text_model": str(refs.text_model),
        "prompts": ref.prompts,
        "seeds": ref.seeds,
        "cfg": ref.cfg,
        "topk": ref.topk,
        "patch_nums": list(refs.loop.patch_nums),
        "thresholds": report.thresholds,
        "threshold_docs": {name: text for name, (_, text) in THRESHOLDS.items()},
        "reference": {
            "fp32": {"caption": ref.fp32_caption,
                     "runs": [{"prompt": p, "seed": s, "tokens_per_stage": [int(np.asarray(t).size) for t in tr.tokens]}
                              for (p, s), (_, tr) in zip(ref.runs, ref.fp32)]},
            "fp16": "torch.autocast('cpu', dtype=torch.float16) around every graph; host loop in fp32",
            "recorded_calls": ref.record_counts(),
        },
        "matrix": matrix,
        "rows": [r.to_json() for r in report.rows],
        "failures": [f.to_json() for f in report.failures],
        "notes": report.notes,
        "files": {"json": JSON_NAME, "html": HTML_NAME},
    })


# ----------------------------------------------------------------------------- pictures


def png_data_uri(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def diff_image(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    d = np.abs(ref.astype(np.float32) - got.astype(np.float32)) * DIFF_GAIN
    return np.clip(d, 0, 255).astype(np.uint8)


def stage_plot(report: ValidationReport) -> str | None:
    """Per-stage agreement (teacher-forced top-1, KL; free-running tokens) of every row, as a PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = [r for r in report.rows if r.status == "ok" and r.stages]
    if not rows:
        return None
    pns = report.reference.refs.loop.patch_nums
    x = np.arange(len(pns))
    fig = Figure(figsize=(12, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    panels = (("tf_top1", "teacher-forced top-1 agreement", "tf_top1_min", False),
              ("tf_kl", "teacher-forced KL (nats, log)", "tf_kl_max", True),
              ("free_token_agreement", "free-running token agreement", "free_token_agreement_min", False))
    for i, (key, title, bar, log) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for r in rows:
            y = np.array([getattr(s, key) for s in r.stages], dtype=np.float64)
            if log:
                y = np.maximum(y, 1e-18)
            ax.plot(x, y, marker="o", linestyle="--" if r.kind == "reference" else "-", label=r.label)
        threshold = report.thresholds.get(bar)
        if threshold is not None:  # the bar: no legend entry (it differs per panel), named in the title
            ax.axhline(threshold, color="#c62828", linewidth=1.2, linestyle=":")
            title += f"  (bar {threshold:g})"
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{si}\n{pn}x{pn}" for si, pn in enumerate(pns)], fontsize=8)
        ax.set_xlabel("stage (scale)", fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;max-width:1600px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.verdict{display:inline-block;padding:3px 12px;border-radius:6px;color:#fff;font-weight:700;margin-left:8px}
.pass{background:#1f8a3b} .fail{background:#c62828} .skip{background:#888}
.meta{color:#555;font-size:13px} .meta code{font-size:12px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
table.matrix{font-size:12px}
th{background:#f3f3f3;white-space:normal;vertical-align:bottom} td.l,th.l{text-align:left}
td.bad{background:#fde0e0;color:#a00;font-weight:600} td.ok{background:#e9f7ec}
tr.ref td{color:#555;font-style:italic}
.notes li{color:#555} .headline{font-size:14px;margin:4px 0}
.scroll{overflow-x:auto;max-width:100%}
.grid{display:flex;flex-wrap:wrap;gap:18px;margin:8px 0 18px}
.cell{text-align:center;font-size:12px}
.cell img{image-rendering:pixelated;border:1px solid #bbb;display:block;margin:0 auto 3px}
.run{margin-bottom:10px} .run h3{font-size:14px;margin:10px 0 4px;font-weight:600}
details{margin:6px 0} summary{cursor:pointer;font-size:14px}
"""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return fmt.format(value)


def _cell(value: Any, fmt: str, bar: str | None, thresholds: dict, extra: str = "") -> str:
    cls = ""
    if bar is not None and thresholds.get(bar) is not None and value is not None:
        cls = "bad" if misses(bar, value, thresholds) else "ok"
    return f'<td class="{cls}{extra}">{html.escape(_fmt(value, fmt))}</td>'


def _matrix_html(report: ValidationReport) -> str:
    t = report.thresholds
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _, _ in COLUMNS)
    lines = [f'<table class="matrix"><tr><th class="l">row (bundle, format, recipe)</th><th class="l">backend</th>'
             f'{head}<th>verdict</th></tr>']
    fp32_cap = report.reference.fp32_caption
    cells = "".join("<td>—</td>" for _ in COLUMNS[:-1])
    cap = _fmt(fp32_cap["accuracy"], "{:.2f}") if fp32_cap else "—"
    lines.append(f'<tr class="ref"><td class="l">torch fp32 (the reference)</td><td class="l">torch</td>'
                 f'{cells}<td>{cap}</td><td>reference</td></tr>')
    for r in report.rows:
        summary = r.summary()
        klass = ' class="ref"' if r.kind == "reference" else ""
        if r.status != "ok":
            verdict = "skipped" if r.status == "skipped" else "ERROR"
            body = f'<td class="l" colspan="{len(COLUMNS)}">{html.escape(r.reason)}</td>'
        else:
            body = "".join(_cell(summary.get(key), fmt, bar, t) for key, _, fmt, bar in COLUMNS)
            verdict = "pass" if r.passed else "FAIL"
            if r.kind == "reference":
                verdict = "not gated"
        vclass = {"pass": "ok", "FAIL": "bad", "ERROR": "bad"}.get(verdict, "")
        lines.append(f'<tr{klass}><td class="l">{html.escape(r.label)}</td><td class="l">{html.escape(r.backend)}</td>'
                     f'{body}<td class="{vclass}">{verdict}</td></tr>')
    lines.append("</table>")
    return "\n".join(lines)


def _stages_html(report: ValidationReport) -> str:
    t = report.thresholds
    out = []
    for r in report.rows:
        if r.status != "ok":
            continue
        first = r.first_divergent_stage
        lines = [f"<details><summary>{html.escape(r.label)} — first divergent stage: "
                 f"{'none (tokens identical)' if first is None else first}</summary>",
                 '<table><tr><th>stage</th><th>scale</th><th>TF KL mean</th><th>TF KL worst</th><th>TF top-1</th>'
                 '<th>TF top-k</th><th>TF logits max |err|</th><th>free tokens</th></tr>']
        for s in r.stages:
            lines.append(
                f"<tr><td>{s.stage}</td><td>{s.pn}x{s.pn}</td>{_cell(s.tf_kl, '{:.2e}', 'tf_kl_max', t)}"
                f"<td>{_fmt(s.tf_kl_max, '{:.2e}')}</td>{_cell(s.tf_top1, '{:.3f}', 'tf_top1_min', t)}"
                f"{_cell(s.tf_topk, '{:.3f}', 'tf_topk_min', t)}<td>{_fmt(s.tf_logits_max_abs_err, '{:.2e}')}</td>"
                f"{_cell(s.free_token_agreement, '{:.3f}', 'free_token_agreement_min', t)}</tr>")
        lines.append("</table></details>")
        out.append("\n".join(lines))
    return "\n".join(out)


def _graphs_html(report: ValidationReport) -> str:
    t = report.thresholds
    rows = [r for r in report.rows if r.status == "ok"]
    if not rows:
        return "<p>No row ran.</p>"
    graphs = [g.graph for g in rows[0].graphs]
    head = "".join(f"<th>{html.escape(r.label)}<br>SNR dB / cosine / max |err|</th>" for r in rows)
    lines = [f'<table><tr><th class="l">graph</th><th>recorded calls</th>{head}</tr>']
    for name in graphs:
        cells = []
        calls = 0
        for r in rows:
            g = next((g for g in r.graphs if g.graph == name), None)
            if g is None:
                cells.append("<td>—</td>")
                continue
            calls = max(calls, g.calls)
            if g.error:
                cells.append(f'<td class="bad">{html.escape(g.error[:80])}</td>')
                continue
            bad = misses("graph_snr_db_min", g.snr_db_min, t) or misses("graph_cosine_min", g.cosine_min, t)
            cells.append(f'<td class="{"bad" if bad else "ok"}">{_fmt(g.snr_db_min, "{:.1f}")} / '
                         f'{_fmt(g.cosine_min, "{:.5f}")} / {_fmt(g.max_abs_err, "{:.1e}")}</td>')
        lines.append(f'<tr><td class="l">{html.escape(name)}</td><td>{calls}</td>{"".join(cells)}</tr>')
    lines.append("</table>")
    return "\n".join(lines)


def _images_html(report: ValidationReport) -> str:
    ref = report.reference
    rows = [r for r in report.rows if r.status == "ok"]
    out = []
    for i, ((prompt, seed), (ref_image, _)) in enumerate(zip(ref.runs, ref.fp32)):
        size = max(DISPLAY_MIN_PX, ref_image.shape[1])
        cells = [_img_cell(ref_image, "torch fp32 (reference)", "", size)]
        for r in rows:
            run = r.runs[i]
            text = f"PSNR {_fmt(run.image_psnr_db, '{:.1f}')} dB<br>SSIM {_fmt(run.image_ssim, '{:.3f}')}"
            if run.first_divergent_stage is not None:
                text += f"<br>tokens diverge at stage {run.first_divergent_stage}"
            cells.append(_img_cell(r.images[i], r.label, text, size))
        # Difference maps sit under their images (an empty first cell under the reference).
        diffs = [f'<div class="cell" style="width:{size}px"></div>']
        diffs += [_img_cell(diff_image(ref_image, r.images[i]), f"|row − fp32| ×{DIFF_GAIN:g}", "", size // 2, size)
                  for r in rows]
        out.append(f'<div class="run"><h3>“{html.escape(prompt)}” · seed {seed}</h3>'
                   f'<div class="grid">{"".join(cells)}</div><div class="grid">{"".join(diffs)}</div></div>')
    return "\n".join(out)


def _img_cell(image: np.ndarray, title: str, text: str, size: int, width: int | None = None) -> str:
    return (f'<div class="cell" style="width:{width or size}px"><img src="{png_data_uri(image)}" width="{size}" '
            f'height="{size}" alt="{html.escape(title)}"><b>{html.escape(title)}</b>{"<br>" + text if text else ""}</div>')


def _where(f) -> str:
    if f.stage is not None:
        return f"stage {f.stage}"
    return f"graph {f.graph}" if f.graph else "whole run"


def _verdicts_html(report: ValidationReport) -> str:
    """One headline per bundle row (verdict, first divergent stage, first missed bar), then the misses."""
    lines = ["<h2>Verdict per bundle</h2>"]
    for r in report.bundle_rows:
        if r.status == "skipped":
            lines.append(f'<p class="headline"><span class="verdict skip">SKIPPED</span> <b>{html.escape(r.label)}</b>: '
                         f"{html.escape(r.reason)}</p>")
            continue
        if r.status == "error":
            lines.append(f'<p class="headline"><span class="verdict fail">ERROR</span> <b>{html.escape(r.label)}</b>: '
                         f"{html.escape(r.reason)}</p>")
            continue
        first = r.first_divergent_stage
        tokens = "tokens identical at every stage" if first is None else f"tokens first diverge at stage {first}"
        if r.passed:
            lines.append(f'<p class="headline"><span class="verdict pass">PASS</span> <b>{html.escape(r.label)}</b>: '
                         f"clears every bar; {tokens}.</p>")
            continue
        lines.append(f'<p class="headline"><span class="verdict fail">FAIL</span> <b>{html.escape(r.label)}</b>: '
                     f"{len(r.failures)} bars missed; {tokens}; first: {html.escape(r.failures[0].describe())}</p>")
        lines.append(f"<details><summary>every missed bar of {html.escape(r.label)}</summary>"
                     '<table><tr><th class="l">metric</th><th class="l">where</th><th>value</th><th>bar</th>'
                     '<th class="l">detail</th></tr>')
        for f in r.failures:
            bound = ">=" if f.metric.endswith("_min") else "<="
            lines.append(f'<tr><td class="l"><code>{f.metric}</code></td><td class="l">{html.escape(_where(f))}</td>'
                         f'<td class="bad">{_fmt(f.value, "{:.4g}")}</td><td>{bound} {f.threshold:g}</td>'
                         f'<td class="l">{html.escape(f.detail)}</td></tr>')
        lines.append("</table></details>")
    return "\n".join(lines)


def render_html(report: ValidationReport) -> str:
    ref = report.reference
    refs = ref.refs
    verdict = ('<span class="verdict pass">PASS</span>' if report.passed
               else '<span class="verdict fail">FAIL</span>')
    bundles = sorted({r.bundle for r in report.bundle_rows if r.bundle})
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>hartkit validate — {'PASS' if report.passed else 'FAIL'}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>hartkit validate {verdict}</h1>",
        f'<p class="meta">bundles: {", ".join(f"<code>{html.escape(b)}</code>" for b in bundles)}<br>'
        f"reference: eager torch on checkpoint <code>{html.escape(str(refs.checkpoint))}</code> "
        f"(fp32, and fp16 via CPU autocast) · {_plural(len(ref.prompts), 'prompt')} × {_plural(len(ref.seeds), 'seed')} "
        f"({', '.join(str(s) for s in ref.seeds)}) · cfg {ref.cfg:g} · top-k overlap k={ref.topk} · "
        f"scales {list(refs.loop.patch_nums)} · hartkit {__version__} · "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>",
    ]
    parts.append(_verdicts_html(report))
    if report.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    parts.append("<h2>Parity matrix</h2>")
    parts.append('<p class="meta">Every row against the fp32 reference on the same prompts, seeds and recorded '
                 "graph inputs. TF = teacher-forced (the reference's tokens fed at every stage); free = the row "
                 "samples on its own with the same seed. Red: misses its bar. The fp16 row is shown for "
                 "comparison and does not decide the verdict.</p>")
    parts.append(f'<div class="scroll">{_matrix_html(report)}</div>')
    plot = stage_plot(report)
    parts.append("<h2>Per-stage agreement</h2>")
    if plot:
        parts.append(f'<img src="{plot}" alt="per-stage agreement plots" style="max-width:100%">')
    parts.append(_stages_html(report))
    parts.append("<h2>Images</h2>")
    parts.append('<p class="meta">Free-running generations (same prompt and seed), then |row − fp32| amplified '
                 f"×{DIFF_GAIN:g}. PSNR/SSIM against the fp32 image.</p>")
    parts.append(_images_html(report))
    parts.append("<h2>Per graph (recorded inputs)</h2>")
    parts.append('<p class="meta">The real inputs recorded from the fp32 reference loop, run through each row\'s '
                 "backend; worst output and call.</p>")
    parts.append(f'<div class="scroll">{_graphs_html(report)}</div>')
    parts.append("<h2>Thresholds</h2><table><tr><th class=\"l\">name</th><th>value</th><th class=\"l\">meaning</th></tr>")
    for name, (_, text) in THRESHOLDS.items():
        value = report.thresholds.get(name)
        parts.append(f'<tr><td class="l"><code>{name}</code></td><td>{"off" if value is None else f"{value:g}"}</td>'
                     f'<td class="l">{html.escape(text)}</td></tr>')
    parts.append("</table></body></html>")
    return "\n".join(parts)


def _atomic_write(path: Path, text: str) -> None:
    from hartkit.fsutil import write_text

    write_text(path, text)


def write_report(report: ValidationReport, out: str | Path) -> tuple[Path, Path]:
    """Write ``out/report.json`` and ``out/report.html``; returns their paths."""
    from hartkit.fsutil import make_dir

    out = make_dir(out)
    data = report_dict(report)
    json_path, html_path = out / JSON_NAME, out / HTML_NAME
    _atomic_write(json_path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    _atomic_write(html_path, render_html(report))
    return json_path, html_path


def summary_lines(report: ValidationReport) -> list[str]:
    """A short text table for the terminal."""
    lines = [f"{'row':34} {'status':8} {'graph SNR':>9} {'TF top-1':>8} {'free tok':>8} {'1st div':>7} "
             f"{'PSNR fp32':>9} {'SSIM':>6}"]
    for r in report.rows:
        s = r.summary()
        status = r.status if r.status != "ok" else ("pass" if r.passed else "FAIL")
        if r.kind == "reference":
            status = "ref"
        lines.append(f"{r.label[:34]:34} {status:8} {_fmt(s.get('graph_snr_db_min'), '{:.1f}'):>9} "
                     f"{_fmt(s.get('tf_top1_min'), '{:.3f}'):>8} {_fmt(s.get('free_token_agreement_min'), '{:.3f}'):>8} "
                     f"{_fmt(s.get('first_divergent_stage'), '{}'):>7} {_fmt(s.get('image_psnr_db_min'), '{:.1f}'):>9} "
                     f"{_fmt(s.get('image_ssim_min'), '{:.3f}'):>6}")
    return lines


def verdict_lines(report: ValidationReport, max_per_row: int = 8) -> list[str]:
    """Per bundle row: PASS/FAIL, the first divergent stage, and the first missed bars."""
    lines = []
    for r in report.bundle_rows:
        if r.status != "ok":
            lines.append(f"{r.status.upper()} {r.label}: {r.reason}")
            continue
        first = r.first_divergent_stage
        tokens = "tokens identical at every stage" if first is None else f"tokens first diverge at stage {first}"
        if r.passed:
            lines.append(f"PASS {r.label}: {tokens}")
            continue
        lines.append(f"FAIL {r.label}: {len(r.failures)} bars missed; {tokens}")
        lines.extend(f"  {f.describe()}" for f in r.failures[:max_per_row])
        if len(r.failures) > max_per_row:
            lines.append(f"  ... and {len(r.failures) - max_per_row} more (see the report)")
    return lines


__all__ = ["verdict_lines", "write_report", "report_dict", "render_html", "summary_lines", "stage_plot", "REPORT_SCHEMA"]
