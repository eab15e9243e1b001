"""The fractal dataset: manifest → held-out split → augmented tensors (one view, or several for SimCLR).

Augmentation randomness (augment.py) is a pure function of (seed, epoch, sample index, view), not of a
global RNG or of which process loads the sample. That is what lets a 2-process DDP run see exactly the
crops of the 1-process run, and a resumed run exactly the crops of an uninterrupted one.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vadbench.pretrain.augment import basic_view, strong_view


@dataclass(frozen=True)
class FractalSplit:
    """Paths (absolute) and contiguous labels 0..num_classes-1 for train and held-out val."""

    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    classes: list[int]  # original class ids, index = label


def read_fractal_split(fractal_dir: Path, val_fraction: float, seed: int) -> FractalSplit:
    """Hold out ``round(val_fraction * n)`` (≥ 1) instances of every class, chosen with `seed`."""
    fractal_dir = Path(fractal_dir)
    manifest = fractal_dir / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: run the fractals stage first")
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"path", "class"} <= set(rows[0]):
        raise ValueError(f"{manifest}: expected columns 'path' and 'class' and at least one row")
    by_class: dict[int, list[Path]] = {}
    for i, row in enumerate(rows, start=2):
        try:
            cls = int(row["class"])
        except ValueError:
            raise ValueError(f"{manifest} line {i}: class {row['class']!r} is not an integer") from None
        by_class.setdefault(cls, []).append(fractal_dir / row["path"])
    if len(by_class) < 2:
        raise ValueError(f"{manifest}: classification needs at least 2 classes, found {len(by_class)}")
    classes = sorted(by_class)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label, cls in enumerate(classes):
        paths = sorted(by_class[cls])
        if len(paths) < 2:
            raise ValueError(f"{manifest}: class {cls} has {len(paths)} instance(s); need ≥ 2 to hold one out")
        n_val = min(len(paths) - 1, max(1, round(val_fraction * len(paths))))
        held = set(rng.choice(len(paths), size=n_val, replace=False).tolist())
        for j, p in enumerate(paths):
            (val if j in held else train).append((p, label))
    return FractalSplit(train=train, val=val, classes=classes)


def _sample_seed(seed: int, epoch: int, index: int, view: int = 0) -> int:
    """View 0 keeps the pre-`views` key, so single-view crops (and the default recipe) are unchanged."""
    key = f"{seed}/{epoch}/{index}" + (f"/{view}" if view else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class FractalImages(Dataset):
    """Item i → (image (C, crop, crop) float in [0, 1], label); `views` > 1: (views, C, crop, crop).

    C is what `_load` gives: 1 for grey PNGs, 3 for RGB ones (`fractals.colour`); the model input is made on device. Train: resize to `input_size`,
    then `augment` ("basic": random crop + optional flip; "strong": augment.strong_view with `crop_scale`),
    each view from (seed, epoch, i, view). Val (train=False): centre crop, one view.
    Call `set_epoch` before each epoch (workers are re-created per epoch, so they see it).
    """

    def __init__(
        self,
        items: list[tuple[Path, int]],
        input_size: int,
        crop_size: int,
        train: bool,
        hflip: bool = True,
        seed: int = 0,
        augment: str = "basic",
        views: int = 1,
        crop_scale: tuple[float, float] = (0.25, 1.0),
    ):
        if augment not in ("basic", "strong"):
            raise ValueError(f"augment must be 'basic' or 'strong', got {augment!r}")
        if views < 1 or (views > 1 and not train):
            raise ValueError(f"views must be 1 for validation and >= 1 for training, got {views}")
        self.items, self.input_size, self.crop_size = items, input_size, crop_size
        self.train, self.hflip, self.seed, self.epoch = train, hflip, seed, 0
        self.augment, self.views, self.crop_scale = augment, views, tuple(crop_scale)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, path: Path) -> torch.Tensor:
        """uint8 (C, input_size, input_size): C = 3 for an RGB(A) PNG, else 1 (grey)."""
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if im.mode in ("RGB", "RGBA") else "L")
                if im.size != (self.input_size, self.input_size):
                    im = im.resize((self.input_size, self.input_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as err:
            raise ValueError(f"fractal image {path} cannot be read: {err}") from None
        return torch.from_numpy(arr.transpose(2, 0, 1).copy() if arr.ndim == 3 else arr[None].copy())

    def _view(self, img: torch.Tensor, index: int, view: int) -> torch.Tensor:
        if not self.train:
            return basic_view(img, self.crop_size, False, None)
        g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, index, view))
        if self.augment == "strong":
            return strong_view(img, self.crop_size, self.crop_scale, self.hflip, g)
        return basic_view(img, self.crop_size, self.hflip, g)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        img = self._load(path)
        if self.views == 1:
            return self._view(img, index, 0), label
        return torch.stack([self._view(img, index, v) for v in range(self.views)]), label
