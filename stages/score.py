"""DVC stage score@<dataset>-<model>-<backbone>: score the test split, compute metrics and costs."""

from vadbench import layout
from vadbench.cell import CellInputs, ScoreSettings, cell_name, score_cell
from vadbench.cli import require_in_grid, stage_main
from vadbench.config import NO_BACKBONE, Params


def run(params: Params, dataset: str, model: str, backbone: str) -> None:
    require_in_grid(params, dataset, model, backbone)
    spec = params.datasets[dataset]
    backbone_dir = None if backbone == NO_BACKBONE else layout.BACKBONES / backbone
    inputs = CellInputs(layout.PREPARED / dataset, backbone_dir, spec.image_size, spec.center_crop)
    name = cell_name(dataset, model, backbone)
    settings = ScoreSettings(
        batch_size=params.score.batch_size,
        latency_warmup=params.score.latency_warmup,
        latency_repeats=params.score.latency_repeats,
        threshold_quantile=params.aggregate.threshold_quantile,
        aupro_fpr_limit=params.aggregate.aupro_fpr_limit,
    )
    result = score_cell(
        inputs,
        layout.FITS / name,
        layout.SCORES / name,
        layout.REPORTS / "cells" / name,
        settings,
        seeds=params.run.seeds,
        device=params.device,
        gallery_size=params.aggregate.gallery_size,
        measured_path=layout.measured_score(layout.MEASURED, name),
    )
    m = result["metrics"]
    print(f"score {name}: image AUROC {m['image_auroc']}, pixel AUROC {m['pixel_auroc']}, AUPRO {m['pixel_aupro']}")


if __name__ == "__main__":
    stage_main(run, n_args=3)
