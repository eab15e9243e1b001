"""Per-class instance plans and the rendering of one instance (pure functions of seed, class, params).

Seeds: every random choice comes from `numpy.random.SeedSequence([seed, class, TAG, ...])`, so a
class's images do not depend on which process renders it, in what order, or what ran before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from vadbench.fractals import ifs, kernels
from vadbench.fractals.params import FractalsParams

FLIPS = ("none", "h", "v", "hv")
_TAG_SEARCH, _TAG_SUBSET, _TAG_RENDER, _TAG_JITTER = 1, 2, 3, 4


def derive_seed(*keys: int) -> int:
    """A 64-bit seed from non-negative integer keys (order matters)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


def search_rng(seed: int, cls: int) -> np.random.Generator:
    """The RNG of class `cls`'s category search."""
    return np.random.default_rng(np.random.SeedSequence([seed, cls, _TAG_SEARCH]))


@dataclass(frozen=True)
class Instance:
    instance: int
    maps: np.ndarray  # (K, 6) after weight perturbation / jitter
    desc: dict  # JSON-able: how `maps` derives from the class system (ifs.apply_instance)
    patch: int  # patch-render index (fractaldb) or instance index (sigma)
    flip: str  # one of FLIPS
    render_seed: int  # 64-bit seed of the chaos game and the 3×3 patch

    def row(self, cls: int) -> dict:
        return {
            "class": cls,
            "instance": self.instance,
            "instance_params": json.dumps(self.desc, sort_keys=True),
            "patch": self.patch,
            "flip": self.flip,
            "render_seed": self.render_seed,
        }


def plan_class(p: FractalsParams, seed: int, cls: int, system: ifs.System) -> list[Instance]:
    """The p.instances_per_class instances of class `cls`, in instance order.

    fractaldb: the grid variant × patch render × flip (flip fastest) is enumerated; when
    instances_per_class is smaller than the grid, a seeded random subset (without replacement,
    kept in grid order) is taken, so every class mixes variants, patches and flips.
    The four flips of a (variant, patch) share one render seed: they are exact flips of one image.
    sigma: instance i gets its own one-map jitter and render seed; flip = FLIPS[i mod n_flips].
    """
    out = []
    if p.sampler == "fractaldb":
        total = p.grid_size
        if p.instances_per_class == total:
            picks = np.arange(total)
        else:
            rng = np.random.default_rng(np.random.SeedSequence([seed, cls, _TAG_SUBSET]))
            picks = np.sort(rng.choice(total, p.instances_per_class, replace=False))
        per_variant = p.patch_renders * p.n_flips
        for i, g in enumerate(picks.tolist()):
            variant, rest = divmod(g, per_variant)
            patch, flip = divmod(rest, p.n_flips)
            maps, desc = ifs.weight_variant(system.maps, variant, p.weight_factors)
            out.append(Instance(i, maps, desc, patch, FLIPS[flip], derive_seed(seed, cls, _TAG_RENDER, variant, patch)))
    else:
        lo, hi = p.sigma_jitter
        for i in range(p.instances_per_class):
            rng = np.random.default_rng(np.random.SeedSequence([seed, cls, _TAG_JITTER, i]))
            maps, desc = ifs.jitter_one_map(system.maps, rng, lo, hi)
            out.append(Instance(i, maps, desc, i, FLIPS[i % p.n_flips], derive_seed(seed, cls, _TAG_RENDER, i)))
    return out


class Renderer:
    """Reusable scratch buffers for one process: render instances without per-image allocation.

    Memory is points × 16 bytes + size² bytes (colour renders: + points + size² bytes), whatever the number
    of images.
    """

    def __init__(self, size: int, points: int, pad: int) -> None:
        self.size, self.points, self.pad = size, points, pad
        self._pts = np.empty((points, 2), np.float64)
        self._img = np.empty((size, size), np.uint8)
        self._last_key: tuple | None = None
        self._labels: np.ndarray | None = None  # colour renders only (allocated on first use)
        self._label_img: np.ndarray | None = None
        self._last_label_key: tuple | None = None

    def render(self, maps: np.ndarray, render_seed: int, flip: str = "none") -> np.ndarray:
        """(size, size) uint8 image in {0, 255}: the chaos game of `maps` stamped with a random 3×3
        patch (drawn from `render_seed`), then flipped ('h' left-right, 'v' up-down, 'hv' both)."""
        key = (render_seed, maps.tobytes())
        if key != self._last_key:  # consecutive flips of one render reuse it
            patch = ifs.random_patch(np.random.default_rng([render_seed, 1]))
            kernels.render_into(
                maps, ifs.cumulative(maps), self.points, self.pad, patch, np.uint64(render_seed), self._pts, self._img
            )
            self._last_key = key
        return _flipped(self._img, flip)

    def render_labels(self, maps: np.ndarray, render_seed: int, flip: str = "none") -> np.ndarray:
        """As `render`, but (size, size) uint8 holds 1 + the index of the map that produced each set pixel
        (0 = empty): the same points, patch and flip, so `render_labels(...) > 0` equals `render(...) > 0`."""
        if self._label_img is None:
            self._label_img = np.empty((self.size, self.size), np.uint8)
        key = (render_seed, maps.tobytes())
        if key != self._last_label_key:
            self._label_into(maps, render_seed, self.points, self.pad, self._label_img)
            self._last_label_key = key
        return _flipped(self._label_img, flip)

    def _label_into(self, maps: np.ndarray, render_seed: int, n: int, pad: int, img: np.ndarray) -> None:
        if self._labels is None:
            self._labels = np.empty(self.points, np.uint8)
        patch = ifs.random_patch(np.random.default_rng([render_seed, 1]))
        kernels.render_labels_into(
            maps, ifs.cumulative(maps), n, pad, patch, np.uint64(render_seed), self._pts, self._labels, img
        )


def _flipped(img: np.ndarray, flip: str) -> np.ndarray:
    """A contiguous copy of img (H, W) flipped as `flip` says ('h' left-right, 'v' up-down, 'hv' both)."""
    if "h" in flip:
        img = img[:, ::-1]
    if "v" in flip:
        img = img[::-1, :]
    return np.ascontiguousarray(img) if flip != "none" else img.copy()
