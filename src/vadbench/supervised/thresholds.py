"""Thresholds chosen on validation data only (normals + the validation fold's anomalies)."""

from __future__ import annotations

import numpy as np


def f1_max_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold (predict anomalous when score ≥ it) with the best F1 on (scores, labels).

    Without validation anomalies there is no F1: the threshold is then just above the highest normal score."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if not y.any():
        return float(np.nextafter(s.max(), np.inf)) if s.size else 0.5
    best, best_thr = -1.0, float(s.max())
    for thr in np.unique(s):
        pred = s >= thr
        tp = int(np.sum(pred & y))
        fp = int(np.sum(pred & ~y))
        fn = int(np.sum(~pred & y))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 > best:  # unique() is ascending: ties keep the lowest threshold (highest recall)
            best, best_thr = f1, float(thr)
    return best_thr
