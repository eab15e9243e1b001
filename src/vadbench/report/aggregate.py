"""The aggregate step: every cell's outputs → leaderboard files and overview figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vadbench.io import write_text
from vadbench.report.html import write_report_page
from vadbench.report.leaderboard import Cell, collect, write_leaderboard
from vadbench.report.plots import plot_auroc_bars, plot_curves
from vadbench.report.supervised import collect_supervised, render_supervised

__all__ = ["Cell", "aggregate"]


def aggregate(
    cells: list[Cell],
    *,
    scores_dir: Path,
    metrics_dir: Path,
    reports_dir: Path,
    measured_dir: Path,
    report_page: Path | None = None,
    supervised_cells: list[Cell] | None = None,
    supervised_dir: Path | None = None,
) -> pd.DataFrame:
    """Write metrics/{leaderboard.csv,leaderboard.md,summary.json} (deterministic),
    <measured_dir>/{costs.json,costs.md} (measurements), reports/*.png and, when given, the shareable
    HTML page `report_page` (it shows the measurements too). `supervised_cells` (their outputs under
    `supervised_dir`) get their own "Supervised (k-fold)" section and ``metrics/supervised.csv``."""
    quality, costs = collect(cells, scores_dir, measured_dir)
    supervised = collect_supervised(supervised_cells or [], supervised_dir or Path(scores_dir) / "supervised")
    write_leaderboard(quality, costs, metrics_dir, measured_dir, supervised_section=render_supervised(supervised))
    write_text(
        Path(metrics_dir) / "supervised.csv", supervised.to_csv(index=False, float_format="%.6f", lineterminator="\n")
    )
    plot_auroc_bars(quality, Path(reports_dir) / "leaderboard.png")
    curves = {
        c.name: {
            "roc": pd.read_csv(Path(scores_dir) / c.name / "roc.csv"),
            "pr": pd.read_csv(Path(scores_dir) / c.name / "pr.csv"),
        }
        for c in cells
    }
    plot_curves(curves, {c.name: c.dataset for c in cells}, Path(reports_dir) / "curves.png")
    if report_page is not None:
        notes = sorted({n for n in quality["notes"] if n})
        write_report_page(
            quality, costs, cells, Path(reports_dir), Path(report_page), notes=notes, supervised=supervised
        )
    return quality
