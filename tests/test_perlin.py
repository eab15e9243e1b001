"""Perlin noise and masks: equal to a per-pixel reference, seeded, bounded, thresholded as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vadbench.models.components.perlin import (
    perlin_from_angles,
    perlin_mask_np,
    perlin_masks,
    perlin_noise,
    perlin_noise_np,
)


def _reference(shape, angles):
    """Textbook gradient noise, one pixel at a time (the definition, not the vectorised code)."""
    h, w = shape
    ry, rx = angles.shape[0] - 1, angles.shape[1] - 1
    out = np.zeros(shape)
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    for i in range(h):
        for j in range(w):
            y, x = i * ry / h, j * rx / w
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            dy, dx = y - y0, x - x0

            def dot(cy, cx, y=y, x=x):
                a = angles[cy, cx]
                return math.cos(a) * (y - cy) + math.sin(a) * (x - cx)

            u, v = fade(dy), fade(dx)
            top = dot(y0, x0) + u * (dot(y0 + 1, x0) - dot(y0, x0))
            bottom = dot(y0, x0 + 1) + u * (dot(y0 + 1, x0 + 1) - dot(y0, x0 + 1))
            out[i, j] = math.sqrt(2) * (top + v * (bottom - top))
    return out


@pytest.mark.parametrize("shape,res", [((16, 16), (4, 4)), ((12, 20), (3, 5)), ((10, 7), (3, 2))])
def test_noise_equals_per_pixel_reference(shape, res):
    angles = (
        2
        * math.pi
        * torch.rand(res[0] + 1, res[1] + 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    got = perlin_from_angles(shape, angles).numpy()
    np.testing.assert_allclose(got, _reference(shape, angles.numpy()), atol=1e-6)


def test_noise_is_zero_on_the_lattice_and_within_unit_range():
    g = torch.Generator().manual_seed(0)
    noise = perlin_noise((64, 64), (8, 8), g)
    assert noise.shape == (64, 64) and noise.dtype == torch.float32
    assert torch.allclose(noise[::8, ::8], torch.zeros(8, 8), atol=1e-6)  # lattice points
    many = torch.stack([perlin_noise((32, 32), (4, 4), g) for _ in range(50)])
    assert many.abs().max() <= 1.0 and many.std() > 0.1


def test_seeded_deterministic_and_seed_sensitive():
    a = perlin_masks(6, (32, 32), 0.2, torch.Generator().manual_seed(3))
    b = perlin_masks(6, (32, 32), 0.2, torch.Generator().manual_seed(3))
    c = perlin_masks(6, (32, 32), 0.2, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    before = torch.get_rng_state()
    perlin_masks(2, (8, 8), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is left alone
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert np.array_equal(perlin_noise_np((16, 16), (2, 4), rng_a), perlin_noise_np((16, 16), (2, 4), rng_b))
    m = perlin_mask_np((20, 24), 0.3, np.random.default_rng(5))
    assert m.shape == (20, 24) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}


def test_masks_are_binary_and_follow_the_threshold():
    shape = (24, 40)  # not powers of two: noise drawn on 32×64 and resized
    masks = {t: perlin_masks(8, shape, t, torch.Generator().manual_seed(9), 1, 4) for t in (-1.01, 0.0, 0.2, 0.6, 1.0)}
    for m in masks.values():
        assert m.shape == (8, *shape) and m.dtype == torch.float32
        assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    assert masks[-1.01].min() == 1  # below the noise's range: full
    assert masks[1.0].max() == 0  # at its top: empty
    assert 0.2 < masks[0.0].mean() < 0.8  # about half the area above 0
    # same draws, higher threshold → a subset
    assert torch.all(masks[0.6] <= masks[0.2]) and torch.all(masks[0.2] <= masks[0.0])
    assert masks[0.6].sum() < masks[0.2].sum() < masks[0.0].sum()


def test_named_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="positive shape and res"):
        perlin_noise((0, 8), (2, 2), g)
    with pytest.raises(ValueError, match="2-D shape"):
        perlin_noise((8, 8, 8), (2, 2), g)
    with pytest.raises(ValueError, match="min_log2 < max_log2"):
        perlin_masks(1, (8, 8), 0.5, g, 3, 3)
