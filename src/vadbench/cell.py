"""One benchmark cell — a dataset × model × backbone — fitted, then scored, once per seed.

The fit and score stages are thin wrappers around `fit_cell` and `score_cell`. A cell's fit
sees only the train and val splits; the test split is loaded by `score_cell` alone.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vadbench.backbones import load_feature_extractor
from vadbench.data.source import ImageSource, loader, to_float
from vadbench.io import atomic_dir, preflight, release_rows, write_json
from vadbench.metrics import cost
from vadbench.metrics.image import image_metrics, pr_points, roc_points
from vadbench.metrics.pixel import pixel_metrics
from vadbench.models import AnomalyModel, create_model, load_model, model_class
from vadbench.runtime import seed_everything, select_device, set_deterministic

MODEL_FILE = "model.pt"
FIT_REPORT = "fit.json"
SCORES, MAPS, METRICS = "scores.csv", "maps.npy", "metrics.json"
PIXEL_KEYS = ("pixel_auroc", "pixel_aupr", "pixel_f1_max", "pixel_aupro")


@dataclass(frozen=True)
class CellInputs:
    """Where a cell's inputs live and how its images are loaded."""

    dataset_dir: Path
    backbone_dir: Path | None
    image_size: int
    center_crop: int | None = None
    teacher_dir: Path | None = None  # stage distill's output for models that take a teacher (EfficientAD)


@dataclass(frozen=True)
class ScoreSettings:
    batch_size: int = 16
    latency_warmup: int = 2
    latency_repeats: int = 10
    threshold_quantile: float = 0.99
    aupro_fpr_limit: float = 0.3


def cell_name(dataset: str, model: str, backbone: str) -> str:
    return f"{dataset}-{model}-{backbone}"


def seed_dir(root: Path, seed: int) -> Path:
    return Path(root) / f"seed-{seed}"


def _source(inputs: CellInputs, split: str) -> ImageSource:
    return ImageSource(inputs.dataset_dir, split, image_size=inputs.image_size, center_crop=inputs.center_crop)


def _backbone_for(model_name: str, hparams: dict[str, Any], inputs: CellInputs, device: torch.device):
    cls = model_class(model_name)
    if not cls.needs_backbone:
        return None
    if inputs.backbone_dir is None:
        raise ValueError(f"model {model_name!r} needs a backbone directory")
    layers = cls.Params.model_validate_json(json.dumps(hparams)).layers  # type: ignore[attr-defined]
    return load_feature_extractor(inputs.backbone_dir, layers, device)


def _with_seed(model_name: str, hparams: dict[str, Any], seed: int) -> dict[str, Any]:
    # the run's seed list, not params.yaml, decides each model's seed (config rejects models.<m>.seed)
    return {**hparams, "seed": seed} if "seed" in model_class(model_name).Params.model_fields else dict(hparams)


def _device_info(device: torch.device) -> str:
    info = cost.device_info(device)
    return f"{info['device']} ({info['name']}, {info['torch_threads']} threads)"


def _mb(n_bytes: int | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**20, 1)


def _split_measured(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A model's fit report → (deterministic part, timings): keys ending in ``_seconds`` are measurements."""
    timings = {k: v for k, v in report.items() if k.endswith("_seconds")}
    return {k: v for k, v in report.items() if k not in timings}, timings


def fit_cell(
    inputs: CellInputs,
    model_name: str,
    hparams: dict[str, Any],
    out_dir: Path,
    *,
    seeds: list[int],
    device: str = "auto",
    measured_path: Path | None = None,
) -> list[dict[str, Any]]:
    """Fit `model_name` once per seed on the train normals (val normals for early stopping only).

    Writes ``out_dir/seed-<s>/{model.pt, fit.json}`` atomically (deterministic content only) and, when
    `measured_path` is given, the seeds' seconds / peak memory / device there (`vadbench.layout`).
    Returns the per-seed summaries (deterministic fields + measurements).
    """
    dev = select_device(device)
    set_deterministic(True)
    train, val = _source(inputs, "train"), _source(inputs, "val")
    if len(train) == 0:
        raise ValueError(f"{inputs.dataset_dir}: the train split is empty")
    if np.any(train.labels != 0) or np.any(val.labels != 0):
        raise ValueError(f"{inputs.dataset_dir}: train/val splits must hold normal images only")
    preflight(Path(out_dir).parent, 1 << 20)  # an unwritable output fails now, not after the fit
    backbone = _backbone_for(model_name, hparams, inputs, dev)
    summaries, measured = [], {}
    with atomic_dir(out_dir) as tmp:
        for seed in seeds:
            seed_everything(seed)
            model = create_model(model_name, backbone=backbone, **_with_seed(model_name, hparams, seed)).to(dev)
            if inputs.teacher_dir is not None and hasattr(model, "use_teacher"):
                model.use_teacher(inputs.teacher_dir)  # a named error when the distilled teacher is missing
            with cost.PeakMemory() as mem, cost.Stopwatch() as watch:
                report = model.fit(train, val if len(val) else None)
            report, timings = _split_measured(report)
            target = seed_dir(tmp, seed)
            target.mkdir()
            model.save(target / MODEL_FILE)
            summary = {
                "model": model_name,
                "seed": seed,
                "hparams": model.hparams,
                "n_train": len(train),
                "n_val": len(val),
                "fit_report": report,
                "torch_threads": torch.get_num_threads(),
                "parameters": cost.count_parameters(model),
                "model_bytes": (target / MODEL_FILE).stat().st_size,
            }
            (target / FIT_REPORT).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
            measured[str(seed)] = {
                "fit_seconds": round(watch.seconds, 3),
                "fit_peak_rss_mb": _mb(mem.peak_rss_bytes),
                "fit_peak_cuda_mb": _mb(mem.peak_cuda_bytes),
                "device": _device_info(dev),
                **timings,
            }
            summaries.append({**summary, **measured[str(seed)]})
    if measured_path is not None:
        write_json(Path(measured_path), measured)
    return summaries


@torch.no_grad()
def predict_stream(
    model: AnomalyModel,
    source: ImageSource,
    batch_size: int,
    device: torch.device,
    maps_out: np.ndarray | None = None,
) -> np.ndarray:
    """Stream `source` through `model.predict` → scores (N,) float32; maps go into `maps_out` (N, H, W)
    batch by batch when given (a memory-mapped array: memory stays one batch whatever N is)."""
    scores = np.zeros(len(source), np.float32)
    start = 0
    for batch in loader(source, batch_size, pin_memory=device.type == "cuda"):
        s, m = model.predict(to_float(batch, device))
        stop = start + len(batch)
        scores[start:stop] = s.float().cpu().numpy()
        if maps_out is not None:
            maps_out[start:stop] = m.float().cpu().numpy()
            release_rows(maps_out, start, stop)  # written through to the file: RSS stays one batch
        start = stop
    return scores


def _memmap(path: Path, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _quality(
    model: AnomalyModel, test: ImageSource, scores, gt_maps, gt_masks, val_scores, settings: ScoreSettings
) -> dict[str, Any]:
    """Image metrics + pixel metrics (or n/a with the reason) of one seed's predictions.

    gt_maps / gt_masks (n_gt, H, W): the maps and masks of the test images with pixel ground truth, in
    order (memory-mapped; the pixel metrics read them chunk by chunk)."""
    image = image_metrics(scores, test.labels, val_scores, settings.threshold_quantile)
    with_gt = test.has_mask
    if not model.has_pixel_maps:
        pixel: dict[str, Any] = _na_pixel("image-level method: no pixel anomaly maps")
    elif not np.any(test.labels[with_gt] == 1):
        pixel = _na_pixel("no pixel ground truth for the anomalous test images")
    else:
        pixel = pixel_metrics(gt_maps, gt_masks, fpr_limit=settings.aupro_fpr_limit)
    reasons = {**image.get("na_reasons", {}), **pixel.get("na_reasons", {})}
    merged = {k: v for d in (image, pixel) for k, v in d.items() if k != "na_reasons"}
    merged["na_reasons"] = reasons
    return merged


def _na_pixel(reason: str) -> dict[str, Any]:
    return {**{k: None for k in PIXEL_KEYS}, "na_reasons": {k: reason for k in PIXEL_KEYS}}


def _over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every numeric metric over seeds, plus `<key>_std` (population std) with several seeds."""
    out: dict[str, Any] = {"na_reasons": per_seed[0]["na_reasons"]}
    for key, first in per_seed[0].items():
        if key == "na_reasons" or not (first is None or isinstance(first, (int, float))):
            continue
        values = [m[key] for m in per_seed]
        if any(v is None for v in values):
            out[key] = None
            continue
        out[key] = round(float(np.mean(values)), 6)
        if len(values) > 1:
            out[f"{key}_std"] = round(float(np.std(values)), 6)
    return out


def score_cell(
    inputs: CellInputs,
    fit_dir: Path,
    out_dir: Path,
    report_dir: Path,
    settings: ScoreSettings,
    *,
    seeds: list[int],
    device: str = "auto",
    gallery_size: int = 4,
    measured_path: Path | None = None,
) -> dict[str, Any]:
    """Score the test split with every seed's model; write scores, maps, metrics, costs and plots.

    `out_dir` (DVC-cached, deterministic): scores.csv, maps.npy (float16), roc.csv, pr.csv (first seed),
    metrics.json (mean over seeds, `_std`, per-seed values, parameters, model bytes, torch threads).
    `report_dir` (git-tracked plots): roc.csv, pr.csv, gallery.png of the first seed.
    `measured_path` (outside every output, `vadbench.layout`): latency, throughput, peak memory, device.
    """
    from vadbench.report.gallery import render_gallery

    dev = select_device(device)
    set_deterministic(True)
    test, val = _source(inputs, "test"), _source(inputs, "val")
    if len(test) == 0:
        raise ValueError(f"{inputs.dataset_dir}: the test split is empty")
    _, h, w = test.image_shape
    gt_index = np.flatnonzero(test.has_mask)
    # before any work: the outputs' disk (fp16 maps) and the scratch disk (fp32 maps ×2, masks) must hold them
    preflight(Path(out_dir).parent, len(test) * h * w * 2 + (1 << 20))
    preflight(Path(tempfile.gettempdir()), len(test) * h * w * 4 + len(gt_index) * h * w * 5)
    # scratch space outside every DVC output: float32 maps for exact metrics, masks of the ground-truth images
    scratch = tempfile.TemporaryDirectory(prefix=f"vadbench-{Path(out_dir).name}-")
    work = Path(scratch.name)
    gt_masks = _memmap(work / "masks.npy", (len(gt_index), h, w), np.uint8)
    for j, i in enumerate(gt_index):
        gt_masks[j] = test.mask(int(i)).numpy()
        if j % 256 == 255:
            release_rows(gt_masks, j - 255, j + 1)
    release_rows(gt_masks, 0, len(gt_index))
    maps = _memmap(work / "maps.npy", (len(test), h, w), np.float32)
    gt_maps = _memmap(work / "gt_maps.npy", (len(gt_index), h, w), np.float32)
    per_seed, first = [], None
    for seed in seeds:
        fit_info = json.loads((seed_dir(fit_dir, seed) / FIT_REPORT).read_text())
        backbone = _backbone_for(fit_info["model"], fit_info["hparams"], inputs, dev)
        model = load_model(seed_dir(fit_dir, seed) / MODEL_FILE, backbone=backbone, map_location=dev).to(dev)
        target = maps if first is None else _memmap(work / "maps_seed.npy", (len(test), h, w), np.float32)
        with cost.PeakMemory() as mem, cost.Stopwatch() as watch:
            scores = predict_stream(model, test, settings.batch_size, dev, target)
        for start in range(0, len(gt_index), 256):  # copy the ground-truth rows in chunks, never all at once
            idx = gt_index[start : start + 256]
            gt_maps[start : start + len(idx)] = target[idx]
            release_rows(gt_maps, start, start + len(idx))
            release_rows(target, int(idx[0]), int(idx[-1]) + 1)
        val_scores = predict_stream(model, val, settings.batch_size, dev) if len(val) else None
        per_seed.append(_quality(model, test, scores, gt_maps, gt_masks, val_scores, settings))
        if first is None:  # costs, maps and pictures come from the first seed's model
            latency_batch = to_float(next(iter(loader(test, settings.batch_size))), dev)
            latency = cost.measure_latency(
                model.predict,  # batches are already on the device
                latency_batch,
                settings.latency_warmup,
                settings.latency_repeats,
                settings.batch_size,
            )
            first = (model, scores, fit_info, mem, watch, latency)
    model, scores, fit_info, mem, watch, latency = first
    metrics = _over_seeds(per_seed)
    metrics.update(
        seeds=list(seeds),
        per_seed={str(s): m for s, m in zip(seeds, per_seed)},
        image_size=inputs.image_size,
        center_crop=inputs.center_crop,
        n_test=len(test),
        n_test_anomalous=int(test.labels.sum()),
        parameters=fit_info["parameters"],
        model_bytes=fit_info["model_bytes"],
        torch_threads=torch.get_num_threads(),
    )
    costs = {
        "score_peak_rss_mb": _mb(mem.peak_rss_bytes),
        "score_peak_cuda_mb": _mb(mem.peak_cuda_bytes),
        "throughput_ips": round(len(test) / watch.seconds, 3) if watch.seconds > 0 else None,
        "latency_ms": round(latency["latency_ms_median"], 3),
        "latency_ms_p90": round(latency["latency_ms_p90"], 3),
        "device": _device_info(dev),
    }
    roc, pr = roc_points(scores, test.labels), pr_points(scores, test.labels)
    has_maps = model.has_pixel_maps
    with atomic_dir(out_dir) as tmp:
        _write_scores(tmp / SCORES, test, scores)
        _write_curve(tmp / "roc.csv", roc, ("fpr", "tpr"))
        _write_curve(tmp / "pr.csv", pr, ("recall", "precision"))
        _save_fp16(tmp / MAPS, maps)
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    with atomic_dir(report_dir) as tmp:
        _write_curve(tmp / "roc.csv", roc, ("fpr", "tpr"))
        _write_curve(tmp / "pr.csv", pr, ("recall", "precision"))
        render_gallery(
            _LazyImages(test),
            _LazyMasks(test),
            maps if has_maps else None,
            scores,
            test.labels,
            tmp / "gallery.png",
            per_group=gallery_size,
            title=out_dir.name,
        )
    del maps, gt_maps, gt_masks
    scratch.cleanup()
    if measured_path is not None:
        write_json(Path(measured_path), costs)
    return {"metrics": metrics, "costs": costs}


def _save_fp16(path: Path, maps: np.ndarray, chunk: int = 256) -> None:
    """maps (N, H, W) float32 (memory-mapped) → ``path`` as a float16 .npy, `chunk` maps at a time."""
    out = _memmap(path, maps.shape, np.float16)
    for start in range(0, len(maps), chunk):
        out[start : start + chunk] = maps[start : start + chunk]
        release_rows(out, start, start + chunk)
        release_rows(maps, start, start + chunk)
    out.flush()
    del out


class _LazyImages:
    """``obj[i]`` → image i of a source as float (C, H, W) in [0, 1]: the gallery decodes only what it shows."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __getitem__(self, i: int) -> np.ndarray:
        return self.source[int(i)].numpy().astype(np.float32) / 255.0


class _LazyMasks(_LazyImages):
    def __getitem__(self, i: int) -> np.ndarray:
        return self.source.mask(int(i)).numpy()


def _write_scores(path: Path, test: ImageSource, scores: np.ndarray) -> None:
    with open(path, "w", newline="") as fh:  # csv quoting: a file name may hold commas or quotes
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("path", "label", "defect_type", "score"))
        for p, y, d, s in zip(test.paths, test.labels, test.defect_types, scores):
            writer.writerow((p, int(y), d, f"{s:.6g}"))


def _write_curve(path: Path, points: list[dict[str, float]], columns: tuple[str, str]) -> None:
    lines = [",".join(columns)] + [f"{p[columns[0]]:.6f},{p[columns[1]]:.6f}" for p in points]
    path.write_text("\n".join(lines) + "\n")
