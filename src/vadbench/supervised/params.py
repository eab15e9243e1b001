"""The `supervised:` section of params.yaml (torch-free: the check stage validates it without importing torch)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from vadbench.schema import StrictModel

#: the supervised methods (`run.supervised_models`); each one's params live under `supervised.<name>`
SUPERVISED_METHODS = ("classifier", "supersimplenet_supervised")


class ClassifierParams(StrictModel):
    """Defaults: a 2-core CPU budget (resnet18 up to layer2 at the dataset's size, max pooling, 1 + 16 epochs,
    batch 8). The report:
    resnet34 (set by the backbone), ImageNet weights, 224 px, head-only then all layers with layer-wise
    learning rates, minority oversampling, flips/rotations, 8-view TTA with majority vote
    (`profiles/paper.yaml` holds the values used for it here; the report gives no exact epoch counts)."""

    stage1_epochs: int = Field(1, ge=0, le=10_000, description="head only, body frozen (paper profile: 5)")
    stage2_epochs: int = Field(16, ge=0, le=10_000, description="everything, discriminative lrs (paper profile: 20)")
    batch_size: int = Field(8, ge=2, le=4096, description="images per step (paper profile: 32)")
    stage1_lr: float = Field(1e-2, gt=0, le=1, description="AdamW lr of the head in stage 1 (paper profile: 1e-3)")
    stage2_lr: float = Field(
        1e-3, gt=0, le=1, description="AdamW lr of the head and the last body stage in stage 2 (paper profile: 1e-4)"
    )
    body_lr_ratio: float = Field(
        0.1,
        gt=0,
        le=1,
        description="stage 2: first body stage's lr / stage2_lr, geometric between (paper profile: 0.01)",
    )
    weight_decay: float = Field(1e-4, ge=0, le=1)
    stage: str = Field(
        "layer2", pattern=r"^[A-Za-z0-9_.]+$", description="last body stage before the head (paper profile: layer4)"
    )
    input_size: int | None = Field(
        None,
        ge=16,
        le=4096,
        description="images resized (bilinear) to this square side before the net (null: as given)",
    )
    pool: Literal["avg", "max", "catavgmax"] = Field(
        "max", description="global pooling before the head (paper profile: catavgmax, fastai's head: avg ‖ max)"
    )
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout before the new head")
    oversample: bool = Field(True, description="repeat the minority class until the classes balance")
    augment: bool = Field(True, description="random dihedral view + photometric jitter per training image")
    jitter: float = Field(0.0, ge=0, le=1, description="contrast ×(1 ± j), brightness ± j/2 (0: dihedral views only)")
    tta: Literal["none", "mean", "vote"] = Field(
        "mean", description="image score: identity view, mean probability of 8 views, or their vote"
    )
    patience: int = Field(0, ge=0, description="stage 2 stops after this many epochs without val improvement")
    seed: int = Field(0, ge=0)


class SupervisedParams(StrictModel):
    """The supervised track (anomalies in training; its own leaderboard section, never the one-class one)."""

    folds: int = Field(5, ge=3, le=100, description="k of the k-fold split of the labelled anomalies (≥ 3)")
    classifier: ClassifierParams = ClassifierParams()
    supersimplenet_supervised: dict[str, Any] = Field(
        {}, description="SuperSimpleNet's params (models.supersimplenet keys) for its supervised mode"
    )

    def method_params(self, name: str) -> dict[str, Any]:
        if name not in SUPERVISED_METHODS:
            raise KeyError(f"unknown supervised method {name!r}; available: {list(SUPERVISED_METHODS)}")
        value = getattr(self, name)
        return value.model_dump(mode="json") if isinstance(value, StrictModel) else dict(value)
