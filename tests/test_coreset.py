"""Coreset samplers: exact greedy k-center picks, k-center quality under projection, ratios, errors;
budget plans and the chunked (streaming) coreset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vadbench.models.components.coreset import (
    BankPlan,
    ChunkedCoreset,
    coreset_size,
    greedy_coreset_indices,
    plan_bank,
    selection_scratch_bytes,
    subsample_indices,
)


def brute_force_greedy(points: np.ndarray, starts: np.ndarray, n_select: int) -> list[int]:
    """Reference: full float64 distance matrix; initial distance = mean distance to the starts."""
    dist = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    current = dist[:, starts].mean(axis=1)
    picks = []
    for _ in range(n_select):
        i = int(np.argmax(current))
        picks.append(i)
        current = np.minimum(current, dist[:, i])
    return picks


def greedy_and_reference(points: np.ndarray, starts: np.ndarray, n_select: int, **kw) -> tuple[list[int], list[int]]:
    """Our picks (no projection, the given starts) and the float64 brute force's, for the same points."""
    ours = greedy_coreset_indices(
        torch.from_numpy(points),
        n_select,
        torch.Generator().manual_seed(0),
        projection_dim=None,
        start_indices=torch.from_numpy(starts),
        **kw,
    )
    return ours.tolist(), brute_force_greedy(points.astype(np.float64), starts, n_select)


def test_hand_made_points_pick_the_expected_order():
    # points on a line at 0, 1, 2, 3, 10; all points as starts → mean distances 3.2, 2.6, 2.4, 2.6, 6.8:
    # first the outlier (10), then 0 (3.2 beats 2.6 / 2.4 / 2.6), then 3 (min distances now 1, 2, 2.6)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [10.0, 0.0]])
    picks = greedy_coreset_indices(
        x, 3, torch.Generator().manual_seed(0), projection_dim=None, start_indices=torch.arange(5)
    )
    assert picks.tolist() == [4, 0, 3]


@pytest.mark.parametrize("dim", [2, 16])
def test_greedy_matches_brute_force_k_center(dim):
    rng = np.random.default_rng(dim)
    points = rng.normal(size=(200, dim)).astype(np.float32)
    starts = rng.choice(200, 10, replace=False)
    ours, reference = greedy_and_reference(points, starts, 40, chunk_size=37)  # several chunks
    assert ours == reference


def test_pruned_updates_pick_as_the_full_pass_and_read_few_rows(monkeypatch):
    # clustered points, as patch features are: the triangle-inequality test must skip most rows after
    # the first picks, and the picks must still be exactly those of the full float64 pass
    import vadbench.models.components.coreset as coreset

    rng = np.random.default_rng(7)
    centers = rng.normal(size=(30, 16)) * 8
    points = (centers[rng.integers(0, 30, 1500)] + rng.normal(size=(1500, 16))).astype(np.float32)
    starts = rng.choice(1500, 10, replace=False)
    read = []
    full = coreset._distances_at
    monkeypatch.setattr(
        coreset, "_distances_at", lambda pts, rows, *a: read.append(rows.numel()) or full(pts, rows, *a)
    )
    ours, reference = greedy_and_reference(points, starts, 150)
    assert ours == reference
    # most picks take the pruned path (the rest read every row in one pass), and it reads few rows
    assert len(read) >= 0.9 * 150 and sum(read) + (150 - len(read)) * 1500 < 0.25 * 1500 * 150


def test_unstructured_points_fall_back_to_full_passes_with_the_same_picks(monkeypatch):
    # Gaussian points in 64-D: the bound rarely prunes, so most picks read every row in one contiguous pass
    import vadbench.models.components.coreset as coreset

    gathered = []
    full = coreset._distances_at
    monkeypatch.setattr(coreset, "_distances_at", lambda pts, rows, *a: gathered.append(1) or full(pts, rows, *a))
    rng = np.random.default_rng(8)
    points = rng.normal(size=(600, 64)).astype(np.float32)
    starts = rng.choice(600, 10, replace=False)
    ours, reference = greedy_and_reference(points, starts, 60, chunk_size=97)
    assert ours == reference
    assert len(gathered) < 30


def test_full_selection_is_a_permutation():
    # once picked, a point's distance is exactly 0, so it is never picked twice
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    picks = greedy_coreset_indices(x, 64, torch.Generator().manual_seed(0), projection_dim=None)
    assert sorted(picks.tolist()) == list(range(64))


def test_projected_greedy_covers_every_cluster():
    # 12 tight, well-separated clusters in 512-D: k-center with k=12 must take one point from each,
    # even after the 128-D random projection; a random subset of 12 almost surely misses some
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(12, 512, generator=g) * 10
    x = (centers[:, None, :] + 0.1 * torch.randn(12, 50, 512, generator=g)).reshape(-1, 512)
    cluster = torch.arange(12).repeat_interleave(50)
    picks = greedy_coreset_indices(x, 12, torch.Generator().manual_seed(0), projection_dim=128)
    assert sorted(cluster[picks].tolist()) == list(range(12))
    rand = subsample_indices(x, "random", 12 / 600, torch.Generator().manual_seed(0))
    assert len(set(cluster[rand].tolist())) < 12


def test_seeded_selection_is_deterministic():
    x = torch.randn(500, 256, generator=torch.Generator().manual_seed(4))
    a = subsample_indices(x, "greedy_coreset", 0.1, torch.Generator().manual_seed(7))
    b = subsample_indices(x, "greedy_coreset", 0.1, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.numel() == 50 and a.unique().numel() == 50


@pytest.mark.parametrize("method", ["greedy_coreset", "random", "identity"])
def test_ratio_one_keeps_everything(method):
    x = torch.randn(97, 32, generator=torch.Generator().manual_seed(5))
    keep = subsample_indices(x, method, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(keep, torch.arange(97))


def test_random_and_identity_samplers():
    x = torch.randn(300, 4)
    r = subsample_indices(x, "random", 0.2, torch.Generator().manual_seed(0))
    assert r.numel() == 60 and r.unique().numel() == 60 and torch.equal(r, r.sort().values)
    assert torch.equal(subsample_indices(x, "identity", 0.2, torch.Generator()), torch.arange(300))


def test_sizes_and_errors():
    assert coreset_size(1000, 0.1) == 100 and coreset_size(5, 0.01) == 1 and coreset_size(7, 1.0) == 7
    with pytest.raises(ValueError, match="ratio"):
        coreset_size(10, 0.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        subsample_indices(torch.zeros(3, 2), "kmeans", 0.5, torch.Generator())
    with pytest.raises(ValueError, match="n_select"):
        greedy_coreset_indices(torch.zeros(3, 2), 4, torch.Generator())
    with pytest.raises(ValueError, match="non-empty"):
        greedy_coreset_indices(torch.zeros(0, 2), 1, torch.Generator())


MB = 1 << 20


def test_plan_single_pass_when_everything_fits():
    plan = plan_bank(100_000, 384, method="greedy_coreset", ratio=0.01, budget_bytes=2 << 30)
    # 100,000 rows × 384 float32 + projection 128 + vectors + the kept copy
    assert plan.strategy == "single_pass" and plan.chunks == 1 and plan.union_rows == 1000
    assert (
        plan.planned_bytes
        == 100_000 * 384 * 4 + selection_scratch_bytes(100_000, 384, 1000, "greedy_coreset") + 1000 * 384 * 4
    )
    assert plan.planned_bytes <= plan.budget_bytes


@pytest.mark.parametrize("rows", [1_500_000, 20_480_000, 123_456_789])
def test_plan_chunked_stays_within_budget_at_any_size(rows):
    # 256² images, layer2 + layer3: 1,024 patches of 384 dims each; ~1,500 / 20,000 / ~120,000 images
    budget = 2 << 30
    plan = plan_bank(rows, 384, method="greedy_coreset", ratio=0.01, budget_bytes=budget)
    assert plan.strategy == "chunked" and plan.planned_bytes <= budget
    assert plan.chunks == -(-rows // plan.chunk_rows)
    if not plan.reduce:  # the union of ⌊1 %⌋ per chunk is the whole bank
        assert plan.union_rows == plan.expected_rows <= coreset_size(rows, 0.01) + 1
    else:
        assert plan.union_rows * 384 * 4 <= budget // 2


def test_plan_chunk_cap_and_half_storage():
    a = plan_bank(2_000_000, 384, method="greedy_coreset", ratio=0.01, budget_bytes=256 * MB)
    b = plan_bank(2_000_000, 384, method="greedy_coreset", ratio=0.01, budget_bytes=256 * MB, max_chunk_rows=10_000)
    h = plan_bank(2_000_000, 384, method="greedy_coreset", ratio=0.01, budget_bytes=256 * MB, bank_itemsize=2)
    assert b.chunk_rows == 10_000 < a.chunk_rows < h.chunk_rows  # fp16 union leaves room for a larger chunk


def test_plan_errors():
    with pytest.raises(ValueError, match="identity keeps all"):
        plan_bank(10_000, 64, method="identity", ratio=0.1, budget_bytes=MB)
    with pytest.raises(ValueError, match="too small"):
        plan_bank(10_000, 512, method="greedy_coreset", ratio=0.1, budget_bytes=10_000)
    with pytest.raises(ValueError, match="unknown sampler"):
        plan_bank(10, 2, method="kmeans", ratio=0.1, budget_bytes=MB)


def _chunked(
    x: torch.Tensor, plan, method="greedy_coreset", ratio=0.1, seed=0, add=97, **kw
) -> tuple[torch.Tensor, ChunkedCoreset]:
    cc = ChunkedCoreset(plan, method, ratio, torch.Generator().manual_seed(seed), **kw)
    for start in range(0, x.shape[0], add):  # batches that straddle chunk boundaries
        cc.add(x[start : start + add])
    return cc.finish(), cc


def test_chunked_with_one_chunk_equals_the_single_pass():
    x = torch.randn(1000, 256, generator=torch.Generator().manual_seed(4))
    plan = BankPlan("chunked", 1000, 256, 1000, 1, 100, 100, False, 0, 0)  # one full chunk
    bank, cc = _chunked(x, plan)
    ref = subsample_indices(x, "greedy_coreset", 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(bank, x[ref]) and cc.chunks == 1


def test_chunked_union_covers_every_cluster_and_keeps_the_ratio():
    # 12 tight clusters, rows shuffled: each 300-row chunk sees every cluster and its k-center (30 picks)
    # takes at least one point of each, so the union covers all of them, with 10 % of the rows
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(12, 512, generator=g) * 10
    x = (centers[:, None, :] + 0.1 * torch.randn(12, 100, 512, generator=g)).reshape(-1, 512)
    cluster = torch.arange(12).repeat_interleave(100)
    order = torch.randperm(1200, generator=g)
    x, cluster = x[order], cluster[order]
    plan = plan_bank(1200, 512, method="greedy_coreset", ratio=0.1, budget_bytes=3 * MB, max_chunk_rows=300)
    assert plan.strategy == "chunked" and plan.chunk_rows == 300 and plan.chunks == 4
    bank, cc = _chunked(x, plan)
    assert bank.shape == (120, 512) and cc.chunks == 4 and cc.reductions == 0
    picked = torch.cdist(bank, x).argmin(1)
    assert torch.equal(x[picked], bank)  # rows of the input, not averages
    assert set(cluster[picked].tolist()) == set(range(12))
    for c in range(4):  # every chunk contributed its own coreset
        assert set(((picked >= 300 * c) & (picked < 300 * (c + 1))).nonzero().flatten().tolist()) == set(
            range(30 * c, 30 * c + 30)
        )


def test_chunked_partial_last_chunk_and_half_storage():
    x = torch.randn(1050, 64, generator=torch.Generator().manual_seed(5))
    plan = plan_bank(1050, 64, method="random", ratio=0.1, budget_bytes=200_000, bank_itemsize=2, max_chunk_rows=200)
    bank, cc = _chunked(x, plan, method="random", dtype=torch.float16)
    # 5 chunks of 200 → 20 each, the last 50 rows → 5
    assert plan.expected_rows == plan.union_rows == 105 and bank.shape == (105, 64) and bank.dtype == torch.float16
    assert cc.chunks == 6
    xh = x.half()
    assert torch.equal(xh[torch.cdist(bank.float(), xh.float()).argmin(1)], bank)  # rows of the input


def test_chunked_union_reduction_keeps_the_bank_within_its_share():
    x = torch.randn(4000, 64, generator=torch.Generator().manual_seed(6))
    plan = plan_bank(4000, 64, method="greedy_coreset", ratio=0.5, budget_bytes=500_000, projection_dim=None)
    assert plan.strategy == "chunked" and plan.reduce and plan.planned_bytes <= 500_000
    bank, cc = _chunked(x, plan, ratio=0.5, projection_dim=None)
    assert cc.reductions >= 1 and bank.shape[0] <= plan.union_rows < 2000
    assert torch.equal(x[torch.cdist(bank, x).argmin(1)], bank)


def test_chunked_rejects_misuse():
    plan = plan_bank(100, 8, method="random", ratio=0.1, budget_bytes=3000, max_chunk_rows=50)
    assert plan.strategy == "chunked"
    cc = ChunkedCoreset(plan, "random", 0.1, torch.Generator())
    with pytest.raises(ValueError, match="expected rows"):
        cc.add(torch.zeros(3, 9))
    with pytest.raises(ValueError, match="more rows than planned"):
        cc.add(torch.zeros(101, 8))
    cc.add(torch.zeros(60, 8))
    with pytest.raises(ValueError, match="planned"):
        cc.finish()


def test_row_file_is_a_bank_on_disk_with_the_same_picks():
    from vadbench.models.components.row_file import RowFile

    x = torch.randn(3000, 48, generator=torch.Generator().manual_seed(9))
    rows = RowFile(3000, 48)
    for start in range(0, 3000, 700):  # batches as the embedding produces them
        rows.add(x[start : start + 700].double())
    assert torch.equal(rows[100:2900], x[100:2900]) and rows[5:5].shape == (0, 48)
    # the projection reads it in slices: the same picks as from memory, and the same rows come back
    keep = subsample_indices(rows, "greedy_coreset", 0.05, torch.Generator().manual_seed(1), projection_dim=16)
    assert torch.equal(
        keep, subsample_indices(x, "greedy_coreset", 0.05, torch.Generator().manual_seed(1), projection_dim=16)
    )
    assert torch.equal(rows.take(keep), x[keep])
    with pytest.raises(ValueError, match="do not fit"):
        rows.add(x[:1])
    with pytest.raises(IndexError, match="contiguous"):
        rows[::2]
    rows.close()
