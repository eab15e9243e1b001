"""Image metrics against scikit-learn and brute-force threshold sweeps; threshold from validation only."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from vadbench.metrics import image_metrics, pr_points, roc_points


def case(seed: int, n: int = 60, ties: bool = True):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    scores = rng.normal(size=n) + 1.2 * labels
    if ties:
        scores = np.round(scores, 1)
    val = rng.normal(size=25)
    return scores, labels, val


def brute_f1_max(scores, labels):
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        best = max(best, 2 * tp / (pred.sum() + labels.sum()))
    return best


@pytest.mark.parametrize("seed,ties", [(0, True), (1, False), (2, True)])
def test_ranking_metrics_equal_references(seed, ties):
    s, y, v = case(seed, ties=ties)
    got = image_metrics(s, y, v, 0.99)
    assert got["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert got["image_aupr"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert got["image_f1_max"] == pytest.approx(brute_f1_max(s, y), abs=1e-6)


def test_operating_point_uses_validation_normals_only():
    s, y, v = case(3)
    got = image_metrics(s, y, v, 0.9)
    assert got["threshold"] == pytest.approx(np.quantile(v, 0.9), abs=1e-6)
    # the threshold cannot move when test labels change
    assert image_metrics(s, 1 - y, v, 0.9)["threshold"] == got["threshold"]
    pred = s > np.quantile(v, 0.9)
    tp, fp, fn = np.sum(pred & (y == 1)), np.sum(pred & (y == 0)), np.sum(~pred & (y == 1))
    assert got["image_precision"] == pytest.approx(tp / (tp + fp), abs=1e-6)
    assert got["image_recall"] == pytest.approx(tp / (tp + fn), abs=1e-6)
    assert got["image_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)
    # a higher quantile can only flag fewer images
    assert image_metrics(s, y, v, 1.0)["image_recall"] <= got["image_recall"]


def test_undefined_values_are_none_with_reasons():
    s, _, v = case(4)
    no_defects = image_metrics(s, np.zeros_like(s, dtype=int), v, 0.99)
    for key in ("image_auroc", "image_aupr", "image_f1_max", "image_recall"):
        assert no_defects[key] is None and no_defects["na_reasons"][key]
    no_val = image_metrics(s, (s > 0).astype(int), None, 0.99)
    assert no_val["threshold"] is None and no_val["image_f1"] is None
    assert "validation" in no_val["na_reasons"]["threshold"]
    assert no_val["image_auroc"] is not None
    # nothing above a huge threshold: precision is undefined, recall and F1 are 0
    high = image_metrics(s, (s > 0).astype(int), np.array([1e9]), 0.5)
    assert high["image_precision"] is None and high["image_recall"] == 0.0 and high["image_f1"] == 0.0


def test_constant_scores_are_chance_not_nan():
    y = np.array([0, 1, 0, 1, 1])
    got = image_metrics(np.zeros(5), y, np.zeros(3), 0.99)
    assert got["image_auroc"] == 0.5
    assert got["image_aupr"] == pytest.approx(0.6, abs=1e-6)
    assert got["na_reasons"] == {"image_precision": "no test image scored above the threshold"}


@pytest.mark.parametrize(
    "scores,labels,val,q,match",
    [
        ([0.1, 0.2], [0, 1], None, 1.5, "threshold_quantile"),
        ([0.1, 0.2], [0, 2], None, 0.9, "only 0 and 1"),
        ([0.1, np.nan], [0, 1], None, 0.9, "NaN"),
        ([0.1, 0.2, 0.3], [0, 1], None, 0.9, "same length"),
        ([0.1, 0.2], [0, 1], [np.inf], 0.9, "val_scores"),
    ],
)
def test_bad_input_is_a_clear_error(scores, labels, val, q, match):
    with pytest.raises(ValueError, match=match):
        image_metrics(np.array(scores), np.array(labels), None if val is None else np.array(val), q)


def test_curve_points_are_downsampled_and_span_the_curve():
    rng = np.random.default_rng(5)
    y = (rng.random(2000) < 0.3).astype(int)
    s = rng.normal(size=2000) + y
    roc = roc_points(s, y, max_points=50)
    assert 2 <= len(roc) <= 50
    assert (roc[0]["fpr"], roc[0]["tpr"]) == (0.0, 0.0) and (roc[-1]["fpr"], roc[-1]["tpr"]) == (1.0, 1.0)
    fpr = np.array([p["fpr"] for p in roc])
    tpr = np.array([p["tpr"] for p in roc])
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s), abs=0.02)
    pr = pr_points(s, y, max_points=50)
    assert len(pr) <= 50 and pr[0]["recall"] == 0.0 and pr[-1]["recall"] == 1.0
    assert roc_points(s, np.zeros_like(y)) == [] and pr_points(s, np.zeros_like(y)) == []
