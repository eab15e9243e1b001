"""FastFlow (Yu et al., 2021, "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows").

Each frozen feature map (layer1–3 of a ResNet) is layer-normalised and mapped by its own 2-D
normalizing flow to a standard normal latent z of the same shape. The flows are chains of affine
coupling blocks whose subnets are convolutions, alternating 3×3 and 1×1 kernels (the paper's
ResNet setting), with soft-clamped scales and channel permutations (`components.flows`).
Training maximises the likelihood: loss = Σ_levels mean_batch(½‖z‖² − log|det J|).
Anomaly map (as anomalib defines it): per level −exp(−½·mean_channels z²), i.e. minus the per-position
likelihood, bilinearly upsampled to the input and averaged over levels; image score = map maximum.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor, pick
from vadbench.data.source import as_source
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components.feature_cache import cache_modes, cache_splits, feature_cache_field
from vadbench.models.components.flows import AffineCouplingBlock, SequentialFlow, conv_subnet
from vadbench.models.components.patch_features import module_device
from vadbench.models.components.trainer import LoopSettings, autocast, predict_maps
from vadbench.models.components.trainer import train as train_loop
from vadbench.schema import StrictModel


@register_model
class FastFlow(AnomalyModel):
    """FastFlow. Learned state: one flow per level (``flows.<i>.*``)."""

    name = "fastflow"

    class Params(StrictModel):
        """Defaults are a 2-core CPU budget; the paper (ResNet-18): 8 flow steps, hidden ratio 1.0,
        3×3/1×1 alternating subnets, clamp 2.0, Adam lr 1e-3 wd 1e-5, batch 32, 500 epochs, 256×256.
        The features' LayerNorm has no learned element-wise affine here (the paper's LayerNorm over
        [C, H, W] has one, which would tie the model to one input size); the flows' per-channel global
        affine takes its place."""

        layers: list[str] = Field(["layer1", "layer2", "layer3"], min_length=1)
        flow_steps: int = Field(4, ge=1, le=32, description="coupling blocks per level (paper: 8)")
        hidden_ratio: float = Field(1.0, gt=0, le=8, description="subnet hidden channels / input channels")
        conv3x3_only: bool = Field(False, description="all subnets 3×3 (paper: alternate 3×3 and 1×1 for ResNets)")
        clamp: float = Field(2.0, gt=0, le=10, description="soft clamp of the log-scales")
        epochs: int = Field(40, ge=1, le=10_000, description="maximum epochs (paper: 500)")
        batch_size: int = Field(16, ge=1)
        lr: float = Field(1e-3, gt=0, le=1)
        weight_decay: float = Field(1e-5, ge=0)
        patience: int = Field(5, ge=0, description="stop after this many epochs without val improvement; 0 = never")
        amp: bool = Field(False, description="fp16 autocast on CUDA for the teacher only (flows stay fp32)")
        feature_cache_gb: float = feature_cache_field()
        seed: int = Field(0, ge=0)

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        channels = backbone.channels_of(p.layers)
        self.backbone = backbone
        rng = np.random.default_rng(p.seed)  # the fixed channel permutations
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the global RNG alone
            torch.manual_seed(p.seed)
            self.flows = nn.ModuleList(
                SequentialFlow(
                    [
                        AffineCouplingBlock(
                            c,
                            conv_subnet(3 if (i % 2 == 0 or p.conv3x3_only) else 1, p.hidden_ratio),
                            clamp=p.clamp,
                            rng=rng,
                        )
                        for i in range(p.flow_steps)
                    ]
                )
                for c in channels
            )
        self.to(module_device(backbone))

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, C, H, W) → per level layer-normalised features (B, c_l, h_l, w_l), fp32."""
        with autocast(images.device, self.p.amp):
            feats = pick(self.backbone(images), self.p.layers)
        # per-sample normalisation over (C, H, W), as the paper does for ResNet features
        return [F.layer_norm(f.float(), f.shape[1:]) for f in feats]

    def _latents(self, feats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """per level features → per level (z (B, c_l, h_l, w_l), log|det J| (B,))."""
        return [flow(f) for f, flow in zip(feats, self.flows)]

    def nll(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Σ_levels mean over the batch of ½‖z‖² − log|det J| (negative log-likelihood up to a constant)."""
        return sum((0.5 * z.pow(2).flatten(1).sum(1) - log_det).mean() for z, log_det in self._latents(feats))

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → (B, H, W) in [−1, 0]: mean over levels of upsampled −exp(−½·mean_c z²)."""
        size = images.shape[-2:]
        maps = []
        for z, _ in self._latents(self._features(images)):
            prob = torch.exp(-0.5 * z.pow(2).mean(1, keepdim=True))
            maps.append(F.interpolate(-prob, size=size, mode="bilinear", align_corners=False)[:, 0])
        return torch.stack(maps).mean(0)

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Train the flows on the normal `train` source; `val` (normals) picks the epoch and stops early."""
        p, device = self.p, module_device(self.backbone)
        self.to(device)
        train, val = as_source(train), (as_source(val) if val is not None and len(val) > 0 else None)
        gen = torch.Generator().manual_seed(p.seed)
        optimizer = torch.optim.Adam(self.flows.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        # the backbone is frozen and there is no augmentation: features are extracted once, not every epoch
        with cache_splits(self._features, train, val, p.batch_size, device, p.feature_cache_gb) as caches:
            train_feats, val_feats = caches
            report = train_loop(
                trainable=self.flows,
                optimizer=optimizer,
                loss_fn=self.nll,
                train=train_feats,
                val=val_feats,
                # flows train in fp32 (the log-det needs it): `amp` is the backbone's autocast only
                settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience),
                generator=gen,
                device=device,
                desc=self.name,
                batch_fn=train_feats.to_device,
            )
        self.eval()
        report["feature_cache"] = cache_modes(train_feats, val_feats)
        return report

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) float in [0, 1] → (scores (B,), maps (B, H, W)), float32 on CPU."""
        self.eval()
        return predict_maps(self.anomaly_maps, images.to(module_device(self.backbone)), self.p.batch_size)
