"""Seeded 2-D Perlin noise and the thresholded masks synthetic-anomaly methods draw from it.

Perlin noise (Perlin 1985, gradient noise): a lattice of `res` × `res` cells over the image, a random
unit gradient at every lattice corner; each pixel's value blends the dot products of the four corner
gradients with its offsets from those corners through the quintic fade 6t⁵ − 15t⁴ + 10t³. The value is
exactly 0 on lattice points and, scaled by √2 (as DRAEM's and SuperSimpleNet's code do), lies in
[−1, 1]. Thresholding it gives the blob-shaped random regions DRAEM (image space) and SuperSimpleNet
(feature space) use as synthetic-anomaly masks.

Unlike the reference code (``rand_perlin_2d``), any shape works, not only multiples of `res`: pixel i
sits at i·res/size on the lattice. For shapes that are multiples, that is the same sampling as theirs.
Everything is drawn from a passed generator — a `torch.Generator` (`perlin_noise`, `perlin_masks`) or a
`numpy.random.Generator` (`perlin_noise_np`, `perlin_mask_np`) — so masks are reproducible and leave
the global RNGs alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def _check(shape: tuple[int, int], res: tuple[int, int]) -> tuple[int, int, int, int]:
    if len(shape) != 2 or len(res) != 2:
        raise ValueError(f"perlin noise needs a 2-D shape and a 2-D res, got shape={shape}, res={res}")
    h, w = (int(s) for s in shape)
    ry, rx = (int(r) for r in res)
    if h < 1 or w < 1 or ry < 1 or rx < 1:
        raise ValueError(f"perlin noise needs positive shape and res, got shape={shape}, res={res}")
    return h, w, ry, rx


def perlin_from_angles(shape: tuple[int, int], angles: torch.Tensor) -> torch.Tensor:
    """Perlin noise (H, W) in [−1, 1] for gradient angles (res_y + 1, res_x + 1) at the lattice corners.

    The deterministic core of every function here: the random part is only `angles`.
    """
    ry, rx = angles.shape[0] - 1, angles.shape[1] - 1
    h, w, ry, rx = _check(shape, (ry, rx))
    angles = angles.to(torch.float64)
    grads = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)  # (ry+1, rx+1, 2)
    # lattice coordinates of every pixel: cell index and fractional offset
    py = torch.arange(h, dtype=torch.float64) * ry / h
    px = torch.arange(w, dtype=torch.float64) * rx / w
    cy, cx = py.floor().long(), px.floor().long()
    fy, fx = (py - cy)[:, None].expand(h, w), (px - cx)[None, :].expand(h, w)
    cy, cx = cy[:, None].expand(h, w), cx[None, :].expand(h, w)

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[cy + dy, cx + dx]  # (H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(1, 0), ty)  # x-offset 0 corners, blended along y
    bottom = torch.lerp(corner(0, 1), corner(1, 1), ty)
    return (math.sqrt(2) * torch.lerp(top, bottom, tx)).to(torch.float32)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Perlin noise (H, W) float32 in [−1, 1] with `res` lattice cells along (y, x), drawn from `generator`."""
    _, _, ry, rx = _check(shape, res)
    angles = 2 * math.pi * torch.rand(ry + 1, rx + 1, generator=generator, dtype=torch.float64)
    return perlin_from_angles(shape, angles)


def perlin_noise_np(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """`perlin_noise` drawn from a numpy Generator: (H, W) float32 ndarray in [−1, 1]."""
    _, _, ry, rx = _check(shape, res)
    angles = 2 * math.pi * rng.random((ry + 1, rx + 1))
    return perlin_from_angles(shape, torch.from_numpy(angles)).numpy()


def _scales(min_log2: int, max_log2: int) -> None:
    if not 0 <= min_log2 < max_log2:
        raise ValueError(f"perlin scales need 0 ≤ min_log2 < max_log2, got {min_log2}, {max_log2}")


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def _mask_from_noise(noise: torch.Tensor, shape: tuple[int, int], threshold: float) -> torch.Tensor:
    # the noise is drawn on a power-of-two grid (a whole number of cells per scale) and resized to `shape`,
    # as SuperSimpleNet's generator does, so every scale gives complete cells
    if tuple(noise.shape) != tuple(shape):
        noise = F.interpolate(noise[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0]
    return (noise > threshold).to(torch.float32)


def perlin_masks(
    n: int,
    shape: tuple[int, int],
    threshold: float,
    generator: torch.Generator,
    min_scale_log2: int = 0,
    max_scale_log2: int = 6,
) -> torch.Tensor:
    """`n` binary Perlin masks (n, H, W) float32 in {0, 1}: 1 where the noise exceeds `threshold`.

    Per mask, the lattice resolution along each axis is 2^k, k uniform in [min_scale_log2, max_scale_log2)
    (the reference codes' 2^randint(0, 6)); the noise is drawn on the next power-of-two grid ≥ `shape` and
    resized bilinearly to `shape`. A higher threshold gives a subset of the mask (smaller regions); the
    noise lies in [−1, 1], so threshold ≥ 1 gives empty masks and < −1 full ones.
    """
    _scales(min_scale_log2, max_scale_log2)
    h, w, _, _ = _check(shape, (1, 1))
    grid = (_next_pow2(h), _next_pow2(w))
    out = torch.empty(n, h, w)
    for i in range(n):
        ky, kx = torch.randint(min_scale_log2, max_scale_log2, (2,), generator=generator).tolist()
        out[i] = _mask_from_noise(perlin_noise(grid, (2**ky, 2**kx), generator), (h, w), threshold)
    return out


def perlin_mask_np(
    shape: tuple[int, int],
    threshold: float,
    rng: np.random.Generator,
    min_scale_log2: int = 0,
    max_scale_log2: int = 6,
) -> np.ndarray:
    """One binary Perlin mask (H, W) float32 ndarray in {0, 1}, drawn from a numpy Generator (as `perlin_masks`)."""
    _scales(min_scale_log2, max_scale_log2)
    h, w, _, _ = _check(shape, (1, 1))
    ky, kx = (int(k) for k in rng.integers(min_scale_log2, max_scale_log2, 2))
    noise = torch.from_numpy(perlin_noise_np((_next_pow2(h), _next_pow2(w)), (2**ky, 2**kx), rng))
    return _mask_from_noise(noise, (h, w), threshold).numpy()
