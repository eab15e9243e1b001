"""SimpleNet (Liu et al., CVPR 2023, "SimpleNet: A Simple Network for Image Anomaly Detection and Localization").

A frozen backbone gives locally aware patch features (PatchCore's: each layer 3×3-averaged, pooled
along channels to `embed_dim`, deeper layers resized to the first layer's grid, the concatenation pooled
to `embed_dim` again). A trainable linear *feature adaptor* maps them to the target domain. Synthetic
anomalous features are the adapted features plus i.i.d. Gaussian noise N(0, σ²), σ = 0.015. A 2-layer MLP
*discriminator* D scores every position; the truncated L1 loss
``mean max(0, 0.5 − D(normal)) + mean max(0, 0.5 + D(anomalous))`` pushes normal scores above 0.5 and
noisy ones below −0.5. At test time the map is −D per position, upsampled bilinearly and smoothed with a
Gaussian (σ = 4 px); the image score is the map's maximum (the reference code takes the maximum of the
unsmoothed patch scores).

The backbone is frozen and the method uses no augmentation, so the patch features are extracted once
(`components.feature_cache`) and only the adaptor and the discriminator train, in the shared loop.
The epoch kept is the one with the lowest validation loss: the same loss on the validation normals
with noise drawn afresh from one fixed seed at every evaluation, so epochs are compared on the same
draws (the reference code picks the epoch by test AUROC, which an honest benchmark cannot).
"""

from __future__ import annotations

import math
from typing import Any

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
    gaussian_noise,
    truncated_l1,
)
from vadbench.models.components.map_normalization import MapNormalization, PositionalMapNorm
from vadbench.models.components.patch_features import locally_aware_embedding, module_device
from vadbench.models.components.smoothing import upsample_and_smooth
from vadbench.models.components.trainer import LoopSettings, autocast, mean_loss, predict_maps
from vadbench.models.components.trainer import train as train_loop
from vadbench.schema import StrictModel

#: offset of the validation noise seed from the model seed (validation draws never repeat training draws)
_VAL_SEED_OFFSET = 7919


@register_model
class SimpleNet(AnomalyModel):
    """SimpleNet. Learned state: the feature adaptor (``adaptor.*``) and the discriminator (``discriminator.*``)."""

    name = "simplenet"

    class Params(StrictModel):
        """Defaults are a 2-core CPU budget. The paper / reference code: WideResNet-50 layer2+3 at 288 px,
        3×3 neighbourhood, embedding 1536, linear adaptor (lr 1e-4), Gaussian noise σ 0.015, discriminator
        2 layers with 1024 hidden units (Adam lr 2e-4, weight decay 1e-5), truncation 0.5, batch 8,
        160 epochs (40 meta-epochs × 4), map smoothed with σ = 4."""

        layers: list[str] = Field(
            ["layer2", "layer3"], min_length=1, description="backbone layers; the first sets the patch grid"
        )
        neighborhood: int = Field(3, ge=1, le=9, description="odd p of the p×p local average (1 = none)")
        embed_dim: int = Field(384, ge=1, le=8192, description="channel-pooled patch feature dim (paper: 1536)")
        feature_norm: FeatureNorm = Field(
            "global", description="standardise features by train-normal statistics first (not in the paper; none)"
        )
        noise_std: float = Field(
            0.3,
            gt=0,
            le=10,
            description="σ of the feature noise, in feature stds unless feature_norm none (paper: 0.015)",
        )
        hidden_dim: int = Field(1024, ge=1, le=16384, description="discriminator hidden units (paper: 1024)")
        margin: float = Field(0.5, gt=0, le=10, description="truncation th of the L1 loss (paper: 0.5)")
        epochs: int = Field(20, ge=1, le=10_000, description="maximum epochs (paper: 160)")
        batch_size: int = Field(8, ge=1, le=4096, description="paper: 8")
        adaptor_lr: float = Field(1e-4, gt=0, le=1, description="AdamW lr of the feature adaptor (paper: 1e-4)")
        discriminator_lr: float = Field(2e-4, gt=0, le=1, description="lr of the discriminator (paper: 2e-4)")
        adaptor_weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW decay (reference code: default)")
        weight_decay: float = Field(1e-5, ge=0, le=1, description="discriminator weight decay (paper: 1e-5)")
        patience: int = Field(0, ge=0, description="stop after this many epochs without val improvement; 0 = never")
        sigma: float = Field(4.0, ge=0, le=64, description="Gaussian smoothing of the map in input pixels (0: none)")
        map_normalization: MapNormalization = Field(
            "none", description="per_position: standardise each map position by validation normals (not in the paper)"
        )
        amp: bool = Field(False, description="fp16 autocast on CUDA for the backbone only")
        feature_cache_gb: float = feature_cache_field()
        seed: int = Field(0, ge=0)

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        if p.neighborhood % 2 != 1:
            raise ValueError(f"models.simplenet.neighborhood must be odd, got {p.neighborhood}")
        backbone.require(p.layers)
        self.backbone = backbone
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the global RNG alone
            torch.manual_seed(p.seed)
            self.adaptor = FeatureAdaptor(p.embed_dim)
            self.feature_norm = FeatureStandardizer(p.embed_dim, p.feature_norm)
            self.discriminator = PatchDiscriminator(p.embed_dim, p.hidden_dim)
        self.map_norm = PositionalMapNorm(p.map_normalization)
        self._noise = torch.Generator().manual_seed(p.seed)
        self.to(module_device(backbone))

    # -- features ---------------------------------------------------------------------------
    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, C, H, W) → [locally aware patch features (B, embed_dim, h, w)], fp32, frozen."""
        with torch.no_grad(), autocast(images.device, self.p.amp):
            maps = pick(self.backbone(images), self.p.layers)
        maps = [m.float() for m in maps]
        return [locally_aware_embedding(maps, self.p.neighborhood, self.p.embed_dim)]

    def scores_of(self, feats: torch.Tensor) -> torch.Tensor:
        """patch features (B, D, h, w) → discriminator output on the adapted features (B, h, w)."""
        return self.discriminator(self.adaptor(self.feature_norm(feats)))[:, 0]

    def loss(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Truncated L1 on adapted features (normal) and adapted + N(0, σ²) (anomalous), one D pass on both."""
        adapted = self.adaptor(self.feature_norm(feats[0]))
        noisy = adapted + gaussian_noise(adapted, self.p.noise_std, self._noise)
        out = self.discriminator(torch.cat([adapted, noisy]))
        normal, anomalous = out[: len(adapted)], out[len(adapted) :]
        return truncated_l1(normal, anomalous, self.p.margin)

    # -- fit --------------------------------------------------------------------------------
    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Train adaptor + discriminator on cached features of the normal `train` source; `val` normals pick the
        epoch (fixed-seed noise) and, with `per_position`, fit the map normalisation."""
        p, device = self.p, module_device(self.backbone)
        self.to(device)
        train, val = as_source(train), (as_source(val) if val is not None and len(val) > 0 else None)
        self.map_norm.check_val(val, self.name)
        self._noise = torch.Generator().manual_seed(p.seed)
        optimizer = torch.optim.AdamW(
            [
                {"params": self.adaptor.parameters(), "lr": p.adaptor_lr, "weight_decay": p.adaptor_weight_decay},
                {"params": self.discriminator.parameters(), "lr": p.discriminator_lr, "weight_decay": p.weight_decay},
            ]
        )
        trainable = nn.ModuleDict({"adaptor": self.adaptor, "discriminator": self.discriminator})
        with cache_splits(self._features, train, val, p.batch_size, device, p.feature_cache_gb) as caches:
            train_feats, val_feats = caches

            def val_loss() -> float:
                # the same noise draws at every evaluation: epochs differ only by their weights
                keep, self._noise = self._noise, torch.Generator().manual_seed(p.seed + _VAL_SEED_OFFSET)
                try:
                    return mean_loss(self.loss, val_feats, p.batch_size, device, val_feats.to_device)
                finally:
                    self._noise = keep

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
            )
        self.eval()
        self.map_norm.calibrate(self.anomaly_maps, val, p.batch_size, device, self.name)
        report["feature_cache"] = cache_modes(train_feats, val_feats)
        report["steps_per_epoch"] = math.ceil(len(train) / p.batch_size)
        return report

    # -- scoring ----------------------------------------------------------------------------
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → −D per patch, upsampled to (H, W) and Gaussian-smoothed: (B, H, W)."""
        patch = -self.scores_of(self._features(images)[0])
        return upsample_and_smooth(patch.float(), tuple(images.shape[-2:]), self.p.sigma)

    def normalized_maps(self, images: torch.Tensor) -> torch.Tensor:
        return self.map_norm(self.anomaly_maps(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) in [0, 1] → (scores = map max (B,), maps (B, H, W)), float32 on CPU."""
        self.eval()
        x = images.to(module_device(self.backbone), torch.float32)
        return predict_maps(self.normalized_maps, x, self.p.batch_size)
