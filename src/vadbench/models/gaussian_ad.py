"""Gaussian AD (Rippel, Mertens & Merhof, ICPR 2020, "Modeling the Distribution of Normal Data in
Pre-Trained Deep Features for Anomaly Detection").

fit: every backbone level's feature map is globally pooled (one vector per image and level; average as the
paper, or max: `pooling`); one
multivariate Gaussian per level is fitted to the train normals' vectors with Ledoit–Wolf shrinkage
(scikit-learn's `LedoitWolf`, as the paper). predict: the image score is the sum over levels of the
Mahalanobis distances to those Gaussians. No learning beyond the moments and no randomness, so the
model has no seed. Image level only: the "map" is the score broadcast (`has_pixel_maps = False`).

Memory: the pooled vectors (N × C_l per level; 20,000 images × 512 channels = 82 MB in float64), which
Ledoit–Wolf needs; none of it depends on the image size. The paper uses EfficientNet-B4 and all nine
levels; here any timm backbone and its named layers (default: resnet18 layer1–4).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor, pick
from vadbench.data.source import as_source, float_batches
from vadbench.models.base import AnomalyModel, register_model
from vadbench.schema import StrictModel


@register_model
class GaussianAD(AnomalyModel):
    """Per-level Gaussians of globally pooled features; score = Σ Mahalanobis distances (image level)."""

    name = "gaussian_ad"
    has_pixel_maps: ClassVar[bool] = False

    class Params(StrictModel):
        """Paper: EfficientNet-B4 (ImageNet), all 9 levels, average pooling, Ledoit–Wolf, 224–380 px."""

        pooling: Literal["avg", "max"] = Field(
            "avg", description="global pooling per level: avg (paper) | max (a small defect barely moves an average)"
        )

        layers: list[str] = Field(
            ["layer1", "layer2", "layer3", "layer4"], min_length=1, description="levels, one Gaussian each"
        )
        batch_size: int = Field(16, ge=1)

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        backbone.require(self.p.layers)
        self.backbone = backbone
        # per level: mean (C_l,) and precision (C_l, C_l); sizes known after fit
        self.means = torch.nn.ParameterList()
        self.precisions = torch.nn.ParameterList()

    def _pooled(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, C, H, W) → per level the globally pooled features (B, C_l), float64."""
        feats = pick(self.backbone(images.to(self.backbone.device, torch.float32)), self.p.layers)
        if self.p.pooling == "max":
            return [f.amax(dim=(2, 3)).double() for f in feats]
        return [f.mean(dim=(2, 3)).double() for f in feats]

    @torch.no_grad()
    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Gaussians from a stream of normal images (N ≥ 2); `val` is not needed."""
        train = as_source(train)
        if len(train) < 2:
            raise ValueError(f"gaussian_ad: need at least 2 train images for a covariance, got {len(train)}")
        per_level: list[list[np.ndarray]] = [[] for _ in self.p.layers]
        for batch in float_batches(train, self.p.batch_size, self.backbone.device):
            for store, pooled in zip(per_level, self._pooled(batch)):
                store.append(pooled.cpu().numpy())
        shrinkage = {}
        from sklearn.covariance import LedoitWolf  # here: sklearn costs ~2 s to import in every stage

        means, precisions = [], []
        for layer, chunks in zip(self.p.layers, per_level):
            lw = LedoitWolf().fit(np.concatenate(chunks))
            means.append(torch.nn.Parameter(torch.from_numpy(lw.location_).float(), requires_grad=False))
            precisions.append(torch.nn.Parameter(torch.from_numpy(lw.precision_).float(), requires_grad=False))
            shrinkage[layer] = round(float(lw.shrinkage_), 6)
        self.means = torch.nn.ParameterList(means).to(self.backbone.device)
        self.precisions = torch.nn.ParameterList(precisions).to(self.backbone.device)
        return {"n_train": len(train), "shrinkage": shrinkage}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        # the ParameterLists are empty until fit: size them from the saved tensors first
        n = len(self.p.layers)
        self.means = torch.nn.ParameterList(
            torch.nn.Parameter(state[f"means.{i}"].clone(), requires_grad=False) for i in range(n)
        )
        self.precisions = torch.nn.ParameterList(
            torch.nn.Parameter(state[f"precisions.{i}"].clone(), requires_grad=False) for i in range(n)
        )

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) → (Σ_levels Mahalanobis distance (B,), score broadcast to maps (B, H, W))."""
        if len(self.means) == 0:
            raise RuntimeError("gaussian_ad: predict called before fit (no Gaussians)")
        total = torch.zeros(images.shape[0], dtype=torch.float64, device=self.backbone.device)
        for pooled, mean, precision in zip(self._pooled(images), self.means, self.precisions):
            d = pooled - mean.double()
            total += torch.einsum("bi,ij,bj->b", d, precision.double(), d).clamp_min(0).sqrt()
        scores = total.float().cpu()
        return scores, scores.view(-1, 1, 1).expand(-1, *images.shape[-2:]).contiguous()
