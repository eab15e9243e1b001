"""Cost of a cell: wall time, latency/throughput, peak memory, parameter count, artifact size, device.

All helpers are small and independent so a stage can measure exactly the call it cares about::

    with PeakMemory() as mem, Stopwatch() as sw:
        report = model.fit(train, val)
    lat = measure_latency(model.predict, test_images, warmup=3, repeats=20, batch_size=16)
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

if TYPE_CHECKING:  # torch is imported lazily: a metrics-only process should not pay ~0.5 GB RSS for it
    import torch
    from torch import nn


class Stopwatch:
    """Context manager: `seconds` = wall time of the block (perf_counter; CUDA synchronised at both ends)."""

    def __enter__(self) -> Stopwatch:
        _sync()
        self.seconds = 0.0
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync()
        self.seconds = time.perf_counter() - self._t0


def _cuda_in_use() -> bool:
    # if torch was never imported, nothing can be running on a GPU
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


def _sync() -> None:
    # CUDA kernels run asynchronously: without a sync a timer measures only the launch
    if _cuda_in_use():
        sys.modules["torch"].cuda.synchronize()


def measure_latency(
    predict_fn: Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    warmup: int = 3,
    repeats: int = 20,
    batch_size: int = 16,
) -> dict[str, float]:
    """Batch-1 latency and batched throughput of `predict_fn` on images (N, C, H, W).

    Latency: `warmup` untimed calls, then `repeats` timed calls on one image each (cycling through the
    set); median and 90th percentile in ms. Throughput: one timed pass over all N images in batches of
    `batch_size`, after one warm-up batch, in images/s.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if warmup < 0 or repeats < 1 or batch_size < 1:
        raise ValueError(f"need warmup >= 0, repeats >= 1, batch_size >= 1; got {warmup}, {repeats}, {batch_size}")
    n = images.shape[0]
    for i in range(warmup):
        predict_fn(images[i % n : i % n + 1])
    times = []
    for i in range(repeats):
        with Stopwatch() as sw:
            predict_fn(images[i % n : i % n + 1])
        times.append(sw.seconds)
    predict_fn(images[:batch_size])  # warm the batched path (allocator, kernels for this shape)
    with Stopwatch() as sw:
        for start in range(0, n, batch_size):
            predict_fn(images[start : start + batch_size])
    ms = np.asarray(times) * 1000.0
    return {
        "latency_ms_median": float(np.median(ms)),
        "latency_ms_p90": float(np.percentile(ms, 90)),
        "throughput_ips": float(n / sw.seconds) if sw.seconds > 0 else float("inf"),
    }


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0, `clear_refs` 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: peak resident memory of this process during the block (and peak CUDA memory).

    On Linux the kernel's own high-water mark (VmHWM) is reset on entry and read on exit: exact, no
    sampling. That reset is process-wide (it also lowers `ru_maxrss`), so do not nest two PeakMemory
    blocks. Elsewhere a thread samples RSS every `interval_s`, which can miss spikes shorter than that.

    After the block: `peak_rss_bytes`, `start_rss_bytes`, `peak_rss_delta_bytes` (peak − start),
    `method` ("vmhwm" or "sampled"), `peak_cuda_bytes` (None without CUDA or when torch was never imported).
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_rss_bytes = 0
        self.start_rss_bytes = 0
        self.peak_rss_delta_bytes = 0
        self.peak_cuda_bytes: int | None = None
        self.method = ""
        self._proc = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sampled = max(self._sampled, self._proc.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self.start_rss_bytes = self._proc.memory_info().rss
        self._sampled = self.start_rss_bytes
        torch = sys.modules.get("torch")
        self._cuda = torch is not None and torch.cuda.is_available()
        if self._cuda:
            sys.modules["torch"].cuda.reset_peak_memory_stats()
        if _reset_peak_rss() and _read_status_kb("VmHWM") is not None:
            self.method = "vmhwm"
        else:
            self.method = "sampled"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        now = self._proc.memory_info().rss
        if self.method == "vmhwm":
            self.peak_rss_bytes = max(now, 1024 * (_read_status_kb("VmHWM") or 0))
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_rss_bytes = max(self._sampled, now)
        self.peak_rss_delta_bytes = self.peak_rss_bytes - self.start_rss_bytes
        if self._cuda:
            self.peak_cuda_bytes = int(sys.modules["torch"].cuda.max_memory_allocated())


def count_parameters(module: nn.Module, trainable_only: bool = False, include_buffers: bool = False) -> int:
    """Number of parameter elements (optionally only trainable ones; optionally plus buffers, e.g. a
    PatchCore memory bank, which is learned state but not an nn.Parameter)."""
    n = sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
    if include_buffers:
        n += sum(b.numel() for b in module.buffers())
    return int(n)


def dir_size_bytes(path: Path | str) -> int:
    """Bytes of a file, or of all regular files under a directory (symlinks not followed)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"artifact {p} does not exist")
    if p.is_file():
        return p.stat().st_size
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file() and not q.is_symlink())


def device_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a cost was measured on: device string and name, CPU threads, and GPU memory when CUDA."""
    import torch

    dev = torch.device(device)
    info: dict[str, Any] = {"device": str(dev), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(name=props.name, total_memory_bytes=int(props.total_memory))
    else:
        info["name"] = platform.processor() or platform.machine()
    return info
