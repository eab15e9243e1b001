"""DVC stage supervised@<dataset>-<method>-<backbone>: the supervised track's k-fold fit and score of one cell."""

from vadbench import layout
from vadbench.cli import stage_main
from vadbench.config import Params


def run(params: Params, dataset: str, method: str, backbone: str) -> None:
    from vadbench.supervised.protocol import FoldData
    from vadbench.supervised.track import run_supervised_cell

    if (dataset, method, backbone) not in params.run.supervised_cells():
        raise ValueError(
            f"{dataset}-{method}-{backbone} is not a cell of run.datasets × run.supervised_models × run.backbones"
        )
    spec = params.datasets[dataset]
    data = FoldData(
        layout.PREPARED / dataset,
        params.supervised.folds,
        params.seed,
        image_size=spec.image_size,
        center_crop=spec.center_crop,
        name=dataset,
    )
    out = layout.supervised_dir(dataset, method, backbone)
    for seed in params.run.seeds[:1]:  # one seed: the k folds already repeat the fit k times
        metrics = run_supervised_cell(
            method,
            params.supervised.method_params(method),
            data,
            layout.BACKBONES / backbone,
            out,
            seed=seed,
            device=params.device,
            measured_path=layout.measured_supervised(layout.MEASURED, out.name),
        )
    print(f"supervised {out.name}: {data.k}-fold image AUROC {metrics['image_auroc']} ({metrics['primary_variant']})")


if __name__ == "__main__":
    stage_main(run, n_args=3)
