"""The supervised track's protocol: k folds over the labelled anomalies, stratified by defect type.

Supervised methods see anomalous images in training, so they never enter the one-class leaderboard. The
anomalies of a prepared dataset (its test split's anomalous images) are dealt into `k` folds, stratified by
defect type and seeded. Fold ``f``:

* **test**: fold f's anomalies + every test normal (each anomaly is tested exactly once over the k folds);
* **validation**: the validation normals + fold (f + 1) mod k's anomalies — the only data that picks the
  threshold and the epoch (never a test image);
* **train**: the train normals + the remaining k − 2 folds' anomalies (test normals never train).

Scores are pooled over folds: the test normals appear once per fold (scored by that fold's model), the
anomalies once each; AUROC/AP/F1-max come from `vadbench.metrics.image_metrics` on the pooled pairs, and
thresholded precision/recall/F1 sum every fold's confusion counts at that fold's validation threshold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vadbench.data.source import ImageSource

#: the fewest folds: one tests, one validates, at least one trains
MIN_FOLDS = 3


class TooFewAnomaliesError(ValueError):
    """The dataset has fewer labelled anomalies than folds (every fold must test at least one)."""

    def __init__(self, dataset: str, k: int, counts: dict[str, int]) -> None:
        self.dataset, self.k, self.counts = dataset, k, dict(counts)
        total = sum(counts.values())
        super().__init__(
            f"dataset {dataset!r} has {total} labelled anomalies ({dict(sorted(counts.items()))}), too few for "
            f"{k}-fold supervised evaluation (needs at least {k}): lower supervised.folds or add anomalies"
        )


def assign_folds(defect_types: Sequence[str], k: int, seed: int, dataset: str = "dataset") -> np.ndarray:
    """Fold index in [0, k) of every anomaly, stratified by defect type, seeded.

    Each type's anomalies are shuffled and dealt round-robin; the deal continues from type to type, so
    every fold gets ⌊n/k⌋ or ⌈n/k⌉ anomalies in all and each type's count per fold differs by at most one.
    Raises `TooFewAnomaliesError` when there are fewer than `k` anomalies."""
    if k < MIN_FOLDS:
        raise ValueError(f"supervised.folds must be ≥ {MIN_FOLDS} (test, validation, train folds), got {k}")
    types = np.asarray(list(defect_types), dtype=object)
    if len(types) < k:
        raise TooFewAnomaliesError(dataset, k, Counter(str(t) for t in types))
    rng = np.random.default_rng(seed)
    folds = np.empty(len(types), dtype=np.int64)
    dealt = 0
    for t in sorted(set(types.tolist())):
        idx = np.flatnonzero(types == t)
        idx = idx[rng.permutation(len(idx))]
        folds[idx] = (dealt + np.arange(len(idx))) % k
        dealt += len(idx)
    return folds


@dataclass(frozen=True)
class Fold:
    """Indices into the anomaly pool (the test split's anomalous images, in manifest order)."""

    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_folds(defect_types: Sequence[str], k: int, seed: int, dataset: str = "dataset") -> list[Fold]:
    """The k folds: fold f tests fold f, validates on fold (f + 1) mod k, trains on the rest."""
    assigned = assign_folds(defect_types, k, seed, dataset)
    return [
        Fold(
            index=f,
            train=np.flatnonzero((assigned != f) & (assigned != (f + 1) % k)),
            val=np.flatnonzero(assigned == (f + 1) % k),
            test=np.flatnonzero(assigned == f),
        )
        for f in range(k)
    ]


class LabelledSource(Dataset):
    """Images from several splits with image labels: ``src[i]`` → (uint8 (C, H, W), float32 label), or
    (image, uint8 mask (H, W), label, bool mask_known) with `with_masks`. `mask_known` is false for an anomalous
    image without a mask file (image-level label only, e.g. ELPV): its all-zero mask means "unknown", not
    "defect-free". Decodes on access, as `ImageSource` does."""

    def __init__(self, parts: Sequence[tuple[ImageSource, Sequence[int]]], with_masks: bool = False) -> None:
        self.items = [(src, int(i)) for src, idx in parts for i in idx]
        self.with_masks = with_masks
        self.labels = np.array([int(src.labels[i]) for src, i in self.items], dtype=np.int64)
        self.defect_types = [src.defect_types[i] for src, i in self.items]
        self.paths = [src.paths[i] for src, i in self.items]
        shapes = {src.image_shape for src, _ in self.items}
        if len(shapes) > 1:
            raise ValueError(f"the parts' images differ in shape: {sorted(shapes)}")
        self.image_shape = shapes.pop() if shapes else (0, 0, 0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):  # noqa: ANN204 - a tuple whose length depends on with_masks
        src, j = self.items[i]
        label = torch.tensor(float(self.labels[i]))
        if not self.with_masks:
            return src[j], label
        return src[j], src.mask(j), label, torch.tensor(bool(src.has_mask[j]))

    def images(self) -> Dataset:
        """The same images without labels (uint8 (C, H, W) items): what `predict` streams."""
        return _ImagesOnly(self)


class _ImagesOnly(Dataset):
    def __init__(self, source: LabelledSource) -> None:
        self.source, self.image_shape = source, source.image_shape

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        src, j = self.source.items[i]
        return src[j]


@dataclass(frozen=True)
class FoldSources:
    train: LabelledSource
    val: LabelledSource
    test: LabelledSource


class FoldData:
    """A prepared dataset split for the supervised track: the anomaly pool, the normals, the folds."""

    def __init__(
        self,
        dataset_dir: Path,
        k: int,
        seed: int,
        *,
        image_size: int | None = None,
        center_crop: int | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or Path(dataset_dir).name

        def src(split: str) -> ImageSource:
            return ImageSource(dataset_dir, split, image_size=image_size, center_crop=center_crop)

        self.train_src, self.val_src, self.test_src = src("train"), src("val"), src("test")
        if np.any(self.train_src.labels != 0) or np.any(self.val_src.labels != 0):
            raise ValueError(f"{dataset_dir}: train/val splits must hold normal images only")
        self.anomalies = np.flatnonzero(self.test_src.labels == 1)
        self.test_normals = np.flatnonzero(self.test_src.labels == 0)
        if len(self.test_normals) == 0:
            raise ValueError(f"{dataset_dir}: the test split has no normal images to test against")
        types = [self.test_src.defect_types[i] for i in self.anomalies]
        self.folds = make_folds(types, k, seed, self.name)
        self.k = k

    @property
    def n_anomalies(self) -> int:
        return len(self.anomalies)

    def sources(self, fold: Fold, with_masks: bool = False) -> FoldSources:
        """Fold `fold`'s train / validation / test sources (labels 0 normal, 1 anomalous)."""
        a = self.anomalies
        train_normals = range(len(self.train_src))
        val_normals = range(len(self.val_src))
        return FoldSources(
            train=LabelledSource([(self.train_src, train_normals), (self.test_src, a[fold.train])], with_masks),
            val=LabelledSource([(self.val_src, val_normals), (self.test_src, a[fold.val])], with_masks),
            test=LabelledSource([(self.test_src, self.test_normals), (self.test_src, a[fold.test])], with_masks),
        )
