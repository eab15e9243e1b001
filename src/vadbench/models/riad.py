"""RIAD (Zavrtanik, Kristan & Skočaj, Pattern Recognition 2021, "Reconstruction by inpainting for visual
anomaly detection").

A U-Net learns to inpaint hidden cells of normal images. For a cell size k the (grey, S×S) image is cut into
a grid of k×k cells, the cells are split at random into n disjoint, equally large sets, and each set hides
(zeroes) its cells in one copy of the image. The n copies go through the network together; the
reconstruction takes every cell from the copy in which it was hidden, so each pixel is inpainted from its
context and never copied through::

    sets (B, 1, S, S) ∈ {0..n−1}   →   copies_j = x · [sets ≠ j]   →   x̂ = Σ_j net(copies_j) · [sets = j]

Training: one k per batch drawn from `cell_sizes`, loss = l2·MSE + ssim·(1 − SSIM) + gms·MSGMS(x, x̂) with

    GMS(x, y) = (2·g_x·g_y + c) / (g_x² + g_y² + c),  g = |Prewitt ∇| (3×3, /3),  c = 0.0026,
    MSGMS loss = 1 − mean over `gms_scales` scales (2× average pooling) of the mean GMS.

Test: for every k a fixed partition (seeded by `seed + 2`, the same for every image, so a score does not
depend on the batch it came in), error map = 1 − mean over scales of GMS upsampled bilinearly to S; the
map is the mean over k, Gaussian-smoothed; image score = its maximum. Train masks come from a generator
seeded `seed` (one partition per image, drawn in batch order), the early-stopping loss on the validation
normals from a generator reset to `seed + 1` at every evaluation (the same masks every epoch) and averaged
over all k. Training runs in the shared loop through `PixelAutoencoderModel` (grey input, Adam), with the
loss and the validation criterion replaced here.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from vadbench.data.source import as_source
from vadbench.models.base import register_model
from vadbench.models.components.pixel_autoencoder import PixelAEParams, PixelAutoencoderModel
from vadbench.models.components.smoothing import gaussian_blur
from vadbench.models.components.ssim import ssim
from vadbench.models.components.trainer import LoopSettings, mean_loss
from vadbench.models.components.trainer import train as train_loop

#: GMSD's stability constant for intensities in [0, 1] (170 / 255², Xue et al. 2014; the reference code's value)
GMS_C = 0.0026
_PREWITT_X = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]]) / 3.0


# -- gradient magnitude similarity ---------------------------------------------------------------
def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) → Prewitt gradient magnitude (N, C, H, W); borders replicated (no false edges there)."""
    n, c, h, w = x.shape
    kx = _PREWITT_X.to(x)
    kernel = torch.stack([kx, kx.T]).unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3): [∂x, ∂y] per channel
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c).view(n, c, 2, h, w)
    return (g.pow(2).sum(2) + 1e-12).sqrt()  # ε keeps the sqrt differentiable on flat regions


def gms_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude similarity of x, y (N, C, H, W) → (N, C, H, W) in (0, 1], 1 where the gradients agree."""
    gx, gy = gradient_magnitude(x), gradient_magnitude(y)
    return (2 * gx * gy + GMS_C) / (gx.pow(2) + gy.pow(2) + GMS_C)


def gms_pyramid(x: torch.Tensor, y: torch.Tensor, scales: int) -> list[torch.Tensor]:
    """GMS maps at `scales` resolutions: full, then each time 2× average-pooled (N, C, H/2^s, W/2^s)."""
    maps = []
    for s in range(scales):
        if s:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        maps.append(gms_map(x, y))
    return maps


def msgms_loss(x: torch.Tensor, y: torch.Tensor, scales: int = 4) -> torch.Tensor:
    """1 − mean over scales of the mean GMS (a scalar, 0 when x = y)."""
    return 1 - torch.stack([m.mean() for m in gms_pyramid(x, y, scales)]).mean()


def msgms_error_map(x: torch.Tensor, y: torch.Tensor, scales: int = 4) -> torch.Tensor:
    """(N, C, H, W) pair → (N, 1, H, W): 1 − mean over scales of GMS, each upsampled bilinearly, channel mean."""
    size = x.shape[-2:]
    ups = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in gms_pyramid(x, y, scales)]
    return (1 - torch.stack(ups).mean(0)).mean(1, keepdim=True)


# -- masks and inpainting --------------------------------------------------------------------------
def cell_partition(batch: int, size: int, cell: int, n_sets: int, generator: torch.Generator) -> torch.Tensor:
    """→ (batch, 1, size, size) int64 set index per pixel: a grid of ⌈size/cell⌉² cells of cell×cell pixels,
    each image's cells shuffled into `n_sets` sets of equal size (±1). Drawn on the CPU (same on every device)."""
    grid = -(-size // cell)
    cells = grid * grid
    labels = torch.arange(cells) * n_sets // cells  # balanced: 0…0 1…1 …
    order = torch.rand(batch, cells, generator=generator).argsort(1)  # one random permutation per image
    sets = labels[order].view(batch, 1, grid, grid)
    return sets.repeat_interleave(cell, 2).repeat_interleave(cell, 3)[..., :size, :size]


def inpaint(net: nn.Module, x: torch.Tensor, sets: torch.Tensor, n_sets: int) -> torch.Tensor:
    """x (B, C, S, S) in [0, 1], sets (B or 1, 1, S, S) → x̂ (B, C, S, S): each pixel from the copy hiding it."""
    sets = sets.to(x.device).expand_as(x)  # shapes, not len(): a traced predict keeps a dynamic batch size
    z = x * 2 - 1  # [−1, 1] as the reference code: a hidden cell (0) reads as mid-grey, not as black
    copies = torch.cat([z * (sets != j) for j in range(n_sets)])  # (n·B, C, S, S), one forward pass
    out = net(copies).view(n_sets, *x.shape)
    return out.gather(0, sets.unsqueeze(0)).squeeze(0)


# -- network -----------------------------------------------------------------------------------------
def _block(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class _Up(nn.Module):
    """(N, cin, h, w), skip (N, cout, 2h, 2w) → (N, cout, 2h, 2w): transposed conv, concatenate, two convs."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 4, 2, 1)
        self.conv = _block(2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], 1))


class InpaintUNet(nn.Module):
    """The reference U-Net at width w: encoder w, 2w, 4w, 8w, 8w (four k4 s2 downsamplings), decoder back with
    skip connections; x (N, C, H, W), H and W divisible by 16 → x̂ (N, C, H, W) in [0, 1] (sigmoid)."""

    def __init__(self, width: int = 16, channels: int = 1) -> None:
        super().__init__()
        c = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.down = nn.ModuleList([_block(channels, c[0])] + [_block(a, b, 4, 2) for a, b in zip(c, c[1:])])
        self.up = nn.ModuleList([_Up(c[i + 1], c[i]) for i in reversed(range(4))])
        self.out = nn.Sequential(nn.Conv2d(c[0], channels, 3, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        return self.out(x)


@register_model
class RIAD(PixelAutoencoderModel):
    """Reconstruction by inpainting: U-Net inpainting of disjoint random cell masks, MSGMS anomaly maps."""

    name = "riad"

    class Params(PixelAEParams):
        """CPU defaults: 128 px grey, width 8, 5 epochs, cells {2, 4, 8} (~30 s per epoch of 100 images on one
        shared core; docs/MODELS.md).

        Paper: 256×256, width 64, cells {2, 4, 8, 16}, n = 3, 300 epochs, batch 8, Adam lr 1e-4 (reference
        code: weight decay 1e-5), loss weights 1/1/1, 4 GMS scales; reference code smooths with a mean filter.
        """

        epochs: int = Field(5, ge=1, le=10000, description="training epochs (paper 300)")
        batch_size: int = Field(8, ge=1, le=4096, description="images per step; the network sees n× as many")
        lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate (paper 1e-4)")
        image_size: int = Field(128, ge=16, le=1024, multiple_of=16, description="square grey network input")
        width: int = Field(8, ge=2, le=256, description="U-Net channels at full resolution (paper 64)")
        cell_sizes: list[Annotated[int, Field(ge=1, le=256)]] = Field(
            [2, 4, 8], min_length=1, max_length=8, description="mask cell sizes k in pixels at image_size"
        )
        num_masks: int = Field(3, ge=2, le=16, description="disjoint cell sets n = masked copies per image")
        l2_weight: float = Field(1.0, ge=0, le=100, description="weight of the MSE term")
        ssim_weight: float = Field(1.0, ge=0, le=100, description="weight of (1 − SSIM)")
        gms_weight: float = Field(1.0, ge=0, le=100, description="weight of the MSGMS loss")
        gms_scales: int = Field(4, ge=1, le=6, description="GMS scales (2× average pooling between them)")

        @model_validator(mode="after")
        def _cells_fit(self) -> RIAD.Params:
            if max(self.cell_sizes) * 2 > self.image_size:
                raise ValueError(f"cell_sizes {self.cell_sizes}: a cell must be at most image_size / 2")
            if self.image_size >> (self.gms_scales - 1) < 4:
                raise ValueError(f"gms_scales {self.gms_scales} shrinks image_size {self.image_size} below 4 px")
            return self

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        self.input_size = p.image_size  # the shared grey conversion resizes to this (instance, not ClassVar)
        # the fixed test partitions, one per k (seed + 2), shared by every image: drawn once here, so `predict`
        # draws nothing (traceable) and a score never depends on its batch; rebuilt from the seed, never saved
        gen = torch.Generator().manual_seed(p.seed + 2)
        parts = [cell_partition(1, p.image_size, k, p.num_masks, gen)[0] for k in p.cell_sizes]
        self.register_buffer("test_sets", torch.stack(parts), persistent=False)  # (len(cell_sizes), 1, S, S)

    def build_net(self) -> nn.Module:
        return InpaintUNet(self.p.width)

    def loss(self, x: torch.Tensor, recon: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """l2·MSE + ssim·(1 − SSIM) + gms·MSGMS between x and its inpainted x̂ (scalar)."""
        p = self.p
        return (
            p.l2_weight * F.mse_loss(recon, x)
            + p.ssim_weight * (1 - ssim(recon, x))
            + p.gms_weight * msgms_loss(x, recon, p.gms_scales)
        )

    def residual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return msgms_error_map(x, recon, self.p.gms_scales)

    def _masked_loss(self, x: torch.Tensor, cell: int, generator: torch.Generator) -> torch.Tensor:
        sets = cell_partition(len(x), x.shape[-1], cell, self.p.num_masks, generator)
        return self.loss(x, inpaint(self.net, x, sets, self.p.num_masks))

    def _fixed_loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Mean loss over every cell size (the validation criterion; masks from `generator`)."""
        return torch.stack([self._masked_loss(x, k, generator) for k in self.p.cell_sizes]).mean()

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Train on a stream of normal images; keep the epoch with the lowest fixed-mask validation loss."""
        p = self.p
        masks = torch.Generator().manual_seed(p.seed)
        sizes = torch.tensor(p.cell_sizes)

        def train_loss(x: torch.Tensor) -> torch.Tensor:
            cell = int(sizes[torch.randint(len(sizes), (1,), generator=masks)])  # one k per batch, as the paper
            return self._masked_loss(x, cell, masks)

        has_val = val is not None and len(val) > 0
        report = train_loop(
            trainable=self.net,
            optimizer=torch.optim.Adam(self.net.parameters(), lr=p.lr, weight_decay=p.weight_decay),
            loss_fn=train_loss,
            train=train,
            val=val if has_val else None,
            # every step sees n masked copies per image, so even a single-image batch gives BatchNorm n samples
            settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience),
            generator=torch.Generator().manual_seed(p.seed),
            device=self.device,
            desc=self.name,
            val_loss=(lambda: self.reconstruction_loss(val)) if has_val else None,
            batch_fn=self._batch_input,
        )
        self.eval()
        return report

    @torch.no_grad()
    def reconstruction_loss(self, images: Dataset | torch.Tensor) -> float:
        """Mean loss over every cell size with the fixed validation masks (generator `seed + 1`, reset here)."""
        self.net.eval()
        gen = torch.Generator().manual_seed(self.p.seed + 1)
        return mean_loss(
            lambda x: self._fixed_loss(x, gen), as_source(images), self.p.batch_size, self.device, self._batch_input
        )

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → smoothed maps (N, 1, S, S): MSGMS error averaged over the cell sizes, fixed partitions."""
        self.net.eval()
        p = self.p
        out = []
        step = max(p.batch_size, 16)
        for start in range(0, len(images), step):
            x = self.to_input(images[start : start + step])
            err = torch.stack(
                [self.residual(x, inpaint(self.net, x, s, p.num_masks)) for s in self.test_sets[:, None]]
            ).mean(0)
            out.append(gaussian_blur(err[:, 0], p.smooth_sigma)[:, None])
        return torch.cat(out)
