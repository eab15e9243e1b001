"""Gaussian smoothing of anomaly maps in torch, equal to ``scipy.ndimage.gaussian_filter`` (mode reflect).

PatchCore and PaDiM smooth the upsampled distance map with σ=4. Doing it in torch keeps maps on the
model's device and batched; the kernel radius (truncate·σ) and the half-sample symmetric border
(``d c b a | a b c d | d c b a``) match scipy's defaults, so results agree with the reference code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian (2r+1,), r = int(truncate·σ + 0.5) as in scipy."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _symmetric_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source index of each padded position for half-sample symmetric padding (any radius, even > n)."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """maps (N, H, W) → (N, H, W) smoothed separably; σ ≤ 0 returns the input unchanged."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate, maps.dtype).to(maps.device)
    r = (kernel.numel() - 1) // 2
    n, h, w = maps.shape
    x = maps.unsqueeze(1)  # (N, 1, H, W)
    x = x.index_select(2, _symmetric_index(h, r, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))  # along H
    x = x.index_select(3, _symmetric_index(w, r, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))  # along W
    return x.squeeze(1)


def upsample_and_smooth(patch_maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(N, h, w) patch scores → (N, H, W): bilinear (align_corners False) to `size`, then Gaussian σ."""
    up = F.interpolate(patch_maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return gaussian_blur(up, sigma)
