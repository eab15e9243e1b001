"""`vadbench predict`: run one fitted pipeline cell on new images → scores.csv + heat-map overlays.

A cell (``<dataset>-<model>-<backbone>``) is what the fit stage wrote under ``data/fits/<cell>/seed-<s>/``
(`vadbench.cell`). New images are decoded exactly as `prepare` + `ImageSource` decode the cell's dataset
(`hygiene.load_image`: 8-bit, alpha dropped, 16-bit scaled; grey or RGB as the dataset; PIL bilinear resize
to the dataset's image_size; its centre crop), streamed in batches (memory stays one batch whatever the
number of files), scored with the model's `predict`.

The decision threshold is the cell's validation threshold, recomputed here exactly as the score stage does
(`aggregate.threshold_quantile` of the model's scores on the prepared *validation normals*, never test) and
cross-checked against ``data/scores/<cell>/metrics.json`` when that exists. An image is anomalous iff its
score is strictly above it (as in `metrics.image`). Files that cannot be decoded are listed in scores.csv
(empty score, the error) and on stderr; the rest are still scored; the command then exits 1.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vadbench.cell import FIT_REPORT, METRICS, MODEL_FILE, CellInputs, _backbone_for, seed_dir
from vadbench.data import hygiene
from vadbench.data.manifest import dataset_center_crop, dataset_channels
from vadbench.data.source import ImageSource, center_crop, loader, to_float
from vadbench.models import AnomalyModel, load_model
from vadbench.runtime import select_device, set_deterministic

SCORES_CSV = "scores.csv"
OVERLAYS = "overlays"
COLUMNS = ("path", "score", "anomalous", "threshold", "overlay", "error")
DEFAULT_MAX_PIXELS = 100_000_000
OVERLAY_ALPHA = 0.45  # the gallery's heat-map opacity (report/gallery.py)


class CellNotFitted(FileNotFoundError):
    """The cell has no fitted model for the seed: the message says which command fits it."""


@dataclass
class FittedCell:
    """A fitted cell ready to score images: model on its device, input recipe, threshold, colour scale."""

    name: str
    seed: int
    model: AnomalyModel
    device: torch.device
    channels: int
    image_size: int
    center_crop: int | None
    max_pixels: int
    bit_depth: int  # significant bits of 16-bit sources, as the dataset was prepared with
    threshold: float | None
    threshold_source: str
    map_range: tuple[float, float] | None  # overlay colour scale from the validation normals' maps
    val: ImageSource | None = None  # the validation normals (export checks parity on a few of them)

    @property
    def input_side(self) -> int:
        return self.center_crop or self.image_size


def split_cell(cell: str) -> tuple[str, str, str]:
    """``<dataset>-<model>-<backbone>`` → its three names (names hold no '-': config.NAME_PATTERN)."""
    parts = cell.split("-")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"cell {cell!r} must be <dataset>-<model>-<backbone> (e.g. synthetic_sem-padim-fractal)")
    return parts[0], parts[1], parts[2]


def _image_size(prepared: Path) -> int:
    info = prepared / "info.json"
    if info.is_file() and json.loads(info.read_text()).get("image_size"):
        return int(json.loads(info.read_text())["image_size"])
    first = ImageSource(prepared, "train")
    with Image.open(prepared / first.paths[0]) as im:  # prepared images are stored square at image_size
        return im.size[0]


def val_threshold(
    model: AnomalyModel, val: ImageSource, quantile: float, batch_size: int, device: torch.device
) -> tuple[float | None, tuple[float, float] | None]:
    """(threshold = `quantile` of the validation normals' scores, (1st, 99.5th) percentile of their maps).

    The maps are subsampled on a 4-pixel grid (memory: a few thousand floats per image)."""
    if len(val) == 0:
        return None, None
    scores, pixels = [], []
    with torch.no_grad():
        for batch in loader(val, batch_size, pin_memory=device.type == "cuda"):
            s, m = model.predict(to_float(batch, device))
            scores.append(s.float().cpu().numpy())
            pixels.append(m[:, ::4, ::4].float().cpu().numpy().ravel())
    v = np.concatenate(scores).astype(np.float64)
    lo, hi = np.percentile(np.concatenate(pixels), [1.0, 99.5])  # the gallery's colour-scale rule
    return float(np.quantile(v, quantile)), (float(lo), float(hi if hi > lo else lo + 1e-6))


def load_fitted_cell(
    cell: str,
    *,
    fits: Path,
    prepared: Path,
    backbones: Path,
    scores: Path | None = None,
    seed: int = 0,
    device: str = "auto",
    quantile: float = 0.99,
    batch_size: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FittedCell:
    """Load `cell`'s model for `seed` from ``fits/<cell>/seed-<seed>/`` with its backbone from `backbones`.

    `prepared` is ``data/prepared`` (the dataset's channels, size, crop and validation split); `scores`
    ``data/scores`` (the metrics.json threshold, a cross-check and the fallback when there is no val split).
    """
    from vadbench.config import NO_BACKBONE

    dataset, model_name, backbone = split_cell(cell)
    fit_dir = seed_dir(Path(fits) / cell, seed)
    if not (fit_dir / MODEL_FILE).is_file() or not (fit_dir / FIT_REPORT).is_file():
        seeds = sorted(p.name for p in (Path(fits) / cell).glob("seed-*")) if (Path(fits) / cell).is_dir() else []
        have = f" (fitted seeds: {', '.join(seeds)})" if seeds else ""
        raise CellNotFitted(
            f"cell {cell} was never fitted for seed {seed}: no {fit_dir / MODEL_FILE}{have}; "
            f"fit it with `dvc repro fit@{cell}` (with {dataset}, {model_name}, {backbone} in params.yaml's run grid)"
        )
    root = Path(prepared) / dataset
    if not (root / "manifest.csv").is_file():
        raise FileNotFoundError(f"{root}/manifest.csv not found: run `dvc repro prepare@{dataset}` first")
    dev = select_device(device)
    set_deterministic(True)
    size, crop, channels = _image_size(root), dataset_center_crop(root), dataset_channels(root)
    fit_info = json.loads((fit_dir / FIT_REPORT).read_text())
    inputs = CellInputs(root, None if backbone == NO_BACKBONE else Path(backbones) / backbone, size, crop)
    extractor = _backbone_for(fit_info["model"], fit_info["hparams"], inputs, dev)
    model = load_model(fit_dir / MODEL_FILE, backbone=extractor, map_location=dev).to(dev).eval()
    val = ImageSource(root, "val", image_size=size, center_crop=crop)
    threshold, map_range = val_threshold(model, val, quantile, batch_size, dev)
    source = f"validation normals ({len(val)}), quantile {quantile}"
    recorded = _recorded_threshold(Path(scores) / cell / METRICS if scores else None, seed)
    if threshold is None and recorded is not None:
        threshold, source = recorded, f"{Path(scores) / cell / METRICS} (seed {seed})"
    elif threshold is not None and recorded is not None and abs(threshold - recorded) > 1e-6 * max(1, abs(recorded)):
        print(
            f"warning: {cell}: validation threshold {threshold:.6g} ≠ {recorded:.6g} in data/scores/{cell}/metrics.json "
            "(another aggregate.threshold_quantile, or stale scores?); using the recomputed one",
            file=sys.stderr,
        )
    if not model.has_pixel_maps:
        map_range = None
    return FittedCell(
        cell, seed, model, dev, channels, size, crop, max_pixels, _bit_depth(root), threshold, source, map_range
    )


def _bit_depth(root: Path) -> int:
    """The prepared dataset's ``bit_depth`` (info.json; 16 when absent: datasets prepared before it existed)."""
    info = root / "info.json"
    value = json.loads(info.read_text()).get("bit_depth", 16) if info.is_file() else 16
    if not isinstance(value, int) or not 9 <= value <= 16:
        raise ValueError(f"{info}: bit_depth must be an integer 9..16, got {value!r}")
    return value


def _recorded_threshold(metrics: Path | None, seed: int) -> float | None:
    if metrics is None or not metrics.is_file():
        return None
    data = json.loads(metrics.read_text())
    value = data.get("per_seed", {}).get(str(seed), {}).get("threshold")
    return None if value is None else float(value)


def decode_image(path: Path, fitted: FittedCell) -> np.ndarray:
    """A file → uint8 (C, H, W) exactly as `prepare` stores it and `ImageSource` reads it (hygiene.BadImageError
    for an unreadable, oversized or float image)."""
    with hygiene.pixel_limit(fitted.max_pixels):
        im, _ = hygiene.load_image(
            Path(path), max_pixels=fitted.max_pixels, draft_size=fitted.image_size, bit_depth=fitted.bit_depth
        )
    im = hygiene.resize_image(im.convert("L" if fitted.channels == 1 else "RGB"), fitted.image_size)
    arr = np.array(im, dtype=np.uint8)
    arr = arr[None] if fitted.channels == 1 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(center_crop(arr, fitted.center_crop, path) if fitted.center_crop else arr)


def find_images(paths: Iterable[Path]) -> list[tuple[Path, str]]:
    """Files given, and image files under folders given (recursive, sorted, hidden ones skipped) →
    [(path, name for its overlay)]. A file named directly is always tried, whatever its extension."""
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    found: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.is_file() and f.suffix.lower() in extensions and not any(s.startswith(".") for s in rel.parts):
                    found.append((f, (Path(p.resolve().name) / rel).as_posix()))
        elif p.exists():
            found.append((p, p.name))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return found


def _overlay_png(image: np.ndarray, heat: np.ndarray, value_range: tuple[float, float], out: Path) -> None:
    """[image | image with jet heat map at the gallery's opacity] side by side, at the model's input size."""
    from matplotlib import colormaps

    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
    rgb = rgb.transpose(1, 2, 0).astype(np.float32) / 255.0
    lo, hi = value_range
    colour = colormaps["jet"](np.clip((heat - lo) / (hi - lo), 0, 1))[..., :3]
    blend = (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * colour
    pair = np.concatenate([rgb, blend], axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pair * 255).round().astype(np.uint8)).save(out)


def _batches(
    files: list[tuple[Path, str]], fitted: FittedCell, batch_size: int, errors: list[tuple[Path, str]]
) -> Iterator[list[tuple[Path, str, np.ndarray]]]:
    batch: list[tuple[Path, str, np.ndarray]] = []
    for path, name in files:
        try:
            batch.append((path, name, decode_image(path, fitted)))
        except (ValueError, OSError) as err:  # BadImageError is a ValueError; a crop larger than the image too
            errors.append((path, str(err)))
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _overlay_name(name: str, used: set[str]) -> str:
    stem, n = Path(name).with_suffix("").as_posix(), 1
    rel = f"{stem}.png"
    while rel in used:
        rel, n = f"{stem}_{n}.png", n + 1
    used.add(rel)
    return rel


def predict_files(
    fitted: FittedCell,
    paths: Iterable[Path],
    out_dir: Path,
    *,
    batch_size: int = 16,
    overlays: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every image of `paths` (files or folders) → ``out_dir/scores.csv`` (+ ``overlays/*.png``).

    Returns {n_scored, n_anomalous, n_failed, failed: [(path, error)], threshold, scores_csv}."""
    from tqdm import tqdm

    files = find_images(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    errors: list[tuple[Path, str]] = []
    used: set[str] = set()
    draw = overlays and fitted.map_range is not None
    thr = fitted.threshold
    n_scored = n_anomalous = 0
    with (
        open(out_dir / SCORES_CSV, "w", newline="") as fh,
        tqdm(total=len(files), desc=f"predict {fitted.name}", unit="img", disable=not progress) as bar,
    ):
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        reported = 0
        for batch in _batches(files, fitted, batch_size, errors):
            images = torch.from_numpy(np.stack([arr for _, _, arr in batch]))
            with torch.no_grad():
                scores, maps = fitted.model.predict(to_float(images, fitted.device))
            scores, maps = scores.float().cpu().numpy(), maps.float().cpu().numpy()
            for (path, name, arr), s, m in zip(batch, scores, maps):
                overlay = ""
                if draw:
                    overlay = f"{OVERLAYS}/{_overlay_name(name, used)}"
                    _overlay_png(arr, m, fitted.map_range, out_dir / overlay)  # type: ignore[arg-type]
                flag = "" if thr is None else int(s > thr)
                n_anomalous += flag == 1
                writer.writerow((str(path), f"{s:.6g}", flag, "" if thr is None else f"{thr:.6g}", overlay, ""))
            n_scored += len(batch)
            for path, err in errors[reported:]:
                writer.writerow((str(path), "", "", "", "", err))
                tqdm.write(f"cannot decode {path}: {err}", file=sys.stderr)
            bar.update(len(batch) + len(errors) - reported)
            reported = len(errors)
        for path, err in errors[reported:]:
            writer.writerow((str(path), "", "", "", "", err))
            tqdm.write(f"cannot decode {path}: {err}", file=sys.stderr)
        bar.update(len(errors) - reported)
    return {
        "n_scored": n_scored,
        "n_anomalous": n_anomalous,
        "n_failed": len(errors),
        "failed": [(str(p), e) for p, e in errors],
        "threshold": thr,
        "threshold_source": fitted.threshold_source,
        "scores_csv": str(out_dir / SCORES_CSV),
        "overlays": draw,
    }
