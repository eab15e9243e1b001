"""Exact pixel-level AUROC, AP, F1-max and AUPRO over every test pixel, in bounded memory.

Why no global sort is needed: between two consecutive distinct *defect*-pixel scores u, the true-positive
count and every region's overlap are constant, so AP, F1-max, AUROC and the PRO curve are fixed by, for
each distinct defect score u (m of them, m <= #defect pixels):
  tp(u)  = #defect pixels >= u           pro(u) = mean over regions of (#region pixels >= u) / |region|
  fp(u)  = #normal pixels >= u           fp_above(u) = #normal pixels > u   (the two differ by ties at u)
Defect pixels are few (1-3 % of pixels) and are gathered and sorted once. Normal pixels are streamed in
chunks of whole images: each chunk is sorted (fast SIMD sort of a float copy) and `searchsorted` of the m
values counts its pixels < u and <= u. Integer counts add up exactly over chunks, so the result does not
depend on `chunk_pixels`.

Regions follow the MVTec AD evaluation code (``scipy.ndimage.label`` with a 3x3 all-ones structure):
8-connected components of each ground-truth mask, never joined across images. FPR is over all
defect-free pixels of the test set (normal images and the background of defective ones). The PRO curve
runs from (0, 0) to (1, 1); it is read at exactly FPR = limit by linear interpolation, integrated with the
trapezoid rule and divided by the limit (not by the last FPR reached, the inflation of anomalib <= 2.2).

Peak extra memory: about chunk_pixels x (1 + 4 + 4) bytes (mask, region labels, sorted float32 copy of
the chunk's normal scores) + 24 bytes per defect pixel + 40 bytes per distinct defect score. Inputs are
not copied as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from vadbench.io import release_rows
from vadbench.metrics._util import as_scores, check_binary_values, check_finite, rnd

PIXEL_KEYS = ("pixel_auroc", "pixel_aupr", "pixel_f1_max", "pixel_aupro")
DEFAULT_CHUNK_PIXELS = 1 << 23  # 8.4 M pixels (128 maps of 256x256): ~75 MB of temporaries; 2^22-2^24 ran equally fast

# 8-connectivity inside each image, none along the image axis of an (n, H, W) stack
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


@dataclass(frozen=True)
class PixelCounts:
    """Exact counts at every distinct defect-pixel score u (arrays (m,), u descending)."""

    thresholds: np.ndarray  # (m,) distinct defect-pixel scores, descending
    tp: np.ndarray  # (m,) int64: defect pixels with score >= u
    fp: np.ndarray  # (m,) int64: normal pixels with score >= u
    fp_above: np.ndarray  # (m,) int64: normal pixels with score > u
    pro: np.ndarray  # (m,) float64: mean region overlap at score >= u
    n_pos: int  # defect pixels
    n_neg: int  # defect-free pixels
    n_regions: int  # connected defect regions over all masks


def _check_inputs(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    a = as_scores(maps, "maps", 3)
    m = np.asarray(masks)
    if m.shape != a.shape:
        raise ValueError(f"masks {m.shape} must have the shape of maps {a.shape} (N, H, W)")
    if not (m.dtype == bool or np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        raise ValueError(f"masks must be 0/1, got dtype {m.dtype}")
    if a.size == 0:
        raise ValueError("maps is empty: no test pixels to evaluate")
    return a, m


def _release(maps: np.ndarray, masks: np.ndarray, sl: slice) -> None:
    """Memory-mapped inputs: drop the chunk's pages from RSS once read (a no-op for in-memory arrays)."""
    release_rows(maps, sl.start, sl.stop)
    release_rows(masks, sl.start, sl.stop)


def _chunks(n_images: int, pixels_per_image: int, chunk_pixels: int) -> list[slice]:
    if chunk_pixels < 1:
        raise ValueError(f"chunk_pixels must be >= 1, got {chunk_pixels}")
    step = max(1, chunk_pixels // max(1, pixels_per_image))
    return [slice(i, min(i + step, n_images)) for i in range(0, n_images, step)]


def pixel_counts(
    maps: Any, masks: Any, chunk_pixels: int = DEFAULT_CHUNK_PIXELS, progress: bool = False
) -> PixelCounts:
    """Exact per-threshold counts for maps (N, H, W) real and masks (N, H, W) 0/1; see module doc."""
    a, m = _check_inputs(maps, masks)
    chunks = _chunks(a.shape[0], a.shape[1] * a.shape[2], chunk_pixels)

    # pass 1: defect-pixel scores and their PRO weight 1 / |region|
    pos_vals, pos_w, n_regions = [], [], 0
    for sl in tqdm(chunks, desc="pixel metrics: regions", disable=not progress):
        mc = m[sl]
        check_binary_values(mc, "masks")
        check_finite(a[sl], "maps")
        defect = mc.astype(bool, copy=False)
        has = defect.reshape(defect.shape[0], -1).any(axis=1)
        if not has.any():
            continue
        defect = defect[has]  # label only images with defects (often half the test set)
        labels, n = ndimage.label(defect, structure=_STRUCTURE)
        region = labels[defect]
        sizes = np.bincount(region, minlength=n + 1)
        pos_vals.append(a[sl][has][defect])
        pos_w.append(1.0 / sizes[region])
        n_regions += n
        _release(maps, masks, sl)  # the caller's memmaps (np.asarray views lose their mapping)
    n_pos = int(sum(v.size for v in pos_vals))
    n_neg = a.size - n_pos
    if n_pos == 0:
        empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float64)
        return PixelCounts(np.zeros(0, a.dtype), empty_i, empty_i, empty_i, empty_f, 0, n_neg, 0)

    vals, w = np.concatenate(pos_vals), np.concatenate(pos_w)
    del pos_vals, pos_w
    order = np.argsort(vals, kind="stable")
    vals, w = vals[order], w[order]
    starts = np.flatnonzero(np.r_[True, vals[1:] != vals[:-1]])
    u = vals[starts]  # ascending distinct defect scores
    count = np.diff(np.r_[starts, vals.size])
    wsum = np.add.reduceat(w, starts)
    del vals, w, order

    # pass 2: normal pixels < u and <= u, summed over chunks (exact integers)
    below = np.zeros(u.size, np.int64)
    below_eq = np.zeros(u.size, np.int64)
    for sl in tqdm(chunks, desc="pixel metrics: normals", disable=not progress):
        neg = a[sl][m[sl] == 0]  # a copy; sorting it leaves the caller's maps untouched
        _release(maps, masks, sl)  # the caller's memmaps (np.asarray views lose their mapping)
        if neg.size == 0:
            continue
        neg.sort()
        below += np.searchsorted(neg, u, side="left")
        below_eq += np.searchsorted(neg, u, side="right")
        del neg

    rev = slice(None, None, -1)  # to thresholds descending
    pro = np.cumsum(wsum[rev]) / n_regions
    return PixelCounts(
        thresholds=u[rev],
        tp=np.cumsum(count[rev]),
        fp=n_neg - below[rev],
        fp_above=n_neg - below_eq[rev],
        pro=np.minimum(pro, 1.0),
        n_pos=n_pos,
        n_neg=n_neg,
        n_regions=n_regions,
    )


def _auroc(c: PixelCounts) -> float:
    # Mann-Whitney with ties counted 1/2, in exact integers: sum over defect pixels of 2*#below + #equal
    count = np.diff(np.r_[0, c.tp])
    below = c.n_neg - c.fp
    equal = c.fp - c.fp_above
    return float(np.sum(count * (2 * below + equal))) / (2.0 * c.n_pos * c.n_neg)


def _ap(c: PixelCounts) -> float:
    # sum of (recall step) x precision, as scikit-learn's average_precision_score
    d_tp = np.diff(np.r_[0, c.tp])
    return float(np.sum(d_tp * (c.tp / (c.tp + c.fp)))) / c.n_pos


def _f1_max(c: PixelCounts) -> float:
    # for a fixed tp the fewest false positives come at the highest threshold reaching it: a defect score
    return float(np.max(2 * c.tp / (c.tp + c.fp + c.n_pos)))


def pro_curve_from_counts(c: PixelCounts) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve vertices (fpr, pro), fpr non-decreasing from (0, 0) to (1, 1).

    Per threshold u two vertices: (fp_above, pro before u) and (fp, pro at u) — the segment between them
    carries the ties at u; between thresholds the curve is flat (only normal pixels enter).
    """
    if c.n_pos == 0 or c.n_neg == 0:
        raise ValueError("PRO curve undefined: " + ("no defect pixels" if c.n_pos == 0 else "no defect-free pixels"))
    pro_before = np.r_[0.0, c.pro[:-1]]
    fpr = np.empty(2 * c.tp.size + 2)
    pro = np.empty_like(fpr)
    fpr[1:-1:2], fpr[2:-1:2] = c.fp_above / c.n_neg, c.fp / c.n_neg
    pro[1:-1:2], pro[2:-1:2] = pro_before, c.pro
    fpr[0] = pro[0] = 0.0
    fpr[-1] = pro[-1] = 1.0
    return fpr, pro


def area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y) over [x[0], limit], y at the limit linearly interpolated.

    x (K,) non-decreasing with x[0] < limit <= x[-1]; y (K,).
    """
    i = int(np.searchsorted(x, limit, side="right"))  # first vertex beyond the limit
    if i >= x.size:
        return float(np.trapezoid(y, x))
    y_lim = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
    return float(np.trapezoid(np.r_[y[:i], y_lim], np.r_[x[:i], limit]))


def _check_limit(fpr_limit: float) -> None:
    if not 0.0 < float(fpr_limit) <= 1.0:
        raise ValueError(f"aggregate.aupro_fpr_limit must be in (0, 1], got {fpr_limit}")


def pro_curve(maps: Any, masks: Any, chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """maps (N, H, W), masks (N, H, W) 0/1 → exact PRO curve (fpr (K,), pro (K,)); ValueError if undefined."""
    return pro_curve_from_counts(pixel_counts(maps, masks, chunk_pixels))


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3, chunk_pixels: int = DEFAULT_CHUNK_PIXELS) -> float | None:
    """Area under the PRO curve up to FPR = fpr_limit, divided by fpr_limit; None without defects/normals."""
    _check_limit(fpr_limit)
    c = pixel_counts(maps, masks, chunk_pixels)
    if c.n_pos == 0 or c.n_neg == 0:
        return None
    fpr, pro = pro_curve_from_counts(c)
    return rnd(area_to_limit(fpr, pro, fpr_limit) / fpr_limit)


def pixel_metrics(
    maps: Any,
    masks: Any,
    fpr_limit: float = 0.3,
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
    progress: bool = False,
) -> dict[str, Any]:
    """Pixel AUROC, AP, F1-max and AUPRO@fpr_limit over all pixels of maps (N, H, W) vs masks (N, H, W).

    Returns the keys of `PIXEL_KEYS` (rounded floats or None) and ``na_reasons`` {key: why None}.
    Ties between scores are handled exactly (AUROC counts a tie as 1/2; AP/F1 treat tied pixels together).
    """
    _check_limit(fpr_limit)
    c = pixel_counts(maps, masks, chunk_pixels, progress)
    out: dict[str, Any] = dict.fromkeys(PIXEL_KEYS)
    na: dict[str, str] = {}
    if c.n_pos == 0:
        for key in PIXEL_KEYS:
            na[key] = "test masks have no defect pixels"
    else:
        out["pixel_aupr"] = rnd(_ap(c))
        out["pixel_f1_max"] = rnd(_f1_max(c))
        if c.n_neg == 0:
            na["pixel_auroc"] = na["pixel_aupro"] = "test masks have no defect-free pixels"
        else:
            out["pixel_auroc"] = rnd(_auroc(c))
            fpr, pro = pro_curve_from_counts(c)
            out["pixel_aupro"] = rnd(area_to_limit(fpr, pro, fpr_limit) / fpr_limit)
    out["na_reasons"] = na
    return out
