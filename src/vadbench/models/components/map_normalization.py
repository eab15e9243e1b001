"""Per-position standardisation of anomaly maps with statistics of validation normals.

Student–teacher models trained for a CPU budget (STFPM, Reverse Distillation) leave their largest
discrepancies on normal images at the image border, where zero padding makes the teacher's
features hard to imitate; the map maximum — the image score — then ranks normals above defects
although the pixel maps separate well. Dividing each position's value by how much it varies on
validation normals (after removing its mean there) puts border and centre on one scale.
Not in the papers (their long training shrinks the border effect); `none` keeps their maps.
Uses only validation normals, never the test split. The statistics are saved with the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from vadbench.models.components.training import predict_in_batches

MapNormalization = Literal["none", "per_position"]

#: floor of the per-position std, as a fraction of its median: keeps quiet positions from exploding
_STD_FLOOR = 0.1


class PositionalMapNorm(nn.Module):
    """maps (N, H, W) → (maps − μ(x, y)) / σ(x, y); μ, σ fitted on validation normals' maps.

    Mode ``none`` is the identity (nothing fitted, nothing saved but empty buffers).
    """

    def __init__(self, mode: MapNormalization = "none") -> None:
        super().__init__()
        self.mode = mode
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("std", torch.empty(0))

    def fit(self, val_maps: torch.Tensor, model: str) -> None:
        """val_maps (N, H, W) of validation normals, N ≥ 2."""
        if self.mode == "none":
            return
        if val_maps.ndim != 3 or len(val_maps) < 2:
            raise ValueError(
                f"models.{model}.map_normalization={self.mode} needs at least 2 validation images, "
                f"got maps of shape {tuple(val_maps.shape)}"
            )
        maps = val_maps.double()
        # no smoothing of the moments: it would smear the sharp border step they are there to remove
        mean, std = maps.mean(0), maps.std(0)
        std = std.clamp_min(max(float(std.median()) * _STD_FLOOR, 1e-12))
        self.mean, self.std = mean.float(), std.float()

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
        val: torch.Tensor | None,
        batch_size: int,
        device: torch.device,
        model: str,
    ) -> None:
        """Fit μ, σ on the maps `maps_fn` gives for the validation images (N, C, H, W); no-op for `none`."""
        if self.mode == "none":
            return
        if val is None or len(val) < 2:
            raise ValueError(f"models.{model}.map_normalization={self.mode} needs at least 2 validation images")
        self.fit(predict_in_batches(maps_fn, val, batch_size, device)[1], model)
