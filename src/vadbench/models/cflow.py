"""CFlow-AD (Gudovskiy et al., WACV 2022, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with
Localization via Conditional Normalizing Flows").

Every feature vector of every frozen layer (a "fiber") is modelled by a conditional normalizing flow,
one decoder per layer, conditioned on a 2-D sinusoidal encoding of the vector's position. Decoders are
chains of affine coupling blocks with fully-connected subnets (`components.flows`) that see the
condition. Training: random mini-batches of fibers (not images) maximise the per-dimension
log-likelihood through −log σ(log p / C), as the reference code does.
Inference: per layer log p / C at every position; normalised by the highest value seen on validation
normals, exp → likelihood in (0, 1], bilinearly upsampled, summed over layers; map = L − sum (low
likelihood = anomalous); image score = map maximum. (The reference code normalises by the maximum
of the test batch itself, which makes a score depend on the other images in its batch.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor, pick
from vadbench.data.source import as_source, loader
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components.feature_cache import FeatureCache, cache_modes, cache_splits, feature_cache_field
from vadbench.models.components.flows import AffineCouplingBlock, SequentialFlow, fc_subnet, gaussian_log_likelihood
from vadbench.models.components.patch_features import module_device
from vadbench.models.components.trainer import LoopSettings, OptimizerStep, autocast, predict_maps
from vadbench.models.components.trainer import train as train_loop
from vadbench.runtime import intra_op_threads
from vadbench.schema import StrictModel


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """(channels, height, width): sin/cos of x in the first half of the channels, of y in the second."""
    if channels % 4:
        raise ValueError(f"positional encoding needs channels divisible by 4, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * -(math.log(10000.0) / half))  # (half/2,)
    x = torch.arange(width, dtype=torch.float32)[:, None] * freq  # (W, half/2)
    y = torch.arange(height, dtype=torch.float32)[:, None] * freq  # (H, half/2)
    pe = torch.zeros(channels, height, width)
    pe[0:half:2] = torch.sin(x).T[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = torch.cos(x).T[:, None, :].expand(-1, height, -1)
    pe[half::2] = torch.sin(y).T[:, :, None].expand(-1, -1, width)
    pe[half + 1 :: 2] = torch.cos(y).T[:, :, None].expand(-1, -1, width)
    return pe


@register_model
class CFlow(AnomalyModel):
    """CFlow-AD. Learned state: one conditional flow per layer (``decoders.<i>.*``) and the per-layer
    validation reference log-likelihood (``ref_log_prob``)."""

    name = "cflow"

    class Params(StrictModel):
        """Defaults are a 2-core CPU budget; the paper: WideResNet-50 layers 2–4, 8 coupling blocks,
        condition vector 128, subnet hidden 2× input, clamp 1.9, fiber batch 256, Adam lr 2e-4 with
        warm-up and cosine decay (not done here), 25 meta-epochs × 8 sub-epochs, 256×256 inputs."""

        layers: list[str] = Field(
            ["layer1", "layer2"],
            min_length=1,
            description="paper: layer2–4 at 256 px (layer1+2 at 128 px give its grids)",
        )
        coupling_blocks: int = Field(4, ge=1, le=32, description="paper: 8")
        condition_vector: int = Field(64, ge=4, le=1024, description="positional-encoding size (paper: 128)")
        hidden_ratio: float = Field(2.0, gt=0, le=8, description="subnet hidden / input features (paper: 2)")
        clamp: float = Field(1.9, gt=0, le=10, description="soft clamp of the log-scales (paper: 1.9)")
        soft_permutation: bool = Field(True, description="random rotations between blocks (reference code: True)")
        fiber_batch_size: int = Field(256, ge=2, description="fibers per optimiser step (paper: 256)")
        epochs: int = Field(20, ge=1, le=10_000, description="maximum passes over all fibers (paper: 200)")
        batch_size: int = Field(16, ge=1, description="images per feature-extraction batch")
        lr: float = Field(2e-4, gt=0, le=1)
        patience: int = Field(3, ge=0, description="stop after this many epochs without val improvement; 0 = never")
        amp: bool = Field(False, description="fp16 autocast on CUDA for the encoder only (flows stay fp32)")
        feature_cache_gb: float = feature_cache_field()
        seed: int = Field(0, ge=0)

        @model_validator(mode="after")
        def _pe_divisible(self) -> CFlow.Params:
            if self.condition_vector % 4:
                raise ValueError(f"condition_vector must be divisible by 4, got {self.condition_vector}")
            return self

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        channels = backbone.channels_of(p.layers)
        self.backbone = backbone
        rng = np.random.default_rng(p.seed)  # the fixed permutations / rotations
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the global RNG alone
            torch.manual_seed(p.seed)
            self.decoders = nn.ModuleList(
                SequentialFlow(
                    [
                        AffineCouplingBlock(
                            c,
                            fc_subnet(p.hidden_ratio),
                            clamp=p.clamp,
                            cond_channels=p.condition_vector,
                            soft_permutation=p.soft_permutation,
                            rng=rng,
                        )
                        for _ in range(p.coupling_blocks)
                    ]
                )
                for c in channels
            )
        # per-layer max of log p / C over validation normals: the likelihood normaliser at inference
        self.register_buffer("ref_log_prob", torch.zeros(len(p.layers)))
        self.to(module_device(backbone))

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, C, H, W) → per layer encoder features (B, c_l, h_l, w_l), fp32."""
        with autocast(images.device, self.p.amp):
            return [f.float() for f in pick(self.backbone(images), self.p.layers)]

    def _fibers(self, feats: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]]:
        """per layer (B, c, h, w) → per layer (fibers (B·h·w, c), conditions (B·h·w, P), (B, h, w))."""
        out = []
        for f in feats:
            b, c, h, w = f.shape
            pe = positional_encoding_2d(self.p.condition_vector, h, w).to(f.device)
            cond = pe.unsqueeze(0).expand(b, -1, -1, -1).permute(0, 2, 3, 1).reshape(-1, pe.shape[0])
            out.append((f.permute(0, 2, 3, 1).reshape(-1, c), cond, (b, h, w)))
        return out

    def _log_prob(self, layer: int, e: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(n, c), (n, P) → log p / c per fiber (n,): the likelihood per feature dimension."""
        z, log_det = self.decoders[layer](e, cond)
        return gaussian_log_likelihood(z, log_det) / e.shape[1]

    def _layer_log_probs(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """per layer features (B, c, h, w) → per layer log p / c maps (B, h, w), computed in fiber chunks."""
        out = []
        for layer, (e, cond, shape) in enumerate(self._fibers(feats)):
            chunks = [
                self._log_prob(layer, e[i : i + self.p.fiber_batch_size], cond[i : i + self.p.fiber_batch_size])
                for i in range(0, len(e), self.p.fiber_batch_size)
            ]
            out.append(torch.cat(chunks).view(shape))
        return out

    def loss(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Mean over layers and every fiber of −log σ(log p / c) (the validation loss)."""
        return torch.stack([-F.logsigmoid(lp).mean() for lp in self._layer_log_probs(feats)]).mean()

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → (B, H, W) in [0, L): L − Σ_layers upsampled exp(log p / c − ref)."""
        size = images.shape[-2:]
        total = torch.zeros(images.shape[0], *size, device=images.device)
        for lp, ref in zip(self._layer_log_probs(self._features(images)), self.ref_log_prob):
            prob = torch.exp((lp - ref).clamp(max=0)).unsqueeze(1)  # ≤ 1: as likely as the likeliest normal
            total += F.interpolate(prob, size=size, mode="bilinear", align_corners=True)[:, 0]
        return len(self.decoders) - total

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Train the decoders on the normal `train` fibers; `val` (normals) picks the epoch, stops early and
        sets the likelihood reference (train when there is no val)."""
        p, device = self.p, module_device(self.backbone)
        self.to(device)
        train, val = as_source(train), (as_source(val) if val is not None and len(val) > 0 else None)
        gen = torch.Generator().manual_seed(p.seed)
        optimizer = torch.optim.Adam(self.decoders.parameters(), lr=p.lr)

        def fiber_steps(feats: list[torch.Tensor], step: OptimizerStep) -> tuple[float, int]:
            """One image batch → many optimiser steps on random fiber mini-batches of each layer."""
            total, count = 0.0, 0
            for layer, (e, cond, _) in enumerate(self._fibers(feats)):
                # random fiber mini-batches: neighbouring positions of one image never share a step
                order = torch.randperm(len(e), generator=gen).to(device)
                for start in range(0, len(e), p.fiber_batch_size):
                    sel = order[start : start + p.fiber_batch_size]
                    if len(sel) < 2:  # a lone leftover fiber is noise, not signal
                        continue
                    total += step(-F.logsigmoid(self._log_prob(layer, e[sel], cond[sel])).mean())
                    count += 1
            return total, count  # the epoch's loss is the mean over its fiber steps

        # the encoder is frozen and there is no augmentation: features are extracted once, not every epoch
        with cache_splits(self._features, train, val, p.batch_size, device, p.feature_cache_gb) as caches:
            train_feats, val_feats = caches
            # 256-fiber steps are too small to split over threads: on 2 CPU cores one thread trains 1.7x faster
            # (3 epochs: 14.4 s → 8.3 s with OMP_WAIT_POLICY=PASSIVE); results are deterministic either way
            with intra_op_threads(1, device):
                report = train_loop(
                    trainable=self.decoders,
                    optimizer=optimizer,
                    loss_fn=self.loss,
                    train=train_feats,
                    val=val_feats,
                    # flows train in fp32 (the log-det needs it): `amp` is the encoder's autocast only
                    settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience),
                    generator=gen,
                    device=device,
                    desc=self.name,
                    batch_fn=train_feats.to_device,
                    step_fn=fiber_steps,
                )
                self.eval()
                self._set_reference(val_feats if val_feats is not None else train_feats, device)
        report["ref_log_prob"] = self.ref_log_prob.tolist()
        report["feature_cache"] = cache_modes(train_feats, val_feats)
        return report

    @torch.no_grad()
    def _set_reference(self, feats: FeatureCache, device: torch.device) -> None:
        """ref_log_prob[l] = max over these normals' fibers of layer l's log p / c, streamed batch by batch."""
        best = torch.full((len(self.decoders),), -torch.inf, device=device)
        for batch in loader(feats, self.p.batch_size, pin_memory=device.type == "cuda"):
            lps = self._layer_log_probs(feats.to_device(batch, device))
            best = torch.maximum(best, torch.stack([lp.max() for lp in lps]))
        self.ref_log_prob.copy_(best)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) float in [0, 1] → (scores (B,), maps (B, H, W)), float32 on CPU."""
        self.eval()
        return predict_maps(self.anomaly_maps, images.to(module_device(self.backbone)), self.p.batch_size)
