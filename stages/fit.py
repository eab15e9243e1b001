"""DVC stage fit@<dataset>-<model>-<backbone>: fit one model on one dataset's normal images."""

from vadbench import layout
from vadbench.cell import CellInputs, cell_name, fit_cell
from vadbench.cli import require_in_grid, stage_main
from vadbench.config import NO_BACKBONE, Params


def run(params: Params, dataset: str, model: str, backbone: str) -> None:
    require_in_grid(params, dataset, model, backbone)
    spec = params.datasets[dataset]
    backbone_dir = None if backbone == NO_BACKBONE else layout.BACKBONES / backbone
    teacher = layout.teacher_dir(model, backbone) if model in layout.TEACHER_MODELS else None
    inputs = CellInputs(layout.PREPARED / dataset, backbone_dir, spec.image_size, spec.center_crop, teacher)
    name = cell_name(dataset, model, backbone)
    out = layout.FITS / name
    measured = layout.measured_fit(layout.MEASURED, name)
    hparams = params.models.get(model, {})
    for s in fit_cell(
        inputs, model, hparams, out, seeds=params.run.seeds, device=params.device, measured_path=measured
    ):
        print(f"fit {out.name} seed {s['seed']}: {s['fit_seconds']:.1f} s, peak RSS {s['fit_peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    stage_main(run, n_args=3)
