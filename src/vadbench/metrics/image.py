"""Image-level metrics: AUROC, AP, F1-max, and F1/precision/recall at a threshold from validation normals.

The operating threshold is the `quantile` of the *validation* normal scores (never test labels; numpy's
default linear interpolation between order statistics), and an image is called anomalous when its score
is strictly above it: with q = 0.99 at most 1 % of validation normals are flagged. Every metric that is
undefined for the given data is None, with its reason in ``na_reasons`` — never a silent NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vadbench.metrics._util import as_binary, as_scores, check_finite, rnd

IMAGE_KEYS = (
    "image_auroc",
    "image_aupr",
    "image_f1_max",
    "image_f1",
    "image_precision",
    "image_recall",
    "threshold",
)


def _sklearn_metrics() -> Any:
    """sklearn.metrics, imported on first use: it costs ~2 s per process, and every fit stage imports this package."""
    import sklearn.metrics

    return sklearn.metrics


def _scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = as_scores(scores, "scores", 1)
    y = as_binary(labels, "labels", 1).astype(np.int8)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must have the same length")
    if s.size == 0:
        raise ValueError("scores is empty: no test images to evaluate")
    check_finite(s, "scores")
    return s, y


def f1_max_from_pr(precision: np.ndarray, recall: np.ndarray) -> float:
    """Best F1 over the points of a precision-recall curve (0 where precision + recall is 0)."""
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)
    return float(f1.max())


def image_metrics(scores: Any, labels: Any, val_scores: Any | None, quantile: float = 0.99) -> dict[str, Any]:
    """Image-level metrics for one cell.

    scores (N,) test image scores, higher = more anomalous; labels (N,) 0 normal / 1 anomalous;
    val_scores (M,) scores of validation normals (or None); quantile in [0, 1] picks the threshold.
    Returns the keys of `IMAGE_KEYS` (rounded floats or None) and ``na_reasons`` {key: why None}.
    """
    if not 0.0 <= float(quantile) <= 1.0:
        raise ValueError(f"aggregate.threshold_quantile must be in [0, 1], got {quantile}")
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    out: dict[str, Any] = dict.fromkeys(IMAGE_KEYS)
    na: dict[str, str] = {}

    if n_pos and n_neg:
        out["image_auroc"] = rnd(_sklearn_metrics().roc_auc_score(y, s))
    else:
        na["image_auroc"] = "test set has no anomalous images" if not n_pos else "test set has no normal images"
    if n_pos:
        out["image_aupr"] = rnd(_sklearn_metrics().average_precision_score(y, s))
        precision, recall, _ = _sklearn_metrics().precision_recall_curve(y, s)
        out["image_f1_max"] = rnd(f1_max_from_pr(precision, recall))
    else:
        na["image_aupr"] = na["image_f1_max"] = "test set has no anomalous images"

    v = None if val_scores is None else as_scores(val_scores, "val_scores", 1)
    if v is None or v.size == 0:
        for key in ("threshold", "image_f1", "image_precision", "image_recall"):
            na[key] = "no validation normals to choose a threshold from"
    else:
        check_finite(v, "val_scores")
        thr = float(np.quantile(v.astype(np.float64), quantile))
        out["threshold"] = rnd(thr)
        pred = s > thr
        tp = int(np.sum(pred & (y == 1)))
        fp = int(np.sum(pred & (y == 0)))
        fn = n_pos - tp
        if tp + fp:
            out["image_precision"] = rnd(tp / (tp + fp))
        else:
            na["image_precision"] = "no test image scored above the threshold"
        if n_pos:
            out["image_recall"] = rnd(tp / n_pos)
        else:
            na["image_recall"] = "test set has no anomalous images"
        if 2 * tp + fp + fn:
            out["image_f1"] = rnd(2 * tp / (2 * tp + fp + fn))
        else:
            na["image_f1"] = "no anomalous images and none predicted anomalous"
    out["na_reasons"] = na
    return out


def _downsample(n: int, max_points: int) -> np.ndarray:
    """Indices of at most `max_points` evenly spread points of an n-point curve, ends kept."""
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(np.int64))


def roc_points(scores: Any, labels: Any, max_points: int = 200) -> list[dict[str, float]]:
    """ROC curve as ≤ max_points dicts {fpr, tpr}, from (0, 0) to (1, 1); [] when a class is missing."""
    s, y = _scores_labels(scores, labels)
    if y.min() == y.max():
        return []
    fpr, tpr, _ = _sklearn_metrics().roc_curve(y, s)
    idx = _downsample(fpr.size, max_points)
    return [{"fpr": rnd(fpr[i]), "tpr": rnd(tpr[i])} for i in idx]


def pr_points(scores: Any, labels: Any, max_points: int = 200) -> list[dict[str, float]]:
    """Precision-recall curve as ≤ max_points dicts {recall, precision}, recall increasing; [] without positives."""
    s, y = _scores_labels(scores, labels)
    if not y.any():
        return []
    precision, recall, _ = _sklearn_metrics().precision_recall_curve(y, s)
    precision, recall = precision[::-1], recall[::-1]  # sklearn gives recall decreasing
    idx = _downsample(recall.size, max_points)
    return [{"recall": rnd(recall[i]), "precision": rnd(precision[i])} for i in idx]
