"""Which model runs how on each side: our hyperparameters, anomalib's arguments, and what still differs.

Pure python (no torch, no anomalib): the parent, both children and the tests import it.

Our side starts from params.yaml's `models.<name>` section; where anomalib hard-codes a value that we expose
as a parameter (STFPM's weight decay, RD's learning rate, …) ours is moved to anomalib's value, so both sides
run the same recipe. What cannot be aligned is listed in `ModelSpec.mismatches` and printed in the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# params.yaml's model names; anomalib's class names under `anomalib.models`
PEER_CLASS = {
    "patchcore": "Patchcore",
    "padim": "Padim",
    "stfpm": "Stfpm",
    "fastflow": "Fastflow",
    "reverse_distillation": "ReverseDistillation",
    "cflow": "Cflow",
    "efficientad_s": "EfficientAd",
}
DEFAULT_MODELS = ("patchcore", "padim", "stfpm", "fastflow", "reverse_distillation", "cflow")
# on request: EfficientAD's networks run at ≥ 256 px on both sides (anomalib's autoencoder needs 256), ~3.7 s per
# batch-1 step on 2 CPU cores, so one epoch of synthetic_sem's 100 train images is ~6 min per fit per side
ALL_MODELS = (*DEFAULT_MODELS, "efficientad_s")


@dataclass(frozen=True)
class ModelSpec:
    """One model on both sides.

    ours: hyperparameters for `vadbench.models.create_model` (params.yaml values with the overrides applied);
    peer: keyword arguments of anomalib's Lightning module (besides pre/post-processor, evaluator, visualizer);
    epochs: trainer epochs on both sides (None: a one-pass model); mismatches: what still differs;
    needs_val: both sides fit with the validation normals (ours `fit(train, val)`, anomalib a val loader).
    """

    name: str
    ours: dict[str, Any]
    peer: dict[str, Any]
    epochs: int | None
    mismatches: tuple[str, ...] = field(default_factory=tuple)
    needs_val: bool = False


RESNET_STRIDE = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def jl_min_dim(n_samples: int, eps: float) -> int:
    """The projection size anomalib's coreset uses: the Johnson–Lindenstrauss bound, as sklearn computes it."""
    from sklearn.random_projection import johnson_lindenstrauss_min_dim  # the parent only; keeps imports light

    return int(johnson_lindenstrauss_min_dim(n_samples, eps=eps))


def train_patches(n_train: int, image_size: int, layers: list[str]) -> int:
    """PatchCore's bank rows before the coreset: one per position of the first layer's grid per train image."""
    side = image_size // RESNET_STRIDE[layers[0]]
    return n_train * side * side


def build_spec(
    name: str,
    params: dict[str, Any],
    arch: str,
    epochs: int,
    coreset_ratio: float | None,
    patches: int | None = None,
    n_train: int | None = None,
    image_size: int | None = None,
) -> ModelSpec:
    """`params`: params.yaml's `models.<name>` section; `epochs`: for every trained model, both sides;
    `patches`: PatchCore's bank rows before the coreset (`train_patches`), for anomalib's projection size;
    `n_train`, `image_size`: EfficientAD's steps (epochs × train images at batch 1) and network input."""
    if name not in PEER_CLASS:
        raise ValueError(f"no anomalib counterpart for {name!r}; choose from {sorted(PEER_CLASS)}")
    ours = {k: v for k, v in params.items() if k != "seed"}
    if name == "patchcore":
        if coreset_ratio is not None:
            ours["coreset_ratio"] = coreset_ratio
        ours.update(memory_budget_gb=8.0)  # single pass, as anomalib (the budget only matters at scale)
        if patches is not None:
            # anomalib's KCenterGreedy: SparseRandomProjection(eps=0.9) to the JL dimension of N rows (305 at
            # 238,592), one random start; ours moves to the same projection size and a single start
            ours.update(projection_dim=jl_min_dim(patches, 0.9), num_starts=1)
        peer = dict(
            backbone=arch,
            layers=list(ours["layers"]),
            coreset_sampling_ratio=ours["coreset_ratio"],
            num_neighbors=ours["num_neighbors"],
        )
        notes = (
            f"coreset: same ratio, JL projection to {ours['projection_dim']} dims and one random start on both sides; "
            "ours a dense Gaussian projection, anomalib a sparse one (SparseRandomProjection): different picks",
            f"ours neighborhood {ours['neighborhood']}, σ={ours['sigma']}; anomalib AvgPool 3×3, Gaussian σ=4 (same)",
        )
        return ModelSpec(name, ours, peer, None, notes)
    if name == "padim":
        peer = dict(backbone=arch, layers=list(ours["layers"]), n_features=ours["n_features"])
        notes = ("the random channel subset is drawn by each library's own RNG: same size, other channels",)
        return ModelSpec(name, ours, peer, None, notes)
    if name == "stfpm":
        # anomalib: SGD lr 0.4, momentum 0.9, weight decay 1e-3, raw product of the per-layer maps, no early stop.
        # Its loss SUMS over the batch (MSELoss(reduction="sum") · 0.5/(h·w)); ours averages. With SGD that makes
        # anomalib's steps batch_size× ours: lr × B and weight decay ÷ B on our side give the same SGD trajectory
        # (momentum buffer = anomalib's / B, update identical), so both run anomalib's effective recipe.
        b = int(ours["batch_size"])
        ours.update(epochs=epochs, patience=0, lr=0.4 * b, momentum=0.9, weight_decay=0.001 / b)
        ours.update(map_normalization="none", map_aggregation="product")
        peer = dict(backbone=arch, layers=list(ours["layers"]))
        notes = (
            f"anomalib's loss sums over the batch, ours averages: ours runs at lr 0.4×{b} and weight decay 0.001/{b}, "
            "the same SGD trajectory (a last partial batch still differs: anomalib's sum shrinks with it)",
            "the random student init comes from each library's own RNG",
        )
        return ModelSpec(name, ours, peer, epochs, notes)
    if name == "fastflow":
        ours.update(epochs=epochs, patience=0, lr=0.001, weight_decay=0.00001)
        peer = dict(
            backbone=arch,
            flow_steps=ours["flow_steps"],
            conv3x3_only=ours["conv3x3_only"],
            hidden_ratio=ours["hidden_ratio"],
        )
        notes = (
            f"anomalib hard-codes resnet18's layers (layer1-3); ours uses {ours['layers']}",
            "ours caches the frozen features once (feature_cache_gb); anomalib recomputes them every epoch",
        )
        return ModelSpec(name, ours, peer, epochs, notes)
    if name == "reverse_distillation":
        # anomalib: Adam lr 0.005, betas (0.5, 0.99), summed maps (mode ADD), σ=4
        ours.update(epochs=epochs, patience=0, lr=0.005, beta1=0.5, beta2=0.99, map_normalization="none")
        peer = dict(backbone=arch, layers=list(ours["layers"]))
        notes = (
            "same OCBE and de_resnet layout, loss (1 − cos of flattened maps) and init scheme (Kaiming fan-out); "
            "the init draws come from each library's own RNG",
            "the σ=4 blur pads differently: ours repeats the edge pixel (scipy, the official code), anomalib reflects "
            "without it; the image score is the map maximum, often in that border band (docs/MODELS.md)",
        )
        return ModelSpec(name, ours, peer, epochs, notes)
    if name == "efficientad_s":
        return _efficientad(ours, epochs, n_train, image_size)
    # cflow
    ours.update(epochs=epochs, patience=0)
    peer = dict(
        backbone=arch,
        layers=list(ours["layers"]),
        fiber_batch_size=ours["fiber_batch_size"],
        condition_vector=ours["condition_vector"],
        coupling_blocks=ours["coupling_blocks"],
        clamp_alpha=ours["clamp"],
        permute_soft=ours["soft_permutation"],
        lr=ours["lr"],
    )
    notes = (
        "an epoch: ours is one pass over all fibers; anomalib's is one pass over the images with one optimiser step "
        "per fiber batch of each image batch (the same fibers, grouped differently)",
    )
    return ModelSpec(name, ours, peer, epochs, notes)


def _efficientad(ours: dict[str, Any], epochs: int, n_train: int | None, image_size: int | None) -> ModelSpec:
    """EfficientAD-S at anomalib's training shape: batch 1, `epochs` passes over the train images, Adam."""
    if n_train is None or image_size is None:
        raise ValueError("efficientad_s needs n_train and image_size (its steps and network input)")
    # anomalib trains at batch 1 (it refuses any other) for max_epochs; ours counts steps: the same number.
    # Network input ≥ 256 px: anomalib's autoencoder has a fixed 8×8 bottleneck convolution (ours scales it)
    net = max(256, -(-image_size // 32) * 32)
    ours.update(batch_size=1, steps=epochs * n_train, image_size=net, patience=0, teacher="distilled")
    peer = dict(
        teacher_out_channels=384,
        model_size="small",
        lr=ours["lr"],
        weight_decay=ours["weight_decay"],
        padding=False,
        pad_maps=True,
    )
    notes = (
        "the same distilled PDN-S teacher on both sides (params.yaml's distill section, on our fractals; converted to "
        "anomalib's layout with its ImageNet input normalisation folded into conv1); student and autoencoder inits "
        "from each library's RNG",
        "penalty images: the same fractal images; anomalib resizes them to twice the input and centre-crops "
        "(a 2× zoom), ours resizes them to the input",
        "map normalisation (0.9 / 0.995 quantiles of the validation normals' maps, both sides): anomalib takes them "
        "over the padded, upsampled full-size maps, ours over the PDN-grid maps",
        "lr × 0.1: ours from step ⌈0.95·N⌉, anomalib's StepLR at step ⌊0.95·N⌋",
        f"networks at {net} px on both sides (anomalib's autoencoder needs 256: a fixed 8×8 bottleneck); anomalib's "
        f"maps come back at {net} px and are resized to the images' {image_size} px, ours are upsampled to it from "
        "the PDN grid"
        + (
            f"; anomalib sizes its penalty images from the {image_size} px dataset images, not its {net} px input"
            if net != image_size
            else ""
        ),
    )
    return ModelSpec("efficientad_s", ours, peer, epochs, notes, needs_val=True)
