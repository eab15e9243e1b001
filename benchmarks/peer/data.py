"""The peer benchmark's inputs, built with our library in the parent: a prepared dataset, backbones, and an
MVTec-style export of the same images for anomalib's `Folder` datamodule."""

from __future__ import annotations

import csv
import fcntl
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vadbench.data.source import ImageSource


def prepare(kind: str, out: Path, image_size: int, seed: int, folder: dict[str, str] | None = None) -> Path:
    """`kind`: synthetic_sem | elpv_mono | elpv_poly | folder → `out` (prepared by the library, as stage prepare)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # study seeds run as parallel processes: one prepares, the others wait and reuse (a second writer's
    # atomic_dir would delete the first one's temp dir as a killed run's leftover)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "manifest.csv").is_file():
            _prepare(kind, out, image_size, seed, folder)
    return out


def _prepare(kind: str, out: Path, image_size: int, seed: int, folder: dict[str, str] | None) -> None:
    from vadbench.data import params as dp
    from vadbench.data.prepare import prepare_dataset

    if kind == "synthetic_sem":
        spec: Any = dp.SyntheticSemParams(image_size=image_size)
    elif kind in ("elpv_mono", "elpv_poly"):
        spec = dp.ElpvParams(category=kind.split("_")[1], image_size=image_size)
    elif kind == "folder":
        if not folder:
            raise ValueError("--dataset folder needs --normal-dir and --abnormal-dir (and optionally --mask-dir)")
        spec = dp.FolderParams(image_size=image_size, **folder)
    else:
        raise ValueError(f"unknown dataset {kind!r}: synthetic_sem | elpv_mono | elpv_poly | folder")
    prepare_dataset(kind, spec, out_dir=out, seed=seed, preview_png=None, progress=False, workers=1)


def limit_train(prepared: Path, out: Path, max_train: int) -> Path:
    """A copy of `prepared` whose train split keeps its first `max_train` images (images are hard links)."""
    if (out / "manifest.csv").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(prepared, tmp, copy_function=_link_or_copy)
    with open(prepared / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept, n_train = [], 0
    for row in rows:
        if row["split"] == "train":
            n_train += 1
            if n_train > max_train:
                continue
        kept.append(row)
    (tmp / "manifest.csv").unlink()
    with open(tmp / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    tmp.rename(out)
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def export_folder(prepared: Path, image_size: int, out: Path) -> dict[str, Any]:
    """Write the prepared splits as anomalib reads them: train/good, val/good, test/good, test/abnormal.

    Images are our `ImageSource`'s uint8 pixels at `image_size` (what our models see), as PNG; test image i is
    `tNNNN.png` so both sides' outputs line up by index. Returns labels (N,), masks (n_gt, H, W) uint8 and the
    indices of the test images with pixel ground truth.
    """
    train = ImageSource(prepared, "train", image_size=image_size)
    val = ImageSource(prepared, "val", image_size=image_size)
    test = ImageSource(prepared, "test", image_size=image_size)
    for d in ("train/good", "val/good", "test/good", "test/abnormal"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for i in range(len(train)):
        _save_png(train[i].numpy(), out / "train/good" / f"n{i:04d}.png")
    for i in range(len(val)):
        _save_png(val[i].numpy(), out / "val/good" / f"v{i:04d}.png")
    for i in range(len(test)):
        sub = "abnormal" if test.labels[i] else "good"
        _save_png(test[i].numpy(), out / "test" / sub / f"t{i:04d}.png")
    gt = np.flatnonzero(test.has_mask)
    masks = np.stack([test.mask(int(i)).numpy() for i in gt]) if len(gt) else np.zeros((0, 1, 1), np.uint8)
    return {
        "labels": test.labels.copy(),
        "gt_index": gt,
        "masks": masks.astype(np.uint8),
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "paths": list(test.paths),
        "has_pixel_gt": bool(len(gt) and np.any(test.labels[gt] == 1)),
    }


def _save_png(chw: np.ndarray, path: Path) -> None:
    img = chw[0] if chw.shape[0] == 1 else np.transpose(chw, (1, 2, 0))
    Image.fromarray(img).save(path)
