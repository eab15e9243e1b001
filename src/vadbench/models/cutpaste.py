"""CutPaste (Li et al., CVPR 2021): self-supervised 3-way classifier + Gaussian density of its features.

A copy of the backbone (`encoder.`) and a small MLP head learn to tell normal images from their
CutPaste and CutPaste-Scar versions (3-way). Then a Gaussian is fitted to the pooled encoder
features of the train normals (mean + Ledoit-Wolf shrunk covariance, sklearn); the anomaly score
is the Mahalanobis distance to it. Image-level variant only (the patch variant scores hundreds of
crops per image, beyond the CPU budget): maps are the score broadcast (`has_pixel_maps = False`).

Training runs in the shared loop (`components.trainer`); each batch's augmentations are drawn from the
model's generator right after that epoch's permutation, batch after batch. The validation pretext loss
streams the val set in two passes (originals + CutPaste, then Scar) so its augmentations are exactly
those `three_way_batch` would draw over the whole set at once (seed + 1).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor
from vadbench.data.source import as_source
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components.backbone_finetune import (
    Pooling,
    float_chunks,
    pooled_features,
    pooled_stream,
    set_finetune_mode,
    trainable_copy,
)
from vadbench.models.components.cutpaste_augment import cutpaste_batch, scar_batch, three_way_batch
from vadbench.models.components.trainer import LoopSettings
from vadbench.models.components.trainer import train as train_loop
from vadbench.schema import StrictModel

#: images per forward pass outside training (Gaussian fit, pretext loss, predict)
_FEATURE_BATCH = 32


def _head(in_dim: int, hidden: list[int], n_classes: int = 3) -> nn.Sequential:
    """Projection MLP (Linear-BN-ReLU per hidden width) then a linear classifier."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, n_classes))


@register_model
class CutPaste(AnomalyModel):
    """CutPaste-3way + Gaussian density estimation (image level)."""

    name = "cutpaste"
    has_pixel_maps: ClassVar[bool] = False

    class Params(StrictModel):
        """Defaults sized for 2 CPU cores. Paper: ResNet-18 (ImageNet), 256×256, head 512×8 → 128,
        SGD lr 0.03 momentum 0.9 weight decay 3e-5, cosine schedule, batch 96 (32 per class), 256 epochs."""

        layers: list[str] = Field(
            ["layer1", "layer2", "layer3"], min_length=1, description="pooled, concatenated layers (paper: final only)"
        )
        pooling: Pooling = Field("max", description="global pooling per layer: avg (paper) | max (keeps small defects)")
        trainable: list[str] = Field(["layer3"], description="backbone modules fine-tuned (paper: all)")
        head_dims: list[int] = Field([128], description="hidden widths of the projection MLP")
        epochs: int = Field(5, ge=0, le=10000)
        batch_size: int = Field(8, ge=2, le=4096, description="normal images per step (×3 with augmentations)")
        lr: float = Field(0.03, gt=0, le=10)
        momentum: float = Field(0.9, ge=0, lt=1)
        weight_decay: float = Field(3e-5, ge=0, le=1)
        jitter: float = Field(0.1, ge=0, le=1, description="brightness/contrast jitter of pasted content")
        patience: int = Field(0, ge=0, description="stop after this many epochs without val-loss gain; 0 = never")
        seed: int = Field(0, ge=0, description="seeds head init, augmentations and batch order")

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        if any(w < 1 for w in p.head_dims):
            raise ValueError(f"cutpaste: head_dims must be positive, got {p.head_dims}")
        self.backbone = backbone  # frozen original (normalisation; not saved)
        self.encoder = trainable_copy(backbone, p.trainable)  # fine-tuned copy (saved)
        in_dim = sum(backbone.channels_of(p.layers))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            self.head = _head(in_dim, p.head_dims).to(self.device)
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("precision", torch.empty(0, 0))

    @property
    def device(self) -> torch.device:
        return self.backbone.mean.device

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """A float batch (B, C, H, W) in [0, 1] → pooled encoder features (B, D) of `layers` (grad if enabled)."""
        x = self.backbone.normalize(images.to(self.device, torch.float32))
        return pooled_features(self.encoder, x, self.p.pooling, self.backbone.layers, self.p.layers)

    def _eval_mode(self) -> None:
        set_finetune_mode(self.encoder, self.p.trainable, train=False)
        self.head.eval()

    @torch.no_grad()
    def embeddings(self, images: Dataset | torch.Tensor, batch_size: int = _FEATURE_BATCH) -> torch.Tensor:
        """Pooled encoder features (N, D) (eval mode, no grad) of a tensor (N, C, H, W) in [0, 1] or of an
        image source streamed in order."""
        if isinstance(images, torch.Tensor) and images.ndim != 4:
            raise ValueError(f"cutpaste: expected images (N, C, H, W), got shape {tuple(images.shape)}")
        set_finetune_mode(self.encoder, self.p.trainable, train=False)
        return pooled_stream(self._embed, images, batch_size, self.device)

    @torch.no_grad()
    def pretext_loss(self, images: Dataset | torch.Tensor, seed: int, batch_size: int = _FEATURE_BATCH) -> float:
        """3-way cross-entropy (eval mode) on images + their augmentations drawn with `seed`, batch by batch.

        The draws equal ``three_way_batch(all images, Generator(seed))``: every CutPaste first (pass 1, with
        the originals), then every Scar (pass 2), on one generator; only one batch is in memory."""
        self._eval_mode()
        gen = torch.Generator().manual_seed(seed)
        total, n = 0.0, 0

        def summed_ce(x: torch.Tensor, label: int) -> float:
            y = torch.full((len(x),), label, dtype=torch.int64, device=self.device)
            return float(F.cross_entropy(self.head(self._embed(x)), y, reduction="sum"))

        for x in float_chunks(images, batch_size, self.device):
            total += summed_ce(x, 0) + summed_ce(cutpaste_batch(x, gen, self.p.jitter), 1)
            n += len(x)
        for x in float_chunks(images, batch_size, self.device):
            total += summed_ce(scar_batch(x, gen, self.p.jitter), 2)
        if n == 0:
            raise ValueError("cutpaste: pretext loss over no images")
        return total / (3 * n)

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Train the 3-way classifier on a stream of normals + augmentations; fit the Gaussian."""
        p = self.p
        train = as_source(train)
        val = as_source(val) if val is not None and len(val) > 0 else None
        if len(train) < 2:
            raise ValueError(f"cutpaste: need at least 2 train images for a covariance, got {len(train)}")
        gen = torch.Generator().manual_seed(p.seed)
        params = [q for q in self.encoder.parameters() if q.requires_grad] + list(self.head.parameters())
        opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        steps = max(1, p.epochs * -(-len(train) // p.batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

        def loss(x: torch.Tensor) -> torch.Tensor:
            # augmentations from the batch-order generator, after this epoch's permutation
            x3, y = three_way_batch(x, gen, p.jitter)
            return F.cross_entropy(self.head(self._embed(x3)), y)

        def train_mode() -> None:
            set_finetune_mode(self.encoder, p.trainable, train=True)
            self.head.train()

        report = train_loop(
            trainable=nn.ModuleDict({"encoder": self.encoder, "head": self.head}),
            optimizer=opt,
            loss_fn=loss,
            train=train,
            val=val,
            # min_batch 2: BatchNorm in the head cannot train on one image per class
            settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience, min_batch=2),
            generator=gen,
            device=self.device,
            desc="cutpaste",
            # the same augmented validation set every epoch (seed + 1), so epochs are compared fairly
            val_loss=(lambda: self.pretext_loss(val, p.seed + 1)) if val is not None else None,
            train_mode=train_mode,
            eval_mode=self._eval_mode,
            scheduler=sched,
        )
        from sklearn.covariance import LedoitWolf  # here: sklearn costs ~2 s to import in every stage

        feats = self.embeddings(train).double().cpu().numpy()
        lw = LedoitWolf().fit(feats)
        self.mean = torch.from_numpy(lw.location_).float().to(self.device)
        self.precision = torch.from_numpy(lw.precision_).float().to(self.device)
        report["shrinkage"] = float(lw.shrinkage_)
        self.eval()
        return report

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) → (Mahalanobis scores (B,), score broadcast to maps (B, H, W)), float32 CPU."""
        if self.precision.numel() == 0:
            raise RuntimeError("cutpaste: predict called before fit (no Gaussian fitted)")
        d = self.embeddings(images) - self.mean
        scores = torch.einsum("nd,de,ne->n", d, self.precision, d).clamp_min(0).sqrt().float().cpu()
        maps = scores.view(-1, 1, 1).expand(-1, *images.shape[-2:]).contiguous()
        return scores, maps
