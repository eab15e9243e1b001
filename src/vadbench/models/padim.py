"""PaDiM (Defard et al., ICPR 2020, "a Patch Distribution Modeling Framework").

fit: layer1..layer3 maps, deeper ones resized (nearest, as the reference code) to layer1's grid and
concatenated; a fixed random subset of `n_features` channels is kept; every grid position gets its
own Gaussian (mean, covariance + ε·I) over the training images. predict: Mahalanobis distance of
each position's vector to its Gaussian, upsampled to the image, Gaussian-smoothed (σ=4); image
score = map maximum.

Memory: the model stores (h·w, d, d) inverse covariances; d=100 on a 128² image (32×32 grid)
is 41 MB in float32. Covariance sums accumulate in float64 so the one-pass formula stays exact.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor, pick
from vadbench.data.source import as_source, float_batches
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components.patch_features import concat_layers, module_device
from vadbench.models.components.smoothing import upsample_and_smooth
from vadbench.schema import StrictModel


def inverse_per_matrix(mats: torch.Tensor) -> torch.Tensor:
    """(P, d, d) invertible matrices → their inverses, one matrix per LAPACK call on CPU.

    Why not one batched `torch.linalg.inv`: with torch 2.14.1's MKL on a 2-thread CPU, the batched inverse of
    d > 128 matrices raises ("Pivots given to lu_solve must all be greater or equal to 1", MKL "DLASWP
    parameter 6") or silently returns wrong matrices (‖A·A⁻¹ − I‖ ≈ 1); single matrices are exact, and for
    d ≤ 128 the results are bitwise those of the batched call (measured 2026-12-06, docs/MODELS.md).
    """
    if mats.device.type != "cpu":
        return torch.linalg.inv(mats)
    out = torch.empty_like(mats)
    for i in range(mats.shape[0]):
        torch.linalg.inv(mats[i], out=out[i])
    return out


def inverse_covariances(
    sum_outer: torch.Tensor, mean: torch.Tensor, n: int, epsilon: float, chunk: int = 64
) -> torch.Tensor:
    """Σxxᵀ (P, d, d) float64, means (P, d), N → float32 (P, d, d) inverses of (covariance + ε·I).

    Chunks of `chunk` grid positions at a time, each inverse written straight into the float32 result: the peak
    is Σxxᵀ plus half of it (not ~3.5× Σxxᵀ as whole-tensor temporaries would take; for the paper profile's
    d = 550 on a 64×64 grid Σxxᵀ alone is 9.9 GB). Element-wise work per chunk, so bitwise the whole-tensor
    result."""
    positions, d, _ = sum_outer.shape
    eye = epsilon * torch.eye(d, dtype=torch.float64, device=sum_outer.device)
    out = torch.empty(positions, d, d, dtype=torch.float32, device=sum_outer.device)
    for start in range(0, positions, chunk):
        rows = slice(start, start + chunk)
        m = mean[rows]
        cov = (sum_outer[rows] - n * m[:, :, None] * m[:, None, :]) / (n - 1)
        cov += eye
        out[rows] = inverse_per_matrix(cov)
    return out


@register_model
class PaDiM(AnomalyModel):
    name = "padim"

    class Params(StrictModel):
        layers: list[str] = Field(["layer1", "layer2", "layer3"], min_length=1, description="first sets the grid")
        n_features: int = Field(100, ge=1, description="random channel subset size d (≤ total channels)")
        epsilon: float = Field(0.01, gt=0, description="covariance regularisation ε·I")
        sigma: float = Field(4.0, ge=0, description="Gaussian smoothing of the map, in input pixels (0 = none)")
        batch_size: int = Field(16, ge=1)
        seed: int = Field(0, ge=0)

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        self.backbone = backbone
        # sizes known only after fit: (d,) channel indices, (d, h, w) means, (h·w, d, d) inverse covariances
        self.register_buffer("channel_idx", torch.empty(0, dtype=torch.int64))
        self.register_buffer("mean", torch.empty(0, 0, 0))
        self.register_buffer("inv_covariance", torch.empty(0, 0, 0))

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → (B, d, h, w): concatenated layers, kept channels only."""
        x = images.to(module_device(self.backbone), torch.float32)
        maps = pick(self.backbone(x), self.p.layers)
        # keep each layer's chosen channels before resizing: nearest resizing is per channel, so this equals
        # selecting from the full concatenation (channel_idx is sorted), with ~total/d times less resizing work
        idx, kept, offset = self.channel_idx.to(x.device), [], 0
        for m in maps:
            own = idx[(idx >= offset) & (idx < offset + m.shape[1])] - offset
            kept.append(m.index_select(1, own))
            offset += m.shape[1]
        return concat_layers(kept, mode="nearest")

    @torch.no_grad()
    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Per-position Gaussians from a stream of normal images (N ≥ 2); `val` is not needed.

        One pass, one batch in memory: Σx and Σxxᵀ per position accumulate in float64, so the moments
        equal those of the whole split at once up to float64 rounding, whatever N is."""
        train = as_source(train)
        if len(train) < 2:
            raise ValueError(f"padim: need at least 2 train images for a covariance, got {len(train)}")
        t0 = time.perf_counter()
        device = module_device(self.backbone)
        total = sum(self.backbone.channels_of(self.p.layers))
        if self.p.n_features > total:
            raise ValueError(
                f"models.padim.n_features={self.p.n_features} exceeds the {total} channels of {self.p.layers}"
            )
        gen = torch.Generator().manual_seed(self.p.seed)
        self.channel_idx = torch.randperm(total, generator=gen)[: self.p.n_features].sort().values.to(device)

        n = len(train)
        s1 = s2 = None  # Σx (P, d) and Σxxᵀ (P, d, d), float64
        for batch in float_batches(train, self.p.batch_size, device):
            emb = self._embed(batch)  # (B, d, h, w)
            b, d, h, w = emb.shape
            x = emb.permute(2, 3, 0, 1).reshape(h * w, b, d).double()  # (P, B, d)
            if s1 is None:
                s1 = torch.zeros(h * w, d, dtype=torch.float64, device=device)
                s2 = torch.zeros(h * w, d, d, dtype=torch.float64, device=device)
            s1 += x.sum(dim=1)
            s2.baddbmm_(x.transpose(1, 2), x)  # in place: no (P, d, d) float64 temporary per batch (3× faster)
        assert s1 is not None and s2 is not None
        mean = s1 / n  # (P, d)
        self.mean = mean.T.reshape(d, h, w).float().contiguous()
        self.inv_covariance = inverse_covariances(s2, mean, n, self.p.epsilon)
        return {
            "grid": [int(h), int(w)],
            "n_features": int(d),
            "total_channels": int(total),
            "fit_seconds": round(time.perf_counter() - t0, 3),
        }

    def mahalanobis(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (B, d, h, w) → (B, h, w): sqrt((x − μ)ᵀ Σ⁻¹ (x − μ)) at every position."""
        b, d, h, w = emb.shape
        delta = (emb - self.mean).permute(2, 3, 0, 1).reshape(h * w, b, d)  # (P, B, d)
        quad = ((delta @ self.inv_covariance) * delta).sum(dim=-1)  # (P, B)
        return quad.clamp_min(0).sqrt().T.reshape(b, h, w)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) in [0, 1] → (scores (B,), maps (B, H, W)), float32 on CPU."""
        if self.inv_covariance.numel() == 0:
            raise RuntimeError("PaDiM is not fitted: call fit() or load_model() first")
        device = module_device(self.backbone)
        self.mean, self.inv_covariance = self.mean.to(device), self.inv_covariance.to(device)
        scores, maps = [], []
        for start in range(0, images.shape[0], self.p.batch_size):
            batch = images[start : start + self.p.batch_size]
            emb = self._embed(batch)
            if emb.shape[1:] != self.mean.shape:
                raise ValueError(
                    f"embedding {tuple(emb.shape[1:])} ≠ fitted {tuple(self.mean.shape)}: other image size?"
                )
            m = upsample_and_smooth(self.mahalanobis(emb), tuple(batch.shape[-2:]), self.p.sigma)
            maps.append(m.float().cpu())
            scores.append(m.flatten(1).amax(dim=1).float().cpu())
        return torch.cat(scores), torch.cat(maps)
