"""Coreset samplers: exact greedy k-center picks, k-center quality under projection, ratios, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vadbench.models.components.coreset import coreset_size, greedy_coreset_indices, subsample_indices


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


def test_hand_made_points_pick_the_expected_order():
    # points on a line at 0, 1, 2, 3, 10; all points as starts → mean distances 3.2, 2.6, 2.4, 2.6, 6.8:
    # first the outlier (10), then 0 (3.2 beats 2.6 / 2.4 / 2.6), then 3 (min distances now 1, 2, 2.6)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [10.0, 0.0]])
    picks = greedy_coreset_indices(x, 3, torch.Generator().manual_seed(0), projection_dim=None, start_indices=torch.arange(5))
    assert picks.tolist() == [4, 0, 3]


@pytest.mark.parametrize("dim", [2, 16])
def test_greedy_matches_brute_force_k_center(dim):
    rng = np.random.default_rng(dim)
    points = rng.normal(size=(200, dim)).astype(np.float32)
    starts = rng.choice(200, 10, replace=False)
    ours = greedy_coreset_indices(
        torch.from_numpy(points), 40, torch.Generator().manual_seed(0),
        projection_dim=None, start_indices=torch.from_numpy(starts), chunk_size=37,  # several chunks
    )
    assert ours.tolist() == brute_force_greedy(points.astype(np.float64), starts, 40)


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
