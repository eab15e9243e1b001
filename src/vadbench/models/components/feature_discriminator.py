"""Pieces shared by SimpleNet and SuperSimpleNet: adapted patch features, feature-space noise, heads, losses.

Both methods take frozen, locally aware patch features, pass them through a trainable linear *feature
adaptor* (a 1×1 convolution = one linear map per position), make synthetic anomalies by adding Gaussian
noise to adapted features, and train a per-position *discriminator* (a 2-layer MLP, written as 1×1
convolutions so maps stay (B, C, h, w); BatchNorm2d over B·h·w positions equals the reference code's
BatchNorm1d over rows) to tell the two apart with a truncated L1 loss. SuperSimpleNet adds Perlin-shaped
noise regions, a focal loss and a classification head (in its model file).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def xavier_init(module: nn.Module) -> None:
    """Xavier-normal weights of convolutions and linear layers, BatchNorm weights 1 (both reference codes)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_normal_(module.weight)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.constant_(module.weight, 1)


FeatureNorm = Literal["none", "global", "channel"]


class FeatureStandardizer(nn.Module):
    """(B, D, h, w) → (x − μ) / s with statistics of the train normals' features, fitted once before training.

    μ is the per-channel mean. ``global``: s is one scalar, the root-mean per-channel variance (the channels
    keep the backbone's relative weights); ``channel``: s is each channel's std (floored at 1 % of the median
    std, so near-constant channels are not blown up); ``none``: the identity. Its point is that the feature
    noise σ is then in units of the feature spread whatever the backbone (not in the papers: their σ 0.015 is
    absolute on ImageNet features). Buffers ``mean`` / ``scale`` are learned state; unfitted it is the identity.
    """

    def __init__(self, dim: int, mode: FeatureNorm) -> None:
        super().__init__()
        self.mode = mode
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Streamed float64 moments over every position of (B, D, h, w) batches; memory O(D)."""
        if self.mode == "none":
            return
        n, total, squares = 0, None, None
        for x in batches:
            rows = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)
            s1, s2 = rows.sum(1), (rows * rows).sum(1)
            total = s1 if total is None else total + s1
            squares = s2 if squares is None else squares + s2
            n += rows.shape[1]
        if total is None or squares is None or n < 2:
            raise ValueError("feature standardisation needs at least 2 feature positions")
        mean = total / n
        var = (squares / n - mean * mean).clamp(min=0)
        if self.mode == "global":
            scale = var.mean().sqrt().expand_as(var)
        else:
            std = var.sqrt()
            scale = std.clamp(min=0.01 * float(std.median()))
        scale = scale.clamp(min=1e-12)
        self.mean.copy_(mean.to(self.mean))
        self.scale.copy_(scale.to(self.scale))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return features
        return (features - self.mean[:, None, None]) / self.scale[:, None, None]


class FeatureAdaptor(nn.Module):
    """(B, D, h, w) → (B, D, h, w): one trainable linear map per position (1×1 convolution with bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(dim, dim, kernel_size=1)
        self.apply(xavier_init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)


class PatchDiscriminator(nn.Module):
    """(B, D, h, w) → (B, 1, h, w): Linear(D, hidden) → BatchNorm → LeakyReLU(0.2) → Linear(hidden, 1, no bias),
    applied at every position (SimpleNet's discriminator, SuperSimpleNet's segmentation head)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(dim, hidden, kernel_size=1), nn.BatchNorm2d(hidden), nn.LeakyReLU(0.2, inplace=True)
        )
        self.tail = nn.Conv2d(hidden, 1, kernel_size=1, bias=False)
        self.apply(xavier_init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(features))


def gaussian_noise(like: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std²) noise shaped as `like`, drawn on the generator's device (CPU) and moved to `like`'s device:
    the same draws on CPU and CUDA for one seed."""
    noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return (noise * std).to(like.device, like.dtype)


def truncated_l1(normal: torch.Tensor, anomalous: torch.Tensor, margin: float) -> torch.Tensor:
    """SimpleNet's loss on discriminator outputs (normal high, anomalous low):
    mean max(0, margin − D(normal)) + mean max(0, margin + D(anomalous)). An empty side contributes 0."""
    loss = normal.new_zeros(())
    if normal.numel():
        loss = loss + torch.clamp(margin - normal, min=0).mean()
    if anomalous.numel():
        loss = loss + torch.clamp(margin + anomalous, min=0).mean()
    return loss


def focal_loss_with_logits(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean binary focal loss (Lin et al. 2017, no α weighting): BCE(σ(x), y)·(1 − p_t)^γ; γ = 0 is plain BCE."""
    targets = targets.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    return (bce * (1 - p_t) ** gamma).mean()


def upscaled_embedding(maps: Sequence[torch.Tensor], scale: float, neighborhood: int) -> torch.Tensor:
    """SuperSimpleNet's features: [(B, C_i, h_i, w_i)] → (B, ΣC_i, s·h_0, s·w_0).

    Every layer resized bilinearly (align_corners, as the reference code) to `scale` × the first layer's
    grid, concatenated along channels, then averaged over a `neighborhood`² window (stride 1, same size).
    """
    if neighborhood % 2 != 1:
        raise ValueError(f"neighborhood must be odd (same-size pooling), got {neighborhood}")
    h, w = (int(v) for v in maps[0].shape[-2:])  # plain ints: traceable for export
    size = (round(h * scale), round(w * scale))
    emb = torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=True) for m in maps], dim=1)
    if neighborhood > 1:
        emb = F.avg_pool2d(emb, neighborhood, stride=1, padding=neighborhood // 2)
    return emb
