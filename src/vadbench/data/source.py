"""The streaming data contract: a split is a sized, indexable source of uint8 images, never one float tensor.

Every model's ``fit(train, val)`` receives an `ImageSource`-like ``torch.utils.data.Dataset``: ``len(src)``
images, ``src[i]`` a uint8 tensor (C, H, W) with C = 1 (grey) or 3 (RGB), all of one shape
(`src.image_shape`). Batches travel as uint8 (a quarter of float32's bytes; pinned on CUDA) and become
float32 in [0, 1] on the device, batch by batch (`float_batches`), so host memory never holds a split::

    for x in float_batches(train, batch_size=16, device=dev):             # in order (statistics, caches)
    for x in float_batches(train, 16, dev, generator=gen):                # seeded shuffle (training)

`ImageSource` decodes a prepared dataset's PNGs on access (resize, optional centre crop); decoding may run
in DataLoader workers (`num_workers`). `TensorSource` wraps an in-memory tensor (tests, small tools).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from vadbench.data.manifest import SPLITS, dataset_center_crop, dataset_channels, read_manifest


def _decode(path: Path, channels: int, size: int | None, crop: int | None) -> np.ndarray:
    """One image file → uint8 (C, H, W): converted to L/RGB, resized (bilinear), centre-cropped."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.array(im, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)
    except OSError as err:
        raise ValueError(f"{path}: cannot decode the image ({err})") from None
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return center_crop(arr, crop, path) if crop is not None else arr


def _decode_mask(path: Path, size: int | None, crop: int | None, shape: tuple[int, int]) -> np.ndarray:
    """A mask file → uint8 (H, W) in {0, 1}, resized with nearest neighbours, cropped like its image."""
    with Image.open(path) as im:
        im = im.convert("L")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.NEAREST)
        arr = np.asarray(im)
    arr = (arr >= 128).astype(np.uint8)[None]  # non-binary masks: threshold at half range
    arr = center_crop(arr, crop, path)[0] if crop is not None else arr[0]
    if arr.shape != shape:
        raise ValueError(f"mask {path} has shape {arr.shape}, its image {shape}")
    return arr


def center_crop(arr: np.ndarray, size: int, path: Path) -> np.ndarray:
    """(C, H, W) → (C, size, size), centred (extra odd pixel goes to the bottom/right)."""
    h, w = arr.shape[1:]
    if size > h or size > w:
        raise ValueError(f"{path}: center_crop {size} is larger than the image ({h}x{w}); lower center_crop")
    top, left = (h - size) // 2, (w - size) // 2
    return arr[:, top : top + size, left : left + size]


class ImageSource(Dataset):
    """One split of a prepared dataset (``manifest.csv``), decoded image by image.

    ``src[i]`` → uint8 (C, H, W); ``src.mask(i)`` → uint8 (H, W) in {0, 1} (all zero without ground
    truth); `labels`, `has_mask`, `defect_types`, `paths` describe every image without decoding any.
    `channels` None → 1 if the dataset is grey, else 3; `center_crop` None → the dataset's own choice.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        *,
        image_size: int | None = None,
        channels: int | None = None,
        center_crop: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.split, self.image_size = Path(root), split, image_size
        self.rows = [r for r in read_manifest(self.root) if r.split == split]
        self.channels = dataset_channels(self.root) if channels is None else channels
        self.crop = dataset_center_crop(self.root) if center_crop is None else center_crop
        self.labels = np.array([r.label for r in self.rows], dtype=np.int64)
        self.has_mask = np.array([bool(r.mask_path) or r.label == 0 for r in self.rows], dtype=bool)
        self.defect_types = [r.defect_type for r in self.rows]
        self.paths = [r.path for r in self.rows]
        self._shape: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image (from the first one when `image_size` does not fix it)."""
        if self._shape is None:
            side = self.crop or self.image_size
            if side is not None:
                self._shape = (self.channels, side, side)
            elif self.rows:
                self._shape = tuple(self._decode(0).shape)  # type: ignore[assignment]
            else:
                self._shape = (self.channels, 0, 0)
        return self._shape

    def _decode(self, i: int) -> np.ndarray:
        return _decode(self.root / self.rows[i].path, self.channels, self.image_size, self.crop)

    def __getitem__(self, i: int) -> torch.Tensor:
        arr = self._decode(i)
        if arr.shape != self.image_shape:
            raise ValueError(
                f"{self.root / self.rows[i].path}: image is {arr.shape[1]}x{arr.shape[2]}, the split's "
                f"{self.image_shape[1]}x{self.image_shape[2]}; set image_size for this dataset"
            )
        return torch.from_numpy(np.ascontiguousarray(arr))

    def mask(self, i: int) -> torch.Tensor:
        r = self.rows[i]
        hw = self.image_shape[1:]
        if not r.mask_path:
            return torch.zeros(hw, dtype=torch.uint8)
        return torch.from_numpy(
            np.ascontiguousarray(_decode_mask(self.root / r.mask_path, self.image_size, self.crop, hw))
        )

    def with_masks(self) -> Dataset:
        """The same split yielding (image uint8 (C, H, W), mask uint8 (H, W)) pairs."""
        return _WithMasks(self)


class _WithMasks(Dataset):
    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source[i], self.source.mask(i)


class TensorSource(Dataset):
    """An in-memory (N, C, H, W) tensor as a source: uint8 as is, float in [0, 1] quantised to uint8.

    Quantisation is exact for images that came from 8-bit files (every prepared dataset)."""

    def __init__(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (N, C, H, W) tensor with C = 1 or 3, got {shape}")
        if images.dtype != torch.uint8:
            if not images.is_floating_point():
                raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
            images = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        self.images = images.cpu()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def as_source(data: Dataset | torch.Tensor) -> Dataset:
    """A tensor → `TensorSource`; any sized Dataset is returned as it is."""
    if isinstance(data, torch.Tensor):
        return TensorSource(data)
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"expected a sized, indexable image source or a tensor, got {type(data).__name__}")
    return data


def image_shape(source: Dataset) -> tuple[int, int, int]:
    """(C, H, W) of a source's images (its `image_shape`, or that of its first item)."""
    shape = getattr(source, "image_shape", None)
    return tuple(shape) if shape is not None else tuple(source[0].shape)  # type: ignore[return-value]


#: DataLoader decode workers when a caller does not say (`set_loader_workers`; 0 = decode in the main process)
_LOADER_WORKERS = 0


def set_loader_workers(n: int) -> None:
    """Decode images in `n` DataLoader worker processes from now on (stages set it from params.loader_workers).

    Worth it with many cores or slow decodes (large PNGs); on 2 cores the main process is as fast."""
    global _LOADER_WORKERS
    if n < 0:
        raise ValueError(f"loader workers must be ≥ 0, got {n}")
    _LOADER_WORKERS = n


class SeededBatches(Sampler[list[int]]):
    """Index batches over range(n): one `torch.randperm(n, generator)` per pass when a generator is given
    (the same order on CPU and CUDA, independent of any other RNG use), else in order."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator) if self.generator is not None else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            yield order[start : start + self.batch_size].tolist()


def loader(
    source: Dataset,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    num_workers: int | None = None,
    pin_memory: bool = False,
    indices: Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader of collated uint8 batches over `source` (or its `indices`), seeded order or in order.

    `num_workers` None → the process default (`set_loader_workers`). Only the main process draws the
    order, so results do not depend on the worker count."""
    if indices is not None:
        source = torch.utils.data.Subset(source, list(indices))
    workers = _LOADER_WORKERS if num_workers is None else num_workers
    if isinstance(source, TensorSource):
        workers = 0  # already in memory: worker processes would only copy it
    return DataLoader(
        source,
        batch_sampler=SeededBatches(len(source), batch_size, generator),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def to_float(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (B, C, H, W) → float32 in [0, 1] on `device` (the copy travels as uint8). Floats pass through."""
    device = torch.device(device)
    if batch.dtype == torch.uint8:
        return batch.to(device, non_blocking=True).float().div_(255.0)
    return batch.to(device, torch.float32)


def float_batches(
    source: Dataset | torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    *,
    generator: torch.Generator | None = None,
    num_workers: int | None = None,
) -> Iterator[torch.Tensor]:
    """Float32 batches (B, C, H, W) in [0, 1] on `device`, seeded shuffle when `generator` is given."""
    device = torch.device(device)
    src = as_source(source)
    for batch in loader(
        src, batch_size, generator=generator, num_workers=num_workers, pin_memory=device.type == "cuda"
    ):
        yield to_float(batch, device)
