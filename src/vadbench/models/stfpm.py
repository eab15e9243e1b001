"""STFPM (Wang et al., BMVC 2021, "Student-Teacher Feature Pyramid Matching for Anomaly Detection").

A student network with the teacher's architecture, randomly initialised, learns to reproduce the
frozen teacher's feature pyramid (layer1–3) on normal images. Where the two disagree the image is
anomalous: per layer the discrepancy is ½‖t̂ − ŝ‖² of channel-normalised features (= 1 − cos),
upsampled to the input; the layers' maps are multiplied (the paper) or summed; score = map maximum.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor, build_feature_net, pick
from vadbench.data.source import as_source
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components import trainer
from vadbench.models.components.feature_cache import cache_modes, cache_splits, feature_cache_field
from vadbench.models.components.map_normalization import MapNormalization, PositionalMapNorm
from vadbench.models.components.patch_features import module_device
from vadbench.models.components.trainer import LoopSettings, predict_maps
from vadbench.schema import StrictModel


@register_model
class STFPM(AnomalyModel):
    """Student–teacher feature-pyramid matching. Learned state: the student network (``student.*``)."""

    name = "stfpm"

    class Params(StrictModel):
        """Defaults are a 2-core CPU budget; the paper: 100 epochs, batch 32, 256×256 inputs, SGD lr 0.4,
        momentum 0.9, weight decay 1e-4, layers 1–3 of ResNet-18, product of the layer maps."""

        layers: list[str] = Field(["layer1", "layer2", "layer3"], min_length=1, description="pyramid layers")
        epochs: int = Field(30, ge=1, le=10_000, description="maximum epochs (paper: 100)")
        batch_size: int = Field(16, ge=1, description="paper: 32")
        lr: float = Field(0.4, gt=0, le=10, description="SGD learning rate (paper: 0.4)")
        momentum: float = Field(0.9, ge=0, lt=1)
        weight_decay: float = Field(1e-4, ge=0)
        patience: int = Field(5, ge=0, description="stop after this many epochs without val improvement; 0 = never")
        map_aggregation: Literal["product", "sum"] = Field("product", description="how layer maps combine")
        amp: bool = Field(False, description="fp16 autocast on CUDA (the paper trains in fp32)")
        map_normalization: MapNormalization = Field(
            "per_position",
            description="per_position: standardise each map position with validation normals' mean/std (not in the paper; "
            "undoes border artefacts of short training); none: the paper's raw maps",
        )
        feature_cache_gb: float = feature_cache_field()
        seed: int = Field(0, ge=0)

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        backbone.require(p.layers)  # the teacher must return every pyramid layer (by name)
        self.backbone = backbone
        with torch.random.fork_rng(devices=[]):  # a seeded student init that leaves the global RNG alone
            torch.manual_seed(p.seed)
            self.student = build_feature_net(backbone.arch, p.layers)
        # timm returns features in network order whatever the order of `layers`: name them so
        info = self.student.feature_info
        self._student_layers = [info.info[i]["module"] for i in sorted(info.out_indices)]
        self.student.to(module_device(backbone))
        self.map_norm = PositionalMapNorm(p.map_normalization)

    def _teacher_targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, C, H, W) → [images, t_1, …, t_L]: the student's input with the frozen teacher's layers,
        what the feature cache stores (the teacher is fixed and training has no augmentation)."""
        return [images, *pick(self.backbone(images), self.p.layers)]

    def _pairs_of(self, images: torch.Tensor, teacher: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images (B, C, H, W) and the teacher's layers → per layer (t̂, ŝ), each (B, C_l, h_l, w_l), unit-norm
        along channels."""
        out = self.student(self.backbone.normalize(images))  # same input normalisation as the teacher
        student = pick(dict(zip(self._student_layers, out, strict=True)), self.p.layers)
        return [(F.normalize(t.float(), dim=1), F.normalize(s.float(), dim=1)) for t, s in zip(teacher, student)]

    def _pairs(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._pairs_of(images, pick(self.backbone(images), self.p.layers))

    def loss(self, batch: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Σ_layers mean over batch and positions of ½‖t̂ − ŝ‖² (the paper's 1/(2·h·w) Σ‖·‖²). `batch`: images
        (B, C, H, W), or [images, teacher layers…] from the feature cache."""
        pairs = self._pairs(batch) if isinstance(batch, torch.Tensor) else self._pairs_of(batch[0], batch[1:])
        return sum(0.5 * (t - s).pow(2).sum(1).mean() for t, s in pairs)

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → maps (B, H, W): layer maps upsampled to (H, W), multiplied or summed."""
        size = images.shape[-2:]
        out = None
        for t, s in self._pairs(images):
            layer = 0.5 * (t - s).pow(2).sum(1, keepdim=True)
            layer = F.interpolate(layer, size=size, mode="bilinear", align_corners=False)[:, 0]
            if out is None:
                out = layer
            else:
                out = out * layer if self.p.map_aggregation == "product" else out + layer
        return out

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Train the student on a stream of normal images (the shared loop: seeded order, early stopping on
        the validation loss, best epoch kept), then fit the map normalisation on the validation stream."""
        p, device = self.p, module_device(self.backbone)
        train = as_source(train)
        val = as_source(val) if val is not None and len(val) > 0 else None
        self.map_norm.check_val(val, self.name)  # fail before training, not after
        if len(train) == 0:
            raise ValueError(f"{self.name}: the train split is empty")
        self.to(device)
        optimizer = torch.optim.SGD(
            self.student.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay
        )
        # the teacher runs once per image, not once per epoch: ~¼ of an epoch's work on CPU, and eval-mode
        # features do not depend on the batch, so the student sees exactly the values it saw before
        with cache_splits(self._teacher_targets, train, val, p.batch_size, device, p.feature_cache_gb) as caches:
            train_feats, val_feats = caches
            report = trainer.train(
                trainable=self.student,
                optimizer=optimizer,
                loss_fn=self.loss,
                train=train_feats,
                val=val_feats,
                settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience, amp=p.amp),
                generator=torch.Generator().manual_seed(p.seed),
                device=device,
                desc=self.name,
                batch_fn=train_feats.to_device,
            )
        report["feature_cache"] = cache_modes(train_feats, val_feats)
        self.eval()
        self.map_norm.calibrate(self.anomaly_maps, val, p.batch_size, device, self.name)  # streamed, no_grad
        return report

    def normalized_maps(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → `anomaly_maps` after the validation-fitted normalisation (B, H, W)."""
        return self.map_norm(self.anomaly_maps(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) in [0, 1] → (scores (B,), maps (B, H, W)), float32 on CPU."""
        self.eval()
        x = images.to(module_device(self.backbone), torch.float32)
        return predict_maps(self.normalized_maps, x, self.p.batch_size)
