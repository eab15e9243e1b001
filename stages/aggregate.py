"""DVC stage aggregate: leaderboard, pivots, Δ-tables, summary metrics and overview plots."""

from vadbench import layout
from vadbench.cli import stage_main
from vadbench.config import NO_BACKBONE, Params
from vadbench.report.aggregate import Cell, aggregate


def run(params: Params) -> None:
    cells = [
        Cell(d, m, b, NO_BACKBONE if b == NO_BACKBONE else params.backbones[b].init) for d, m, b in params.run.cells()
    ]
    aggregate(
        cells,
        scores_dir=layout.SCORES,
        metrics_dir=layout.METRICS,
        reports_dir=layout.REPORTS,
        measured_dir=layout.MEASURED,
        report_page=layout.REPORT_PAGE,
        supervised_cells=[Cell(d, m, b, params.backbones[b].init) for d, m, b in params.run.supervised_cells()],
        supervised_dir=layout.SUPERVISED,
    )


if __name__ == "__main__":
    stage_main(run)
