"""IAD + inpainting (Huang, Cheng, Yang, Lin, Shi, Yang, Gwee & Wen, ICIP 2021, "Joint anomaly detection and
inpainting for microscopy images via deep self-supervised learning"; the MIIC dataset's paper).

Self-supervised inpainting anomaly detection: a network trained on normal images only learns to fill random
rectangular holes from their surroundings; at test time the image is inpainted region by region and the
inpainting error is the anomaly map (a defect cannot be predicted from normal context, so it stays in the
error). Grey S×S input (`image_size`), x ∈ [0, 1].

Network (mask-aware, no skip connections): input [x̃, m] with x̃ = (2x − 1)·(1 − m) (a hole reads as mid-grey)
and the hole mask m as a second channel, so the net knows which pixels to invent and which to trust::

    conv5 w → conv3/2 2w, conv3 2w → conv3/2 4w, conv3 4w → dilated conv3 4w (d = `dilations`) → conv3 4w
    → ×2 nearest, conv3 2w, conv3 2w → ×2 nearest, conv3 w, conv3 w/2 → conv3 1, sigmoid     (ELU between)

Only the holes are taken from the net: x̂ = x·(1 − m) + net(x̃, m)·m. The dilated middle gives a receptive
field of ±78 px (at any size), so a `window`-sized hole is filled from the periodic structure around it.

Training masks: `holes` axis-aligned rectangles per image, sides uniform in [`hole_min`, `hole_max`] px,
positions uniform (they may overlap and leave the image), drawn on the CPU from a generator seeded
`seed + 7919` in batch order. Loss, over the hole pixels only (the rest is copied, not predicted):
    l1 · mean_m |x̂ − x|  +  ssim · mean_m (1 − SSIM(x̂, x))     (11×11 Gaussian SSIM, components.ssim)
The early-stopping criterion is that loss on the validation normals under masks from a generator reset to
`seed + 1` at every evaluation (the same masks every epoch).

Test masks (fixed, no randomness): the image is tiled into `window`×`window` squares; the squares are split
into g² sets by (row mod g, column mod g), g = `window_groups`, and each set is one mask, so a hidden square
has its eight neighbours visible and g² masks cover the image exactly once. `window_phases` = 2 adds the same
tiling shifted by window/2 (another g² masks), so no pixel is scored only at a hole's centre or edge. Per mask
the error of its hidden pixels is
    e = |G_σr * (x̂ − x)|      (the signed residual Gaussian-smoothed with σr = `residual_sigma` before |·|)
so the SEM shot noise, zero-mean, averages out while a defect, one-signed over its area, keeps its contrast;
the map averages e over the masks hiding each pixel, is Gaussian-smoothed (`smooth_sigma`) and, by default,
standardised per position with the validation normals' mean and std (`map_normalization`, the shared
`PositionalMapNorm`: the tiling leaves a faint window-grid and border pattern on every image). Image score:
the map's maximum (`score_reduction`).

What the paper does not publish (no code is public; the MIIC repository holds the data only), and what we
chose: the network (an encoder / dilated-middle / decoder completion net in the style of Iizuka et al. 2017),
the mask shapes and sizes, the loss, the residual and the calibration above; see docs/MODELS.md. The paper's
second stage, inpainting the detected defect away ("joint ... inpainting", trained on MIIC's synthesised
defect pairs), is not part of the benchmark contract and is not implemented.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from vadbench.data.source import as_source
from vadbench.models.base import register_model
from vadbench.models.components.map_normalization import MapNormalization, PositionalMapNorm
from vadbench.models.components.pixel_autoencoder import PixelAEParams, PixelAutoencoderModel
from vadbench.models.components.smoothing import gaussian_blur
from vadbench.models.components.ssim import ssim_map
from vadbench.models.components.trainer import LoopSettings, mean_loss
from vadbench.models.components.trainer import train as train_loop

_MASK_SEED_OFFSET = 7919  # training holes: a stream apart from the batch order (seed) and validation (seed + 1)


# -- masks ---------------------------------------------------------------------------------------------
def random_box_masks(
    batch: int, size: int, holes: int, min_side: int, max_side: int, generator: torch.Generator
) -> torch.Tensor:
    """→ (batch, 1, size, size) float {0, 1}: the union of `holes` random rectangles per image, sides uniform in
    [min_side, max_side], centres uniform over the image (a box may stick out by up to half its side, so
    border pixels are hidden about as often as the rest). Drawn on the CPU (the same on every device)."""
    sides = torch.randint(min_side, max_side + 1, (batch, holes, 2), generator=generator)
    lo = torch.rand(batch, holes, 2, generator=generator) * size - sides / 2
    top, left = lo.floor().long().unbind(-1)
    h, w = sides.unbind(-1)
    ar = torch.arange(size)
    rows = (ar >= top[..., None]) & (ar < (top + h)[..., None])  # (B, holes, S)
    cols = (ar >= left[..., None]) & (ar < (left + w)[..., None])
    return (rows[..., :, None] & cols[..., None, :]).any(1, keepdim=True).float()


def window_masks(size: int, window: int, groups: int, phases: int) -> torch.Tensor:
    """The fixed test masks → (phases·groups², 1, size, size) float {0, 1}.

    Phase p tiles the image with window×window squares starting at offset p·window/2 (a partial row/column
    of squares fills the border); mask (p, a, b) hides the squares whose (row, column) index ≡ (a, b) mod
    `groups`. Within a phase the masks are disjoint and cover every pixel once."""
    masks = []
    for phase in range(phases):
        offset = phase * window // 2
        idx = (torch.arange(size) - offset + window) // window  # square index per row / column (border: 0)
        for a in range(groups):
            for b in range(groups):
                rows, cols = idx % groups == a, idx % groups == b
                masks.append((rows[:, None] & cols[None, :]).float())
    return torch.stack(masks)[:, None]


# -- network --------------------------------------------------------------------------------------------
def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, dilation * (kernel - 1) // 2, dilation), nn.ELU(inplace=True)]


class DilatedInpaintNet(nn.Module):
    """Completion network: [x̃, m] (N, 2, H, W), H and W divisible by 4 → (N, 1, H, W) in [0, 1] (sigmoid).

    Two stride-2 convolutions down to H/4, dilated 3×3 convolutions there (`dilations`), two nearest ×2
    upsamplings back; no skip connections (they would hand the decoder the hole's zeros at full resolution)
    and no normalisation layers (batch statistics would mix holes and context)."""

    def __init__(self, width: int = 16, dilations: tuple[int, ...] = (2, 4, 8)) -> None:
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            *_conv(2, w, 5),
            *_conv(w, 2 * w, 3, 2),
            *_conv(2 * w, 2 * w),
            *_conv(2 * w, 4 * w, 3, 2),
            *_conv(4 * w, 4 * w),
        )
        self.middle = nn.Sequential(
            *[m for d in dilations for m in _conv(4 * w, 4 * w, dilation=d)], *_conv(4 * w, 4 * w)
        )
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), *_conv(4 * w, 2 * w), *_conv(2 * w, 2 * w),
            nn.Upsample(scale_factor=2, mode="nearest"), *_conv(2 * w, w), *_conv(w, max(w // 2, 1)),
            nn.Conv2d(max(w // 2, 1), 1, 3, 1, 1), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.middle(self.encoder(x)))


def inpaint(net: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, 1, S, S) in [0, 1], mask (B or 1, 1, S, S) {0, 1} → x̂ (B, 1, S, S): holes from the net, the rest x."""
    mask = mask.to(x.device).expand_as(x)  # shapes, not len(): a traced predict keeps a dynamic batch size
    hidden = (x * 2 - 1) * (1 - mask)  # [−1, 1]: a hole (0) reads as mid-grey, not as black
    return x * (1 - mask) + net(torch.cat([hidden, mask], 1)) * mask


# -- model ----------------------------------------------------------------------------------------------
@register_model
class IADInpaint(PixelAutoencoderModel):
    """IAD + inpainting: random-hole inpainting net, windowed test-time inpainting, smoothed-residual maps."""

    name = "iad_inpaint"

    class Params(PixelAEParams):
        """CPU defaults: 128 px grey, width 8, 6 epochs, batch 8, Adam lr 1e-3 (~24 s fit on 100 images, 2 cores;
        image / pixel AUROC 0.908 / 0.971 on the default synthetic_sem, docs/MODELS.md). The paper publishes no
        network, masks, loss or schedule (its MIIC images are 512×512 grey SEM): every value here is our choice;
        profiles/paper.yaml scales them to 256 px and a GPU schedule."""

        epochs: int = Field(6, ge=1, le=10000, description="training epochs")
        batch_size: int = Field(8, ge=1, le=4096, description="images per step")
        lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate")
        image_size: int = Field(128, ge=16, le=1024, multiple_of=4, description="square grey network input")
        width: int = Field(8, ge=2, le=256, description="channels at full resolution (2w, 4w below)")
        dilations: list[Annotated[int, Field(ge=1, le=64)]] = Field(
            [2, 4, 8], min_length=1, max_length=8, description="dilations of the 3×3 convs at 1/4 resolution"
        )
        window: int = Field(16, ge=2, le=512, description="side of the test-time hidden squares, px at image_size")
        window_groups: int = Field(2, ge=2, le=8, description="g: g² masks per tiling, hidden squares g apart")
        window_phases: int = Field(2, ge=1, le=2, description="tilings: 1, or 2 with the second shifted by window/2")
        holes: int = Field(8, ge=1, le=256, description="random rectangles hidden per training image")
        hole_min: int = Field(8, ge=1, le=512, description="smallest training rectangle side, px")
        hole_max: int = Field(24, ge=1, le=512, description="largest training rectangle side, px")
        l1_weight: float = Field(1.0, ge=0, le=100, description="weight of the mean |x̂ − x| over hole pixels")
        ssim_weight: float = Field(1.0, ge=0, le=100, description="weight of the mean (1 − SSIM) over hole pixels")
        residual_sigma: float = Field(
            1.0, ge=0, le=16, description="Gaussian σ on the signed residual before |·| (0: plain |x̂ − x|)"
        )
        map_normalization: MapNormalization = Field(
            "per_position", description="per_position: standardise by the validation normals' mean/std per pixel"
        )

        @model_validator(mode="after")
        def _sizes_fit(self) -> IADInpaint.Params:
            if self.hole_min > self.hole_max:
                raise ValueError(f"hole_min {self.hole_min} > hole_max {self.hole_max}")
            if self.window * 2 > self.image_size:
                raise ValueError(f"window {self.window}: at most image_size / 2 ({self.image_size // 2})")
            if self.window_phases == 2 and self.window % 2:
                raise ValueError(f"window {self.window} must be even for the half-window shifted tiling")
            if self.l1_weight == 0 and self.ssim_weight == 0:
                raise ValueError("l1_weight and ssim_weight are both 0: nothing to train")
            return self

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        self.input_size = p.image_size  # the shared grey conversion resizes to this (instance, not ClassVar)
        # the fixed test masks, rebuilt from the params (never saved); predict then draws nothing (traceable)
        masks = window_masks(p.image_size, p.window, p.window_groups, p.window_phases)
        self.register_buffer("test_masks", masks, persistent=False)  # (M, 1, S, S)
        self.map_norm = PositionalMapNorm(p.map_normalization)

    def build_net(self) -> nn.Module:
        return DilatedInpaintNet(self.p.width, tuple(self.p.dilations))

    # -- loss ---------------------------------------------------------------------------------------------
    def hole_loss(self, x: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """l1·mean|x̂ − x| + ssim·mean(1 − SSIM) over the hole pixels of x, x̂ (B, 1, S, S) (a scalar)."""
        p = self.p
        n = mask.sum().clamp_min(1.0)
        loss = p.l1_weight * ((recon - x).abs() * mask).sum() / n
        if p.ssim_weight:
            loss = loss + p.ssim_weight * ((1 - ssim_map(recon, x)) * mask).sum() / n
        return loss

    def _masked_loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p = self.p
        mask = random_box_masks(len(x), x.shape[-1], p.holes, p.hole_min, p.hole_max, generator).to(x.device)
        return self.hole_loss(x, inpaint(self.net, x, mask), mask)

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Train on a stream of normal images (best epoch by the fixed-mask validation loss), then fit the
        map normalisation on the validation normals' maps."""
        p = self.p
        has_val = val is not None and len(val) > 0
        self.map_norm.check_val(val, self.name)  # fail before training, not after
        masks = torch.Generator().manual_seed(p.seed + _MASK_SEED_OFFSET)
        report = train_loop(
            trainable=self.net,
            optimizer=torch.optim.Adam(self.net.parameters(), lr=p.lr, weight_decay=p.weight_decay),
            loss_fn=lambda x: self._masked_loss(x, masks),
            train=train,
            val=val if has_val else None,
            settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience),
            generator=torch.Generator().manual_seed(p.seed),
            device=self.device,
            desc=self.name,
            val_loss=(lambda: self.reconstruction_loss(val)) if has_val else None,
            batch_fn=self._batch_input,
        )
        self.eval()
        self.map_norm.calibrate(lambda x: self.raw_maps(x)[:, 0], val, p.batch_size, self.device, self.name)
        return report

    @torch.no_grad()
    def reconstruction_loss(self, images: Dataset | torch.Tensor) -> float:
        """Mean hole loss over an image source with the fixed validation masks (generator `seed + 1`, reset here)."""
        self.net.eval()
        gen = torch.Generator().manual_seed(self.p.seed + 1)
        return mean_loss(
            lambda x: self._masked_loss(x, gen), as_source(images), self.p.batch_size, self.device, self._batch_input
        )

    # -- maps -----------------------------------------------------------------------------------------------
    def window_error(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 1, S, S) network input → mean over the test masks of the residual of each hidden pixel
        (N, 1, S, S), unsmoothed: |G_σr * (x̂ − x)| where the mask hides the pixel."""
        total = torch.zeros_like(x)
        for mask in self.test_masks[:, None]:  # (1, 1, S, S) each
            diff = inpaint(self.net, x, mask) - x
            if self.p.residual_sigma > 0:
                diff = gaussian_blur(diff[:, 0], self.p.residual_sigma)[:, None]
            total = total + diff.abs() * mask
        return total / self.p.window_phases  # each tiling hides every pixel once

    @torch.no_grad()
    def raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] → smoothed error maps (N, 1, S, S), before the normalisation."""
        self.net.eval()
        out = []
        step = max(self.p.batch_size, 16)
        for start in range(0, len(images), step):
            err = self.window_error(self.to_input(images[start : start + step]))
            out.append(gaussian_blur(err[:, 0], self.p.smooth_sigma)[:, None])
        return torch.cat(out)

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → maps (N, 1, S, S): the error maps after the validation-fitted normalisation."""
        return self.map_norm(self.raw_maps(images)[:, 0])[:, None]
