"""The leaderboard's separate "Supervised (k-fold)" section: methods that trained on labelled anomalies.

Never merged into the one-class tables: each row says how many folds and how many labelled anomalies it used."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from vadbench.report.leaderboard import Cell, markdown_table

COLUMNS = (
    "dataset",
    "method",
    "backbone",
    "init",
    "score",
    "folds",
    "labelled_anomalies",
    "image_auroc",
    "fold_auroc_mean",
    "fold_auroc_std",
    "image_aupr",
    "image_f1",
    "image_precision",
    "image_recall",
)
NOTE = (
    "These methods trained on labelled anomalies: not comparable with the one-class leaderboard. The dataset's "
    "anomalies are split k-fold (stratified by defect type, seeded); fold f trains on the train normals + k − 2 "
    "folds, picks its threshold and epoch on the validation normals + fold f + 1, and is tested on fold f + the "
    "test normals. AUROC/AP are pooled over (fold, image) pairs; F1/precision/recall sum every fold's confusion "
    "counts at its validation threshold. `labelled_anomalies` is the number of anomalies dealt into the folds."
)


def collect_supervised(cells: list[Cell], root: Path) -> pd.DataFrame:
    """One row per supervised cell (its ``metrics.json`` under `root`), in the given order, plus one row per extra
    score variant (e.g. the classifier's TTA variants), marked in column `score`."""
    rows = []
    for c in cells:
        m = json.loads((Path(root) / c.name / "metrics.json").read_text())
        primary = m["primary_variant"]
        for variant in [primary, *sorted(v for v in m["variants"] if v != primary)]:
            v = m["variants"][variant]
            rows.append(
                {
                    "dataset": c.dataset,
                    "method": c.model,
                    "backbone": c.backbone,
                    "init": c.init,
                    "score": variant if variant == primary else f"{variant} (variant)",
                    "folds": m["folds"],
                    "labelled_anomalies": m["n_labelled_anomalies"],
                    **{k: v.get(k) for k in COLUMNS[7:]},
                }
            )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def render_supervised(table: pd.DataFrame) -> str:
    """The markdown section ("" when the grid has no supervised cells)."""
    if table.empty:
        return ""
    parts = ["\n## Supervised (k-fold)\n\n", NOTE, "\n\n"]
    for dataset, t in table.groupby("dataset", sort=True):
        parts.append(f"\n### {dataset}\n")
        parts.append(markdown_table(t.drop(columns=["dataset"]).reset_index(drop=True)))
    return "".join(parts)
