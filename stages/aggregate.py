"""DVC stage aggregate: leaderboard, pivots, Δ-tables, summary metrics and overview plots."""

from pathlib import Path

from vadbench.cli import stage_main
from vadbench.config import Params
from vadbench.report.aggregate import Cell, aggregate


def run(params: Params) -> None:
    cells = [
        Cell(d, m, b, params.backbones[b].init)
        for d in params.run.datasets
        for m in params.run.models
        for b in params.run.backbones
    ]
    aggregate(cells, scores_dir=Path("data/scores"), metrics_dir=Path("metrics"), reports_dir=Path("reports"))


if __name__ == "__main__":
    stage_main(run)
