"""Turning backbone feature maps into per-position embeddings, and nearest-neighbour search on them.

Shared by the memory-bank / Gaussian methods (PatchCore, PaDiM): given the maps a model picked by
name from its extractor (``pick(backbone(x), layers)``), optionally 3×3-average them (PatchCore's
"locally aware" patches), bring every layer to the first layer's resolution, concatenate channels,
and search a bank of such vectors in bounded-memory chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for an empty module)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def concat_layers(maps: Sequence[torch.Tensor], mode: str = "bilinear") -> torch.Tensor:
    """[(B, C_i, h_i, w_i)] → (B, ΣC_i, h_0, w_0): deeper maps resized to the first map's grid."""
    size = maps[0].shape[-2:]
    resized = [maps[0]]
    for m in maps[1:]:
        if m.shape[-2:] != size:
            m = F.interpolate(m, size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
        resized.append(m)
    return torch.cat(resized, dim=1)


def _pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, C, h, w) → (B, dim, h, w): adaptive average pooling along channels (the official MeanMapper)."""
    b, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(-1, 1, c)
    return F.adaptive_avg_pool1d(flat, dim).reshape(b, h, w, dim).permute(0, 3, 1, 2)


def locally_aware_embedding(
    maps: Sequence[torch.Tensor], neighborhood: int = 3, target_dim: int | None = None
) -> torch.Tensor:
    """PatchCore patch features: [(B, C_i, h_i, w_i)] → (B, D, h_0, w_0).

    Each layer is averaged over a `neighborhood`² window (stride 1, same size: a patch sees its
    neighbours, which widens the receptive field without going deeper), then resized bilinearly to
    the first layer's grid. With `target_dim`, each layer is first pooled along channels to
    `target_dim` (so every layer weighs the same whatever its width) and the concatenation pooled to
    `target_dim` again, as in the official code; without it D = ΣC_i.
    """
    if neighborhood % 2 != 1:
        raise ValueError(f"neighborhood must be odd (same-size pooling), got {neighborhood}")
    pooled = [
        F.avg_pool2d(m, neighborhood, stride=1, padding=neighborhood // 2, count_include_pad=True)
        if neighborhood > 1
        else m
        for m in maps
    ]
    if target_dim is not None:
        pooled = [_pool_channels(m, target_dim) for m in pooled]
    emb = concat_layers(pooled, mode="bilinear")
    return _pool_channels(emb, target_dim) if target_dim is not None else emb


def to_rows(emb: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) → (B·h·w, D), rows ordered image, then row-major position."""
    return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])


def nearest_neighbors(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    max_elements: int = 1 << 24,
    bank_chunk: int = 1 << 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean k-NN of each query row in `bank`: (distances (M, k) ascending, indices (M, k)).

    queries (M, D), bank (K, D) on one device. Queries go in chunks so the distance block never
    exceeds `max_elements` floats (64 MB by default) however large M and K are. A bank stored in
    another dtype than the queries (a float16 bank, float32 queries) is read `bank_chunk` rows at a
    time, each converted to the queries' dtype, with a running top-k: no full-precision copy of the
    bank is ever made. Ties keep the lowest bank index.
    """
    if bank.shape[0] == 0:
        raise ValueError("empty memory bank: fit the model first")
    k = min(k, bank.shape[0])
    if bank.dtype == queries.dtype:
        return _knn_block(queries, bank, k, max_elements)
    best_d = best_i = None
    for start in range(0, bank.shape[0], bank_chunk):
        part = bank[start : start + bank_chunk].to(queries.dtype)
        d, i = _knn_block(queries, part, min(k, part.shape[0]), max_elements)
        i = i + start
        if best_d is None:
            best_d, best_i = d, i
            continue
        # earlier chunks first: on equal distances the lower bank index wins, as in a single pass
        cat_d, cat_i = torch.cat([best_d, d], dim=1), torch.cat([best_i, i], dim=1)
        if k == 1:
            take = (d < best_d).long()  # strict: a tie keeps the earlier (lower) index
            best_d, best_i = cat_d.gather(1, take), cat_i.gather(1, take)
        else:
            order = torch.argsort(cat_d, dim=1, stable=True)[:, :k]
            best_d, best_i = cat_d.gather(1, order), cat_i.gather(1, order)
    assert best_d is not None and best_i is not None
    return best_d, best_i


def _knn_block(
    queries: torch.Tensor, bank: torch.Tensor, k: int, max_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = max(1, max_elements // bank.shape[0])
    dists, idxs = [], []
    for start in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[start : start + chunk], bank)
        if k == 1:
            val, idx = d.min(dim=1, keepdim=True)
        else:
            val, idx = d.topk(k, dim=1, largest=False)  # sorted ascending
        dists.append(val)
        idxs.append(idx)
    return torch.cat(dists), torch.cat(idxs)
