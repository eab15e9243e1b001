"""Square bilinear resize of a batch, the one the models share for their network input."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_square(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) → (B, C, side, side), bilinear with pixel-centre alignment (align_corners=False).

    Antialiased only when shrinking: an upscale gains nothing from it (the two agree to 1 ulp there), and
    ONNX has no antialiased resize. Returns `x` itself when it already has that size.
    """
    h, w = x.shape[-2:]
    if (h, w) == (side, side):
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=h > side or w > side)
