"""DVC stage fit@<dataset>-<model>-<backbone>: fit one model on one dataset's normal images."""

from pathlib import Path

from vadbench.cell import CellInputs, cell_name, fit_cell
from vadbench.cli import require_in_grid, stage_main
from vadbench.config import NO_BACKBONE, Params


def run(params: Params, dataset: str, model: str, backbone: str) -> None:
    require_in_grid(params, dataset, model, backbone)
    spec = params.datasets[dataset]
    backbone_dir = None if backbone == NO_BACKBONE else Path("data/backbones") / backbone
    inputs = CellInputs(Path("data/prepared") / dataset, backbone_dir, spec.image_size, spec.center_crop)
    out = Path("data/fits") / cell_name(dataset, model, backbone)
    for s in fit_cell(inputs, model, params.models.get(model, {}), out, seeds=params.run.seeds, device=params.device):
        print(f"fit {out.name} seed {s['seed']}: {s['fit_seconds']:.1f} s, peak RSS {s['fit_peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    stage_main(run, n_args=3)
