"""Per-position standardisation of anomaly maps with statistics of validation normals.

Student–teacher models trained for a CPU budget (STFPM, Reverse Distillation) leave their largest
discrepancies on normal images at the image border, where zero padding makes the teacher's
features hard to imitate; the map maximum — the image score — then ranks normals above defects
although the pixel maps separate well. Dividing each position's value by how much it varies on
validation normals (after removing its mean there) puts border and centre on one scale.
Not in the papers (their long training shrinks the border effect); `none` keeps their maps.
Uses only validation normals, never the test split. The statistics are saved with the model.

The moments are streamed: `calibrate` runs the map function over the validation source batch by
batch and accumulates per-position running sums in float64, so memory does not grow with N. The
sums are taken around a shift (the first batch's mean map), which keeps Σx² − n·μ² free of
cancellation when the maps' mean is large against their spread; the result equals ``maps.mean(0)``
and ``maps.std(0)`` (unbiased, N − 1) of all maps at once to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from vadbench.models.components.trainer import stream_maps

MapNormalization = Literal["none", "per_position"]

#: floor of the per-position std, as a fraction of its median: keeps quiet positions from exploding
_STD_FLOOR = 0.1


class RunningMoments:
    """Per-position mean and unbiased std of maps (B, H, W) fed batch by batch; float64, O(H·W) memory."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None  # (H, W): the first batch's mean map
        self.s1: torch.Tensor | None = None  # Σ (x − shift)
        self.s2: torch.Tensor | None = None  # Σ (x − shift)²

    def update(self, maps: torch.Tensor) -> None:
        if maps.ndim != 3:
            raise ValueError(f"maps must be (B, H, W), got shape {tuple(maps.shape)}")
        if len(maps) == 0:
            return
        x = maps.detach().double()
        if self.shift is None:
            self.shift = x.mean(0)
            self.s1, self.s2 = torch.zeros_like(self.shift), torch.zeros_like(self.shift)
        elif x.shape[1:] != self.shift.shape:
            raise ValueError(f"maps of shape {tuple(x.shape[1:])} after maps of shape {tuple(self.shift.shape)}")
        d = x - self.shift
        self.s1 += d.sum(0)
        self.s2 += d.pow(2).sum(0)
        self.n += len(x)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (H, W), std (H, W)), float64; needs n ≥ 2."""
        if self.n < 2 or self.shift is None:
            raise ValueError(f"moments need at least 2 maps, got {self.n}")
        m1 = self.s1 / self.n
        var = (self.s2 - self.n * m1.pow(2)) / (self.n - 1)
        return self.shift + m1, var.clamp_min(0).sqrt()


class PositionalMapNorm(nn.Module):
    """maps (N, H, W) → (maps − μ(x, y)) / σ(x, y); μ, σ fitted on validation normals' maps.

    Mode ``none`` is the identity (nothing fitted, nothing saved but empty buffers).
    """

    def __init__(self, mode: MapNormalization = "none") -> None:
        super().__init__()
        self.mode = mode
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("std", torch.empty(0))

    def _too_few(self, model: str, got: str) -> ValueError:
        return ValueError(f"models.{model}.map_normalization={self.mode} needs at least 2 validation images, got {got}")

    def check_val(self, val: Dataset | torch.Tensor | None, model: str) -> None:
        """Raise the error `calibrate` would, before any training (a no-op for `none`)."""
        if self.mode != "none" and (val is None or len(val) < 2):
            raise self._too_few(model, "none" if val is None else f"{len(val)}")

    def fit_stream(self, batches: Iterable[torch.Tensor], model: str) -> None:
        """Fit μ, σ on validation normals' maps arriving as batches (B, H, W), N ≥ 2 in all."""
        if self.mode == "none":
            return
        moments = RunningMoments()
        for maps in batches:
            moments.update(maps)
        if moments.n < 2:
            raise self._too_few(model, f"{moments.n}")
        # no smoothing of the moments: it would smear the sharp border step they are there to remove
        mean, std = moments.mean_std()
        std = std.clamp_min(max(float(std.median()) * _STD_FLOOR, 1e-12))
        self.mean, self.std = mean.float(), std.float()

    def fit(self, val_maps: torch.Tensor, model: str) -> None:
        """val_maps (N, H, W) of validation normals, N ≥ 2 (the in-memory form of `fit_stream`)."""
        if self.mode == "none":
            return
        if val_maps.ndim != 3 or len(val_maps) < 2:
            raise self._too_few(model, f"maps of shape {tuple(val_maps.shape)}")
        self.fit_stream([val_maps], model)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return maps
        if self.mean.numel() == 0:
            raise RuntimeError("map normalisation used before fit")
        if maps.shape[-2:] != self.mean.shape:
            raise ValueError(
                f"maps are {tuple(maps.shape[-2:])} but the normalisation was fitted at {tuple(self.mean.shape)}: "
                "predict at the training image size"
            )
        return (maps - self.mean.to(maps.device)) / self.std.to(maps.device)

    def calibrate(
        self,
        maps_fn: Callable[[torch.Tensor], torch.Tensor],
        val: Dataset | torch.Tensor | None,
        batch_size: int,
        device: torch.device,
        model: str,
    ) -> None:
        """Fit μ, σ on the maps `maps_fn` gives for a validation source (uint8 or float images), streamed
        `batch_size` images at a time under no_grad; a no-op for `none`."""
        if self.mode == "none":
            return
        self.check_val(val, model)
        self.fit_stream(stream_maps(maps_fn, val, batch_size, device), model)
