"""DRAEM (Zavrtanik, Kristan, Skočaj, ICCV 2021, "DRAEM – A discriminatively trained reconstruction embedding for
surface anomaly detection"); pixel input, no backbone.

Two networks trained jointly on normal images with simulated anomalies (official code: VitjanZ/DRAEM):

* reconstructive sub-network R, an encoder–decoder without skips: 5 double-conv blocks (widths w, 2w, 4w, 8w,
  8w; 4 max-pools), 4 bilinear ×2 upsamplings back, a 3×3 output conv (no squashing): corrupted I_a → Î ≈ I;
* discriminative sub-network D, a U-Net (6 blocks up to 8w, 5 max-pools, skip connections) on
  concat(Î, I_a) → 2-channel (normal, anomalous) logits at the input resolution.

Simulated anomaly (paper Sec. 3.3): M = Perlin noise > 0.5 (`components.perlin`, lattice 2^k per axis,
k ∈ [0, 6)); I_a = (1 − M)⊙I + (1 − β)(M⊙I) + β(M⊙A), opacity β ~ U[0.1, 1], A a foreign texture; half the
images stay clean with an empty mask. Loss: L2(Î, I) + (1 − SSIM(Î, I)) + focal(D, M) with γ = 2 (the focal
gradient reaches R too, as in the official code). Map: the softmax anomalous probability, bilinear to the
caller's size; image score: max of that map box-filtered k×k (paper: 21 on the 256 px map; here 21 scaled to
`input_size`, made odd: 11 at 128 px), computed at `input_size` so it does not depend on the caller's size.

**Textures.** The paper blends DTD images (each through 3 of 10 imgaug augmentations). We have no DTD
download, so `fit` renders a small seeded bank of *fractal* images with our own IFS code (`vadbench.fractals`:
σ-factor systems accepted by the FractalDB filling-rate search, chaos game at `input_size`, a random 3×3
stamp, binary). Each use maps a bank image through random per-channel levels lo + (hi − lo)·A with
lo, hi ~ U[0, 1] (contrast, inversion, and a tint for colour input) after a random 90° rotation and flip.
The bank is rebuilt from the seed by every fit and is not saved (it is training data, not learned state).

Other departures: no 30 % rotation of the training images or of the Perlin noise (official code); the epoch
kept has the lowest loss on the val normals corrupted from one fixed seed (seed + 1), with `patience` (the
official code keeps the last epoch); torch's default weight init unless `init: draem` (the official N(0, 0.02)
left the toy model's softmax at 0.50 ± 0.003 after 72 steps); the CPU defaults (see `Params`). Training runs in
the shared loop: `batch_fn` turns each uint8 batch into (I_a, I, M) from the model's augmentation generator,
so one seed fixes weights, order and every corruption.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from vadbench.data.source import as_source, to_float
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components.feature_discriminator import focal_loss_with_logits
from vadbench.models.components.perlin import perlin_masks
from vadbench.models.components.resize import resize_square
from vadbench.models.components.ssim import ssim
from vadbench.models.components.trainer import LoopSettings, mean_loss
from vadbench.models.components.trainer import train as train_loop
from vadbench.schema import StrictModel

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as the pixel autoencoders
_AUG_SEED_OFFSET = 104_729  # training corruptions: a stream apart from the order (seed) and validation (seed + 1)
_TEXTURE_TAG = 7  # numpy SeedSequence key of the texture bank


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _double(cin: int, cmid: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*_conv(cin, cmid), *_conv(cmid, cout))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *_conv(cin, cout))


class ReconstructiveNet(nn.Module):
    """I_a (N, C, S, S) → Î (N, C, S, S), S a multiple of 16; base width w (paper: 128)."""

    def __init__(self, channels: int, w: int) -> None:
        super().__init__()
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w]
        ins = [channels, *widths[:-1]]
        self.encoder = nn.ModuleList(_double(a, b, b) for a, b in zip(ins, widths, strict=True))
        # decoder as the official one: upsample keeps the width, the double conv then narrows it
        dec = [(8 * w, 4 * w), (4 * w, 2 * w), (2 * w, w), (w, w)]
        self.decoder = nn.Sequential(*(nn.Sequential(_up(a, a), _double(a, a, b)) for a, b in dec))
        self.out = nn.Conv2d(w, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if i else x)
        return self.out(self.decoder(x))


class DiscriminativeNet(nn.Module):
    """concat(Î, I_a) (N, 2C, S, S) → logits (N, 2, S, S), S a multiple of 32; base width w (paper: 64)."""

    def __init__(self, in_channels: int, w: int) -> None:
        super().__init__()
        enc = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList(_double(a, b, b) for a, b in zip([in_channels, *enc[:-1]], enc, strict=True))
        skips = enc[-2::-1]  # b5, b4, b3, b2, b1
        outs = [8 * w, 4 * w, 2 * w, w, w]
        ups_in = [enc[-1], *outs[:-1]]
        self.ups = nn.ModuleList(_up(a, b) for a, b in zip(ups_in, outs, strict=True))
        self.decoder = nn.ModuleList(_double(o + s, o, o) for o, s in zip(outs, skips, strict=True))
        self.out = nn.Conv2d(w, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for i, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if i else x)
            feats.append(x)
        for up, block, skip in zip(self.ups, self.decoder, feats[-2::-1], strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.out(x)


class DraemNet(nn.Module):
    """I_a (N, C, S, S) → (Î (N, C, S, S), segmentation logits (N, 2, S, S))."""

    def __init__(self, channels: int, recon_width: int, disc_width: int) -> None:
        super().__init__()
        self.recon = ReconstructiveNet(channels, recon_width)
        self.disc = DiscriminativeNet(2 * channels, disc_width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recon = self.recon(x)
        return recon, self.disc(torch.cat([recon, x], dim=1))


def _init_weights(m: nn.Module) -> None:
    # the official weights_init: convs N(0, 0.02), BatchNorm scale N(1, 0.02), shift 0
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def focal_loss(logits: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean 2-class softmax focal loss of logits (N, 2, H, W) vs mask (N, 1, H, W) in {0, 1}.

    softmax over two logits is σ(l₁ − l₀), so this is the binary focal loss of the logit difference."""
    return focal_loss_with_logits(logits[:, 1] - logits[:, 0], mask[:, 0], gamma)


def fractal_textures(n: int, size: int, seed: int) -> torch.Tensor:
    """A seeded bank of n fractal renders (n, size, size) uint8 in {0, 255} (the stand-in for DTD).

    Each image: a σ-factor IFS accepted by the FractalDB filling-rate search, chaos game with ~1.5 points
    per pixel (the fractal dataset's density), stamped with a random 3×3 patch, one of the four flips."""
    from vadbench.fractals import ifs  # here: numba kernels load only when a model is fitted
    from vadbench.fractals.instances import FLIPS, Renderer
    from vadbench.fractals.params import FractalsParams

    search = FractalsParams(sampler="sigma")
    rng = np.random.default_rng([seed, _TEXTURE_TAG])
    renderer = Renderer(size, max(100, int(1.5 * size * size)), pad=2)
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        system = ifs.search_system(search, rng)
        out[i] = renderer.render(system.maps, int(rng.integers(0, 2**63)), FLIPS[i % len(FLIPS)])
    return torch.from_numpy(out)


@register_model
class Draem(AnomalyModel):
    """DRAEM: reconstructive + discriminative sub-networks. Learned state: ``net.recon.*``, ``net.disc.*``."""

    name = "draem"
    needs_backbone: ClassVar[bool] = False

    class Params(StrictModel):
        """CPU defaults: grey 128 px, widths 8 / 8, 12 epochs, Adam lr 2e-3 (×0.2 at 80/90 %), torch's weight
        init, no early stopping, 64 fractal textures: a fit on 100 images of 128 px takes ~90 s on 2 quiet cores
        (16 / 16 costs ~2.5× per step). Early stopping is off because the validation loss, dominated by the
        reconstruction terms, spikes in the first epochs (BatchNorm running statistics after a dozen steps):
        patience 4 stopped seed 1 at epoch 5 keeping epoch 0. Paper (MVTec AD): RGB
        256×256, widths 128 / 64, 700 epochs, batch 8, Adam lr 1e-4 × 0.2 at 80 % and 90 % of the epochs,
        Perlin threshold 0.5, scales 2^[0, 6), β ∈ [0.1, 1], half the images clean, focal γ 2, score =
        max of the 21×21-averaged map at 256 px, DTD textures (5640 images)."""

        input_size: int = Field(128, ge=32, le=1024, multiple_of=32, description="network input side (paper: 256)")
        channels: Literal[1, 3] = Field(1, description="1: grey (luma) input, 3: RGB (paper: 3)")
        recon_width: int = Field(8, ge=1, le=512, description="base width of the reconstructive net (paper: 128)")
        disc_width: int = Field(8, ge=1, le=512, description="base width of the discriminative U-Net (paper: 64)")
        textures: int = Field(64, ge=1, le=10_000, description="fractal textures rendered per fit (paper: DTD)")
        perlin_threshold: float = Field(0.5, ge=-1, le=1, description="mask = Perlin noise > this (paper: 0.5)")
        perlin_min_scale_log2: int = Field(0, ge=0, le=10, description="lattice 2^k per axis, k ≥ this (paper: 0)")
        perlin_max_scale_log2: int = Field(6, ge=1, le=11, description="... and k < this (paper: 6)")
        opacity_min: float = Field(0.1, ge=0, le=1, description="β ~ U[opacity_min, opacity_max] (paper: 0.1)")
        opacity_max: float = Field(1.0, ge=0, le=1, description="(paper: 1.0)")
        anomaly_probability: float = Field(0.5, ge=0, le=1, description="share of images corrupted (paper: 0.5)")
        focal_gamma: float = Field(2.0, ge=0, le=10, description="focal loss γ (paper: 2)")
        score_kernel: int | None = Field(
            None, ge=1, le=255, description="odd side of the score's box filter; null: 21·input_size/256 (paper: 21)"
        )
        epochs: int = Field(12, ge=1, le=10_000, description="maximum epochs (paper: 700)")
        batch_size: int = Field(8, ge=2, le=4096, description="paper: 8")
        lr: float = Field(2e-3, gt=0, le=1, description="Adam learning rate (paper: 1e-4)")
        lr_gamma: float = Field(0.2, gt=0, le=1, description="lr × this at 80 % and 90 % of the epochs (paper: 0.2)")
        patience: int = Field(0, ge=0, description="epochs without val-loss improvement before stopping; 0 = never")
        init: Literal["torch", "draem"] = Field(
            "torch", description="weights: torch's defaults, or the official N(0, 0.02) convs (paper: draem)"
        )
        seed: int = Field(0, ge=0, description="seeds weight init, batch order, textures and corruptions")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        if p.perlin_min_scale_log2 >= p.perlin_max_scale_log2:
            raise ValueError("models.draem.perlin_min_scale_log2 must be < perlin_max_scale_log2")
        if p.opacity_min > p.opacity_max:
            raise ValueError(f"models.draem.opacity_min ({p.opacity_min}) must be ≤ opacity_max ({p.opacity_max})")
        if p.score_kernel is not None and p.score_kernel % 2 == 0:
            raise ValueError(f"models.draem.score_kernel must be odd, got {p.score_kernel}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            self.net = DraemNet(p.channels, p.recon_width, p.disc_width)
            if p.init == "draem":
                self.net.apply(_init_weights)
        self._gen = torch.Generator().manual_seed(p.seed + _AUG_SEED_OFFSET)
        self._bank: torch.Tensor | None = None  # fractal textures (K, S, S) uint8, only while fitting

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def score_kernel(self) -> int:
        if self.p.score_kernel is not None:
            return self.p.score_kernel
        return max(1, round(21 * self.p.input_size / 256)) | 1  # odd: a same-size box filter

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1|3, H, W) in [0, 1] → (N, channels, S, S) on the model's device (luma or replicated grey)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"draem: expected images (N, 1|3, H, W), got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 3 and self.p.channels == 1:
            x = (x * torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif x.shape[1] == 1 and self.p.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return resize_square(x, self.p.input_size).clamp(0, 1)

    # -- simulated anomalies -----------------------------------------------------------------
    def textures_for(self, n: int, bank: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """n textures (n, channels, S, S) in [0, 1]: bank images, random 90° turn + flip, random per-channel levels."""
        idx = torch.randint(len(bank), (n,), generator=gen).tolist()
        turns = torch.randint(4, (n,), generator=gen).tolist()
        flips = (torch.rand(n, generator=gen) < 0.5).tolist()
        lo, hi = torch.rand(2, n, self.p.channels, 1, 1, generator=gen)
        base = torch.stack(
            [(bank[i].flip(-1) if f else bank[i]).rot90(k, (-2, -1)) for i, k, f in zip(idx, turns, flips, strict=True)]
        )
        return lo + (hi - lo) * (base[:, None].float() / 255)

    def corrupt(self, x: torch.Tensor, bank: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean x (N, C, S, S) → (I_a (N, C, S, S), mask (N, 1, S, S)); all draws on CPU from `gen`."""
        p = self.p
        n, _, h, w = x.shape
        corrupted = torch.rand(n, generator=gen) < p.anomaly_probability
        k = int(corrupted.sum())
        masks = torch.zeros(n, 1, h, w)
        beta = torch.zeros(n, 1, 1, 1)
        tex = torch.zeros(n, p.channels, h, w)
        if k:  # draws only for the corrupted images; the others keep I and an empty mask
            masks[corrupted, 0] = perlin_masks(
                k, (h, w), p.perlin_threshold, gen, p.perlin_min_scale_log2, p.perlin_max_scale_log2
            )
            beta[corrupted] = p.opacity_min + (p.opacity_max - p.opacity_min) * torch.rand(k, 1, 1, 1, generator=gen)
            tex[corrupted] = self.textures_for(k, bank, gen)
        masks, beta, tex = (t.to(x.device) for t in (masks, beta, tex))
        # (1 − M)·I + (1 − β)·M·I + β·M·A
        return x + masks * beta * (tex - x), masks

    def _batch(self, batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loop's `batch_fn`: uint8 batch → (I_a, I, M) on the device, from the current generator."""
        if self._bank is None:
            raise RuntimeError("draem: no texture bank (corruptions are drawn only inside fit)")
        x = self.to_input(to_float(batch, device))
        x_aug, masks = self.corrupt(x, self._bank, self._gen)
        return x_aug, x, masks

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """L2(Î, I) + (1 − SSIM(Î, I)) + focal(D(Î, I_a), M) of one (I_a, I, M) batch."""
        x_aug, x, masks = batch
        recon, logits = self.net(x_aug)
        return F.mse_loss(recon, x) + (1 - ssim(recon, x)) + focal_loss(logits, masks, self.p.focal_gamma)

    # -- fit ----------------------------------------------------------------------------------
    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Train both sub-networks on normal `train` images with simulated anomalies; `val` picks the epoch."""
        p, device = self.p, self.device
        train = as_source(train)
        val = as_source(val) if val is not None and len(val) > 0 else None
        self._gen = torch.Generator().manual_seed(p.seed + _AUG_SEED_OFFSET)
        self._bank = fractal_textures(p.textures, p.input_size, p.seed)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=p.lr)
        # the loop steps the scheduler per optimiser step; batches of one image are skipped (min_batch 2)
        steps = len(train) // p.batch_size + (len(train) % p.batch_size >= 2)
        milestones = sorted({math.floor(p.epochs * f) * steps for f in (0.8, 0.9)})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=p.lr_gamma)

        try:
            report = train_loop(
                trainable=self.net,
                optimizer=optimizer,
                loss_fn=self.loss,
                train=train,
                val=val,
                settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience, min_batch=2),
                generator=torch.Generator().manual_seed(p.seed),
                device=device,
                desc=self.name,
                val_loss=(lambda: self.validation_loss(val)) if val is not None else None,
                batch_fn=self._batch,
                scheduler=scheduler,
            )
        finally:
            self._bank = None
        self.eval()
        report["textures"] = p.textures
        return report

    @torch.no_grad()
    def validation_loss(self, images: Dataset | torch.Tensor) -> float:
        """The early-stopping criterion (eval mode): mean loss over `images` corrupted from seed + 1, the same
        copies at every call (the fit's bank, or the seed's bank rebuilt outside fit)."""
        self.net.eval()
        keep = self._gen, self._bank
        self._gen = torch.Generator().manual_seed(self.p.seed + 1)
        if self._bank is None:
            self._bank = fractal_textures(self.p.textures, self.p.input_size, self.p.seed)
        try:
            return mean_loss(self.loss, as_source(images), self.p.batch_size, self.device, self._batch)
        finally:
            self._gen, self._bank = keep

    # -- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) → anomalous-class probability (N, 1, S, S), in sub-batches."""
        self.net.eval()
        step = max(self.p.batch_size, 32)
        out = []
        for start in range(0, len(images), step):
            _, logits = self.net(self.to_input(images[start : start + step]))
            out.append(torch.softmax(logits, dim=1)[:, 1:])
        return torch.cat(out)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) in [0, 1] → (scores (B,), maps (B, H, W)) float32 on CPU."""
        maps = self.anomaly_maps(images)
        k = self.score_kernel
        scores = F.avg_pool2d(maps, k, stride=1, padding=k // 2).flatten(1).amax(1)
        full = F.interpolate(maps, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        return scores.float().cpu(), full.float().cpu()
