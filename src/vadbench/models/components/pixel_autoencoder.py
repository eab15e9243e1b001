"""Shared machinery of the pixel autoencoders (SAE, DAE): grey 128×128 input, training, residual maps.

Subclasses supply the network (`build_net`), the training loss and the per-pixel residual; this
base converts inputs batch by batch (`to_input` as the shared loop's `batch_fn`: uint8 → float → grey
128×128 on the device, never a whole split), trains with Adam in `components.trainer` (early stopping on
the validation loss), and turns residuals into maps at the caller's resolution and image scores.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from vadbench.data.source import as_source, to_float
from vadbench.models.base import AnomalyModel
from vadbench.models.components.resize import resize_square
from vadbench.models.components.smoothing import gaussian_blur
from vadbench.models.components.trainer import LoopSettings, mean_loss
from vadbench.models.components.trainer import train as train_loop
from vadbench.schema import StrictModel

#: ITU-R BT.601 luma weights: RGB → grey the way most image libraries do it
_LUMA = (0.299, 0.587, 0.114)


class PixelAEParams(StrictModel):
    """Training and scoring knobs shared by the pixel autoencoders (architecture is fixed)."""

    seed: int = Field(0, ge=0, description="seeds weight init and batch order")
    epochs: int = Field(30, ge=1, le=10000)
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    patience: int = Field(5, ge=0, description="epochs without validation-loss improvement before stopping; 0 = never")
    smooth_sigma: float = Field(
        2.0, ge=0, le=32, description="Gaussian σ (pixels at 128×128) applied to the residual map"
    )
    score_reduction: Literal["max", "mean"] = Field("max", description="image score = max or mean of the smoothed map")


class PixelAutoencoderModel(AnomalyModel):
    """Base of pixel-space autoencoders; never uses a backbone."""

    needs_backbone: ClassVar[bool] = False
    input_size: ClassVar[int] = 128

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        # seeded init without touching the global RNG (fork_rng restores it afterwards)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.p.seed)
            self.net = self.build_net()

    # -- what a subclass defines -------------------------------------------------------------
    def build_net(self) -> nn.Module:
        """Network: x (N, 1, 128, 128) → (reconstruction (N, 1, 128, 128) in [0, 1], latent (N, D))."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, recon: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of one batch."""
        raise NotImplementedError

    def residual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-pixel anomaly evidence (N, 1, 128, 128), higher = more anomalous."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1], C ∈ {1, 3} → grey (N, 1, 128, 128) on the model's device."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: expected images (N, 1|3, H, W), got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 3:
            w = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        return resize_square(x, self.input_size).clamp(0, 1)

    def _batch_input(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The loop's `batch_fn`: a collated uint8 batch → network input on the device."""
        return self.to_input(to_float(batch, device))

    def _batch_loss(self, x: torch.Tensor) -> torch.Tensor:
        recon, latent = self.net(x)
        return self.loss(x, recon, latent)

    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Train on a stream of normal images; keep the epoch with the lowest validation loss."""
        p = self.p
        report = train_loop(
            trainable=self.net,
            optimizer=torch.optim.Adam(self.net.parameters(), lr=p.lr, weight_decay=p.weight_decay),
            loss_fn=self._batch_loss,
            train=train,
            val=val,
            # min_batch 2: BatchNorm cannot train on a single image
            settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience, min_batch=2),
            generator=torch.Generator().manual_seed(p.seed),
            device=self.device,
            desc=self.name,
            batch_fn=self._batch_input,
        )
        self.eval()
        return report

    @torch.no_grad()
    def reconstruction_loss(self, images: Dataset | torch.Tensor) -> float:
        """Mean training loss (eval mode) over an image source (or tensor), batch by batch: the early-stopping
        criterion."""
        self.net.eval()
        return mean_loss(self._batch_loss, as_source(images), self.p.batch_size, self.device, self._batch_input)

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Smoothed residual maps (N, 1, 128, 128) of one batch of images (N, C, H, W), in sub-batches."""
        self.net.eval()
        out = []
        step = max(self.p.batch_size, 32)
        for start in range(0, len(images), step):
            x = self.to_input(images[start : start + step])
            recon, _ = self.net(x)
            out.append(gaussian_blur(self.residual(x, recon)[:, 0], self.p.smooth_sigma)[:, None])
        return torch.cat(out)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) in [0, 1] → (scores (B,), maps (B, H, W)) float32 on CPU."""
        maps = self.anomaly_maps(images)
        flat = maps.flatten(1)
        scores = flat.amax(1) if self.p.score_reduction == "max" else flat.mean(1)
        # the score comes from the 128×128 map, so it does not depend on the caller's resolution
        full = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return scores.float().cpu(), full.float().cpu()
