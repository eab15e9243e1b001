"""DVC stage distill@<model>-<backbone>: EfficientAD's teacher PDN, distilled once per backbone (not per dataset).

For a model in `layout.TEACHER_MODELS` (efficientad_s / efficientad_m): distil the backbone's `distill.layers`
features into a PDN of that model's size on the fractal images, and store it with the penalty images
(data/teachers/<model>-<backbone>/{teacher.pt, card.json}). For every other model: a small constant
marker (card.json) written without importing torch, so the stage costs ~nothing when EfficientAD is not in
the grid, and adding or removing EfficientAD never changes another model's fit dependencies.
"""

import json
import sys
import time

from vadbench import layout
from vadbench.io import atomic_dir


def write_marker(model: str, backbone: str) -> None:
    with atomic_dir(layout.teacher_dir(model, backbone)) as tmp:
        marker = {"model": model, "backbone": backbone, "teacher": None}
        (tmp / "card.json").write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def run(params, model: str, backbone: str) -> None:
    import torch

    from vadbench.backbones import load_feature_extractor, read_card
    from vadbench.cli import require_in_grid
    from vadbench.config import ParamsError
    from vadbench.models.components.teacher_distill import (
        CARD_FILE,
        TEACHER_FILE,
        FractalImages,
        distill_teacher,
        penalty_subset,
        save_teacher,
    )
    from vadbench.runtime import seed_everything, select_device, set_deterministic

    if model not in params.run.models or backbone not in params.run.backbones:
        raise ParamsError(f"{model} × {backbone} is not in run.models × run.backbones")
    require_in_grid(params, params.run.datasets[0], model, backbone)
    d = params.distill
    layers = list(params.model_params(model).layers)  # type: ignore[attr-defined]
    if layers != list(d.layers):
        raise ParamsError(f"models.{model}.layers {layers} must equal distill.layers {list(d.layers)}")
    size = layout.TEACHER_MODELS[model]
    device = select_device(params.device)
    set_deterministic(True)
    seed_everything(params.seed)
    backbone_dir = layout.BACKBONES / backbone
    extractor = load_feature_extractor(backbone_dir, d.layers, device)
    images = FractalImages(layout.FRACTALS, d.image_size)
    start = time.perf_counter()
    state, report = distill_teacher(
        extractor,
        images,
        size=size,
        layers=d.layers,
        image_size=d.image_size,
        steps=d.steps,
        batch_size=d.batch_size,
        lr=d.lr,
        weight_decay=d.weight_decay,
        grayscale=d.grayscale,
        norm_images=d.norm_images,
        seed=params.seed,
        device=device,
    )
    # penalty images: a seeded subset of the fractals at their own size (the model resizes them)
    penalty = penalty_subset(FractalImages(layout.FRACTALS, params.fractals.image_size), d.penalty_images, params.seed)
    card = read_card(backbone_dir)
    meta = {
        "model": model,
        "backbone": backbone,
        "size": size,
        "arch": card.arch,
        "init": card.init,
        "layers": list(d.layers),
        "distill": d.model_dump(mode="json"),
        "seed": params.seed,
        "torch_threads": torch.get_num_threads(),
        "penalty_images": len(penalty),
        **report,
    }
    with atomic_dir(layout.teacher_dir(model, backbone)) as tmp:
        save_teacher(tmp / TEACHER_FILE, size, state, penalty, meta)
        (tmp / CARD_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(
        f"distill {model}-{backbone}: PDN-{size}, {d.steps} steps, final loss {report['final_loss']:.4f}, "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 2 and args[0] not in layout.TEACHER_MODELS:
        write_marker(*args)  # no teacher to distil: no params to read, no torch to load
    else:
        from vadbench.cli import stage_main

        stage_main(run, n_args=2)
