"""Memory-bank subsamplers for PatchCore: approximate greedy coreset (k-center), random, identity.

Every sampler returns row *indices* into the feature matrix, so the caller keeps the original
(unprojected) features. The greedy coreset follows PatchCore's official "approximate greedy":

1. project features to `projection_dim` dims with a seeded Gaussian Johnson–Lindenstrauss matrix
   (distances are kept up to a small factor, and each distance pass costs 128 instead of ~1500 dims);
2. start from `num_starts` random points: a point's initial "distance to the coreset" is its mean
   distance to those starts (the starts themselves are not selected);
3. repeat: pick the point farthest from the coreset, then lower every point's distance with its
   distance to the new pick.

Step 3 skips the points the new pick cannot get closer to (triangle inequality, as in accelerated
k-means/k-center): each point keeps a reference center a (the last pick that lowered it, initially the
first start) and its distance r to it; the pick c can lower the point's distance u only if
d(a, c) − r < u, so only those rows are read. The picks are those of the full pass: a skipped point's
distance to c is ≥ u, and the rows that are read get the same arithmetic. A full pass over N × pdim
floats is memory-bound (~24 ms for 238k × 305 here); after the first picks only a few per cent of the
rows pass the test (measured on ELPV features: 4 %, 7× faster over the whole selection).

Memory stays flat: the per-point vectors, the picks' rows and one (chunk, dim) scratch buffer are
allocated once and every update writes in place. (Allocating fresh temporaries per iteration fragments glibc malloc
until a long selection loop is OOM-killed; see shared/notes/environment.md.)

Banks larger than a memory budget (`plan_bank`, `ChunkedCoreset`): when all rows and the selection
scratch fit the budget, one selection over all of them (above). Otherwise rows stream through a chunk
buffer sized by the budget; each chunk is subsampled at the ratio and the union of the picks is the
bank — k-center per chunk, not over all rows (docs/PATCHCORE_BUDGET.md measures what that costs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Callable
from dataclasses import dataclass
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


def random_projection(
    features: torch.Tensor, dim: int, generator: torch.Generator, chunk_size: int = 65536
) -> torch.Tensor:
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


def _distances_at(
    points: torch.Tensor, rows: torch.Tensor, center: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """`_distances_to` for the rows `rows` (M,) of `points` only, written into `out` (M,): the same
    arithmetic per row, the rows gathered chunk by chunk into `scratch`."""
    chunk = scratch.shape[0]
    for start in range(0, rows.numel(), chunk):
        stop = min(rows.numel(), start + chunk)
        buf = scratch[: stop - start]
        torch.index_select(points, 0, rows[start:stop], out=buf)
        buf.sub_(center)
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

    dev, dim = points.device, points.shape[1]
    min_dist = torch.zeros(n, dtype=torch.float32, device=dev)
    dist = torch.empty_like(min_dist)
    scratch = torch.empty(min(chunk_size, n), dim, dtype=torch.float32, device=dev)
    # start: mean distance to the random starting points (the official code's "anchor distances"); the
    # first start's distances are also every point's pruning reference (0 + d is exactly d: same sums)
    ref_dist = _distances_to(points, points[int(start_indices[0])], torch.empty_like(min_dist), scratch)
    min_dist.copy_(ref_dist)
    for s in start_indices[1:].tolist():
        min_dist.add_(_distances_to(points, points[s], dist, scratch))
    min_dist.div_(len(start_indices))

    # pruning state: each point's reference center (row of `centers`: 0 is the first start, i + 1 the
    # i-th pick) and its distance to it; the other buffers are per-iteration scratch, sliced, never grown
    ref = torch.zeros(n, dtype=torch.int32, device=dev)
    centers = torch.empty(n_select + 1, dim, dtype=torch.float32, device=dev)
    centers[0] = points[int(start_indices[0])]
    center_dist = torch.empty(n_select + 1, dtype=torch.float32, device=dev)
    bound, ref_dist_rows = torch.empty_like(min_dist), torch.empty_like(min_dist)
    ref_rows = torch.empty_like(ref)
    maybe_closer = torch.empty(n, dtype=torch.bool, device=dev)
    rows_buf = torch.empty(n, 1, dtype=torch.int64, device=dev)

    picked = torch.empty(n_select, dtype=torch.int64, device=dev)
    for i in tqdm(range(n_select), desc="coreset", disable=not progress, leave=False):
        idx = torch.argmax(min_dist).view(1)  # first maximum on ties
        picked[i : i + 1] = idx
        center = points.index_select(0, idx)[0]
        centers[i + 1] = center
        # lower bound of each point's distance to the pick, d(ref, pick) − d(point, ref), shrunk by a
        # relative 2⁻¹⁶ so that rounding can only add rows to read, never drop one
        dc = _distances_to(centers[: i + 2], center, center_dist[: i + 2], scratch)
        torch.index_select(dc, 0, ref, out=bound)
        bound.sub_(ref_dist).mul_(1 - 2**-16)
        torch.lt(bound, min_dist, out=maybe_closer)
        if int(maybe_closer.sum()) > n // 2:
            # most rows may get closer (unstructured data, first picks): one contiguous pass over all rows is
            # cheaper than gathering them, and gives every row the same arithmetic
            d = _distances_to(points, center, dist, scratch)
            closer = torch.lt(d, min_dist, out=maybe_closer)
            torch.minimum(min_dist, d, out=min_dist)
            torch.where(closer, d, ref_dist, out=ref_dist)
            ref.masked_fill_(closer, i + 1)
            continue
        rows = torch.nonzero(maybe_closer, out=rows_buf.resize_(0))[:, 0]  # regrown within its storage
        m = rows.numel()
        d = _distances_at(points, rows, center, dist[:m], scratch)
        current = torch.index_select(min_dist, 0, rows, out=bound[:m])
        closer = torch.lt(d, current, out=maybe_closer[:m])
        min_dist.index_copy_(0, rows, torch.minimum(d, current, out=current))
        rd = torch.index_select(ref_dist, 0, rows, out=ref_dist_rows[:m])
        ref_dist.index_copy_(0, rows, torch.where(closer, d, rd, out=rd))
        rf = torch.index_select(ref, 0, rows, out=ref_rows[:m])
        ref.index_copy_(0, rows, rf.masked_fill_(closer, i + 1))
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
    """Rows of `features` (N, D) to keep: (M,) int64 on the features' device, M = `coreset_size(N, ratio)`.

    `method`: ``greedy_coreset`` (see module doc), ``random`` (uniform without replacement, sorted) or
    ``identity`` (all rows). Ratio 1.0 keeps every row whatever the method.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {SAMPLERS}")
    m = coreset_size(features.shape[0], ratio)
    return subsample_to(
        features, method, m, generator, projection_dim=projection_dim, num_starts=num_starts, progress=progress
    )


def subsample_to(
    features: torch.Tensor,
    method: str,
    m: int,
    generator: torch.Generator,
    *,
    projection_dim: int | None = 128,
    num_starts: int = 10,
    progress: bool = False,
) -> torch.Tensor:
    """`subsample_indices` with the number of kept rows `m` (1 ≤ m ≤ N) given instead of a ratio."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {SAMPLERS}")
    n = features.shape[0]
    if method == "identity" or m == n:
        return torch.arange(n, device=features.device)
    if method == "random":
        return torch.randperm(n, generator=generator)[:m].sort().values.to(features.device)
    return greedy_coreset_indices(
        features, m, generator, projection_dim=projection_dim, num_starts=num_starts, progress=progress
    )


# -- memory-bounded banks -----------------------------------------------------------------------------
def selection_scratch_bytes(
    n: int, dim: int, m: int, method: str, *, projection_dim: int | None = 128, itemsize: int = 4
) -> int:
    """Bytes `subsample_to` allocates to pick `m` of `n` rows of width `dim` stored `itemsize` bytes wide.

    Counted from the code above (greedy): the projected points (n × pdim float32) and the projection
    matrix, a float32 copy of half-precision rows in 65,536-row slices (or whole, without projection),
    the start permutation (n int64, kept alive by its slice), `min_dist` and `dist` (2n float32), the
    pruning state and scratch (per point: 5 float32/int32, a bool and an int64 row index; the picks'
    rows, m + 1 × (pdim + 1) float32), the distance scratch (≤ 16,384 × pdim float32) and the picks
    (m int64). Random: the permutation and the sorted picks. The caller's copy of the kept rows is not
    included (`plan_bank` adds it).
    """
    if method == "identity" or m == n:
        return n * 8  # arange
    if method == "random":
        return n * 8 + 2 * m * 8
    projected = projection_dim is not None and projection_dim < dim
    pdim = projection_dim if projected else dim
    b = 0
    if projected:
        b += dim * pdim * 4 + n * pdim * 4 + (min(65536, n) * dim * 4 if itemsize != 4 else 0)
    elif itemsize != 4:
        b += n * dim * 4
    pruning = n * (5 * 4 + 1 + 8) + (m + 1) * (pdim + 1) * 4
    return b + n * 8 + 2 * n * 4 + pruning + min(16384, n) * pdim * 4 + m * 8


@dataclass(frozen=True)
class BankPlan:
    """How a memory bank of `rows` patch vectors is built within `budget_bytes` (`plan_bank`).

    ``single_pass``: every row in one float32 matrix, one selection (the paper; `planned_bytes` covers
    the matrix, the selection scratch and the kept copy). ``chunked``: rows stream through a float32
    buffer of `chunk_rows`; each full chunk (and the last, partial one) is subsampled at the ratio and
    its picks appended to a union buffer of `union_rows` rows; `reduce` True means the union would
    exceed its share of the budget, so whenever it is full it is subsampled down to half (a coreset of
    the union) before the next chunk's picks go in.
    """

    strategy: str
    rows: int
    dim: int
    chunk_rows: int
    chunks: int
    union_rows: int
    expected_rows: int
    reduce: bool
    planned_bytes: int
    budget_bytes: int


def _expected_rows(rows: int, chunk: int, ratio: float) -> int:
    full, rem = divmod(rows, chunk)
    return full * coreset_size(chunk, ratio) + (coreset_size(rem, ratio) if rem else 0)


def plan_bank(
    rows: int,
    dim: int,
    *,
    method: str,
    ratio: float,
    budget_bytes: int,
    projection_dim: int | None = 128,
    bank_itemsize: int = 4,
    max_chunk_rows: int | None = None,
) -> BankPlan:
    """Single pass when everything fits `budget_bytes`, else the largest chunk (≤ `max_chunk_rows`) that does.

    Counted: the float32 rows (the whole matrix, or one chunk buffer), the selection scratch
    (`selection_scratch_bytes`), the copy of the kept rows, and, chunked, the union buffer in the bank's
    dtype (`bank_itemsize` bytes per value) plus the scratch of reducing it. Not counted: the model and
    backbone, one batch of images and activations, the interpreter (constant in N).
    Raises ValueError when not even a chunk of ⌈1/ratio⌉ rows fits (the smallest chunk that keeps a row
    without rounding up the ratio) or `method` is ``identity`` and the whole bank does not fit.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {SAMPLERS}")
    if rows < 1 or dim < 1:
        raise ValueError(f"need rows ≥ 1 and dim ≥ 1, got {rows}, {dim}")
    kw = {"projection_dim": projection_dim}
    m = coreset_size(rows, ratio) if method != "identity" else rows
    single = (
        rows * dim * 4
        + selection_scratch_bytes(rows, dim, m, method, **kw)
        + m * dim * (4 + (bank_itemsize if bank_itemsize != 4 else 0))
    )
    if single <= budget_bytes:
        return BankPlan("single_pass", rows, dim, rows, 1, m, m, False, single, budget_bytes)
    gb = 1 << 30
    if method == "identity":
        raise ValueError(
            f"sampler identity keeps all {rows:,} patches ({single / gb:.2f} GB with scratch), more than "
            f"memory_budget_gb={budget_bytes / gb:g}: raise the budget or use greedy_coreset / random"
        )
    s = bank_itemsize
    top = min(rows, max_chunk_rows or rows)
    c_min = min(top, math.ceil(1 / ratio))

    def chunk_cost(c: int) -> int:  # the float32 buffer + one chunk's selection + the copy of its picks
        k = coreset_size(c, ratio)
        return c * dim * 4 + selection_scratch_bytes(c, dim, k, method, **kw) + k * dim * 4

    def largest(ok: Callable[[int], bool]) -> int | None:  # largest chunk in [c_min, top] with ok (monotone)
        if not ok(c_min):
            return None
        lo, hi = c_min, top
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        return lo

    # 1. the union of every chunk's picks fits next to the chunk: no reduction. Σ⌊cᵢ·r⌋ ≤ ⌊rows·r⌋, plus
    #    one row when a last chunk under 1/r rows is rounded up to one pick: a bound for every chunk size
    bound = coreset_size(rows, ratio) + 1
    c = largest(lambda c: bound * dim * s + chunk_cost(c) <= budget_bytes)
    if c is not None:
        u = _expected_rows(rows, c, ratio)
        return BankPlan("chunked", rows, dim, c, -(-rows // c), u, u, False, u * dim * s + chunk_cost(c), budget_bytes)

    # 2. the union alone outgrows the budget: at most half of it for the union, subsampled to half its
    #    rows whenever the next chunk's picks would not fit. Peak = union + max(a chunk's selection, the
    #    buffer + the union's reduction); at the end (buffer freed) the union + its compact copy.
    def reduce_cost(u: int) -> int:
        return selection_scratch_bytes(u, dim, u // 2, method, itemsize=s, **kw) + (u // 2) * dim * s

    def peak(c: int, u: int) -> int:
        return u * dim * s + max(chunk_cost(c), c * dim * 4 + reduce_cost(u), u * dim * s)

    u = budget_bytes // 2 // (dim * s)
    while u >= 2:
        c = largest(lambda c, u=u: peak(c, u) <= budget_bytes and coreset_size(c, ratio) <= u - u // 2)
        if c is not None:
            return BankPlan(
                "chunked",
                rows,
                dim,
                c,
                -(-rows // c),
                u,
                _expected_rows(rows, c, ratio),
                True,
                peak(c, u),
                budget_bytes,
            )
        u //= 2
    need = _expected_rows(rows, c_min, ratio) * dim * s + chunk_cost(c_min)
    raise ValueError(
        f"memory_budget_gb={budget_bytes / gb:g} is too small for a bank of {rows:,} patches × {dim} dims at "
        f"ratio {ratio:g}: the smallest chunk ({c_min} rows) and its union need ~{need / gb:.3f} GB"
    )


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A chunk's selection and a union reduction allocate buffers of different sizes in turn; once glibc
    has raised its mmap threshold, those of up to 32 MB come from the heap, whose holes keep RSS above
    the live bytes (measured: 63 MiB peak for 51 MiB planned with 15 reductions; 49 MiB with a trim
    after each selection). Called once per chunk and per reduction: milliseconds.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ChunkedCoreset:
    """Streaming subsample under a `BankPlan` (``chunked``): rows in, a bank of ≈ ratio·rows out.

    `add` copies rows into the preallocated float32 chunk buffer; each time it is full, `subsample_to`
    keeps ``coreset_size(chunk, ratio)`` of its rows (k-center within the chunk for ``greedy_coreset``)
    and appends them to the preallocated union buffer (`dtype`). With ``plan.reduce``, a union that
    would overflow is first subsampled to half its capacity (a coreset of the union). `finish` handles
    the last, partial chunk and returns the bank (rows of the union, in pick order). Every chunk and
    reduction draws its projection and starts from the one `generator`, in order: deterministic.
    All large buffers are allocated once (no per-chunk growth: see the module doc on fragmentation), and
    freed heap pages go back to the OS after every selection (`release_free_heap`).
    """

    def __init__(
        self,
        plan: BankPlan,
        method: str,
        ratio: float,
        generator: torch.Generator,
        *,
        projection_dim: int | None = 128,
        num_starts: int = 10,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> None:
        if plan.strategy != "chunked":
            raise ValueError(f"ChunkedCoreset needs a chunked plan, got {plan.strategy!r}")
        self.plan, self.method, self.ratio, self.generator = plan, method, ratio, generator
        self.kw = {"projection_dim": projection_dim, "num_starts": num_starts}
        self.buffer: torch.Tensor | None = torch.empty(plan.chunk_rows, plan.dim, dtype=torch.float32, device=device)
        self.union: torch.Tensor | None = torch.empty(plan.union_rows, plan.dim, dtype=dtype, device=device)
        self.fill = self.count = self.seen = self.chunks = self.reductions = 0
        self._bar = tqdm(total=plan.chunks, desc="coreset chunks", disable=not progress, leave=False)

    def add(self, rows: torch.Tensor) -> None:
        """Append (n, D) rows (any device or float dtype); full chunks are subsampled on the way."""
        if self.buffer is None:
            raise RuntimeError("ChunkedCoreset.finish() was called already")
        if rows.ndim != 2 or rows.shape[1] != self.plan.dim:
            raise ValueError(f"expected rows (n, {self.plan.dim}), got {tuple(rows.shape)}")
        if self.seen + rows.shape[0] > self.plan.rows:
            raise ValueError(f"more rows than planned ({self.plan.rows:,})")
        pos, cap = 0, self.plan.chunk_rows
        while pos < rows.shape[0]:
            take = min(rows.shape[0] - pos, cap - self.fill)
            self.buffer[self.fill : self.fill + take].copy_(rows[pos : pos + take])
            self.fill, pos = self.fill + take, pos + take
            if self.fill == cap:
                self._flush()
        self.seen += rows.shape[0]

    def _flush(self) -> None:
        assert self.buffer is not None and self.union is not None
        k = coreset_size(self.fill, self.ratio)
        if self.count + k > self.union.shape[0]:
            self._reduce()  # before the chunk's selection: the two scratch areas never coexist
        chunk = self.buffer[: self.fill]
        keep = subsample_to(chunk, self.method, k, self.generator, **self.kw)
        self.union[self.count : self.count + k].copy_(chunk[keep])
        del keep
        release_free_heap()
        self.count += k
        self.fill = 0
        self.chunks += 1
        self._bar.update(1)

    def _reduce(self) -> None:
        assert self.union is not None
        target = self.union.shape[0] // 2
        current = self.union[: self.count]
        keep = subsample_to(current, self.method, target, self.generator, **self.kw)
        kept = current[keep]
        self.union[:target].copy_(kept)
        del kept, keep
        release_free_heap()
        self.count = target
        self.reductions += 1

    def finish(self) -> torch.Tensor:
        """The bank (M, D) in the union's dtype; frees the chunk buffer first."""
        if self.buffer is None or self.union is None:
            raise RuntimeError("ChunkedCoreset.finish() was called already")
        if self.seen != self.plan.rows:
            raise ValueError(f"saw {self.seen:,} rows, planned {self.plan.rows:,}")
        if self.fill:
            self._flush()
        self._bar.close()
        self.buffer = None
        union, self.union = self.union, None
        return union if self.count == union.shape[0] else union[: self.count].clone()
