"""Structural similarity (Wang et al. 2004) as a per-pixel map, differentiable, for images in [0, 1]."""

from __future__ import annotations

import torch

from vadbench.models.components.smoothing import gaussian_blur

# the constants of the SSIM paper for data range 1
_C1 = 0.01**2
_C2 = 0.03**2


def ssim_map(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    """Local SSIM of x, y (N, C, H, W) in [0, 1] → (N, C, H, W), 1 where identical.

    Gaussian window of std `sigma`, size 2·radius+1 (11×11 by default, the paper's window);
    borders are mirrored (scipy's reflect) so the map keeps the input size.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")

    def blur(t: torch.Tensor) -> torch.Tensor:
        # channels folded into the batch: the shared blur works on (N, H, W) maps
        return gaussian_blur(t.flatten(0, 1), sigma, truncate=radius / sigma).view_as(t)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + _C1) * (2 * cov + _C2)
    den = (mu_x**2 + mu_y**2 + _C1) * (var_x + var_y + _C2)
    return num / den


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    """Mean SSIM over all pixels and images (a scalar)."""
    return ssim_map(x, y, sigma, radius).mean()
