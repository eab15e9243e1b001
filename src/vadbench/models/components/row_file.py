"""Fixed-width rows appended to an anonymous temporary file and read back with `pread`, never a memory map.

Shared by PatchCore's on-disk bank (`coreset`) and the feature cache's disk mode (`feature_cache`). Reads
and writes go through the file, so the rows live in the kernel's page cache, which it reclaims under
pressure, and never count towards the process's resident memory. A memory map would: every page read or
written stays mapped, so an epoch over a mapped cache raises the process's RSS (and its OOM-killer score) to
the whole file. Measured with STFPM on 5,006 256-px images (4.6 GB of fp16 features): fit peak RSS 7.5 GB
through `np.memmap` vs 4.0 GB at 1,001 images (`benchmarks/results/scale.md`).

The file is created with `tempfile.TemporaryFile` (``$TMPDIR`` or `dir`): on Linux it never has a name, so a
killed run leaves nothing behind; elsewhere it is deleted on close.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


class RowFile:
    """Rows (N, D) of one dtype, appended in order; contiguous slices and indexed picks read back.

    Offers what `greedy_coreset_indices` uses of a feature matrix: `shape`, `ndim`, `device`, contiguous row
    slices (``rows[a:b]`` → tensor), and `take` for picks in any order.
    """

    ndim = 2
    device = torch.device("cpu")

    def __init__(self, rows: int, dim: int, dtype: torch.dtype = torch.float32, dir: Path | str | None = None) -> None:
        self.shape = torch.Size((rows, dim))
        self.dtype = dtype
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self._row_bytes = dim * self._np_dtype.itemsize
        self._file = tempfile.TemporaryFile(dir=dir)  # deleted when closed or collected
        self._count = 0

    @property
    def count(self) -> int:
        """Rows written so far."""
        return self._count

    def add(self, rows: torch.Tensor) -> None:
        """Append rows (n, D) of any float dtype or device, stored as `dtype` (torch's rounding)."""
        if rows.ndim != 2 or rows.shape[1] != self.shape[1] or self._count + rows.shape[0] > self.shape[0]:
            raise ValueError(f"rows {tuple(rows.shape)} do not fit a RowFile of shape {tuple(self.shape)}")
        self._file.write(memoryview(rows.detach().to("cpu", self.dtype).contiguous().numpy()).cast("B"))
        self._count += rows.shape[0]

    def __getitem__(self, index: slice) -> torch.Tensor:
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            raise IndexError("RowFile supports contiguous row slices only")
        if stop > self._count:
            raise IndexError(f"rows up to {stop:,} asked, {self._count:,} written")
        out = np.empty((max(0, stop - start), self.shape[1]), self._np_dtype)
        if out.size:
            self._read(out, start)
        return torch.from_numpy(out)

    def take(self, indices: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        """Rows at `indices` (M,), in that order: (M, D)."""
        picks = np.asarray(indices, dtype=np.int64).reshape(-1)
        if picks.size and (picks.min() < 0 or picks.max() >= self._count):
            bad = picks[(picks < 0) | (picks >= self._count)][0]
            raise IndexError(f"row {bad} of a RowFile with {self._count:,} rows")
        out = np.empty((len(picks), self.shape[1]), self._np_dtype)
        self._file.flush()
        for i, row in enumerate(picks.tolist()):
            self._read(out[i], row, flush=False)
        return torch.from_numpy(out)

    def _read(self, out: np.ndarray, row: int, flush: bool = True) -> None:
        if flush:
            self._file.flush()
        got = os.preadv(self._file.fileno(), [memoryview(out).cast("B")], row * self._row_bytes)
        if got != out.nbytes:
            raise OSError(f"short read from a temporary row file: {got} of {out.nbytes} bytes")

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        """Release the file (idempotent)."""
        self._file.close()
