"""Iterated function systems: the two samplers, category search, and per-instance variations.

A system is `maps` (K, 6) float64 with rows (a, b, c, d, e, f) meaning x' = a·x + b·y + e,
y' = c·x + d·y + f, plus map probabilities (K,) ∝ |det| = |a·d − b·c| (FractalDB's rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vadbench.fractals import kernels
from vadbench.fractals.params import FractalsParams

PARAM_NAMES = ("a", "b", "c", "d", "e", "f")
SINGLE_PIXEL = np.zeros((3, 3), np.uint8)
SINGLE_PIXEL[1, 1] = 1  # category search renders bare points, as FractalDB's search does


class SearchError(RuntimeError):
    """No system met the filling threshold within the allowed number of candidates."""


@dataclass(frozen=True)
class System:
    maps: np.ndarray  # (K, 6)
    fill: float  # filling rate of the search render
    tries: int  # candidates drawn until this one was accepted
    search_seed: int  # render seed of the search render (to re-check `fill`)

    def to_json(self) -> dict:
        # repr-exact floats: json round-trips float64 exactly, so renders can be regenerated
        return {"maps": self.maps.tolist(), "fill": self.fill, "tries": self.tries, "search_seed": self.search_seed}

    @staticmethod
    def from_json(d: dict) -> System:
        maps = np.asarray(d["maps"], np.float64).reshape(-1, 6)
        return System(maps, float(d["fill"]), int(d["tries"]), int(d["search_seed"]))


def probabilities(maps: np.ndarray) -> np.ndarray:
    """Map probabilities (K,) ∝ |det| of each linear part; uniform when every det is 0."""
    det = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2])
    total = det.sum()
    return det / total if total > 0 else np.full(len(maps), 1.0 / len(maps))


def cumulative(maps: np.ndarray) -> np.ndarray:
    """Cumulative probabilities (K,) for the kernel; the last entry is exactly 1."""
    cum = np.cumsum(probabilities(maps))
    cum[-1] = 1.0
    return cum


def sample_fractaldb(rng: np.random.Generator, min_maps: int, max_maps: int) -> np.ndarray:
    """FractalDB candidate: K ~ U{min..max} maps, all six parameters ~ U(−1, 1). (K, 6)."""
    k = int(rng.integers(min_maps, max_maps + 1))
    return rng.uniform(-1.0, 1.0, (k, 6))


def sample_singular_values(rng: np.random.Generator, n: int, alpha: float) -> np.ndarray:
    """(n, 2) singular values with 0 ≤ s2 ≤ s1 ≤ 1 per map and Σ (s1 + 2·s2) = alpha (0 < alpha < 3n).

    Pairs are drawn one at a time, each from the interval that still lets the remaining pairs
    (each contributing between 0 and 3) absorb the rest of the budget exactly.
    """
    s = np.empty((n, 2))
    budget = alpha
    for i in range(n - 1):
        rest = 3.0 * (n - 1 - i)  # the most the later pairs can take
        s1 = rng.uniform(max(0.0, (budget - rest) / 3.0), min(1.0, budget))
        s2 = rng.uniform(max(0.0, (budget - s1 - rest) / 2.0), min(s1, (budget - s1) / 2.0))
        s[i] = s1, s2
        budget -= s1 + 2.0 * s2
    # last pair takes the remainder exactly: s2 = (budget − s1)/2 ≤ s1 ⇔ s1 ≥ budget/3
    s1 = rng.uniform(budget / 3.0, min(1.0, budget))
    s[-1] = s1, (budget - s1) / 2.0
    return s


def _rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def sample_sigma(rng: np.random.Generator, min_maps: int, max_maps: int) -> np.ndarray:
    """σ-factor candidate (Anderson & Farrell): linear parts U·diag(s)·V, translations ~ U(−1, 1). (K, 6).

    U and V are random rotations times random axis reflections; the singular values satisfy
    Σ (s1 + 2·s2) = α with α ~ U((5+K)/2, (6+K)/2), so every map is a contraction.
    """
    k = int(rng.integers(min_maps, max_maps + 1))
    alpha = rng.uniform((5 + k) / 2.0, (6 + k) / 2.0)
    sv = sample_singular_values(rng, k, alpha)
    maps = np.empty((k, 6))
    for i in range(k):
        u = _rotation(rng.uniform(-np.pi, np.pi)) @ np.diag(rng.choice([-1.0, 1.0], 2))
        v = _rotation(rng.uniform(-np.pi, np.pi)) @ np.diag(rng.choice([-1.0, 1.0], 2))
        a = u @ np.diag(sv[i]) @ v
        maps[i, :4] = a[0, 0], a[0, 1], a[1, 0], a[1, 1]
        maps[i, 4:] = rng.uniform(-1.0, 1.0, 2)
    return maps


def filling_rate(img: np.ndarray) -> float:
    """Non-zero pixels / all pixels of a (H, W) image."""
    return float(np.count_nonzero(img)) / img.size


def search_render(
    maps: np.ndarray, seed: int, p: FractalsParams, pts: np.ndarray | None = None, img: np.ndarray | None = None
) -> tuple[float, int]:
    """Render `maps` as in the category search into `img` (search_size², bare points).
    Returns (filling rate, finite points); pts/img are optional scratch buffers."""
    pts = np.empty((p.search_points, 2)) if pts is None else pts
    img = np.empty((p.search_size, p.search_size), np.uint8) if img is None else img
    filled, n = kernels.render_into(
        maps, cumulative(maps), p.search_points, p.search_pad, SINGLE_PIXEL, np.uint64(seed), pts, img
    )
    return filled / img.size, n


def search_system(p: FractalsParams, rng: np.random.Generator) -> System:
    """Draw candidates from `rng` until one's search render fills ≥ p.filling_threshold.

    Each candidate is rendered with p.search_points bare points on a p.search_size² canvas with
    p.search_pad padding; a system whose points diverge to infinity is rejected.
    """
    sampler = sample_fractaldb if p.sampler == "fractaldb" else sample_sigma
    lo, hi = (p.min_maps, p.max_maps) if p.sampler == "fractaldb" else (p.sigma_min_maps, p.sigma_max_maps)
    pts = np.empty((p.search_points, 2))
    img = np.empty((p.search_size, p.search_size), np.uint8)
    for tries in range(1, p.search_max_tries + 1):
        maps = sampler(rng, lo, hi)
        seed = int(rng.integers(0, 2**63))
        fill, n = search_render(maps, seed, p, pts, img)
        if n == p.search_points and fill >= p.filling_threshold:
            return System(maps, fill, tries, seed)
    raise SearchError(
        f"no {p.sampler} system reached fractals.filling_threshold={p.filling_threshold} in "
        f"fractals.search_max_tries={p.search_max_tries} candidates; lower the threshold or raise the tries"
    )


def weight_variant(maps: np.ndarray, variant: int, factors: tuple[float, ...]) -> tuple[np.ndarray, dict]:
    """FractalDB weight perturbation. Variant 0 is the system itself; variant 1 + j·F + i multiplies
    parameter j (a..f) of every map by factors[i] (F = len(factors)). Returns (maps (K, 6), description)."""
    if variant == 0:
        return maps.copy(), {"kind": "identity"}
    j, i = divmod(variant - 1, len(factors))
    out = maps.copy()
    out[:, j] *= factors[i]
    return out, {"kind": "weight", "param": PARAM_NAMES[j], "factor": factors[i]}


def jitter_one_map(
    maps: np.ndarray, rng: np.random.Generator, lo: float, hi: float, attempts: int = 4
) -> tuple[np.ndarray, dict]:
    """σ-sampler per-image variation: scale all six parameters of one random map by U(lo, hi).

    A jitter that makes any linear part expansive (largest singular value > 1) is redrawn, up to
    `attempts` times; after that the image uses the system unchanged (factor 1).
    """
    for _ in range(attempts):
        k = int(rng.integers(0, len(maps)))
        factor = float(rng.uniform(lo, hi))
        out = maps.copy()
        out[k] *= factor
        if np.linalg.svd(out[:, :4].reshape(-1, 2, 2), compute_uv=False).max() <= 1.0:
            return out, {"kind": "jitter", "map": k, "factor": factor}
    return maps.copy(), {"kind": "jitter", "map": -1, "factor": 1.0}


def apply_instance(maps: np.ndarray, desc: dict) -> np.ndarray:
    """Rebuild an instance's maps (K, 6) from the class system and its manifest description."""
    out = maps.copy()
    if desc["kind"] == "weight":
        out[:, PARAM_NAMES.index(desc["param"])] *= desc["factor"]
    elif desc["kind"] == "jitter" and desc["map"] >= 0:
        out[desc["map"]] *= desc["factor"]
    elif desc["kind"] not in ("identity", "jitter"):
        raise ValueError(f"unknown instance kind {desc['kind']!r} in manifest `instance` column")
    return out


def random_patch(rng: np.random.Generator) -> np.ndarray:
    """A random binary 3×3 patch (3, 3) uint8 with at least one set cell."""
    while True:
        patch = rng.integers(0, 2, (3, 3)).astype(np.uint8)
        if patch.any():
            return patch
