"""fractals: params validation, kernels (RNG, raster, filling rate), samplers and instance variations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from vadbench.config import ParamsError, parse_params
from vadbench.fractals import ifs, kernels
from vadbench.fractals.instances import FLIPS, Renderer, plan_class, search_rng
from vadbench.fractals.params import FractalsParams

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(search_size=96, search_points=4000, search_pad=2, image_size=32, points=1500, pad=1)


# --- params -------------------------------------------------------------------------------------------
def _raw_with(**fractals) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["fractals"].update(fractals)
    return raw


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"min_maps": 5, "max_maps": 3}, "fractals.min_maps"),
        ({"image_size": 8, "pad": 4}, "fractals.image_size"),
        ({"search_size": 12, "search_pad": 6}, "fractals.search_size"),
        ({"num_classes": 0}, "fractals.num_classes"),
        ({"instances_per_class": 2000}, "fractals.instances_per_class"),
        ({"weight_factors": [0.5, 1.0]}, "fractals.weight_factors"),
        ({"sigma_min_maps": 4, "sigma_max_maps": 2}, "fractals.sigma_min_maps"),
        ({"unknown_key": 1}, "fractals.unknown_key"),
        ({"composition": "many"}, "fractals.composition"),
        ({"multi_count": [5, 3]}, "fractals.multi_count"),
        ({"multi_count": [0, 3]}, "fractals.multi_count"),
        ({"multi_count": [4]}, "fractals.multi_count"),
        ({"multi_scale": [0.5, 0.2]}, "fractals.multi_scale"),
        ({"multi_scale": [0.0, 0.5]}, "fractals.multi_scale"),
        ({"multi_scale": [0.5, 1.5]}, "fractals.multi_scale"),
        ({"composition": "multi", "multi_scale": [0.01, 0.5]}, "fractals.multi_scale"),  # < 2 px at 64 px
        ({"background": "plasma"}, "fractals.background"),
        ({"background": "fractal", "num_classes": 1}, "fractals.background"),
        ({"background_level": 0.0}, "fractals.background_level"),
        ({"background_level": 1.5}, "fractals.background_level"),
        ({"colour": "rgb"}, "fractals.colour"),
    ],
)
def test_inconsistent_params_are_rejected_naming_the_key(change: dict, key: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse_params(_raw_with(**change))
    assert key in str(err.value)


def test_params_yaml_section_lists_every_field() -> None:
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["fractals"]
    assert set(section) == set(FractalsParams.model_fields)


def test_params_yaml_generator_options_are_the_plain_defaults() -> None:
    p = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()), check_models=False).fractals
    assert p == FractalsParams(workers=p.workers) and p.plain
    assert not p.model_copy(update={"colour": "colour"}).plain


def test_content_dump_names_generator_options_only_where_they_act() -> None:
    options = {"composition", "multi_count", "multi_scale", "background", "background_level", "colour"}
    plain = FractalsParams()
    assert not options & set(plain.content_dump()) and "workers" not in plain.content_dump()
    assert plain.content_dump() == FractalsParams(multi_count=(1, 2), background_level=0.9).content_dump()
    multi = FractalsParams(composition="multi").content_dump()
    assert options & set(multi) == {"composition", "multi_count", "multi_scale"}
    both = FractalsParams(background="diamond_square", colour="colour").content_dump()
    assert options & set(both) == {"background", "background_level", "colour"}


# --- kernels ------------------------------------------------------------------------------------------
def test_rng_stream_is_seeded_uniform_and_distinct() -> None:
    a = kernels.uniform_stream(np.uint64(7), 20000)
    assert np.array_equal(a, kernels.uniform_stream(np.uint64(7), 20000))
    assert not np.array_equal(a, kernels.uniform_stream(np.uint64(8), 20000))
    assert a.min() >= 0.0 and a.max() < 1.0
    assert abs(a.mean() - 0.5) < 0.01 and abs(a.var() - 1 / 12) < 0.005


def _raster(points: list[tuple[float, float]], size: int, pad: int, patch: np.ndarray) -> tuple[np.ndarray, int]:
    pts = np.asarray(points, np.float64)
    bbox = np.array([pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max()])
    img = np.full((size, size), 7, np.uint8)  # garbage: rasterize must clear it
    filled = kernels.rasterize(pts, len(pts), bbox, pad, patch, img)
    return img, filled


def test_raster_places_points_and_counts_fill_exactly() -> None:
    # size 10, pad 1 → x ∈ [0, 1] maps to columns 1..8; y grows upwards (row 8 at y=0)
    img, filled = _raster([(0, 0), (1, 1), (0.5, 0.5), (0.5, 0.5)], 10, 1, ifs.SINGLE_PIXEL)
    assert sorted(zip(*np.nonzero(img))) == [(1, 8), (4, 4), (8, 1)]
    assert filled == 3 and ifs.filling_rate(img) == pytest.approx(0.03)
    assert set(np.unique(img)) == {0, 255}


def test_raster_stamps_the_patch_around_each_point() -> None:
    patch = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1]], np.uint8)  # two diagonal corners
    img, filled = _raster([(0, 0), (1, 1)], 12, 2, patch)
    # points at (row 9, col 2) and (row 2, col 9): corners at (−1,−1) and (+1,+1)
    assert sorted(zip(*np.nonzero(img))) == [(1, 8), (3, 10), (8, 1), (10, 3)]
    assert filled == 4


@pytest.mark.parametrize("pad", [0, 1, 4])
def test_raster_equals_stamping_every_point(pad: int) -> None:
    """The kernel marks centres then dilates; a plain per-point stamp must give the same pixels."""
    rng = np.random.default_rng(pad)
    size = 40
    for _ in range(5):
        pts = rng.normal(size=(300, 2))
        patch = ifs.random_patch(rng)
        img, filled = _raster([tuple(p) for p in pts], size, pad, patch)
        ref = np.zeros((size, size), np.uint8)
        lo, hi = pts.min(0), pts.max(0)
        inner = size - 2 * pad - 1
        cols = pad + ((pts[:, 0] - lo[0]) * (inner / (hi[0] - lo[0]))).astype(int)
        rows = pad + ((hi[1] - pts[:, 1]) * (inner / (hi[1] - lo[1]))).astype(int)
        for r, c in zip(rows, cols):
            for dr, dc in zip(*np.nonzero(patch)):
                rr, cc = r + dr - 1, c + dc - 1
                if 0 <= rr < size and 0 <= cc < size:
                    ref[rr, cc] = 255
        assert np.array_equal(img, ref) and filled == np.count_nonzero(ref)


def test_horizontal_line_fills_one_row() -> None:
    t = np.linspace(0, 1, 1000)
    img, filled = _raster([(x, 0.3) for x in t], 50, 3, ifs.SINGLE_PIXEL)  # flat: y span 0 → row pad
    assert filled == 44 and img[3, 3:47].all() and ifs.filling_rate(img) == pytest.approx(44 / 2500)


def test_divergent_system_stops_and_reports_finite_points() -> None:
    maps = np.array([[3.0, 0, 0, 3.0, 1, 1]])  # expands ×3 per step: overflows after ~650 steps
    pts, bbox = np.empty((10_000, 2)), np.empty(4)
    n = kernels.chaos_game(maps, np.array([1.0]), 10_000, np.uint64(1), pts, bbox)
    assert 0 < n < 10_000 and np.isfinite(pts[:n]).all()


# --- samplers and search ------------------------------------------------------------------------------
def test_singular_values_meet_the_sigma_constraints() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 7):
        for _ in range(50):
            alpha = rng.uniform(0.1, 3 * n - 0.1)
            s = ifs.sample_singular_values(rng, n, alpha)
            assert (s >= 0).all() and (s <= 1 + 1e-12).all() and (s[:, 1] <= s[:, 0] + 1e-12).all()
            assert (s[:, 0] + 2 * s[:, 1]).sum() == pytest.approx(alpha)


def test_sigma_systems_are_contractive_with_alpha_in_range() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        maps = ifs.sample_sigma(rng, 2, 4)
        k = len(maps)
        sv = np.linalg.svd(maps[:, :4].reshape(k, 2, 2), compute_uv=False)
        alpha = (sv[:, 0] + 2 * sv[:, 1]).sum()
        assert 2 <= k <= 4 and sv.max() <= 1 + 1e-9
        assert (5 + k) / 2 - 1e-9 <= alpha <= (6 + k) / 2 + 1e-9
        assert (np.abs(maps[:, 4:]) <= 1).all()


def test_fractaldb_candidates_and_probabilities() -> None:
    rng = np.random.default_rng(2)
    sizes = {len(ifs.sample_fractaldb(rng, 2, 7)) for _ in range(300)}
    assert sizes == set(range(2, 8))
    maps = ifs.sample_fractaldb(rng, 3, 3)
    assert maps.shape == (3, 6) and (np.abs(maps) <= 1).all()
    det = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2])
    assert np.allclose(ifs.probabilities(maps), det / det.sum())
    assert ifs.cumulative(maps)[-1] == 1.0


@pytest.mark.parametrize("sampler", ["fractaldb", "sigma"])
def test_every_accepted_system_meets_the_threshold(sampler: str) -> None:
    p = FractalsParams(sampler=sampler, filling_threshold=0.15, **FAST)
    for cls in range(4):
        system = ifs.search_system(p, search_rng(0, cls))
        fill, n = ifs.search_render(system.maps, system.search_seed, p)  # independent re-render
        assert n == p.search_points and fill == system.fill >= 0.15
        again = ifs.search_system(p, search_rng(0, cls))
        assert np.array_equal(again.maps, system.maps)  # same seed → same category


def test_search_gives_up_with_a_named_error() -> None:
    p = FractalsParams(filling_threshold=1.0, search_max_tries=3, **FAST)
    with pytest.raises(ifs.SearchError, match="fractals.filling_threshold"):
        ifs.search_system(p, search_rng(0, 0))


# --- instances ----------------------------------------------------------------------------------------
def _system(k: int = 3) -> ifs.System:
    return ifs.System(np.random.default_rng(3).uniform(-1, 1, (k, 6)), 0.3, 1, 0)


def test_full_grid_applies_every_weight_perturbation_and_flip() -> None:
    p = FractalsParams(patch_renders=2, instances_per_class=50 * 4, **FAST)
    system = _system()
    plan = plan_class(p, 0, 5, system)
    assert len(plan) == p.grid_size == 25 * 2 * 4
    assert [i.flip for i in plan[:8]] == list(FLIPS) * 2
    seen = set()
    for inst in plan:
        ratio = np.divide(inst.maps, system.maps)
        if inst.desc["kind"] == "identity":
            assert np.allclose(ratio, 1)
            seen.add(("id",))
            continue
        j = ifs.PARAM_NAMES.index(inst.desc["param"])
        assert np.allclose(ratio[:, j], inst.desc["factor"]) and np.allclose(np.delete(ratio, j, axis=1), 1)
        seen.add((j, inst.desc["factor"]))
    assert len(seen) == 25
    pairs = [s for s in seen if len(s) == 2]
    assert {f for _, f in pairs} == {0.2, 0.6, 1.4, 1.8} and {j for j, _ in pairs} == set(range(6))
    # the four flips of a (variant, patch) are flips of one render
    r = Renderer(p.image_size, p.points, p.pad)
    base = r.render(plan[0].maps, plan[0].render_seed, "none")
    assert np.array_equal(r.render(plan[1].maps, plan[1].render_seed, "h"), base[:, ::-1])
    assert np.array_equal(r.render(plan[2].maps, plan[2].render_seed, "v"), base[::-1])
    assert np.array_equal(r.render(plan[3].maps, plan[3].render_seed, "hv"), base[::-1, ::-1])
    assert plan[4].render_seed != plan[0].render_seed  # next patch render: a new stream


def test_subset_is_deterministic_distinct_and_per_class() -> None:
    p = FractalsParams(instances_per_class=40, **FAST)
    system = _system()
    key = lambda plan: [(json.dumps(i.desc), i.patch, i.flip) for i in plan]  # noqa: E731
    a, b = key(plan_class(p, 0, 1, system)), key(plan_class(p, 0, 1, system))
    assert a == b and len(set(a)) == 40
    assert a != key(plan_class(p, 0, 2, system)) and a != key(plan_class(p, 1, 1, system))


def test_sigma_jitter_changes_one_map_within_range_and_stays_contractive() -> None:
    p = FractalsParams(sampler="sigma", instances_per_class=30, **FAST)
    system = ifs.System(ifs.sample_sigma(np.random.default_rng(4), 4, 4), 0.3, 1, 0)
    for inst in plan_class(p, 0, 0, system):
        changed = np.flatnonzero(~np.all(np.isclose(inst.maps, system.maps), axis=1))
        if inst.desc["map"] < 0:
            assert changed.size == 0
            continue
        assert changed.tolist() == [inst.desc["map"]] and 0.8 <= inst.desc["factor"] <= 1.1
        assert np.allclose(inst.maps[changed[0]], system.maps[changed[0]] * inst.desc["factor"])
        assert np.linalg.svd(inst.maps[:, :4].reshape(-1, 2, 2), compute_uv=False).max() <= 1
        assert np.array_equal(ifs.apply_instance(system.maps, inst.desc), inst.maps)


def test_patch_renders_differ_and_images_are_binary() -> None:
    p = FractalsParams(**FAST)
    r = Renderer(p.image_size, p.points, p.pad)
    maps = ifs.sample_sigma(np.random.default_rng(5), 3, 3)
    a, b = r.render(maps, 11), r.render(maps, 12)
    assert a.shape == (32, 32) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 255}
    assert not np.array_equal(a, b) and np.array_equal(a, r.render(maps, 11))
