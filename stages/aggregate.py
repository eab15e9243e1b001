"""DVC stage aggregate: leaderboard, pivots, Δ-tables, summary metrics and overview plots."""

from pathlib import Path

from vadbench.cli import stage_main
from vadbench.config import NO_BACKBONE, Params
from vadbench.report.aggregate import Cell, aggregate


def run(params: Params) -> None:
    cells = [Cell(d, m, b, NO_BACKBONE if b == NO_BACKBONE else params.backbones[b].init) for d, m, b in params.run.cells()]
    aggregate(cells, scores_dir=Path("data/scores"), metrics_dir=Path("metrics"), reports_dir=Path("reports"))


if __name__ == "__main__":
    stage_main(run)
