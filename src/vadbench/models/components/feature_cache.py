"""Frozen-backbone features of a split, extracted once and read back every epoch, under a memory budget.

Models that train only heads on fixed features (FastFlow, CFlow: frozen backbone, no augmentation) would
otherwise rerun the backbone every epoch. `FeatureCache.build` streams a source through a features function
once, in order, and stores the per-level maps where the budget allows::

    cache = FeatureCache.build(model._features, train, batch_size=16, device=dev, ram_bytes=2 * 2**30)
    train(..., train=cache, batch_fn=cache.to_device, ...)     # items: tuples of per-level tensors
    cache.close()                                              # or `with FeatureCache.build(...) as cache:`

Storage, decided once from N × (bytes of one image's maps):

- ``ram``: fp32 tensors (N, c, h, w) per level, when they fit `ram_bytes`. Values are exactly what the
  features function returned, so training is bit-identical to extracting everything up front.
- ``disk``: over the budget, one fp16 `RowFile` per level (an anonymous temporary file in ``$TMPDIR`` or
  `tmp_root`, never inside an output), when that file system has the room (plus 1 GiB to spare). Rows are
  written and read with `pwrite`/`pread`, not a memory map: only the batch being read sits in the process's
  memory, the rest in the kernel's page cache, reclaimably. (Memory-mapped, every page an epoch touched
  stayed resident in the process: STFPM's fit peak RSS was 7.5 GB at 5,006 256-px images against 4.0 GB
  at 1,001.) The file has no name on Linux, so a killed run leaves nothing behind. A map with values
  beyond fp16's range (|x| > 65504) abandons the disk cache for recomputation.
- ``recompute``: no disk wanted (`disk=False`, i.e. ``feature_cache_gb: 0``) or no room (a
  `FeatureCacheWarning` names the sizes and the directory): items are the
  source's uint8 images and `to_device` runs the features function on each batch (the backbone runs every
  epoch, memory stays flat).

fp16 on disk vs fp32 in RAM, measured on the toy set of ``tests/conftest.py`` (20 train / 4 val / 16 test
images, 64², random ResNet-18, 3 epochs; FastFlow 2 flow steps on layer1–3, CFlow 2 blocks on layer2–3):
FastFlow (layer-normalised features) max |Δ score| 3.5e-05 on scores in −0.63…−0.22; CFlow (raw
features) max |Δ score| 1.6e-05 on scores in 0.17…0.87; image AUROC identical (1.0 both ways).
Recomputation gave bit-identical scores there (CPU): eval-mode features do not depend on the batch.
"""

from __future__ import annotations

import itertools
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import Field
from torch.utils.data import Dataset

from vadbench.data.source import as_source, float_batches, to_float
from vadbench.models.components.row_file import RowFile

#: float images (B, C, H, W) on the device → per-level maps (B, c_l, h_l, w_l)
FeaturesFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]

MODES = ("ram", "disk", "recompute")
#: a disk cache leaves at least this much free on its file system
DISK_SPARE_BYTES = 2**30
_FP16_MAX = float(torch.finfo(torch.float16).max)


class FeatureCacheWarning(UserWarning):
    """A cache that wanted disk fell back to recomputing features every epoch (correct, slower)."""


class FeatureCache(Dataset):
    """A split's features, item i = tuple of per-level maps (c_l, h_l, w_l), or (``recompute``) image i.

    Build with `FeatureCache.build`; pass `to_device` as the training loop's ``batch_fn``: it turns a
    collated batch (of any mode) into per-level float32 maps on the device.
    """

    def __init__(
        self,
        mode: str,
        features_fn: FeaturesFn,
        source: Dataset,
        levels: list[torch.Tensor] | list[RowFile] | None = None,
        shapes: list[tuple[int, ...]] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.features_fn, self.source = mode, features_fn, source
        self.levels: list[Any] = levels or []
        self.shapes = shapes or []  # per-level item shapes (c, h, w): a disk row is one flattened item
        self._threads = torch.get_num_threads()  # recomputation extracts with the threads the cache was built with

    # -- building ----------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        features_fn: FeaturesFn,
        source: Dataset | torch.Tensor,
        *,
        batch_size: int,
        device: torch.device | str,
        ram_bytes: float,
        disk: bool = True,
        tmp_root: Path | str | None = None,
        num_workers: int = 0,
    ) -> FeatureCache:
        """Extract `source`'s features once (in order, `batch_size` images at a time) into RAM (fp32) when
        all of them fit `ram_bytes`, else onto disk (fp16 `RowFile`s under `tmp_root`, default ``$TMPDIR``)
        when `disk` and there is room, else a recomputing cache. `ram_bytes` ≤ 0 and no disk → recompute
        without extracting anything."""
        source = as_source(source)
        n = len(source)
        if n == 0:
            raise ValueError("cannot cache the features of an empty split")
        if ram_bytes <= 0 and not disk:
            return cls("recompute", features_fn, source)
        batches = float_batches(source, batch_size, device, num_workers=num_workers)
        first = [f.detach().float() for f in features_fn(next(batches))]
        shapes = [tuple(f.shape[1:]) for f in first]
        per_image = sum(math.prod(s) for s in shapes)
        if n * per_image * 4 <= ram_bytes:
            levels: list[Any] = [torch.empty((n, *s), dtype=torch.float32) for s in shapes]
            mode = "ram"
        elif disk and (room := _disk_room(tmp_root)) >= n * per_image * 2 + DISK_SPARE_BYTES:
            mode = "disk"
            levels = [RowFile(n, math.prod(s), torch.float16, dir=tmp_root) for s in shapes]
        else:
            if disk:  # wanted disk, had no room (without disk, recomputing is what the caller asked for)
                root = tmp_root if tmp_root is not None else tempfile.gettempdir()
                _warn_recompute(
                    f"{n:,} images' features need {n * per_image * 4 / 2**30:.1f} GiB in RAM (budget "
                    f"feature_cache_gb {ram_bytes / 2**30:.1f}) or {n * per_image * 2 / 2**30:.1f} GiB + 1 GiB spare "
                    f"on disk, and {root} has {room / 2**30:.1f} GiB free",
                    "Point TMPDIR at a larger disk or raise feature_cache_gb.",
                )
            return cls("recompute", features_fn, source)
        cache = cls(mode, features_fn, source, levels, shapes)
        start = 0
        for feats in itertools.chain([first], (features_fn(x) for x in batches)):
            stop = start + len(feats[0])
            for store, f in zip(levels, feats, strict=True):
                f = f.detach().float().cpu()
                if mode == "ram":
                    store[start:stop] = f
                elif f.abs().max() > _FP16_MAX:  # beyond fp16's range: inf on disk
                    cache.close()
                    _warn_recompute(f"features beyond fp16's range (|x| > {_FP16_MAX:.0f}) cannot go to disk")
                    return cls("recompute", features_fn, source)
                else:
                    store.add(f.flatten(1))
            start = stop
        return cache

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """A batch read at once (a fancy index per level, not one read per item); the DataLoader collates it."""
        if self.mode == "recompute":
            return [self.source[i] for i in indices]
        if self.mode == "ram":
            return [tuple(level[i] for level in self.levels) for i in indices]
        if self.closed:
            raise RuntimeError("the feature cache was closed")
        rows = [level.take(indices).view(-1, *shape) for level, shape in zip(self.levels, self.shapes, strict=True)]
        return [tuple(r[j] for r in rows) for j in range(len(indices))]  # fp16, as stored

    def to_device(self, batch: Any, device: torch.device) -> list[torch.Tensor]:
        """A collated batch → per-level float32 maps (B, c_l, h_l, w_l) on `device` (the loop's ``batch_fn``).

        Any mode's batch: stored maps (a list per level) move, images (one uint8 tensor) go through the
        features function — so one cache's `to_device` also serves another of the same function (train in
        RAM, val recomputed)."""
        if not isinstance(batch, torch.Tensor):
            return [f.to(device, non_blocking=True).float() for f in batch]
        with torch.no_grad(), _threads(self._threads, device):
            return [f.float() for f in self.features_fn(to_float(batch, device))]

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def ram_bytes(self) -> int:
        """Bytes this cache holds in RAM (0 on disk or recomputing)."""
        return sum(t.numel() * t.element_size() for t in self.levels) if self.mode == "ram" else 0

    @property
    def closed(self) -> bool:
        return self.mode == "disk" and not self.levels

    def close(self) -> None:
        """Drop the stored maps (a disk cache's temporary files). Idempotent."""
        if self.mode == "disk":
            for level in self.levels:
                level.close()
        self.levels = []

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _disk_room(tmp_root: Path | str | None) -> int:
    root = Path(tmp_root) if tmp_root is not None else Path(tempfile.gettempdir())
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return 0


def _warn_recompute(reason: str, advice: str = "") -> None:
    """A `FeatureCacheWarning` for a cache that falls back to recomputing: why, and what to change."""
    message = f"feature cache: {reason}: the backbone reruns every epoch (same results, slower)."
    warnings.warn(f"{message} {advice}".strip(), FeatureCacheWarning, stacklevel=3)


class _threads:
    """On CPU, run the block with `n` torch intra-op threads (a caller may have lowered them), then restore."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.n, self.cpu = n, torch.device(device).type == "cpu"

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        if self.cpu and self.before != self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.cpu and torch.get_num_threads() != self.before:
            torch.set_num_threads(self.before)


class SplitCaches(NamedTuple):
    """The train and val caches of one fit: unpacks as ``(train, val)`` and closes both on leaving a
    ``with`` block, so no model repeats the close-in-``finally`` dance::

        with cache_splits(model._features, train, val, 16, device, 2.0) as (train_feats, val_feats):
            report = train(..., train=train_feats, val=val_feats, batch_fn=train_feats.to_device)
        report["feature_cache"] = cache_modes(train_feats, val_feats)
    """

    train: FeatureCache
    val: FeatureCache | None

    def close(self) -> None:
        self.train.close()
        if self.val is not None:
            self.val.close()

    def __enter__(self) -> SplitCaches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cache_modes(train: FeatureCache, val: FeatureCache | None) -> dict[str, str | None]:
    """Where each split's features lived (``ram`` / ``disk`` / ``recompute``): the fit report's entry."""
    return {"train": train.mode, "val": val.mode if val is not None else None}


def cache_splits(
    features_fn: FeaturesFn,
    train: Dataset,
    val: Dataset | None,
    batch_size: int,
    device: torch.device,
    budget_gb: float,
) -> SplitCaches:
    """Train and val features under one RAM budget (val gets what train left); disk unless `budget_gb` is 0."""
    budget, disk = budget_gb * 2**30, budget_gb > 0
    train_feats = FeatureCache.build(
        features_fn, train, batch_size=batch_size, device=device, ram_bytes=budget, disk=disk
    )
    if val is None:
        return SplitCaches(train_feats, None)
    try:
        val_feats = FeatureCache.build(
            features_fn, val, batch_size=batch_size, device=device, ram_bytes=budget - train_feats.ram_bytes, disk=disk
        )
    except BaseException:
        train_feats.close()
        raise
    return SplitCaches(train_feats, val_feats)


def feature_cache_field() -> Any:
    """The ``feature_cache_gb`` field of a model's Params (FastFlow, CFlow)."""
    return Field(
        2.0,
        ge=0,
        description="RAM (GiB) for train+val features cached once in fp32; beyond it fp16 files in $TMPDIR, "
        "else the backbone reruns every epoch; 0 = always rerun it",
    )
