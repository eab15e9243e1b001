"""Compiled chaos-game kernels: one deterministic RNG stream per image, points → binary raster.

The RNG is a splitmix64 stream written out here (not numba's global np.random state) so that an
image depends only on its own 64-bit seed: the same seed gives the same pixels in any process,
in any order, with any number of workers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53: top 53 bits → float in [0, 1)
BURN_IN = 20  # iterations dropped before recording, so the start point (0, 0) does not stretch the bbox


def numba_cache_dir() -> Path | None:
    """A writable directory for numba's on-disk cache, or None when there is none.

    Kept outside the source tree on purpose: `src/vadbench/fractals` is a DVC dependency, and cache
    files written beside the sources would change its hash. `NUMBA_CACHE_DIR` wins when set.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    bases = [Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"), Path(tempfile.gettempdir())]
    for base in bases:
        d = base / f"vadbench-numba-{os.getuid()}" if base == bases[-1] else base / "vadbench" / "numba"
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return d
        except OSError:
            continue
    return None


def _jit(fn: Callable[..., Any]) -> Any:
    """njit with an on-disk cache when a writable cache dir exists, plain njit otherwise.

    numba picks the cache locator when the function is decorated, so `config.CACHE_DIR` is set only
    for the decoration and restored afterwards (other numba users in the process are unaffected).
    """
    cache_dir = numba_cache_dir()
    if cache_dir is None:
        return numba.njit(fn)
    saved = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = str(cache_dir)
    try:
        return numba.njit(cache=True)(fn)
    except RuntimeError:  # no usable locator after all (read-only everything): compile per process
        return numba.njit(fn)
    finally:
        numba.config.CACHE_DIR = saved


@_jit
def _next(state: np.uint64) -> tuple[np.uint64, float]:
    """splitmix64 step: (new state, uniform float in [0, 1))."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z = z ^ (z >> _S31)
    return state, float(z >> _S11) * _TO_UNIT


@_jit
def uniform_stream(seed: np.uint64, n: int) -> np.ndarray:
    """The first `n` floats of the stream for `seed` (for tests of the RNG itself). (n,) float64."""
    out = np.empty(n, np.float64)
    s = seed
    for i in range(n):
        s, out[i] = _next(s)
    return out


@_jit
def chaos_game(
    maps: np.ndarray, cum: np.ndarray, n_points: int, seed: np.uint64, pts: np.ndarray, bbox: np.ndarray
) -> int:
    """Write `n_points` chaos-game points into pts[:n] (pts (>=n, 2) float64: x, y).

    maps (K, 6) rows a, b, c, d, e, f: x' = a·x + b·y + e, y' = c·x + d·y + f; cum (K,) cumulative
    map probabilities (last == 1). bbox (4,) receives xmin, xmax, ymin, ymax of the recorded points
    (tracked here to save a pass). Returns how many points are finite: a divergent system stops early.
    """
    s = seed
    x = 0.0
    y = 0.0
    xmin = ymin = np.inf
    xmax = ymax = -np.inf
    k_last = maps.shape[0] - 1
    for i in range(-BURN_IN, n_points):
        s, u = _next(s)
        # branch-free map choice: a data-dependent loop exit mispredicts on most steps (3× slower)
        k = 0
        for j in range(k_last):
            k += u >= cum[j]
        xn = maps[k, 0] * x + maps[k, 1] * y + maps[k, 4]
        y = maps[k, 2] * x + maps[k, 3] * y + maps[k, 5]
        x = xn
        if not (np.isfinite(x) and np.isfinite(y)):
            n_points = max(i, 0)
            break
        if i >= 0:
            pts[i, 0] = x
            pts[i, 1] = y
            xmin = min(xmin, x)
            xmax = max(xmax, x)
            ymin = min(ymin, y)
            ymax = max(ymax, y)
    bbox[0], bbox[1], bbox[2], bbox[3] = xmin, xmax, ymin, ymax
    return n_points


@_jit
def _pixel(v: float, scale: float, pad: int, inner: int) -> int:
    """Offset v ≥ 0 → pixel index in [pad, pad+inner]; clamps float round-off and inf/nan from huge spans."""
    t = v * scale
    if not t <= inner:
        t = inner
    return pad + int(t)


@_jit
def rasterize(pts: np.ndarray, n: int, bbox: np.ndarray, pad: int, patch: np.ndarray, img: np.ndarray) -> int:
    """Stamp pts[:n] into img (S, S) uint8 (cleared here) as 255-valued `patch` (3, 3) copies.

    Each axis is stretched independently from bbox (xmin, xmax, ymin, ymax) onto [pad, S-1-pad]
    (as FractalDB does); y grows upwards; stamps are clipped at the border. Returns the number
    of non-zero pixels.
    """
    img[:, :] = 0
    if n == 0:
        return 0
    size = img.shape[0]
    xmin, xmax, ymin, ymax = bbox[0], bbox[1], bbox[2], bbox[3]
    inner = size - 2 * pad - 1
    sx = inner / (xmax - xmin) if xmax > xmin else 0.0
    sy = inner / (ymax - ymin) if ymax > ymin else 0.0
    # offsets of the patch's set cells
    dr = np.empty(9, np.int64)
    dc = np.empty(9, np.int64)
    m = 0
    for r in range(3):
        for c in range(3):
            if patch[r, c]:
                dr[m] = r - 1
                dc[m] = c - 1
                m += 1
    single = m == 1 and dr[0] == 0 and dc[0] == 0
    # Mark point centres first, then dilate by the patch: the same pixels as stamping every
    # point, but 200k random writes + m sequential (vectorised) passes instead of m·200k random writes.
    centres = img if single else np.zeros((size, size), np.uint8)
    for i in range(n):
        centres[_pixel(ymax - pts[i, 1], sy, pad, inner), _pixel(pts[i, 0] - xmin, sx, pad, inner)] = 255
    if not single:
        for j in range(m):
            a, b = dr[j], dc[j]
            for r in range(max(0, a), min(size, size + a)):
                for c in range(max(0, b), min(size, size + b)):
                    img[r, c] |= centres[r - a, c - b]
    return np.count_nonzero(img)


@_jit
def render_into(
    maps: np.ndarray,
    cum: np.ndarray,
    n_points: int,
    pad: int,
    patch: np.ndarray,
    seed: np.uint64,
    pts: np.ndarray,
    img: np.ndarray,
) -> tuple[int, int]:
    """Chaos game + raster into `img` (S, S) uint8 using scratch `pts`. Returns (filled pixels, finite points)."""
    bbox = np.empty(4)
    n = chaos_game(maps, cum, n_points, seed, pts, bbox)
    return rasterize(pts, n, bbox, pad, patch, img), n


# --- generator options: colour by map, plasma backgrounds ---------------------------------------------
@_jit
def chaos_game_labels(
    maps: np.ndarray,
    cum: np.ndarray,
    n_points: int,
    seed: np.uint64,
    pts: np.ndarray,
    labels: np.ndarray,
    bbox: np.ndarray,
) -> int:
    """`chaos_game` that also writes the index of the map that produced each point into labels[:n] (uint8).

    The same RNG use and arithmetic as `chaos_game`, so the points are identical; a separate kernel keeps the
    grey path free of the extra store.
    """
    s = seed
    x = 0.0
    y = 0.0
    xmin = ymin = np.inf
    xmax = ymax = -np.inf
    k_last = maps.shape[0] - 1
    for i in range(-BURN_IN, n_points):
        s, u = _next(s)
        k = 0
        for j in range(k_last):
            k += u >= cum[j]
        xn = maps[k, 0] * x + maps[k, 1] * y + maps[k, 4]
        y = maps[k, 2] * x + maps[k, 3] * y + maps[k, 5]
        x = xn
        if not (np.isfinite(x) and np.isfinite(y)):
            n_points = max(i, 0)
            break
        if i >= 0:
            pts[i, 0] = x
            pts[i, 1] = y
            labels[i] = k
            xmin = min(xmin, x)
            xmax = max(xmax, x)
            ymin = min(ymin, y)
            ymax = max(ymax, y)
    bbox[0], bbox[1], bbox[2], bbox[3] = xmin, xmax, ymin, ymax
    return n_points


@_jit
def rasterize_labels(
    pts: np.ndarray, labels: np.ndarray, n: int, bbox: np.ndarray, pad: int, patch: np.ndarray, img: np.ndarray
) -> int:
    """`rasterize` writing map index + 1 instead of 255 (0 = empty) into img (S, S) uint8.

    A pixel hit by several points keeps the label of the last one; with a 3×3 patch, the patch offsets are
    applied in row-major order, each overwriting the previous where it sets a pixel. Returns non-zero pixels.
    """
    img[:, :] = 0
    if n == 0:
        return 0
    size = img.shape[0]
    xmin, xmax, ymin, ymax = bbox[0], bbox[1], bbox[2], bbox[3]
    inner = size - 2 * pad - 1
    sx = inner / (xmax - xmin) if xmax > xmin else 0.0
    sy = inner / (ymax - ymin) if ymax > ymin else 0.0
    dr = np.empty(9, np.int64)
    dc = np.empty(9, np.int64)
    m = 0
    for r in range(3):
        for c in range(3):
            if patch[r, c]:
                dr[m] = r - 1
                dc[m] = c - 1
                m += 1
    single = m == 1 and dr[0] == 0 and dc[0] == 0
    centres = img if single else np.zeros((size, size), np.uint8)
    for i in range(n):
        centres[_pixel(ymax - pts[i, 1], sy, pad, inner), _pixel(pts[i, 0] - xmin, sx, pad, inner)] = labels[i] + 1
    if not single:
        for j in range(m):
            a, b = dr[j], dc[j]
            for r in range(max(0, a), min(size, size + a)):
                for c in range(max(0, b), min(size, size + b)):
                    v = centres[r - a, c - b]
                    if v:
                        img[r, c] = v
    return np.count_nonzero(img)


@_jit
def render_labels_into(
    maps: np.ndarray,
    cum: np.ndarray,
    n_points: int,
    pad: int,
    patch: np.ndarray,
    seed: np.uint64,
    pts: np.ndarray,
    labels: np.ndarray,
    img: np.ndarray,
) -> tuple[int, int]:
    """`render_into` with map labels: img gets map index + 1 where set. Returns (filled pixels, finite points)."""
    bbox = np.empty(4)
    n = chaos_game_labels(maps, cum, n_points, seed, pts, labels, bbox)
    return rasterize_labels(pts, labels, n, bbox, pad, patch, img), n


PLASMA_ROUGHNESS = 0.5  # random amplitude × this per halving of the step (0.5: the classic smooth plasma)


@_jit
def diamond_square(seed: np.uint64, grid: np.ndarray, roughness: float) -> None:
    """Diamond-square (plasma) noise into grid (N+1, N+1) float64, N a power of two, from one seeded stream.

    Corners ~ U(0, 1); each diamond and square step sets a point to the mean of its (2–4) neighbours plus
    U(−½, ½) × amplitude, the amplitude starting at 1 and multiplied by `roughness` after every level.
    """
    n = grid.shape[0] - 1
    s = seed
    for r in (0, n):
        for c in (0, n):
            s, u = _next(s)
            grid[r, c] = u
    step = n
    amp = 1.0
    while step > 1:
        half = step // 2
        for r in range(half, n, step):  # diamond step: square centres
            for c in range(half, n, step):
                avg = 0.25 * (grid[r - half, c - half] + grid[r - half, c + half])
                avg += 0.25 * (grid[r + half, c - half] + grid[r + half, c + half])
                s, u = _next(s)
                grid[r, c] = avg + (u - 0.5) * amp
        for r in range(0, n + 1, half):  # square step: edge midpoints (exactly one of r/half, c/half odd)
            start = half if (r // half) % 2 == 0 else 0
            for c in range(start, n + 1, step):
                total = 0.0
                cnt = 0
                if r >= half:
                    total += grid[r - half, c]
                    cnt += 1
                if r + half <= n:
                    total += grid[r + half, c]
                    cnt += 1
                if c >= half:
                    total += grid[r, c - half]
                    cnt += 1
                if c + half <= n:
                    total += grid[r, c + half]
                    cnt += 1
                s, u = _next(s)
                grid[r, c] = total / cnt + (u - 0.5) * amp
        step = half
        amp *= roughness


@_jit
def plasma_into(seed: np.uint64, top: float, grid: np.ndarray, out: np.ndarray) -> None:
    """Diamond-square noise on grid (N+1, N+1) (N ≥ S−1, power of two), its top-left (S, S) window stretched
    to [0, top] (0 ≤ top ≤ 255) and rounded into out (S, S) uint8."""
    diamond_square(seed, grid, PLASMA_ROUGHNESS)
    size = out.shape[0]
    lo = np.inf
    hi = -np.inf
    for r in range(size):
        for c in range(size):
            lo = min(lo, grid[r, c])
            hi = max(hi, grid[r, c])
    scale = top / (hi - lo) if hi > lo else 0.0
    for r in range(size):
        for c in range(size):
            out[r, c] = np.uint8(int((grid[r, c] - lo) * scale + 0.5))


@_jit
def area_downscale(src: np.ndarray, out: np.ndarray) -> None:
    """Exact area average of src (S, S, C) uint8 into out (D, D, C) uint8, D ≤ S, in integer arithmetic.

    Output pixel i covers source [i·S/D, (i+1)·S/D) on each axis; source pixel k contributes its overlap, which
    in units of 1/D px is the integer min((i+1)·S, (k+1)·D) − max(i·S, k·D). Rounded half up. Exact, so it is
    byte-reproducible on any machine, and it commutes with flips.
    """
    size = src.shape[0]
    dst = out.shape[0]
    chans = src.shape[2]
    rows = np.zeros((dst, size, chans), np.int64)  # rows averaged: Σ_k w_ik · src[k]
    for i in range(dst):
        lo = i * size
        hi = lo + size
        for k in range(lo // dst, (hi - 1) // dst + 1):
            w = min(hi, (k + 1) * dst) - max(lo, k * dst)
            for c in range(size):
                for ch in range(chans):
                    rows[i, c, ch] += w * src[k, c, ch]
    norm = size * size
    for j in range(dst):
        lo = j * size
        hi = lo + size
        k0 = lo // dst
        k1 = (hi - 1) // dst
        for i in range(dst):
            for ch in range(chans):
                acc = 0
                for k in range(k0, k1 + 1):
                    acc += (min(hi, (k + 1) * dst) - max(lo, k * dst)) * rows[i, k, ch]
                out[i, j, ch] = np.uint8((acc + norm // 2) // norm)
