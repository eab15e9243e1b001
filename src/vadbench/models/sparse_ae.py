"""Sparse convolutional autoencoder (SAE): reconstruct grey 128×128 normals; residual = anomaly map.

Architecture (fixed, as specified for this benchmark):
(1,128,128) → Conv(1→32, k4 s2 p1) BN ReLU → (32,64,64) → Conv(32→64, k4 s2 p1) BN ReLU → (64,32,32)
→ FC(65536→64) = latent z → FC(64→65536) → (64,32,32) → ConvT(64→32, k4 s2 p1) BN ReLU → (32,64,64)
→ ConvT(32→1, k4 s2 p1) Sigmoid → (1,128,128).
Loss: MSE(x, x̂) + l1_weight · mean |z| (L1 of the latent, averaged like torch.nn.functional.l1_loss;
the summed norm made Adam blow the 65536-fan-in latent up in the first steps).
Map: squared error (x − x̂)², Gaussian-smoothed; score: max (default) or mean of that map.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from vadbench.models.base import register_model
from vadbench.models.components.pixel_autoencoder import PixelAEParams, PixelAutoencoderModel


class SparseAENet(nn.Module):
    """x (N, 1, 128, 128) → (x̂ (N, 1, 128, 128) in [0, 1], z (N, 64))."""

    def __init__(self, latent_dim: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.to_latent = nn.Linear(64 * 32 * 32, latent_dim)
        self.from_latent = nn.Linear(latent_dim, 64 * 32 * 32)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.to_latent(self.encoder(x).flatten(1))
        return self.decoder(self.from_latent(z).view(-1, 64, 32, 32)), z


@register_model
class SparseAE(PixelAutoencoderModel):
    """Sparse autoencoder anomaly detector (pixel input; no backbone)."""

    name = "sparse_ae"

    class Params(PixelAEParams):
        """Defaults: 30 epochs × ~100 images (about 1–4 min on 2 shared CPU cores; image AUROC ≈ 0.83 on
        synthetic_sem with them).

        Paper-scale profile: same architecture, ~100–200 epochs, batch 32, Adam lr 1e-3.
        """

        l1_weight: float = Field(1e-3, ge=0, le=10, description="weight of the L1 sparsity penalty on the latent")

    def build_net(self) -> nn.Module:
        return SparseAENet(64)

    def loss(self, x: torch.Tensor, recon: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(recon, x) + self.p.l1_weight * latent.abs().mean()

    def residual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return (x - recon) ** 2
