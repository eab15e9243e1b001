"""Collect every cell's metrics into the leaderboard, pivots, Δ-tables and summary files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vadbench.io import write_json, write_text
from vadbench.layout import measured_fit, measured_score

QUALITY = (
    "image_auroc",
    "image_aupr",
    "image_f1_max",
    "image_f1",
    "pixel_auroc",
    "pixel_aupr",
    "pixel_f1_max",
    "pixel_aupro",
)
#: measured (vary between runs; metrics/measured/) and deterministic (parameters, bytes: in metrics.json)
COSTS = (
    "fit_seconds",
    "latency_ms",
    "throughput_ips",
    "fit_peak_rss_mb",
    "score_peak_rss_mb",
    "parameters",
    "model_bytes",
)
_DETERMINISTIC_COSTS = ("parameters", "model_bytes")
DELTA_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


@dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    backbone: str
    init: str  # the backbone's weight source: random | fractal | imagenet | file

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.model}-{self.backbone}"


def _read_measured(path: Path) -> dict[str, Any]:
    """A cell's measurements, or {} (costs then show n/a) — e.g. after a `dvc checkout` on another machine."""
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(cells: list[Cell], scores_dir: Path, measured_dir: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(quality table, cost table), one row per cell, in a stable order.

    Quality from each cell's deterministic ``metrics.json``; measured costs from `measured_dir`
    (`vadbench.layout.measured_fit` / `measured_score`, first seed's fit)."""
    quality, costs = [], []
    for cell in cells:
        cdir = Path(scores_dir) / cell.name
        if not (cdir / "metrics.json").is_file():
            raise FileNotFoundError(f"{cdir / 'metrics.json'} missing: run `dvc repro score@{cell.name}`")
        m = json.loads((cdir / "metrics.json").read_text())
        c = {k: m.get(k) for k in _DETERMINISTIC_COSTS}
        if measured_dir is not None:
            fits = _read_measured(measured_fit(measured_dir, cell.name))
            first_seed = str((m.get("seeds") or [0])[0])
            c.update(fits.get(first_seed, {}))
            c.update(_read_measured(measured_score(measured_dir, cell.name)))
        key = {"dataset": cell.dataset, "model": cell.model, "backbone": cell.backbone, "init": cell.init}
        notes = []
        if m.get("center_crop"):
            notes.append(f"center-crop {m['center_crop']}")
        reasons = sorted(set((m.get("na_reasons") or {}).values()))
        notes.extend(f"n/a: {r}" for r in reasons)
        stds = {f"{k}_std": m.get(f"{k}_std") for k in QUALITY}
        seeds = m.get("seeds") or [None]
        quality.append(
            {
                **key,
                **{k: m.get(k) for k in QUALITY},
                **stds,
                "n_seeds": len(seeds),
                "image_size": m.get("image_size"),
                "notes": "; ".join(notes),
            }
        )
        costs.append({**key, **{k: c.get(k) for k in COSTS}, "device": c.get("device")})
    order = ["dataset", "model", "backbone"]
    q = pd.DataFrame(quality).sort_values(order, kind="stable").reset_index(drop=True)
    k = pd.DataFrame(costs).sort_values(order, kind="stable").reset_index(drop=True)
    return q, k


def delta_table(quality: pd.DataFrame) -> pd.DataFrame:
    """Δ = fractal − random and fractal − imagenet, per dataset, model and metric."""
    rows = []
    for (dataset, model), group in quality.groupby(["dataset", "model"], sort=True):
        by_init = {r["backbone"]: r for _, r in group.iterrows()}
        fractal = [b for b, r in by_init.items() if r["init"] == "fractal"]
        others = [b for b, r in by_init.items() if r["init"] in ("random", "imagenet")]
        for fb in sorted(fractal):
            for ob in sorted(others):
                row: dict[str, Any] = {"dataset": dataset, "model": model, "comparison": f"{fb} − {ob}"}
                for metric in DELTA_METRICS:
                    a, b = by_init[fb][metric], by_init[ob][metric]
                    row[metric] = None if _missing(a) or _missing(b) else round(a - b, 6)
                rows.append(row)
    return pd.DataFrame(rows, columns=["dataset", "model", "comparison", *DELTA_METRICS])


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(v: Any, digits: int = 3) -> str:
    if _missing(v):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    if df.empty:
        return "_(none)_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], digits) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_leaderboard(
    quality: pd.DataFrame, costs: pd.DataFrame, metrics_dir: Path, measured_dir: Path, supervised_section: str = ""
) -> None:
    """metrics/leaderboard.{csv,md}, metrics/summary.json (deterministic); costs.{json,md} in `measured_dir`."""
    metrics_dir, measured_dir = Path(metrics_dir), Path(measured_dir)
    # std columns only when some cell ran several seeds: single-seed tables stay narrow
    multi = bool((quality["n_seeds"] > 1).any())
    table = quality if multi else quality.drop(columns=[f"{k}_std" for k in QUALITY])
    write_text(metrics_dir / "leaderboard.csv", table.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
    summary: dict[str, Any] = {}
    keys = [*QUALITY, *(f"{k}_std" for k in QUALITY)] if multi else list(QUALITY)
    for _, r in quality.iterrows():
        cell = summary.setdefault(r["dataset"], {}).setdefault(r["model"], {})
        cell[r["backbone"]] = {k: (None if _missing(r[k]) else round(float(r[k]), 6)) for k in keys}
    write_json(metrics_dir / "summary.json", summary)
    cost_summary: dict[str, Any] = {}
    for _, r in costs.iterrows():
        entry = cost_summary.setdefault(r["dataset"], {}).setdefault(r["model"], {})
        entry[r["backbone"]] = {k: (None if _missing(r[k]) else r[k]) for k in (*COSTS, "device")}
    write_json(measured_dir / "costs.json", json.loads(json.dumps(cost_summary, default=float)))
    # the supervised track's own section comes after every one-class table (report/supervised.py)
    write_text(metrics_dir / "leaderboard.md", render_markdown(quality) + supervised_section)
    write_text(measured_dir / "costs.md", render_costs(costs))


PROTOCOL_NOTE = (
    "Quality metrics are deterministic for fixed params, seed and torch thread count on one machine kind. "
    "Costs (time, memory, latency) are measurements and vary between runs: `metrics/measured/costs.md`. "
    "Pixel AUPRO is integrated to FPR "
    "0.3 and normalised (MVTec AD definition). Thresholded F1 uses a threshold from validation normals only."
)


@dataclass(frozen=True)
class DatasetViews:
    """The tables of one dataset, shared by the markdown leaderboard and the HTML report."""

    ranked: pd.DataFrame  # one row per cell, best image AUROC first, "mean ± std" strings where several seeds
    pivot: pd.DataFrame  # model × backbone: "image AUROC / pixel AUROC", "—" where the grid has no such cell
    deltas: pd.DataFrame  # Δ fractal − random / imagenet per model and metric


def dataset_views(quality: pd.DataFrame) -> dict[str, DatasetViews]:
    """{dataset: its tables}, datasets in sorted order."""
    views = {}
    for dataset, q in quality.groupby("dataset", sort=True):
        ranked = q.sort_values(["image_auroc", "model", "backbone"], ascending=[False, True, True], kind="stable")
        shown = ranked[["model", "backbone", "init", *QUALITY, "n_seeds", "notes"]].astype(object)
        for k in QUALITY:  # mean ± std over seeds where there are several
            shown[k] = [
                _fmt(v) if _missing(sd) else f"{_fmt(v)} ± {_fmt(sd)}" for v, sd in zip(ranked[k], ranked[f"{k}_std"])
            ]
        pivot = q.pivot(index="model", columns="backbone", values="image_auroc")
        pix = q.pivot(index="model", columns="backbone", values="pixel_auroc")
        # backbone "none" (pixel models) last; "—" where the grid has no such cell, "n/a" for a missing metric
        pivot = pivot[sorted(pivot.columns, key=lambda b: (b == "none", b))]
        cells = set(zip(q["model"], q["backbone"]))
        table = pivot.copy().astype(object)
        for model in table.index:
            for bb in table.columns:
                has = (model, bb) in cells
                table.loc[model, bb] = f"{_fmt(pivot.loc[model, bb])} / {_fmt(pix.loc[model, bb])}" if has else "—"
        deltas = delta_table(q)
        views[dataset] = DatasetViews(
            ranked=shown.reset_index(drop=True),
            pivot=table.reset_index(),
            deltas=deltas.drop(columns=["dataset"]) if not deltas.empty else deltas,
        )
    return views


def render_markdown(quality: pd.DataFrame) -> str:
    parts = ["# vadbench leaderboard\n\n", PROTOCOL_NOTE, "\n"]
    for dataset, views in dataset_views(quality).items():
        parts.append(f"\n## {dataset}\n")
        parts.append(markdown_table(views.ranked))
        parts.append("\n### Image AUROC / pixel AUROC (model × backbone)\n")
        parts.append(markdown_table(views.pivot))
        parts.append("\n### Δ fractal vs other weight sources (positive = fractal better)\n")
        parts.append(markdown_table(views.deltas, digits=3))
    return "".join(parts)


def render_costs(costs: pd.DataFrame) -> str:
    parts = [
        "# vadbench costs\n\nMeasured on the machine named in `device`; they vary between runs "
        "(fit: first seed; latency: batch 1; peak RSS of the stage process).\n"
    ]
    for dataset, c in costs.groupby("dataset", sort=True):
        parts.append(f"\n## {dataset}\n")
        parts.append(markdown_table(c[["model", "backbone", *COSTS, "device"]], digits=1))
    return "".join(parts)
