"""PatchCore (Roth et al., CVPR 2022, "Towards Total Recall in Industrial Anomaly Detection").

fit: every training image → locally aware patch features (3×3-averaged layer2 + layer3, layer3
upsampled to layer2's grid) → one memory bank of patch vectors → greedy coreset subsample.
predict: each test patch's score is its distance to the nearest bank vector; the map is those
scores upsampled to the image and Gaussian-smoothed (σ=4); the image score is the maximum patch
score re-weighted by how isolated its nearest bank vector is (paper eq. 7, below).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field

from vadbench.backbones import FeatureExtractor
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components.coreset import subsample_indices
from vadbench.models.components.patch_features import (
    locally_aware_embedding,
    module_device,
    nearest_neighbors,
    select_layers,
    to_rows,
)
from vadbench.models.components.smoothing import upsample_and_smooth
from vadbench.schema import StrictModel


@register_model
class PatchCore(AnomalyModel):
    name = "patchcore"

    class Params(StrictModel):
        layers: list[str] = Field(["layer2", "layer3"], min_length=1, description="backbone layers, first sets the grid")
        neighborhood: int = Field(3, ge=1, le=9, description="odd patch size p of the local average (1 = none)")
        target_embed_dimension: int | None = Field(None, ge=1, description="channel-pool patch vectors to this dim")
        sampler: Literal["greedy_coreset", "random", "identity"] = "greedy_coreset"
        coreset_ratio: float = Field(0.1, gt=0, le=1, description="fraction of patches kept in the memory bank")
        projection_dim: int | None = Field(128, ge=1, description="JL projection dim for coreset distances")
        num_starts: int = Field(10, ge=1, description="random starting points of the approximate greedy coreset")
        num_neighbors: int = Field(9, ge=1, description="b in the image-score re-weighting; 1 = plain max")
        sigma: float = Field(4.0, ge=0, description="Gaussian smoothing of the map, in input pixels (0 = none)")
        batch_size: int = Field(16, ge=1)
        seed: int = Field(0, ge=0)

    def __init__(self, backbone: FeatureExtractor, **params: Any) -> None:
        super().__init__(**params)
        p = self.p
        if p.neighborhood % 2 != 1:
            raise ValueError(f"models.patchcore.neighborhood must be odd, got {p.neighborhood}")
        self.backbone = backbone
        # (K, D) coreset of training patch vectors; its size is known only after fit
        self.register_buffer("memory_bank", torch.empty(0, 0))

    # -- features ---------------------------------------------------------------------------
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → patch embedding (B, D, h, w) on the backbone's device."""
        x = images.to(module_device(self.backbone), torch.float32)
        maps = select_layers(self.backbone, x, self.p.layers)
        return locally_aware_embedding(maps, self.p.neighborhood, self.p.target_embed_dimension)

    @torch.no_grad()
    def fit(self, train: torch.Tensor, val: torch.Tensor | None = None) -> dict[str, Any]:
        """Fill the memory bank from normal `train` images (N, C, H, W); `val` is not needed."""
        if train.ndim != 4 or train.shape[0] == 0:
            raise ValueError(f"train must be (N, C, H, W) with N ≥ 1, got {tuple(train.shape)}")
        t0 = time.perf_counter()
        bank: torch.Tensor | None = None
        for start in range(0, train.shape[0], self.p.batch_size):
            rows = to_rows(self._embed(train[start : start + self.p.batch_size]))
            if bank is None:  # preallocate the whole bank once: no list + cat doubling peak memory
                per_image = rows.shape[0] // min(self.p.batch_size, train.shape[0])
                bank = torch.empty(train.shape[0] * per_image, rows.shape[1], device=rows.device)
            bank[start * per_image : start * per_image + rows.shape[0]] = rows
        assert bank is not None
        t1 = time.perf_counter()
        gen = torch.Generator().manual_seed(self.p.seed)
        keep = subsample_indices(
            bank, self.p.sampler, self.p.coreset_ratio, gen,
            projection_dim=self.p.projection_dim, num_starts=self.p.num_starts, progress=True,
        )
        self.memory_bank = bank[keep].contiguous()
        t2 = time.perf_counter()
        return {
            "patches": int(bank.shape[0]),
            "patches_per_image": int(per_image),
            "memory_bank_size": int(self.memory_bank.shape[0]),
            "embed_dim": int(bank.shape[1]),
            "embed_seconds": round(t1 - t0, 3),
            "sampling_seconds": round(t2 - t1, 3),
        }

    # -- scoring ----------------------------------------------------------------------------
    def _image_scores(self, queries: torch.Tensor, patch_scores: torch.Tensor, nn_idx: torch.Tensor) -> torch.Tensor:
        """Paper eq. 7: s = (1 − exp‖m* − m_test‖ / Σ_{m ∈ N_b(m*)} exp‖m − m_test‖) · s*.

        queries (B, P, D) patch vectors, patch_scores / nn_idx (B, P) → (B,). m_test is the image's
        highest-scoring patch, s* its score, m* its nearest bank vector, N_b(m*) the b bank vectors
        nearest m* (m* included). A test patch whose nearest normal vector sits in a sparse bank region
        (far from its neighbours) is down-weighted: its distance is less surprising there.
        """
        s_star, worst = patch_scores.max(dim=1)
        if self.p.num_neighbors == 1:
            return s_star  # the weight would be 1 − 1 = 0: plain max, as anomalib does
        rows = torch.arange(queries.shape[0], device=queries.device)
        m_test = queries[rows, worst]  # (B, D)
        m_star = self.memory_bank[nn_idx[rows, worst]]  # (B, D)
        _, support = nearest_neighbors(m_star, self.memory_bank, self.p.num_neighbors)  # (B, b)
        d_support = torch.linalg.vector_norm(self.memory_bank[support] - m_test[:, None], dim=-1)  # (B, b)
        # exp(s*) / Σ exp(d), computed in log space so large distances cannot overflow
        weight = 1 - torch.exp(s_star - torch.logsumexp(d_support, dim=1))
        return weight * s_star

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, H, W) in [0, 1] → (scores (N,), maps (N, H, W)), float32 on CPU."""
        if self.memory_bank.numel() == 0:
            raise RuntimeError("PatchCore memory bank is empty: call fit() or load_model() first")
        device = module_device(self.backbone)
        self.memory_bank = self.memory_bank.to(device)
        scores, maps = [], []
        for start in range(0, images.shape[0], self.p.batch_size):
            batch = images[start : start + self.p.batch_size]
            emb = self._embed(batch)  # (B, D, h, w)
            b, d, h, w = emb.shape
            if d != self.memory_bank.shape[1]:
                raise ValueError(f"patch dim {d} ≠ memory bank dim {self.memory_bank.shape[1]}: other backbone/params?")
            queries = to_rows(emb)
            dist, idx = nearest_neighbors(queries, self.memory_bank, 1)
            patch_scores, nn_idx = dist.view(b, h * w), idx.view(b, h * w)
            scores.append(self._image_scores(queries.view(b, h * w, d), patch_scores, nn_idx).float().cpu())
            maps.append(upsample_and_smooth(patch_scores.view(b, h, w), tuple(batch.shape[-2:]), self.p.sigma).float().cpu())
        return torch.cat(scores), torch.cat(maps)
