"""Deep convolutional autoencoder (DAE) trained with MSE + SSIM; residual = anomaly map.

Architecture (fixed, as specified for this benchmark), input grey (1,128,128):
encoder: 4 blocks [Conv k3 s2 → BN → LeakyReLU(0.2) → Conv k3 s1 → BN → LeakyReLU(0.2)], channels
32/64/128/256: 128→64→32→16→8 → (256,8,8) → FC(16384→128) = latent → FC(128→16384) → (256,8,8);
decoder: 4 blocks [ConvT k4 s2 → Conv k3 → BN → ReLU], channels 128/64/32/32: 8→16→32→64→128;
output Conv(32→1, k3) + Sigmoid → (1,128,128).
Loss: MSE(x, x̂) + ssim_weight · (1 − SSIM(x, x̂)) (11×11 Gaussian window, σ 1.5).
Map: ssim_map_weight · (1 − SSIM map)/2 + (1 − ssim_map_weight) · (x − x̂)², both in [0, 1], then
Gaussian-smoothed; score: max (default) or mean of that map.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from vadbench.models.base import register_model
from vadbench.models.components.pixel_autoencoder import PixelAEParams, PixelAutoencoderModel
from vadbench.models.components.ssim import ssim_map


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True),
    )  # fmt: skip


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class DeepAENet(nn.Module):
    """x (N, 1, 128, 128) → (x̂ (N, 1, 128, 128) in [0, 1], z (N, 128))."""

    def __init__(self, latent_dim: int = 128) -> None:
        super().__init__()
        self.encoder = nn.Sequential(_down(1, 32), _down(32, 64), _down(64, 128), _down(128, 256))
        self.to_latent = nn.Linear(256 * 8 * 8, latent_dim)
        self.from_latent = nn.Linear(latent_dim, 256 * 8 * 8)
        self.decoder = nn.Sequential(_up(256, 128), _up(128, 64), _up(64, 32), _up(32, 32))
        self.out = nn.Sequential(nn.Conv2d(32, 1, 3, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.to_latent(self.encoder(x).flatten(1))
        return self.out(self.decoder(self.from_latent(z).view(-1, 256, 8, 8))), z


@register_model
class DeepAE(PixelAutoencoderModel):
    """Deep autoencoder anomaly detector with SSIM loss (pixel input; no backbone)."""

    name = "deep_ae"

    class Params(PixelAEParams):
        """Defaults: 30 epochs, early stopping (patience 5). Costly on CPU (~20 s per epoch of 100 images on
        2 shared cores) and it needs the epochs: 6 epochs gave only image AUROC 0.56 on synthetic_sem.

        Paper-scale profile: same architecture, ~200 epochs, batch 32, Adam lr 1e-3 (weight decay 1e-5).
        """

        ssim_weight: float = Field(0.1, ge=0, le=100, description="weight of (1 − SSIM) in the training loss")
        ssim_map_weight: float = Field(0.5, ge=0, le=1, description="share of (1 − SSIM)/2 vs squared error in the map")

    def build_net(self) -> nn.Module:
        return DeepAENet(128)

    def loss(self, x: torch.Tensor, recon: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(recon, x) + self.p.ssim_weight * (1 - ssim_map(recon, x).mean())

    def residual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        w = self.p.ssim_map_weight
        # (1 − SSIM)/2 ∈ [0, 1] puts the structural term on the same scale as the squared error
        return w * (1 - ssim_map(recon, x)) / 2 + (1 - w) * (x - recon) ** 2
