"""EfficientAD's networks: the patch description network (PDN, small / medium) and the autoencoder.

PDN-S is four convolutions with two 2×2 average poolings, PDN-M six: each output feature vector sees
exactly a 33×33 input patch (receptive field 33, stride 4). Without padding (the paper's choice for
the anomaly-detection networks; anomalib #1143/#1943 lost about a point with padding) an S×S input
gives a (S/4 − 8)×(S/4 − 8) map: 56×56 at 256 px, 24×24 at 128 px. Distillation trains the same
weights *with* padding (S/4 × S/4, matching the backbone's stride-8 grid of a 2S input), as the
authors' pretraining script; the teacher is then used without it. Parameter shapes do not depend on
padding, so one state dict serves both.

The autoencoder (the paper's Table 7) maps the image through a 1×1 bottleneck of 64 channels and
decodes with bilinear upsampling + convolution to the PDN's output grid. Its intermediate sizes scale
with the input: the paper's 3, 8, 15, 32, 63, 127 at 256 px are S/64 − 1, S/32, S/16 − 1, S/8, S/4 − 1,
S/2 − 1; the bottleneck kernel is S/32 (8 at 256 px, the paper's value).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

PdnSize = Literal["small", "medium"]
#: every PDN output pixel sees this many input pixels per side (both sizes)
RECEPTIVE_FIELD = 33
#: teacher feature channels (the paper's 384); the student has twice as many
TEACHER_CHANNELS = 384


def pdn(
    size: PdnSize, out_channels: int = TEACHER_CHANNELS, padding: bool = False, in_channels: int = 3
) -> nn.Sequential:
    """PDN-S (4 convs) or PDN-M (6 convs): (B, in, S, S) → (B, out, S/4 − 8, S/4 − 8) (S/4 with `padding`)."""
    pad = 1 if padding else 0
    if size == "small":
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 128, 4, padding=3 * pad),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=pad),
            nn.Conv2d(128, 256, 4, padding=3 * pad),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=pad),
            nn.Conv2d(256, 256, 3, padding=pad),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, out_channels, 4),
        ]
    elif size == "medium":
        layers = [
            nn.Conv2d(in_channels, 256, 4, padding=3 * pad),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=pad),
            nn.Conv2d(256, 512, 4, padding=3 * pad),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, 2, padding=pad),
            nn.Conv2d(512, 512, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, 512, 3, padding=pad),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, out_channels, 4),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1),
        ]
    else:
        raise ValueError(f"PDN size must be 'small' or 'medium', got {size!r}")
    return nn.Sequential(*layers)


def pdn_out_size(image_size: int, padding: bool = False) -> int:
    """Side of the PDN map for an image_size² input (both sizes have the same geometry)."""
    if padding:
        return image_size // 4
    side = ((image_size - 3) // 2 - 3) // 2 - 2 - 3
    if side < 1:
        raise ValueError(f"image size {image_size} is too small for the unpadded PDN (needs ≥ {RECEPTIVE_FIELD})")
    return side


class Autoencoder(nn.Module):
    """(B, 3, S, S) → (B, out, m, m) with m the PDN map side; a 64-channel 1×1 bottleneck (S/32 ≥ 1 kernel)."""

    def __init__(self, image_size: int, out_size: int, out_channels: int = TEACHER_CHANNELS) -> None:
        super().__init__()
        if image_size < 64 or image_size % 32:
            raise ValueError(f"the autoencoder needs an image size that is a multiple of 32 and ≥ 64, got {image_size}")
        self.out_size = out_size
        s = image_size
        self.sizes = [max(s // 64 - 1, 1), s // 32, s // 16 - 1, s // 8, s // 4 - 1, s // 2 - 1]
        enc: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64)):
            enc += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        enc.append(nn.Conv2d(64, 64, s // 32))  # → 1×1
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.ModuleList(nn.Conv2d(64, 64, 4, padding=2) for _ in self.sizes)
        self.head = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(64, out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        for size, conv in zip(self.sizes, self.decoder):
            z = F.relu(conv(F.interpolate(z, size=size, mode="bilinear", align_corners=False)))
        z = F.interpolate(z, size=self.out_size, mode="bilinear", align_corners=False)
        return self.head(z)
