"""EfficientAD's teacher for both sides of the peer benchmark: one distilled PDN-S per backbone, given to each.

Our pipeline distils the teacher from the cell's backbone on fractal images (stage `distill`); anomalib loads a
PDN-S from `<pretrained dir>/efficientad_pretrained_weights/pretrained_teacher_small.pth` and draws its penalty
images from an image folder (`imagenet_dir`, ImageNette by default). Here the teacher is distilled once per
backbone with params.yaml's `distill` section (as the stage does), saved in our format, and converted for anomalib:

* keys: our `nn.Sequential` indices 0, 3, 6, 8 are anomalib's conv1 … conv4 (the same layers and shapes);
* input normalisation: anomalib's PDN normalises its input with ImageNet's mean/std, ours with the backbone
  card's; folding the difference into conv1 (no padding: exact) makes both compute the same features;
* penalty images: the teacher file's fractal images, written as PNGs into an ImageFolder layout.

Parent side only (our venv): `prepare_teacher` returns the three paths, reusing a finished one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# our PDN-S (vadbench.models.components.pdn, nn.Sequential) → anomalib's SmallPatchDescriptionNetwork
PDN_S_KEYS = {"0": "conv1", "3": "conv2", "6": "conv3", "8": "conv4"}


def to_anomalib_pdn_s(state: dict[str, Any], mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """Our PDN-S state (input normalised by `mean`/`std`) → anomalib's (input normalised by ImageNet's).

    conv1 sees x_a = (x − m_a)/s_a instead of x_o = (x − m_o)/s_o, and x_o = x_a · s_a/s_o + (m_a − m_o)/s_o per
    channel: weights × s_a/s_o, bias + Σ W · (m_a − m_o)/s_o. Exact without padding (anomalib's default).
    """
    import torch

    out = {}
    for key, value in state.items():
        index, param = key.split(".", 1)
        out[f"{PDN_S_KEYS[index]}.{param}"] = value.clone()
    m_o, s_o = torch.tensor(mean), torch.tensor(std)
    m_a, s_a = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    w = state["0.weight"].double()  # (128, 3, 4, 4)
    out["conv1.weight"] = (w * (s_a / s_o).double().view(1, 3, 1, 1)).float()
    shift = ((m_a - m_o) / s_o).double().view(1, 3, 1, 1)
    out["conv1.bias"] = (state["0.bias"].double() + (w * shift).sum((1, 2, 3))).float()
    return out


def prepare_teacher(
    out: Path, backbone_dir: Path, fractals: Path, distill: dict[str, Any], seed: int
) -> dict[str, Path]:
    """Distil (once) a PDN-S teacher from the backbone at `backbone_dir` on the fractals at `fractals`.

    Returns {"ours": dir for `EfficientAD.use_teacher`, "anomalib_root": the directory anomalib's
    `get_pretrained_weights_dir` must return, "penalty": anomalib's `imagenet_dir`}.
    """
    import torch
    from PIL import Image

    from vadbench.backbones import load_feature_extractor, read_card
    from vadbench.models.components.teacher_distill import (
        TEACHER_FILE,
        FractalImages,
        distill_teacher,
        load_teacher,
        penalty_subset,
        save_teacher,
    )

    paths = {"ours": out / "ours", "anomalib_root": out / "anomalib", "penalty": out / "penalty"}
    anomalib_file = paths["anomalib_root"] / "efficientad_pretrained_weights" / "pretrained_teacher_small.pth"
    if not anomalib_file.is_file():
        if not (fractals / "manifest.csv").is_file():
            raise FileNotFoundError(
                f"{fractals}: no fractal images for EfficientAD's teacher (run `dvc repro fractals` or pass "
                "--fractals-dir)"
            )
        card = read_card(backbone_dir)
        layers = list(distill["layers"])
        extractor = load_feature_extractor(backbone_dir, layers, torch.device("cpu"))
        distill_images = FractalImages(fractals, int(distill["image_size"]))
        state, report = distill_teacher(
            extractor,
            distill_images,
            size="small",
            layers=layers,
            image_size=int(distill["image_size"]),
            steps=int(distill["steps"]),
            batch_size=int(distill["batch_size"]),
            lr=float(distill["lr"]),
            weight_decay=float(distill["weight_decay"]),
            grayscale=float(distill["grayscale"]),
            norm_images=int(distill["norm_images"]),
            seed=seed,
        )
        with Image.open(fractals / distill_images.paths[0]) as im:
            native = im.size[0]
        images = FractalImages(fractals, native)
        penalty = penalty_subset(images, int(distill["penalty_images"]), seed)
        meta = {"arch": card.arch, "layers": layers, "distill": distill, "seed": seed, **report}
        paths["ours"].mkdir(parents=True, exist_ok=True)
        save_teacher(paths["ours"] / TEACHER_FILE, "small", state, penalty, meta)
        (paths["penalty"] / "fractal").mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(penalty):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths["penalty"] / "fractal" / f"p{i:04d}.png")
        anomalib_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = anomalib_file.with_suffix(".tmp")
        torch.save(to_anomalib_pdn_s(state, card.mean, card.std), tmp)
        tmp.rename(anomalib_file)  # last: its presence marks the whole teacher as finished
        print(f"teacher: PDN-S distilled ({distill['steps']} steps) → {out}", flush=True)
    load_teacher(paths["ours"], "small")  # fails loudly on a damaged one
    return paths
