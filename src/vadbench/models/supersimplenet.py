"""SuperSimpleNet, unsupervised mode (Rolih, Fučka, Skočaj, ICPR 2024, "SuperSimpleNet: Unifying Unsupervised
and Supervised Learning for Fast and Reliable Surface Defect Detection").

SimpleNet's recipe with three changes the paper makes:

* **features**: every backbone layer (layer2+3) resized bilinearly to *twice* the first layer's grid,
  concatenated, then 3×3-averaged (locally aware) — a finer patch grid than SimpleNet's; a linear
  feature adaptor (1×1 convolution) follows, as in SimpleNet;
* **synthetic anomalies in feature space, Perlin-shaped**: each batch of adapted features is duplicated;
  every copy gets a binary Perlin mask (`components.perlin`, threshold 0.2, lattice 2^k per axis,
  k ∈ [0, 6)), emptied with probability ½ so about half the copies stay normal, and Gaussian noise
  N(0, 0.015²) is added *inside the mask only*; the mask is the pixel target, "any mask pixel" the label;
* **two heads**: a segmentation head (SimpleNet's discriminator MLP per position, output high = anomalous)
  and a classification head: a 5×5 conv block (128 channels, BatchNorm, ReLU) over the features
  concatenated with the segmentation map, global max and average pooled, joined by the map's max and
  average, into one linear unit. In the unsupervised setting the map reaching the classification head
  is detached (``stop_grad``), so classification does not shape segmentation.

Loss (paper, eq. 3–4): truncated L1 on the map (normal positions pushed below −0.5, masked ones above
+0.5) + focal loss (γ = 4) on the map + focal loss on the image logit. Inference (paper): the map is the
segmentation output upsampled to the image and Gaussian-smoothed (σ = 4 px); the image score is the
classification head's σ(logit) (`score: map_max` takes the map maximum instead, the reference code's
"seg" score). AdamW (adaptor 1e-4, heads 2e-4 with weight decay 1e-5), learning rate × 0.4 at 80 % and
90 % of the epochs. Features are extracted once (`components.feature_cache`: frozen backbone, no
augmentation); the epoch kept is the one with the lowest loss on the validation normals with synthetic
anomalies drawn from one fixed seed at every evaluation (the reference code keeps the last epoch).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor, pick
from vadbench.data.source import as_source, loader
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components.feature_cache import cache_modes, cache_splits, feature_cache_field
from vadbench.models.components.feature_discriminator import (
    FeatureAdaptor,
    FeatureNorm,
    FeatureStandardizer,
    PatchDiscriminator,
    focal_loss_with_logits,
    gaussian_noise,
    truncated_l1,
    upscaled_embedding,
    xavier_init,
)
from vadbench.models.components.patch_features import module_device
from vadbench.models.components.perlin import perlin_masks
from vadbench.models.components.smoothing import upsample_and_smooth
from vadbench.models.components.trainer import LoopSettings, autocast, mean_loss
from vadbench.models.components.trainer import train as train_loop
from vadbench.schema import StrictModel

_VAL_SEED_OFFSET = 7919


class ClassificationHead(nn.Module):
    """(features (B, D, h, w), seg map (B, 1, h, w)) → image logit (B,).

    conv k×k (D + 1 → c) + BatchNorm + ReLU, global max and avg pooled (2c), with the map's global max and
    avg (2) → Linear(2c + 2, 1). `stop_grad` detaches the map on both paths (the paper's unsupervised mode).
    """

    def __init__(self, dim: int, channels: int, kernel: int, stop_grad: bool) -> None:
        super().__init__()
        self.stop_grad = stop_grad
        self.conv = nn.Sequential(
            nn.Conv2d(dim + 1, channels, kernel_size=kernel, padding="same"),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(2 * channels + 2, 1)
        self.apply(xavier_init)

    def forward(self, features: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        seg = seg.detach() if self.stop_grad else seg
        out = self.conv(torch.cat([features, seg], dim=1))
        pooled = [out.amax(dim=(2, 3)), out.mean(dim=(2, 3)), seg.amax(dim=(2, 3)), seg.mean(dim=(2, 3))]
        return self.fc(torch.cat(pooled, dim=1))[:, 0]


@register_model
class SuperSimpleNet(AnomalyModel):
    """SuperSimpleNet (unsupervised). Learned state: ``adaptor.*``, ``seg_head.*``, ``cls_head.*``."""

    name = "supersimplenet"

    class Params(StrictModel):
        """Defaults are a 2-core CPU budget (upscale 1, 256 hidden, 32 classification channels, 60 epochs: the
        paper's sizes cost ~2.8 s per step of 8 images here, ×11 these). The paper (unsupervised, MVTec AD): WideResNet-50 layer2+3
        upscaled ×2, 3×3 neighbourhood, noise σ 0.015, Perlin threshold 0.2 (VisA 0.6), scales 2^[0, 6),
        empty-mask probability 0.5, segmentation head 1024 hidden, classification head 5×5 conv with 128
        channels, stop_grad on, truncation 0.5, focal γ 4, AdamW lr 1e-4 (adaptor) / 2e-4 (heads, weight
        decay 1e-5), × 0.4 at 80 % and 90 % of 300 epochs, batch 32, 256 px, no gradient clipping."""

        layers: list[str] = Field(["layer2", "layer3"], min_length=1, description="backbone layers")
        upscale: float = Field(1.0, gt=0, le=8, description="patch grid = this × the first layer's grid (paper: 2)")
        neighborhood: int = Field(3, ge=1, le=9, description="odd p of the p×p local average (1 = none)")
        feature_norm: FeatureNorm = Field(
            "global", description="standardise features by train-normal statistics first (not in the paper; none)"
        )
        noise_std: float = Field(
            0.35,
            gt=0,
            le=10,
            description="σ of the feature noise, in feature stds unless feature_norm none (paper: 0.015)",
        )
        perlin_threshold: float = Field(0.2, ge=-1, le=1, description="mask = Perlin noise > this (paper: 0.2)")
        perlin_min_scale_log2: int = Field(0, ge=0, le=10, description="lattice 2^k per axis, k ≥ this (paper: 0)")
        perlin_max_scale_log2: int = Field(6, ge=1, le=11, description="... and k < this (paper: 6)")
        empty_probability: float = Field(0.5, ge=0, le=1, description="chance a copy's mask is emptied (paper: 0.5)")
        hidden_dim: int = Field(256, ge=1, le=16384, description="segmentation head hidden units (paper: 1024)")
        cls_channels: int = Field(32, ge=1, le=4096, description="classification conv channels (paper: 128)")
        cls_kernel: int = Field(5, ge=1, le=9, description="classification conv kernel (paper: 5)")
        stop_grad: bool = Field(True, description="detach the map entering the classification head (paper, unsup.)")
        margin: float = Field(0.5, gt=0, le=10, description="truncation th of the L1 loss (paper: 0.5)")
        focal_gamma: float = Field(4.0, ge=0, le=10, description="focal loss γ on map and score (0 = BCE; paper: 4)")
        epochs: int = Field(60, ge=1, le=10_000, description="maximum epochs (paper: 300)")
        batch_size: int = Field(8, ge=1, le=4096, description="normal images per step, ×2 with copies (paper: 32)")
        adaptor_lr: float = Field(1e-4, gt=0, le=1, description="AdamW lr of the adaptor (paper: 1e-4)")
        seg_lr: float = Field(2e-4, gt=0, le=1, description="AdamW lr of the segmentation head (paper: 2e-4)")
        cls_lr: float = Field(2e-4, gt=0, le=1, description="AdamW lr of the classification head (paper: 2e-4)")
        adaptor_weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW default, as the reference code")
        weight_decay: float = Field(1e-5, ge=0, le=1, description="heads' weight decay (paper: 1e-5)")
        lr_gamma: float = Field(0.4, gt=0, le=1, description="lr × this at 80 % and 90 % of the epochs (paper: 0.4)")
        patience: int = Field(0, ge=0, description="stop after this many epochs without val improvement; 0 = never")
        sigma: float = Field(4.0, ge=0, le=64, description="Gaussian smoothing of the map in input pixels (0: none)")
        score: Literal["cls", "map_max"] = Field("cls", description="image score: σ(cls logit) (paper) or map max")
        amp: bool = Field(False, description="fp16 autocast on CUDA for the backbone only")
        feature_cache_gb: float = feature_cache_field()
        seed: int = Field(0, ge=0)

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        if p.neighborhood % 2 != 1:
            raise ValueError(f"models.supersimplenet.neighborhood must be odd, got {p.neighborhood}")
        if p.perlin_min_scale_log2 >= p.perlin_max_scale_log2:
            raise ValueError(
                "models.supersimplenet.perlin_min_scale_log2 must be < perlin_max_scale_log2, got "
                f"{p.perlin_min_scale_log2} and {p.perlin_max_scale_log2}"
            )
        dim = sum(backbone.channels_of(p.layers))  # also fails on a missing layer, naming it
        self.backbone = backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            self.adaptor = FeatureAdaptor(dim)
            self.feature_norm = FeatureStandardizer(dim, p.feature_norm)
            self.seg_head = PatchDiscriminator(dim, p.hidden_dim)
            self.cls_head = ClassificationHead(dim, p.cls_channels, p.cls_kernel, p.stop_grad)
        self._gen = torch.Generator().manual_seed(p.seed)
        self.to(module_device(backbone))

    # -- features and heads -----------------------------------------------------------------
    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, C, H, W) → [upscaled, locally aware features (B, ΣC, s·h, s·w)], fp32, frozen."""
        with torch.no_grad(), autocast(images.device, self.p.amp):
            maps = pick(self.backbone(images), self.p.layers)
        return [upscaled_embedding([m.float() for m in maps], self.p.upscale, self.p.neighborhood)]

    def heads(self, adapted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """adapted features (B, D, h, w) → (map logits (B, 1, h, w), image logits (B,))."""
        seg = self.seg_head(adapted)
        return seg, self.cls_head(adapted, seg)

    def synthetic_anomalies(self, adapted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """adapted (B, D, h, w) of normals → (2B copies with masked noise, masks (2B, 1, h, w), labels (2B,))."""
        p = self.p
        both = torch.cat([adapted, adapted])
        n, _, h, w = both.shape
        masks = perlin_masks(n, (h, w), p.perlin_threshold, self._gen, p.perlin_min_scale_log2, p.perlin_max_scale_log2)
        keep = (torch.rand(n, generator=self._gen) >= p.empty_probability).float()  # emptied with prob p
        masks = (masks * keep[:, None, None])[:, None].to(both.device)
        noisy = both + gaussian_noise(both, p.noise_std, self._gen) * masks
        return noisy, masks, masks.flatten(1).amax(1)

    def loss(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Truncated L1 + focal on the map, focal on the image logit, over the duplicated batch."""
        return self.target_loss(*self.synthetic_anomalies(self.adaptor(self.feature_norm(feats[0]))))

    def target_loss(
        self, adapted: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, known: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The paper's loss of adapted features (B, D, h, w) against pixel masks (B, 1, h, w) and image labels
        (B,): synthetic targets (unsupervised), or real ones too (`vadbench.supervised.supersimplenet`).
        `known` (B,) bool: images whose mask is known; the others (anomalies labelled only at image level) add
        the classification loss alone, as mixed-supervision training treats weak labels."""
        p = self.p
        seg, logit = self.heads(adapted)
        if known is not None and not bool(known.all()):  # all known: the same tensors, so the same bytes
            seg, masks = seg[known], masks[known]
        anomalous = masks > 0
        # the map is high where anomalous: negate it into truncated_l1's "normal high" convention
        pixel = truncated_l1(-seg[~anomalous], -seg[anomalous], p.margin)
        if seg.numel():
            pixel = pixel + focal_loss_with_logits(seg, masks, p.focal_gamma)
        return pixel + focal_loss_with_logits(logit, labels, p.focal_gamma)

    # -- fit --------------------------------------------------------------------------------
    def optimization(
        self, n_train: int
    ) -> tuple[nn.ModuleDict, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """(trainable modules, AdamW with the paper's per-module lr/decay, step-wise MultiStepLR) for `n_train`
        images: the one recipe of the unsupervised fit and the supervised track."""
        p = self.p
        optimizer = torch.optim.AdamW(
            [
                {"params": self.adaptor.parameters(), "lr": p.adaptor_lr, "weight_decay": p.adaptor_weight_decay},
                {"params": self.seg_head.parameters(), "lr": p.seg_lr, "weight_decay": p.weight_decay},
                {"params": self.cls_head.parameters(), "lr": p.cls_lr, "weight_decay": p.weight_decay},
            ]
        )
        # the loop steps the scheduler once per optimiser step: the paper's epoch milestones in steps
        steps = math.ceil(n_train / p.batch_size)
        milestones = sorted({int(p.epochs * f) * steps for f in (0.8, 0.9)})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=p.lr_gamma)
        trainable = nn.ModuleDict({"adaptor": self.adaptor, "seg_head": self.seg_head, "cls_head": self.cls_head})
        return trainable, optimizer, scheduler

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Train adaptor + heads on cached features of the normal `train` source with feature-space synthetic
        anomalies; `val` normals (fixed-seed anomalies) pick the epoch."""
        p, device = self.p, module_device(self.backbone)
        self.to(device)
        train, val = as_source(train), (as_source(val) if val is not None and len(val) > 0 else None)
        self._gen = torch.Generator().manual_seed(p.seed)
        trainable, optimizer, scheduler = self.optimization(len(train))
        with cache_splits(self._features, train, val, p.batch_size, device, p.feature_cache_gb) as caches:
            train_feats, val_feats = caches

            def val_loss() -> float:
                keep, self._gen = self._gen, torch.Generator().manual_seed(p.seed + _VAL_SEED_OFFSET)
                try:
                    return mean_loss(self.loss, val_feats, p.batch_size, device, val_feats.to_device)
                finally:
                    self._gen = keep

            self.feature_norm.fit(train_feats.to_device(b, device)[0] for b in loader(train_feats, p.batch_size))
            report = train_loop(
                trainable=trainable,
                optimizer=optimizer,
                loss_fn=self.loss,
                train=train_feats,
                val=val_feats,
                settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience),
                generator=torch.Generator().manual_seed(p.seed),
                device=device,
                desc=self.name,
                batch_fn=train_feats.to_device,
                val_loss=val_loss if val_feats is not None else None,
                scheduler=scheduler,
            )
        self.eval()
        report["feature_cache"] = cache_modes(train_feats, val_feats)
        report["steps_per_epoch"] = math.ceil(len(train) / p.batch_size)
        return report

    # -- scoring ----------------------------------------------------------------------------
    def maps_and_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) → (smoothed, upsampled map logits (B, H, W), σ(image logits) (B,))."""
        seg, logit = self.heads(self.adaptor(self.feature_norm(self._features(images)[0])))
        maps = upsample_and_smooth(seg[:, 0].float(), tuple(images.shape[-2:]), self.p.sigma)
        return maps, torch.sigmoid(logit.float())

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) in [0, 1] → (scores (B,), maps (B, H, W)), float32 on CPU."""
        self.eval()
        x = images.to(module_device(self.backbone), torch.float32)
        maps, scores = [], []
        for start in range(0, len(x), self.p.batch_size):
            m, s = self.maps_and_scores(x[start : start + self.p.batch_size])
            maps.append(m.float().cpu())
            scores.append(s.float().cpu())
        maps_t, cls = torch.cat(maps), torch.cat(scores)
        return (cls if self.p.score == "cls" else maps_t.flatten(1).amax(1)), maps_t
