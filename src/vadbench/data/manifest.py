"""The prepared-dataset contract every loader writes and every model stage reads.

A prepared dataset is a directory holding the images (any sub-layout) and
``manifest.csv`` with one row per image::

    path,split,label,defect_type,mask_path,sha256
    train/good/000.png,train,0,good,,ab12...
    test/bridge/003.png,test,1,bridge,ground_truth/bridge/003_mask.png,cd34...

``split`` is ``train`` | ``val`` | ``test``; ``label`` is 0 (normal) or 1 (anomalous); paths are
relative to the dataset directory, POSIX-style; ``mask_path`` is empty when there is no pixel
ground truth (normal images, or image-level-only datasets).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vadbench.io import atomic_file, sha256_file

MANIFEST = "manifest.csv"
COLUMNS = ("path", "split", "label", "defect_type", "mask_path", "sha256")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ManifestRow:
    path: str
    split: str
    label: int
    defect_type: str
    mask_path: str = ""
    sha256: str = ""


@dataclass
class ImageSet:
    """Images of one split, loaded and resized.

    images: (N, C, H, W) float32 in [0, 1]; C is 1 (grey) or 3 (RGB).
    masks:  (N, H, W) uint8 in {0, 1}; all-zero for normals and images without ground truth.
    has_mask: (N,) bool, True where a pixel mask exists (normals count as having an all-zero mask).
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: np.ndarray
    has_mask: np.ndarray
    defect_types: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def write_manifest(root: Path, rows: list[ManifestRow], *, compute_hashes: bool = True) -> Path:
    """Validate `rows` against the files under `root` and write ``root/manifest.csv`` atomically."""
    root = Path(root)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in sorted(rows, key=lambda r: (SPLITS.index(r.split), r.path)):
        if r.split not in SPLITS:
            raise ValueError(f"{root}: manifest row {r.path!r} has split {r.split!r}; expected one of {SPLITS}")
        if r.label not in (0, 1):
            raise ValueError(f"{root}: manifest row {r.path!r} has label {r.label!r}; expected 0 or 1")
        if not (root / r.path).is_file():
            raise FileNotFoundError(f"{root}: manifest row names {r.path!r}, which does not exist")
        if r.mask_path and not (root / r.mask_path).is_file():
            raise FileNotFoundError(f"{root}: mask {r.mask_path!r} of {r.path!r} does not exist")
        digest = r.sha256 or (sha256_file(root / r.path) if compute_hashes else "")
        writer.writerow((r.path, r.split, r.label, r.defect_type, r.mask_path, digest))
    out = root / MANIFEST
    with atomic_file(out, "w") as fh:
        fh.write(buf.getvalue())
    return out


def read_manifest(root: Path) -> list[ManifestRow]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the prepare stage for this dataset first")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} differ from the expected {list(COLUMNS)}")
        return [
            ManifestRow(r["path"], r["split"], int(r["label"]), r["defect_type"], r["mask_path"], r["sha256"])
            for r in reader
        ]


def mvtec_layout_rows(root: Path, *, val_dir: str = "val") -> list[ManifestRow]:
    """Rows for an MVTec-layout tree: train/good, <val_dir>/good, test/<type>, ground_truth/<type>/<stem>_mask.png."""
    root = Path(root)
    rows: list[ManifestRow] = []
    for split, sub in (("train", "train"), ("val", val_dir)):
        for p in sorted((root / sub / "good").glob("*.png")):
            rows.append(ManifestRow(p.relative_to(root).as_posix(), split, 0, "good"))
    for type_dir in sorted(d for d in (root / "test").iterdir() if d.is_dir()):
        for p in sorted(type_dir.glob("*.png")):
            label = 0 if type_dir.name == "good" else 1
            mask = root / "ground_truth" / type_dir.name / f"{p.stem}_mask.png"
            mask_rel = mask.relative_to(root).as_posix() if label and mask.is_file() else ""
            rows.append(ManifestRow(p.relative_to(root).as_posix(), "test", label, type_dir.name, mask_rel))
    return rows


def load_split(
    root: Path,
    split: str,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    center_crop: int | None = None,
) -> ImageSet:
    """Every image of `split` stacked into one float tensor: for tests and small tools only.

    Stages and models stream the split instead (`vadbench.data.source.ImageSource`); arguments as there.
    """
    from vadbench.data.source import ImageSource

    src = ImageSource(root, split, image_size=image_size, channels=channels, center_crop=center_crop)
    c, h, w = src.image_shape
    images = torch.zeros((len(src), c, h, w))
    masks = torch.zeros((len(src), h, w), dtype=torch.uint8)
    for i in range(len(src)):
        images[i] = src[i].float().div_(255.0)
        masks[i] = src.mask(i)
    return ImageSet(images, masks, src.labels, src.has_mask, src.defect_types, src.paths)


def dataset_channels(root: Path) -> int:
    """1 if the first train image is single-channel (L/I;16/I), else 3."""
    rows = read_manifest(root)
    if not rows:
        raise ValueError(f"{root}/{MANIFEST} lists no images")
    with Image.open(Path(root) / rows[0].path) as im:
        return 1 if im.mode in ("L", "I", "I;16", "1", "F") else 3


def dataset_center_crop(root: Path) -> int | None:
    """The crop a prepared dataset asks for (its info.json ``center_crop``), or None."""
    info = Path(root) / "info.json"
    if not info.is_file():
        return None
    value = json.loads(info.read_text()).get("center_crop")
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{info}: center_crop must be a positive integer or null, got {value!r}")
    return value
