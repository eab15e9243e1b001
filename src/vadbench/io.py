"""Atomic file output and hashing: nothing half-written ever appears at a final path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def remove_leftovers(final: Path) -> list[Path]:
    """Delete ``.<name>.tmp-*`` / ``.<name>.old-*`` beside `final`: what a killed run (SIGKILL, power loss)
    left behind. One writer per output at a time (DVC runs a stage once), so none of them is live."""
    final = Path(final)
    stale = sorted(
        p for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*") for p in final.parent.glob(pattern)
    )
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` in one rename.

    On error the temp dir is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # rename the old dir aside first so the swap itself is a single rename
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `final` for writing; rename it over `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_path(final: Path) -> contextlib.AbstractContextManager[Path]:
    """Yield a temp *path* (not opened) beside `final`, renamed over it on success.

    For writers that insist on a filename (PIL, matplotlib, torch.save, safetensors).
    """
    return _atomic_path(Path(final))


@contextlib.contextmanager
def _atomic_path(final: Path) -> Iterator[Path]:
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.tmp-", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write JSON deterministically (sorted keys, fixed float repr) and atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_file(path, "w") as fh:
        fh.write(text)


def write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: Path) -> str:
    """Hash of every file's relative path and content under `root`, in sorted order."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def load_tensors(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a one-line error when the file holds more than tensors.

    torch's own message suggests ``weights_only=False``, which would run arbitrary code from the file: we
    never do that, and never suggest it.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: refused to load: it holds Python objects beyond tensors and plain containers, which "
            f"vadbench never unpickles ({first.split('.')[0]}). Use a file written by vadbench or a "
            "plain state dict / .safetensors file; rerun the stage that writes it."
        ) from None
    except (EOFError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable torch file ({type(err).__name__}: {str(err)[:200]})") from None


def preflight(directory: Path, need_bytes: int = 0) -> None:
    """Fail before the work, not after it: `directory` must be creatable, writable and hold `need_bytes`.

    Raises OSError (errno EROFS/EACCES/ENOSPC) naming the directory; `cli.stage_main` prints it in one line.
    """
    import errno

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(directory)) from None
    free = shutil.disk_usage(directory).free
    if need_bytes > free:
        raise OSError(
            errno.ENOSPC, f"needs about {need_bytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free", str(directory)
        )


def release_rows(arr: Any, start: int, stop: int) -> None:
    """Drop rows [start, stop) of a memory-mapped array from this process's resident memory.

    Pages of a file mapping count in RSS once touched and stay until unmapped; a streamed pass over a
    large memmap (scores written batch by batch, metrics read chunk by chunk) would otherwise grow RSS
    with the split. Dirty pages are written back first (msync), then MADV_DONTNEED releases them; the
    data stays in the file. A no-op for ordinary arrays.
    """
    import mmap

    mm = getattr(arr, "_mmap", None)
    if mm is None or stop <= start or not hasattr(mm, "madvise"):
        return
    row = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
    first = arr.offset % mmap.ALLOCATIONGRANULARITY + start * row  # np.memmap maps from an aligned offset
    last = min(first + (stop - start) * row, len(mm))
    lo = first - first % mmap.PAGESIZE
    hi = -(-last // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = min(hi, len(mm))
    if hi > lo:
        mm.flush(lo, hi - lo)
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def read_rows(arr: Any, rows: Any) -> np.ndarray:
    """Copy rows `rows` of an (N, ...) array into a new in-memory array, releasing each from RSS once read.

    Reading a strided or scattered subset of a memory-mapped array straight (``np.asarray(arr[::k])``,
    fancy indexing) faults in far more than the rows asked for: the kernel maps whole page-cache folios
    around each access, and a sample of every 7th map of a 400 MB test split made the whole file
    resident (measured). One row at a time, each released after the copy, keeps it to the rows' size.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
    for j, i in enumerate(rows):
        out[j] = arr[i]
        release_rows(arr, int(i), int(i) + 1)
    return out
