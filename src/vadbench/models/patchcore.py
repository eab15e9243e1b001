"""PatchCore (Roth et al., CVPR 2022, "Towards Total Recall in Industrial Anomaly Detection").

fit: every training image → locally aware patch features (3×3-averaged layer2 + layer3, layer3
upsampled to layer2's grid) → one memory bank of patch vectors → greedy coreset subsample.
predict: each test patch's score is its distance to the nearest bank vector; the map is those
scores upsampled to the image and Gaussian-smoothed (σ=4); the image score is the maximum patch
score re-weighted by how isolated its nearest bank vector is (paper eq. 7, below).

Memory budget (`memory_budget_gb`, GiB = 2³⁰ bytes; docs/PATCHCORE_BUDGET.md): the bank is built
from a stream of training images and never needs N·P·D·4 bytes at once. After the first batch the
number of patches (N·P) and their width D are known and `plan_bank` decides:

* **single pass** (the paper, and exactly the previous implementation) when every patch in float32,
  the coreset's scratch (JL projection, distance vectors) and the kept copy fit the budget. On the CPU,
  with the greedy coreset and a projection, the patches go to an anonymous temporary file (TMPDIR,
  `RowFile`) as they stream in: the selection reads only their projection, so the full rows are read
  twice (to project them, in the same slices as from memory: bit-identical picks; then the picks) and
  never sit in memory beside the projection. ELPV, 233 × 1,024 patches × 384: peak RSS 1,473 → 1,202 MiB.
* **chunked** otherwise: patches stream through a float32 chunk buffer of as many rows as the budget
  leaves, at most `coreset_chunk_patches` (default 2¹⁸ = 262,144: about one paper-scale single pass, an
  MVTec category's whole bank); each full chunk is greedy-coreset to `coreset_ratio` of its rows and the
  picks are appended to a preallocated union, which is the bank (≈ ratio·N·P rows). A chunk of C rows
  costs ratio·C distance passes over C rows, so the cost per image is constant (∝ ratio·C): linear in N,
  and the cap keeps a large budget from making every image slower. If even the union would
  exceed half the budget (large ratios at large N), it is itself coreset-subsampled to half its capacity
  whenever full, so the bank stays within the budget and holds fewer rows than ratio·N·P (the report
  says `reductions`). Departure from the paper: k-center runs per chunk, not over all patches.

`bank_dtype` float16 stores the union and the final bank in half precision (half the bank memory and
model file); distances are still computed in float32, a bank chunk at a time. kNN search is chunked
(`nearest_neighbors`); at predict the bank moves to the batch's device when that device has room.
The budget counts what grows with N (bank, chunk buffer, selection scratch), not the backbone, one
batch of activations or the interpreter (≈ 1.5 GB on CPU).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor, pick
from vadbench.data.source import as_source, float_batches
from vadbench.models.base import AnomalyModel, register_model
from vadbench.models.components.coreset import ChunkedCoreset, coreset_size, plan_bank, subsample_indices
from vadbench.models.components.patch_features import (
    locally_aware_embedding,
    module_device,
    nearest_neighbors,
    to_rows,
)
from vadbench.models.components.row_file import RowFile
from vadbench.models.components.smoothing import upsample_and_smooth
from vadbench.schema import StrictModel

GIB = 1 << 30
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@register_model
class PatchCore(AnomalyModel):
    name = "patchcore"

    class Params(StrictModel):
        layers: list[str] = Field(
            ["layer2", "layer3"], min_length=1, description="backbone layers, first sets the grid"
        )
        neighborhood: int = Field(3, ge=1, le=9, description="odd patch size p of the local average (1 = none)")
        target_embed_dimension: int | None = Field(None, ge=1, description="channel-pool patch vectors to this dim")
        sampler: Literal["greedy_coreset", "random", "identity"] = "greedy_coreset"
        coreset_ratio: float = Field(0.1, gt=0, le=1, description="fraction of patches kept in the memory bank")
        projection_dim: int | None = Field(128, ge=1, description="JL projection dim for coreset distances")
        num_starts: int = Field(10, ge=1, description="random starting points of the approximate greedy coreset")
        num_neighbors: int = Field(9, ge=1, description="b in the image-score re-weighting; 1 = plain max")
        sigma: float = Field(4.0, ge=0, description="Gaussian smoothing of the map, in input pixels (0 = none)")
        memory_budget_gb: float = Field(
            2.0, gt=0, description="GiB for the bank and coreset scratch; over it, a coreset per chunk of patches"
        )
        coreset_chunk_patches: int | None = Field(
            262144, ge=1, description="most patches per chunk over the budget (null: as many as the budget allows)"
        )
        bank_dtype: Literal["float32", "float16"] = Field("float32", description="storage of the memory bank")
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
        maps = pick(self.backbone(x), self.p.layers)
        return locally_aware_embedding(maps, self.p.neighborhood, self.p.target_embed_dimension)

    @torch.no_grad()
    def fit(self, train: Dataset | torch.Tensor, val: Dataset | torch.Tensor | None = None) -> dict[str, Any]:
        """Fill the memory bank from a stream of normal `train` images, within the memory budget; `val` is not needed."""
        train = as_source(train)
        n = len(train)
        if n == 0:
            raise ValueError("patchcore: the train source is empty")
        require = getattr(self.backbone, "require", None)
        if require is not None:
            require(self.p.layers)
        p = self.p
        t0 = time.perf_counter()
        device = module_device(self.backbone)
        self.memory_bank = torch.empty(0, 0, device=device)  # a refit does not hold the old bank meanwhile
        batches = float_batches(train, p.batch_size, device)
        rows = to_rows(self._embed(next(batches)))
        per_image = rows.shape[0] // min(p.batch_size, n)
        total, dim = n * per_image, rows.shape[1]
        dtype = _DTYPES[p.bank_dtype]
        plan = plan_bank(
            total,
            dim,
            method=p.sampler,
            ratio=p.coreset_ratio,
            budget_bytes=int(p.memory_budget_gb * GIB),
            projection_dim=p.projection_dim,
            bank_itemsize=dtype.itemsize,
            max_chunk_rows=p.coreset_chunk_patches,
        )
        if plan.strategy == "chunked":
            note = (
                f"; the union of the chunks' picks would exceed half the budget, so it is itself coreset-reduced "
                f"whenever full: the bank keeps ≤ {plan.union_rows:,} rows, not {plan.expected_rows:,}"
                if plan.reduce
                else ""
            )
            print(
                f"patchcore: {total:,} patches × {dim} exceed memory_budget_gb={p.memory_budget_gb:g} in one pass; "
                f"coreset per chunk: {plan.chunks} chunks of ≤ {plan.chunk_rows:,} patches{note}",
                file=sys.stderr,
            )
        store = _store_device(device, plan.planned_bytes)
        gen = torch.Generator().manual_seed(p.seed)
        chunked = None
        spill = (
            plan.strategy == "single_pass"
            and store.type == "cpu"
            and p.sampler == "greedy_coreset"
            and p.projection_dim is not None
            and p.projection_dim < dim
            and coreset_size(total, p.coreset_ratio) < total
        )
        if spill:
            # the selection reads only the projected rows: the full ones wait on disk for the picks
            bank = sink = RowFile(total, dim)
        elif plan.strategy == "single_pass":
            # preallocate the whole bank once: no list + cat doubling peak memory
            bank = torch.empty(total, dim, device=store)
            sink = _Filler(bank)
        else:
            chunked = ChunkedCoreset(
                plan,
                p.sampler,
                p.coreset_ratio,
                gen,
                projection_dim=p.projection_dim,
                num_starts=p.num_starts,
                dtype=dtype,
                device=store,
                progress=True,
            )
            sink = chunked
        t = time.perf_counter()
        sink.add(rows)
        sampling_s = time.perf_counter() - t
        del rows
        for batch in batches:
            rows = to_rows(self._embed(batch))
            t = time.perf_counter()
            sink.add(rows)  # chunked: each full chunk is subsampled here
            sampling_s += time.perf_counter() - t
            del rows
        t1 = time.perf_counter()
        if chunked is None:
            keep = subsample_indices(
                bank,
                p.sampler,
                p.coreset_ratio,
                gen,
                projection_dim=p.projection_dim,
                num_starts=p.num_starts,
                progress=True,
            )
            kept = bank.take(keep) if spill else bank[keep].contiguous()
            if spill:
                bank.close()
            del bank, keep, sink
            self.memory_bank = kept if kept.dtype == dtype else kept.to(dtype)
        else:
            self.memory_bank = chunked.finish()
        t2 = time.perf_counter()
        sampling_s += t2 - t1
        return {
            "patches": int(total),
            "patches_per_image": int(per_image),
            "memory_bank_size": int(self.memory_bank.shape[0]),
            "embed_dim": int(dim),
            "bank_strategy": plan.strategy,
            "chunk_patches": int(plan.chunk_rows),
            "chunks": int(plan.chunks),
            "union_reductions": int(chunked.reductions if chunked is not None else 0),
            "planned_bank_bytes": int(plan.planned_bytes),
            # embedding includes decoding the stream; sampling is every coreset selection and bank copy
            "embed_seconds": round(t2 - t0 - sampling_s, 3),
            "sampling_seconds": round(sampling_s, 3),
        }

    # -- scoring ----------------------------------------------------------------------------
    def _image_scores(
        self, bank: torch.Tensor, queries: torch.Tensor, patch_scores: torch.Tensor, nn_idx: torch.Tensor
    ) -> torch.Tensor:
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
        m_star = bank[nn_idx[rows, worst]].to(m_test.dtype)  # (B, D)
        _, support = nearest_neighbors(m_star, bank, self.p.num_neighbors)  # (B, b)
        d_support = torch.linalg.vector_norm(bank[support].to(m_test.dtype) - m_test[:, None], dim=-1)  # (B, b)
        # exp(s*) / Σ exp(d), computed in log space so large distances cannot overflow
        weight = 1 - torch.exp(s_star - torch.logsumexp(d_support, dim=1))
        return weight * s_star

    def _bank_on(self, device: torch.device) -> torch.Tensor:
        """The bank on `device` when it has room (CUDA: under half its free memory), else where it is."""
        bank = self.memory_bank
        if bank.device != device:
            if device.type != "cuda" or bank.numel() * bank.element_size() < torch.cuda.mem_get_info(device)[0] // 2:
                self.memory_bank = bank = bank.to(device)
        return bank

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (B, C, H, W) in [0, 1] → (scores (B,), maps (B, H, W)), float32 on CPU."""
        if self.memory_bank.numel() == 0:
            raise RuntimeError("PatchCore memory bank is empty: call fit() or load_model() first")
        emb = self._embed(images)  # (B, D, h, w)
        b, d, h, w = emb.shape
        if d != self.memory_bank.shape[1]:
            raise ValueError(f"patch dim {d} ≠ memory bank dim {self.memory_bank.shape[1]}: other backbone/params?")
        bank = self._bank_on(emb.device)
        queries = to_rows(emb).to(bank.device)
        dist, idx = nearest_neighbors(queries, bank, 1)
        patch_scores, nn_idx = dist.view(b, h * w), idx.view(b, h * w)
        scores = self._image_scores(bank, queries.view(b, h * w, d), patch_scores, nn_idx).float().cpu()
        maps = upsample_and_smooth(patch_scores.view(b, h, w), tuple(images.shape[-2:]), self.p.sigma).float().cpu()
        return scores, maps


class _Filler:
    """Rows appended in order into a preallocated matrix (the single-pass bank)."""

    def __init__(self, out: torch.Tensor) -> None:
        self.out, self.pos = out, 0

    def add(self, rows: torch.Tensor) -> None:
        self.out[self.pos : self.pos + rows.shape[0]] = rows
        self.pos += rows.shape[0]


def _store_device(device: torch.device, planned_bytes: int) -> torch.device:
    """Where the bank is built: the backbone's device, unless that is a GPU without room for the plan."""
    if device.type == "cuda" and planned_bytes > 0.8 * torch.cuda.mem_get_info(device)[0]:
        return torch.device("cpu")
    return device
