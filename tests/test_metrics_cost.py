"""Cost helpers: call counts, memory peaks that a block really caused, sizes and parameter counts."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from vadbench.metrics.cost import PeakMemory, Stopwatch, count_parameters, device_info, dir_size_bytes, measure_latency


def test_measure_latency_times_single_images_then_batches():
    calls: list[int] = []

    def predict(batch: torch.Tensor) -> None:
        calls.append(batch.shape[0])
        time.sleep(0.002)

    out = measure_latency(predict, torch.zeros(10, 1, 4, 4), warmup=2, repeats=5, batch_size=4)
    assert calls == [1] * 7 + [4] + [4, 4, 2]  # warm-up, timed singles, batched warm-up, one batched pass
    assert out["latency_ms_median"] >= 2.0 and out["latency_ms_p90"] >= out["latency_ms_median"]
    assert 0 < out["throughput_ips"] <= 10 / (3 * 0.002)  # 3 batched calls of >= 2 ms for 10 images
    with pytest.raises(ValueError, match="N, C, H, W"):
        measure_latency(predict, torch.zeros(0, 1, 4, 4))


def test_peak_memory_sees_a_freed_allocation():
    with PeakMemory() as mem, Stopwatch() as sw:
        big = np.ones(40_000_000)  # 320 MB, touched, then freed inside the block
        del big
    assert mem.peak_rss_delta_bytes > 250e6
    assert mem.peak_rss_bytes >= mem.start_rss_bytes
    assert mem.method in ("vmhwm", "sampled")
    assert sw.seconds > 0
    with PeakMemory() as small:
        np.ones(1000)
    assert small.peak_rss_delta_bytes < 100e6  # the earlier peak does not leak into a later block


def test_count_parameters_and_buffers():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert count_parameters(net) == 3 * 4 + 4 + 4 + 4
    net[0].weight.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 4 + 8
    assert count_parameters(net, include_buffers=True) == 24 + 4 + 4 + 1  # running mean/var, num_batches


def test_dir_size_and_device(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    assert dir_size_bytes(tmp_path) == 123
    assert dir_size_bytes(tmp_path / "a.bin") == 100
    with pytest.raises(FileNotFoundError, match="missing"):
        dir_size_bytes(tmp_path / "missing")
    info = device_info("cpu")
    assert info["device"] == "cpu" and info["cpu_count"] >= 1


def test_peak_memory_sampling_fallback(monkeypatch):
    # where /proc/self/clear_refs is not writable (non-Linux, some sandboxes) a thread samples RSS
    monkeypatch.setattr("vadbench.metrics.cost._reset_peak_rss", lambda: False)
    with PeakMemory(interval_s=0.001) as mem:
        big = np.ones(40_000_000)
        time.sleep(0.05)  # held long enough for several samples
        del big
    assert mem.method == "sampled"
    assert mem.peak_rss_delta_bytes > 250e6
