"""PANDA (Reiss et al., CVPR 2021): fine-tune a pretrained backbone to make normal features compact.

A copy of the backbone (`encoder.`) is fine-tuned on normal images with the compactness loss
‖f(x) − c‖², where f is the globally pooled (avg as the paper, or max) feature of `layers` and c the mean feature of
the train images before fine-tuning. Collapse guard: the Fisher-diagonal EWC term of the paper
needs the source-task data, which a benchmark backbone does not come with, so this
implementation uses (a) PANDA's own "early stopping" variant guards — small learning rate, few
epochs, gradient-norm clipping, BatchNorm statistics frozen, the earliest layers frozen — plus
(b) an L2-SP penalty `l2sp_weight · Σ‖θ − θ₀‖²` toward the pretrained weights (Li et al. 2018).
Anomaly score: mean Euclidean distance to the k = 2 nearest train features (kNN).
Image-level method: the "map" is the score broadcast over the image (`has_pixel_maps = False`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor
from vadbench.data.source import as_source
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components.backbone_finetune import (
    Pooling,
    l2sp_penalty,
    pooled_features,
    pooled_stream,
    set_finetune_mode,
    snapshot,
    trainable_copy,
)
from vadbench.models.components.trainer import LoopSettings, OptimizerStep
from vadbench.models.components.trainer import train as train_loop
from vadbench.schema import StrictModel

#: images per forward pass when pooling features outside training (center, kNN bank, validation, predict)
_FEATURE_BATCH = 32


@register_model
class Panda(AnomalyModel):
    """PANDA: compactness fine-tuning + kNN scoring (image level)."""

    name = "panda"
    #: no pixel localisation in the paper: maps are the image score broadcast
    has_pixel_maps: ClassVar[bool] = False

    class Params(StrictModel):
        """Defaults sized for 2 CPU cores. Paper: ResNet-152 (ImageNet), 224×224, SGD lr 1e-2,
        weight decay 5e-5, batch 32, 15 epochs, grad clip 1e-3, EWC (λ 5e4) or early stopping, k = 2."""

        layers: list[str] = Field(
            ["layer1", "layer2"], min_length=1, description="pooled, concatenated layers (paper: final only)"
        )
        pooling: Pooling = Field("max", description="global pooling per layer: avg (paper) | max (keeps small defects)")
        trainable: list[str] = Field(["layer2"], description="modules fine-tuned (PANDA: the last blocks only)")
        epochs: int = Field(10, ge=0, le=1000, description="0 = no fine-tuning (plain kNN on pretrained features, DN2)")
        batch_size: int = Field(16, ge=1, le=4096)
        lr: float = Field(0.03, gt=0, le=10, description="SGD (paper: 1e-2)")
        weight_decay: float = Field(5e-5, ge=0, le=1)
        grad_clip: float = Field(
            1.0, gt=0, description="max gradient norm per step (paper 1e-3: too slow for CPU budgets)"
        )
        l2sp_weight: float = Field(1e-2, ge=0, description="weight of Σ‖θ − θ₀‖² (stand-in for EWC)")
        patience: int = Field(0, ge=0, description="stop after this many epochs without val-loss gain; 0 = never")
        k: int = Field(2, ge=1, le=100, description="neighbours in the kNN score")
        seed: int = Field(0, ge=0, description="seeds the batch order")

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        self.backbone = backbone  # frozen original (normalisation + not saved)
        self.encoder = trainable_copy(backbone, p.trainable)  # fine-tuned copy (saved)
        backbone.require(p.layers)
        self.register_buffer("center", torch.empty(0))
        self.register_buffer("train_features", torch.empty(0, 0))

    @property
    def device(self) -> torch.device:
        return self.backbone.mean.device

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """A float batch (B, C, H, W) in [0, 1] → pooled encoder features (B, D) of `layers` (grad if enabled)."""
        x = self.backbone.normalize(images.to(self.device, torch.float32))
        return pooled_features(self.encoder, x, self.p.pooling, self.backbone.layers, self.p.layers)

    def features(self, images: Dataset | torch.Tensor, batch_size: int = _FEATURE_BATCH) -> torch.Tensor:
        """Pooled encoder features (N, D) on the model device, eval mode, no grad, `batch_size` images a pass.

        `images`: a tensor (N, C, H, W) (float in [0, 1] used as is, uint8 scaled) or an image source,
        streamed in order (only the (N, D) features are held)."""
        if isinstance(images, torch.Tensor) and images.ndim != 4:
            raise ValueError(f"panda: expected images (N, C, H, W), got shape {tuple(images.shape)}")
        set_finetune_mode(self.encoder, self.p.trainable, train=False)
        return pooled_stream(self._embed, images, batch_size, self.device)

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Fine-tune on a stream of normals; early stopping (if `patience`) on the val compactness loss."""
        p = self.p
        train = as_source(train)
        val = as_source(val) if val is not None and len(val) > 0 else None
        if len(train) < p.k:
            raise ValueError(f"panda: need at least k={p.k} train images, got {len(train)}")
        gen = torch.Generator().manual_seed(p.seed)
        center = self.features(train).mean(0)
        self.center = center
        anchor = snapshot(self.encoder)
        params = [q for q in self.encoder.parameters() if q.requires_grad]
        report: dict[str, Any] = {"epochs_run": 0}
        if p.epochs and params:

            def compactness(x: torch.Tensor) -> torch.Tensor:
                return ((self._embed(x) - center) ** 2).sum(1).mean()

            def step(x: torch.Tensor, stepper: OptimizerStep) -> tuple[float, int]:
                # the optimiser sees compactness + L2-SP; the reported loss is the compactness alone
                compact = compactness(x)
                stepper(compact + p.l2sp_weight * l2sp_penalty(self.encoder, anchor))
                return float(compact.detach()) * len(x), len(x)

            def val_loss() -> float:
                assert val is not None
                return float(((self.features(val) - center) ** 2).sum(1).mean())

            def frozen_statistics() -> None:
                # BatchNorm stays in eval mode, as in PANDA: only weights move, statistics do not
                set_finetune_mode(self.encoder, p.trainable, train=False)

            report = train_loop(
                trainable=self.encoder,
                optimizer=torch.optim.SGD(params, lr=p.lr, weight_decay=p.weight_decay),
                loss_fn=compactness,
                train=train,
                val=val,
                settings=LoopSettings(
                    epochs=p.epochs, batch_size=p.batch_size, patience=p.patience, grad_clip=p.grad_clip
                ),
                generator=gen,
                device=self.device,
                desc="panda",
                val_loss=val_loss if val is not None else None,
                train_mode=frozen_statistics,
                eval_mode=frozen_statistics,
                step_fn=step,
            )
        self.train_features = self.features(train)
        self.eval()
        return report

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) → (kNN scores (B,), score broadcast to maps (B, H, W)), float32 CPU."""
        if self.train_features.numel() == 0:
            raise RuntimeError("panda: predict called before fit (no train features)")
        feats = self.features(images)
        k = min(self.p.k, len(self.train_features))
        dist = torch.cdist(feats, self.train_features.to(feats.device))
        scores = dist.topk(k, dim=1, largest=False).values.mean(1).float().cpu()
        maps = scores.view(-1, 1, 1).expand(-1, *images.shape[-2:]).contiguous()
        return scores, maps
