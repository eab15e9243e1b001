"""Run one supervised cell (dataset × method × backbone): fit and score every fold, pool the metrics.

Outputs (``vadbench.layout.supervised_dir``), deterministic for fixed params, seed, threads and machine kind:
``fold-<f>/model.pt`` + ``fold-<f>/fit.json``, ``scores.csv`` (fold, path, label, defect type, one column
per score variant) and ``metrics.json`` (pooled metrics of every variant, per-fold AUROC, fold count and the
number of labelled anomalies used). Seconds and peak memory go to `measured_path`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vadbench.io import atomic_dir, write_json
from vadbench.metrics import cost
from vadbench.metrics._util import rnd
from vadbench.metrics.image import image_metrics
from vadbench.runtime import seed_everything, select_device, set_deterministic
from vadbench.supervised.protocol import FoldData
from vadbench.supervised.thresholds import f1_max_threshold

MODEL_FILE, FIT_REPORT, SCORES, METRICS = "model.pt", "fit.json", "scores.csv", "metrics.json"


class SupervisedMethod(Protocol):
    """What the track needs from a supervised method (`classifier`, `supersimplenet_supervised`)."""

    #: the variant reported as the method's score; variants with a fixed decision threshold
    primary_variant: str
    fixed_thresholds: dict[str, float]
    needs_masks: bool

    def fit(self, train: Any, val: Any) -> dict[str, Any]: ...
    def score_variants(self, source: Any) -> dict[str, np.ndarray]: ...
    def save(self, path: Path) -> None: ...


#: name → builder(backbone_dir, hparams, device) of a fresh, unfitted method
Builder = Callable[[Path, dict[str, Any], torch.device], SupervisedMethod]


def builders() -> dict[str, Builder]:
    from vadbench.supervised.classifier import build_classifier
    from vadbench.supervised.supersimplenet import build_supersimplenet

    return {"classifier": build_classifier, "supersimplenet_supervised": build_supersimplenet}


def pooled_metrics(
    fold_scores: list[np.ndarray], fold_labels: list[np.ndarray], thresholds: list[float]
) -> dict[str, Any]:
    """Metrics of (fold, image) pairs pooled over folds; thresholded counts summed at each fold's threshold."""
    scores, labels = np.concatenate(fold_scores), np.concatenate(fold_labels)
    out = {
        k: v
        for k, v in image_metrics(scores, labels, None).items()
        if k in ("image_auroc", "image_aupr", "image_f1_max")
    }
    tp = fp = fn = 0
    for s, y, thr in zip(fold_scores, fold_labels, thresholds):
        pred = s >= thr
        tp += int(np.sum(pred & (y == 1)))
        fp += int(np.sum(pred & (y == 0)))
        fn += int(np.sum(~pred & (y == 1)))
    out["image_precision"] = rnd(tp / (tp + fp)) if tp + fp else None
    out["image_recall"] = rnd(tp / (tp + fn)) if tp + fn else None
    out["image_f1"] = rnd(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else None
    per_fold = [image_metrics(s, y, None)["image_auroc"] for s, y in zip(fold_scores, fold_labels)]
    out["fold_auroc"] = per_fold
    valid = [a for a in per_fold if a is not None]
    out["fold_auroc_mean"] = rnd(float(np.mean(valid))) if valid else None
    out["fold_auroc_std"] = rnd(float(np.std(valid))) if valid else None
    out["thresholds"] = [rnd(t) for t in thresholds]
    return out


def run_supervised_cell(
    method: str,
    hparams: dict[str, Any],
    data: FoldData,
    backbone_dir: Path | None,
    out_dir: Path,
    *,
    seed: int,
    device: str = "auto",
    measured_path: Path | None = None,
    folds: list[int] | None = None,
) -> dict[str, Any]:
    """Fit and score `method` on every fold of `data` (or only `folds`); write outputs; return metrics.json."""
    build = builders()[method]
    dev = select_device(device)
    set_deterministic(True)
    chosen = list(range(data.k)) if folds is None else list(folds)
    scores: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    thresholds: dict[str, list[float]] = {}
    rows: list[tuple[Any, ...]] = []
    measured: dict[str, Any] = {}
    fold_info = []
    primary = None
    with atomic_dir(Path(out_dir)) as tmp:
        for f in chosen:
            fold = data.folds[f]
            src = data.sources(fold, with_masks=False)
            seed_everything(seed)
            model = build(backbone_dir, {**hparams, "seed": seed}, dev)
            primary = model.primary_variant
            fit_src = data.sources(fold, with_masks=True) if model.needs_masks else src
            with cost.PeakMemory() as mem, cost.Stopwatch() as watch:
                report = model.fit(fit_src.train, fit_src.val)
            val_variants = model.score_variants(src.val)
            with cost.Stopwatch() as score_watch:
                test_variants = model.score_variants(src.test)
            target = tmp / f"fold-{f}"
            target.mkdir()
            model.save(target / MODEL_FILE)
            info = {
                "fold": f,
                "n_train": len(src.train),
                "n_train_anomalous": int(src.train.labels.sum()),
                "n_val": len(src.val),
                "n_val_anomalous": int(src.val.labels.sum()),
                "n_test": len(src.test),
                "n_test_anomalous": int(src.test.labels.sum()),
                "fit_report": report,
                "torch_threads": torch.get_num_threads(),
            }
            (target / FIT_REPORT).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            fold_info.append({k: v for k, v in info.items() if k != "fit_report"})
            labels.append(src.test.labels)
            for name, s in test_variants.items():
                thr = model.fixed_thresholds.get(name)
                if thr is None:
                    thr = f1_max_threshold(val_variants[name], src.val.labels)
                scores.setdefault(name, []).append(np.asarray(s, dtype=np.float64))
                thresholds.setdefault(name, []).append(float(thr))
            for i in range(len(src.test)):
                values = [f"{float(test_variants[n][i]):.6g}" for n in sorted(test_variants)]
                rows.append((f, src.test.paths[i], int(src.test.labels[i]), src.test.defect_types[i], *values))
            measured[str(f)] = {
                "fit_seconds": round(watch.seconds, 3),
                "score_seconds": round(score_watch.seconds, 3),
                "fit_peak_rss_mb": None if mem.peak_rss_bytes is None else round(mem.peak_rss_bytes / 2**20, 1),
                "device": str(dev),
            }
        variants = {n: pooled_metrics(scores[n], labels, thresholds[n]) for n in sorted(scores)}
        metrics = {
            "method": method,
            "dataset": data.name,
            "folds": data.k,
            "folds_run": chosen,
            "seed": seed,
            "n_labelled_anomalies": data.n_anomalies,
            "n_train_normals": len(data.train_src),
            "n_val_normals": len(data.val_src),
            "n_test_normals": len(data.test_normals),
            "primary_variant": primary,
            **{k: v for k, v in variants[primary].items()},
            "variants": variants,
            "per_fold": fold_info,
            "hparams": {**hparams, "seed": seed},
        }
        with open(tmp / SCORES, "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(("fold", "path", "label", "defect_type", *sorted(scores)))
            writer.writerows(rows)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if measured_path is not None:
        write_json(Path(measured_path), measured)
    return metrics
