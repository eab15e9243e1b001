"""Pixel metrics against scikit-learn and a brute-force MVTec-style AUPRO sweep written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from vadbench.metrics import aupro, pixel_metrics, pro_curve


def brute_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Every distinct score as a threshold; regions = 8-connected components per image; segment-wise area."""
    regions = []
    for amap, mask in zip(maps, masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3), int))
        regions += [amap[lab == k] for k in range(1, n + 1)]
    normals = maps[masks == 0]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(float(np.mean(normals >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for k in range(1, len(xs)):
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        if x0 >= limit:
            break
        if x1 > limit:  # cut the segment at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_case(seed: int, n: int = 6, size: int = 20, levels: int | None = 12):
    """Maps with blobs that score a bit higher; `levels` rounds scores so many ties occur."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(1, n, 2):  # every other image has 1-3 blobs
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            r = rng.integers(1, 4)
            yy, xx = np.mgrid[:size, :size]
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    maps = rng.random((n, size, size)) + 0.6 * masks * rng.random((n, size, size))
    if levels:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("seed,levels", [(0, 12), (1, 5), (2, None), (3, 40)])
def test_pixel_metrics_equal_references(seed, levels):
    maps, masks = random_case(seed, levels=levels)
    got = pixel_metrics(maps, masks, fpr_limit=0.3)
    y, s = masks.ravel(), maps.ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert got["pixel_aupr"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    assert got["pixel_f1_max"] == pytest.approx(f1.max(), abs=1e-6)
    assert got["pixel_aupro"] == pytest.approx(brute_aupro(maps, masks, 0.3), abs=1e-4)
    assert got["na_reasons"] == {}


@pytest.mark.parametrize("limit", [0.01, 0.1, 0.3, 0.77, 1.0])
def test_aupro_any_limit_equals_brute_force(limit):
    maps, masks = random_case(7, levels=8)
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(brute_aupro(maps, masks, limit), abs=1e-4)


def test_result_does_not_depend_on_chunking_and_is_json_stable():
    maps, masks = random_case(4, n=9)
    ref = pixel_metrics(maps, masks)
    for chunk in (1, 400, 1000, 10**9):
        assert pixel_metrics(maps, masks, chunk_pixels=chunk) == ref
    assert json.dumps(ref, sort_keys=True) == json.dumps(pixel_metrics(maps.copy(), masks.copy()), sort_keys=True)
    assert all(isinstance(v, float) and round(v, 6) == v for k, v in ref.items() if k != "na_reasons")


def test_inputs_are_not_modified_and_dtypes_are_accepted():
    maps, masks = random_case(5)
    maps_before = maps.copy()
    ref = pixel_metrics(maps, masks)
    np.testing.assert_array_equal(maps, maps_before)
    assert pixel_metrics(maps.astype(np.float64), masks.astype(bool)) == ref


def test_perfect_and_inverted_maps():
    _, masks = random_case(6)
    perfect = pixel_metrics(masks.astype(np.float32), masks)
    assert perfect["pixel_auroc"] == perfect["pixel_aupr"] == perfect["pixel_f1_max"] == perfect["pixel_aupro"] == 1.0
    inverted = pixel_metrics(1.0 - masks.astype(np.float32), masks)
    assert inverted["pixel_auroc"] == 0.0
    assert inverted["pixel_aupro"] == 0.0


def test_constant_map_gives_chance_values():
    _, masks = random_case(8)
    got = pixel_metrics(np.full(masks.shape, 0.5, np.float32), masks, fpr_limit=0.3)
    n_pos, n_all = int(masks.sum()), masks.size
    # all pixels tie: ROC and PRO curves are the diagonal (area under y=x up to 0.3, / 0.3 = 0.15)
    assert got["pixel_auroc"] == 0.5
    assert got["pixel_aupro"] == pytest.approx(0.15, abs=1e-6)
    assert got["pixel_aupr"] == pytest.approx(n_pos / n_all, abs=1e-6)
    assert got["pixel_f1_max"] == pytest.approx(2 * n_pos / (n_pos + n_all), abs=1e-6)


def test_half_detected_regions_give_half():
    # two regions: one scores above every normal pixel, one below → PRO is 0.5 from FPR 0 to FPR 1
    rng = np.random.default_rng(0)
    maps = rng.uniform(0.3, 0.7, (2, 10, 10))
    masks = np.zeros((2, 10, 10), np.uint8)
    masks[0, 1:3, 1:3] = 1
    masks[1, 5:8, 5:9] = 1
    maps[0][masks[0] == 1] = 0.9
    maps[1][masks[1] == 1] = 0.1
    assert aupro(maps, masks, fpr_limit=0.3) == 0.5
    fpr, pro = pro_curve(maps, masks)
    assert fpr[0] == pro[0] == 0.0 and fpr[-1] == pro[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def test_regions_are_8_connected_and_never_cross_images():
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 2, 2] = masks[0, 3, 3] = 1  # diagonal neighbours: one region under 8-connectivity
    masks[0, 6, 6] = 1  # a second region
    masks[1, 2, 2] = 1  # same place in the next image: its own region
    maps = np.where(masks == 1, 0.0, 0.5).astype(np.float32)  # defect pixels below every normal pixel ...
    maps[0, 2, 2] = 1.0  # ... except half of the diagonal region, above every normal pixel
    # regions: {diag: 1/2, single: 0, other image: 0} → PRO = 1/6 until FPR 1 (4-connectivity would give 1/4)
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(1 / 6, abs=1e-6)


def test_undefined_cases_are_none_with_reason():
    maps = np.random.default_rng(0).random((3, 8, 8))
    got = pixel_metrics(maps, np.zeros((3, 8, 8), np.uint8))
    assert all(got[k] is None for k in ("pixel_auroc", "pixel_aupr", "pixel_f1_max", "pixel_aupro"))
    assert set(got["na_reasons"]) == {"pixel_auroc", "pixel_aupr", "pixel_f1_max", "pixel_aupro"}
    assert aupro(maps, np.zeros((3, 8, 8))) is None
    all_defect = pixel_metrics(maps, np.ones((3, 8, 8), np.uint8))
    assert all_defect["pixel_auroc"] is None and all_defect["pixel_aupro"] is None
    assert all_defect["pixel_aupr"] == 1.0 and "no defect-free" in all_defect["na_reasons"]["pixel_auroc"]


@pytest.mark.parametrize(
    "maps,masks,kwargs,match",
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), {}, "shape"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {}, "3 dims"),
        (np.full((1, 2, 2), np.nan), np.zeros((1, 2, 2)), {}, "NaN"),
        (np.zeros((1, 2, 2)), np.full((1, 2, 2), 2), {}, "only 0 and 1"),
        (np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), {"fpr_limit": 0.0}, "aupro_fpr_limit"),
        (np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), {"chunk_pixels": 0}, "chunk_pixels"),
    ],
)
def test_bad_input_is_a_clear_error(maps, masks, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pixel_metrics(maps, masks, **kwargs)


def test_memory_stays_bounded_by_the_chunk():
    # a full copy of the maps (what a flatten-and-sort implementation makes) would add >= maps.nbytes
    from vadbench.metrics.cost import PeakMemory

    rng = np.random.default_rng(0)
    maps = rng.random((100, 256, 256), dtype=np.float32)
    masks = np.zeros(maps.shape, np.uint8)
    masks[::10, 100:120, 100:120] = 1  # 4,000 defect pixels
    with PeakMemory() as mem:
        got = pixel_metrics(maps, masks, chunk_pixels=1 << 16)
    assert got["pixel_auroc"] is not None
    assert mem.peak_rss_delta_bytes < maps.nbytes / 2
