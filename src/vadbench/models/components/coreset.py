"""Memory-bank subsamplers for PatchCore: approximate greedy coreset (k-center), random, identity.

Every sampler returns row *indices* into the feature matrix, so the caller keeps the original
(unprojected) features. The greedy coreset follows PatchCore's official "approximate greedy":

1. project features to `projection_dim` dims with a seeded Gaussian Johnson–Lindenstrauss matrix
   (distances are kept up to a small factor, and each distance pass costs 128 instead of ~1500 dims);
2. start from `num_starts` random points: a point's initial "distance to the coreset" is its mean
   distance to those starts (the starts themselves are not selected);
3. repeat: pick the point farthest from the coreset, then lower every point's distance with its
   distance to the new pick.

Memory stays flat: the min-distance vector and one (chunk, dim) scratch buffer are allocated once and
every update writes in place. (Allocating fresh temporaries per iteration fragments glibc malloc
until a long selection loop is OOM-killed; see shared/notes/environment.md.)
"""

from __future__ import annotations

from typing import Literal

import torch
from tqdm import tqdm

SamplerName = Literal["greedy_coreset", "random", "identity"]
SAMPLERS: tuple[str, ...] = ("greedy_coreset", "random", "identity")


def coreset_size(n: int, ratio: float) -> int:
    """Number of rows kept from `n` at `ratio` in (0, 1]: floor, but at least one."""
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return n if ratio == 1 else max(1, min(n, int(n * ratio)))


def random_projection(features: torch.Tensor, dim: int, generator: torch.Generator, chunk_size: int = 65536) -> torch.Tensor:
    """(N, D) → (N, dim) through a seeded Gaussian matrix scaled by 1/sqrt(dim) (JL projection).

    The matrix is drawn on the CPU from `generator` (identical on CPU and GPU), then moved to the
    features' device; rows are projected in chunks so a half-precision or huge bank is never copied whole.
    """
    n, d = features.shape
    proj = torch.randn(d, dim, generator=generator, dtype=torch.float32).div_(dim**0.5).to(features.device)
    out = torch.empty(n, dim, dtype=torch.float32, device=features.device)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        torch.mm(features[start:stop].float(), proj, out=out[start:stop])
    return out


def _distances_to(points: torch.Tensor, center: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every row of `points` (N, D) to `center` (D,), written into `out` (N,).

    Uses the difference form (not |a|²-2ab+|b|²) so a point's distance to itself is exactly 0; works in
    chunks through the preallocated `scratch` (chunk, D) so no call allocates more than a scalar.
    """
    chunk = scratch.shape[0]
    for start in range(0, points.shape[0], chunk):
        stop = min(points.shape[0], start + chunk)
        buf = scratch[: stop - start]
        torch.sub(points[start:stop], center, out=buf)
        buf.mul_(buf)
        torch.sum(buf, dim=1, out=out[start:stop])
    return out.sqrt_()


def greedy_coreset_indices(
    features: torch.Tensor,
    n_select: int,
    generator: torch.Generator,
    *,
    projection_dim: int | None = 128,
    num_starts: int = 10,
    start_indices: torch.Tensor | None = None,
    chunk_size: int = 16384,
    progress: bool = False,
) -> torch.Tensor:
    """Approximate greedy k-center selection (PatchCore): indices (n_select,) int64, in pick order.

    features: (N, D) on any device. `projection_dim` None, or ≥ D, keeps the features as they are.
    `start_indices` overrides the `num_starts` random starting points (for exact tests).
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, D) feature matrix, got shape {tuple(features.shape)}")
    n = features.shape[0]
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must be in [1, {n}], got {n_select}")
    if projection_dim is not None and projection_dim < features.shape[1]:
        points = random_projection(features, projection_dim, generator)
    else:
        points = features.float()
    if start_indices is None:
        start_indices = torch.randperm(n, generator=generator)[: min(num_starts, n)]

    min_dist = torch.zeros(n, dtype=torch.float32, device=points.device)
    dist = torch.empty_like(min_dist)
    scratch = torch.empty(min(chunk_size, n), points.shape[1], dtype=torch.float32, device=points.device)
    # start: mean distance to the random starting points (the official code's "anchor distances")
    for s in start_indices.tolist():
        min_dist.add_(_distances_to(points, points[s], dist, scratch))
    min_dist.div_(len(start_indices))

    picked = torch.empty(n_select, dtype=torch.int64, device=points.device)
    for i in tqdm(range(n_select), desc="coreset", disable=not progress, leave=False):
        idx = torch.argmax(min_dist).view(1)  # first maximum on ties; stays a tensor: no GPU sync
        picked[i : i + 1] = idx
        center = points.index_select(0, idx)[0]
        torch.minimum(min_dist, _distances_to(points, center, dist, scratch), out=min_dist)
    return picked


def subsample_indices(
    features: torch.Tensor,
    method: str,
    ratio: float,
    generator: torch.Generator,
    *,
    projection_dim: int | None = 128,
    num_starts: int = 10,
    progress: bool = False,
) -> torch.Tensor:
    """Rows of `features` (N, D) to keep: (M,) int64 on the features' device.

    `method`: ``greedy_coreset`` (see module doc), ``random`` (uniform without replacement, sorted) or
    ``identity`` (all rows). Ratio 1.0 keeps every row whatever the method.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {SAMPLERS}")
    n = features.shape[0]
    m = coreset_size(n, ratio)
    if method == "identity" or m == n:
        return torch.arange(n, device=features.device)
    if method == "random":
        return torch.randperm(n, generator=generator)[:m].sort().values.to(features.device)
    return greedy_coreset_indices(
        features, m, generator, projection_dim=projection_dim, num_starts=num_starts, progress=progress
    )
