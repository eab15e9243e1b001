"""Dihedral views and photometric jitter: the classifier's training augmentation and its 8-view TTA."""

from __future__ import annotations

import torch

#: the 8 symmetries of a square: (quarter turns, horizontal flip); view 0 is the identity
DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


def dihedral(images: torch.Tensor, view: int) -> torch.Tensor:
    """images (B, C, H, W) → view `view` of `DIHEDRAL` (square images keep their shape)."""
    k, flip = DIHEDRAL[view]
    out = images.flip(-1) if flip else images
    return torch.rot90(out, k, dims=(-2, -1)) if k else out


def augment(images: torch.Tensor, generator: torch.Generator, jitter: float) -> torch.Tensor:
    """Per image: a random dihedral view, contrast × U(1 − j, 1 + j) about its mean, brightness + U(−j/2, j/2).

    Draws come from `generator` (CPU) in a fixed order, so augmentation is seeded on any device.
    images (B, C, H, W) float in [0, 1] → same shape, clamped to [0, 1]."""
    b = len(images)
    views = torch.randint(0, len(DIHEDRAL), (b,), generator=generator).tolist()
    contrast = 1 + jitter * (2 * torch.rand(b, generator=generator) - 1)
    brightness = jitter * (torch.rand(b, generator=generator) - 0.5)
    out = torch.stack([dihedral(x[None], v)[0] for x, v in zip(images, views)])
    if jitter > 0:
        c = contrast.to(images.device).view(b, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * c + mean + brightness.to(images.device).view(b, 1, 1, 1)).clamp(0, 1)
    return out
