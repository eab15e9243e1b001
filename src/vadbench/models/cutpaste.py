"""CutPaste (Li et al., CVPR 2021): self-supervised 3-way classifier + Gaussian density of its features.

A copy of the backbone (`encoder.`) and a small MLP head learn to tell normal images from their
CutPaste and CutPaste-Scar versions (3-way). Then a Gaussian is fitted to the pooled encoder
features of the train normals (mean + Ledoit-Wolf shrunk covariance, sklearn); the anomaly score
is the Mahalanobis distance to it. Image-level variant only (the patch variant scores hundreds of
crops per image, beyond the CPU budget): maps are the score broadcast (`has_pixel_maps = False`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from sklearn.covariance import LedoitWolf
from torch import nn

from vadbench.backbones import FeatureExtractor
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components.backbone_finetune import Pooling, pooled_features, set_finetune_mode, trainable_copy
from vadbench.models.components.cutpaste_augment import three_way_batch
from vadbench.models.components.epoch_loop import fit_epochs, minibatches
from vadbench.schema import StrictModel


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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            self.head = _head(sum(backbone.channels), p.head_dims).to(self.device)
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("precision", torch.empty(0, 0))

    @property
    def device(self) -> torch.device:
        return self.backbone.mean.device

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.encoder, self.backbone.normalize(images.to(self.device)), self.p.pooling)

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """images (N, C, H, W) in [0, 1] → pooled encoder features (N, D) (eval mode, no grad)."""
        if images.ndim != 4:
            raise ValueError(f"cutpaste: expected images (N, C, H, W), got shape {tuple(images.shape)}")
        set_finetune_mode(self.encoder, self.p.trainable, train=False)
        return torch.cat([self._embed(images[i]) for i in minibatches(len(images), batch_size)])

    @torch.no_grad()
    def pretext_loss(self, images: torch.Tensor, seed: int) -> float:
        """3-way cross-entropy (eval mode) on images (N, C, H, W) + their augmentations drawn with `seed`."""
        x, y = three_way_batch(images.to(self.device), torch.Generator().manual_seed(seed), self.p.jitter)
        self.head.eval()
        return float(F.cross_entropy(self.head(self.embeddings(x)), y))

    def fit(self, train: torch.Tensor, val: torch.Tensor | None = None) -> dict[str, Any]:
        """Train the 3-way classifier on normals (N, C, H, W) + augmentations; fit the Gaussian."""
        p = self.p
        if len(train) < 2:
            raise ValueError(f"cutpaste: need at least 2 train images for a covariance, got {len(train)}")
        gen = torch.Generator().manual_seed(p.seed)
        params = [q for q in self.encoder.parameters() if q.requires_grad] + list(self.head.parameters())
        opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        steps = max(1, p.epochs * -(-len(train) // p.batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        has_val = val is not None and len(val) > 0

        def train_epoch(_: int) -> float:
            total = 0.0
            for idx in minibatches(len(train), p.batch_size, gen):
                if len(idx) < 2:  # BatchNorm in the head cannot train on one image per class
                    continue
                set_finetune_mode(self.encoder, p.trainable, train=True)
                self.head.train()
                x, y = three_way_batch(train[idx].to(self.device), gen, p.jitter)
                loss = F.cross_entropy(self.head(self._embed(x)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            return total / len(train)

        both = nn.ModuleDict({"encoder": self.encoder, "head": self.head})
        # the same augmented validation set every epoch (seed + 1), so epochs are compared fairly
        val_loss = (lambda: self.pretext_loss(val, p.seed + 1)) if has_val else None
        report = fit_epochs(both, train_epoch, val_loss, p.epochs, p.patience, "cutpaste")
        feats = self.embeddings(train).double().cpu().numpy()
        lw = LedoitWolf().fit(feats)
        self.mean = torch.from_numpy(lw.location_).float().to(self.device)
        self.precision = torch.from_numpy(lw.precision_).float().to(self.device)
        report["shrinkage"] = float(lw.shrinkage_)
        self.eval()
        return report

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, H, W) → (Mahalanobis scores (N,), score broadcast to maps (N, H, W)), float32 CPU."""
        if self.precision.numel() == 0:
            raise RuntimeError("cutpaste: predict called before fit (no Gaussian fitted)")
        d = self.embeddings(images) - self.mean
        scores = torch.einsum("nd,de,ne->n", d, self.precision, d).clamp_min(0).sqrt().float().cpu()
        maps = scores.view(-1, 1, 1).expand(-1, *images.shape[-2:]).contiguous()
        return scores, maps
