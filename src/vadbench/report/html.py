"""`reports/index.html`: the one page to share — leaderboard, Δ tables, costs, figures, galleries, protocol.

Self-contained: every figure is inlined as a data URI (galleries as reduced JPEG thumbnails: the full PNGs
are ~1 MB each), no script, no stylesheet or font from anywhere, so it opens from disk in any browser and
survives being mailed. It shows measured costs, which vary between runs, so — like `metrics/measured/` — it
is written beside the stage's declared outputs, not as one of them (dvc.lock stays byte-identical).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from PIL import Image

from vadbench.io import write_text
from vadbench.report.leaderboard import COSTS, PROTOCOL_NOTE, Cell, dataset_views

THUMB_WIDTH = 900  # px of a gallery thumbnail in the page
_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;
color:#1b1f24}
table{border-collapse:collapse;margin:.6rem 0 1.4rem;font-size:.85rem}
th,td{border:1px solid #d0d7de;padding:.25rem .5rem;text-align:right}
th{background:#f3f5f7}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto;border:1px solid #d0d7de}
.note{background:#f6f8fa;border-left:4px solid #8c959f;padding:.6rem 1rem}
details{margin:.3rem 0}summary{cursor:pointer;font-weight:600}
"""


def _table(df: pd.DataFrame, digits: int = 3) -> str:
    if df.empty:
        return "<p><em>(none)</em></p>"
    return df.to_html(
        index=False,
        escape=True,
        na_rep="n/a",
        border=0,
        float_format=lambda v: f"{v:.{digits}f}",
    )


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png(path: Path) -> str | None:
    return _data_uri(path.read_bytes(), "image/png") if path.is_file() else None


def _thumbnail(path: Path, width: int = THUMB_WIDTH) -> str | None:
    """A gallery PNG → a JPEG data URI at most `width` px wide (deterministic bytes for the same PNG)."""
    if not path.is_file():
        return None
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82, optimize=True)
    return _data_uri(buf.getvalue(), "image/jpeg")


def _figure(uri: str | None, alt: str) -> str:
    if uri is None:
        return f"<p><em>{html.escape(alt)}: not generated</em></p>"
    return f'<figure><img src="{uri}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def render_page(
    quality: pd.DataFrame,
    costs: pd.DataFrame,
    cells: Iterable[Cell],
    reports_dir: Path,
    notes: Iterable[str] = (),
    supervised: pd.DataFrame | None = None,
) -> str:
    """The whole page as one HTML string (figures read from `reports_dir`)."""
    reports_dir = Path(reports_dir)
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>vadbench report</title><style>{_STYLE}</style></head><body>",
        "<h1>vadbench report</h1>",
        f'<p class="note">{esc(PROTOCOL_NOTE)}</p>',
    ]
    extra = [n for n in notes if n]
    if extra:
        parts.append("<h2>Protocol notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in extra) + "</ul>")
    parts.append("<h2>Contents</h2><ul>")
    views = dataset_views(quality)
    parts.extend(f'<li><a href="#ds-{esc(d)}">{esc(d)}</a></li>' for d in views)
    parts.append('<li><a href="#costs">Costs</a></li><li><a href="#figures">Figures</a></li>')
    parts.append('<li><a href="#galleries">Anomaly-map galleries</a></li></ul>')
    for dataset, v in views.items():
        parts.append(f'<h2 id="ds-{esc(dataset)}">Leaderboard: {esc(dataset)}</h2>')
        parts.append(_table(v.ranked))
        parts.append("<h3>Image AUROC / pixel AUROC (model × backbone)</h3>")
        parts.append(_table(v.pivot))
        parts.append("<h3>Δ fractal vs other weight sources (positive = fractal better)</h3>")
        parts.append(_table(v.deltas))
    if supervised is not None and not supervised.empty:
        from vadbench.report.supervised import NOTE

        parts.append('<h2 id="supervised">Supervised (k-fold)</h2>')
        parts.append(f'<p class="note">{esc(NOTE)}</p>')
        parts.append(_table(supervised))
    parts.append('<h2 id="costs">Costs</h2>')
    parts.append(
        "<p>Measured on the machine named in <code>device</code>; they vary between runs (fit: first seed; "
        "latency: batch 1; peak RSS of the stage process). n/a: not measured on this checkout.</p>"
    )
    for dataset, c in costs.groupby("dataset", sort=True):
        parts.append(f"<h3>{esc(dataset)}</h3>")
        parts.append(_table(c[["model", "backbone", *COSTS, "device"]], digits=1))
    parts.append('<h2 id="figures">Figures</h2>')
    parts.append(_figure(_png(reports_dir / "leaderboard.png"), "image and pixel AUROC per cell"))
    parts.append(_figure(_png(reports_dir / "curves.png"), "ROC and PR curves"))
    parts.append(_figure(_png(reports_dir / "fractals_preview.png"), "fractal pretraining images (preview)"))
    parts.append('<h2 id="galleries">Anomaly-map galleries</h2>')
    parts.append("<p>Per cell: test images, ground truth and anomaly-map overlays (highest and lowest scores).</p>")
    for cell in sorted(cells, key=lambda c: c.name):
        uri = _thumbnail(reports_dir / "cells" / cell.name / "gallery.png")
        parts.append(f"<details><summary>{esc(cell.name)}</summary>{_figure(uri, cell.name)}</details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report_page(
    quality: pd.DataFrame,
    costs: pd.DataFrame,
    cells: Iterable[Cell],
    reports_dir: Path,
    out_path: Path,
    notes: Iterable[str] = (),
    supervised: pd.DataFrame | None = None,
) -> Path:
    """Render the page and write it atomically to `out_path`."""
    write_text(Path(out_path), render_page(quality, costs, cells, reports_dir, notes, supervised))
    return Path(out_path)
