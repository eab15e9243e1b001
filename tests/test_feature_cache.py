"""FeatureCache: RAM within the budget (exact), fp16 files on disk beyond it (never mapped, nothing left behind),
recomputation without disk; batches through the shared loader; the train/val budget split."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vadbench.data.source import TensorSource, loader, to_float
from vadbench.models.components import feature_cache as fc
from vadbench.models.components.feature_cache import FeatureCache, cache_splits

N, SIZE = 10, 8
PER_IMAGE_FP32 = (SIZE * SIZE + (SIZE // 2) ** 2) * 4  # two levels of 1 channel


class Features:
    """Two levels: a scaled copy and a 2×2 average pool; counts its calls."""

    def __init__(self, scale: float = 3.0) -> None:
        self.calls, self.scale = 0, scale

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        return [x * self.scale, F.avg_pool2d(x, 2)]


def _images(n: int = N) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _expected(images: torch.Tensor, fn: Features) -> list[torch.Tensor]:
    return [f.float() for f in Features(fn.scale)(to_float(images, "cpu"))]


def _read_all(cache: FeatureCache, batch_size: int = 3) -> list[torch.Tensor]:
    """Every item through the loader (in order) and `to_device`, concatenated per level."""
    parts = [cache.to_device(b, torch.device("cpu")) for b in loader(cache, batch_size)]
    return [torch.cat(level) for level in zip(*parts)]


def test_ram_when_it_fits_is_exact():
    images, fn = _images(), Features()
    cache = FeatureCache.build(fn, TensorSource(images), batch_size=4, device="cpu", ram_bytes=N * PER_IMAGE_FP32)
    assert cache.mode == "ram" and cache.ram_bytes == N * PER_IMAGE_FP32 and len(cache) == N
    assert fn.calls == 3  # one pass: ceil(10 / 4) batches
    for got, want in zip(_read_all(cache), _expected(images, fn)):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    # a seeded batch is the same as fancy-indexing the stored levels (what caching everything did)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:4]
    batch = next(iter(loader(cache, 4, generator=torch.Generator().manual_seed(1))))
    for got, level in zip(batch, cache.levels):
        assert torch.equal(got, level[order])
    item = cache[2]
    assert isinstance(item, tuple) and [t.shape for t in item] == [(1, SIZE, SIZE), (1, SIZE // 2, SIZE // 2)]


def test_over_budget_goes_to_disk_fp16_and_leaves_nothing(tmp_path):
    images, fn = _images(), Features()
    cache = FeatureCache.build(
        fn, images, batch_size=4, device="cpu", ram_bytes=N * PER_IMAGE_FP32 - 1, tmp_root=tmp_path
    )
    assert cache.mode == "disk" and cache.ram_bytes == 0
    assert list(tmp_path.iterdir()) == []  # anonymous temporary files: no name on Linux
    got = _read_all(cache, batch_size=4)
    for g, want in zip(got, _expected(images, fn)):
        assert g.dtype == torch.float32
        assert torch.equal(g, want.half().float())  # exactly the fp16 rounding of the features
    shuffled = next(iter(loader(cache, 5, generator=torch.Generator().manual_seed(2))))
    order = torch.randperm(N, generator=torch.Generator().manual_seed(2))[:5]
    assert torch.equal(shuffled[0].float(), got[0][order])
    cache.close()
    cache.close()  # idempotent
    assert cache.closed


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from Linux's /proc")
def test_disk_cache_is_never_memory_mapped(tmp_path):
    """Read through the file, not a mapping: mapped pages an epoch touches would stay in the process's
    resident memory (STFPM at 5,006 images: 7.5 GB peak RSS memory-mapped)."""
    cache = FeatureCache.build(Features(), _images(), batch_size=4, device="cpu", ram_bytes=0, tmp_root=tmp_path)
    assert cache.mode == "disk"
    _read_all(cache)
    files = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(tmp_path) in line]
    cache.close()
    assert files == []


def test_no_room_on_disk_or_disk_unwanted_recomputes(monkeypatch):
    images, fn = _images(), Features()
    monkeypatch.setattr(fc, "_disk_room", lambda root: 0)
    with pytest.warns(fc.FeatureCacheWarning, match=r"has 0\.0 GiB free: the backbone reruns every epoch"):
        cache = FeatureCache.build(fn, images, batch_size=4, device="cpu", ram_bytes=16)
    assert cache.mode == "recompute" and cache.ram_bytes == 0
    for got, want in zip(_read_all(cache, batch_size=N), _expected(images, fn)):
        assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fc.FeatureCacheWarning)  # no disk asked for: recomputing is no surprise
        small = FeatureCache.build(Features(), images, batch_size=4, device="cpu", ram_bytes=16, disk=False)
    assert small.mode == "recompute"
    fn0 = Features()
    cache0 = FeatureCache.build(fn0, images, batch_size=4, device="cpu", ram_bytes=0, disk=False)
    assert cache0.mode == "recompute" and fn0.calls == 0  # budget 0: nothing extracted up front
    assert cache0[3].dtype == torch.uint8 and torch.equal(cache0[3], images[3])


def test_values_beyond_fp16_range_recompute(tmp_path):
    images = _images()
    with pytest.warns(fc.FeatureCacheWarning, match="beyond fp16's range"):
        cache = FeatureCache.build(
            Features(scale=1e6), images, batch_size=4, device="cpu", ram_bytes=0, tmp_root=tmp_path
        )
    assert cache.mode == "recompute"
    assert list(tmp_path.iterdir()) == []


def test_recompute_extracts_with_the_threads_it_was_built_with():
    seen = []

    def fn(x: torch.Tensor) -> list[torch.Tensor]:
        seen.append(torch.get_num_threads())
        return [x]

    before = torch.get_num_threads()
    cache = FeatureCache.build(fn, _images(), batch_size=4, device="cpu", ram_bytes=0, disk=False)
    torch.set_num_threads(1)  # CFlow trains its fiber steps on one thread
    try:
        cache.to_device(next(iter(loader(cache, 4))), torch.device("cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen == [before]


def test_cache_splits_share_one_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(fc.tempfile, "gettempdir", lambda: str(tmp_path))
    train, val = _images(6), _images(4)
    budget_gb = 6 * PER_IMAGE_FP32 / 2**30  # exactly the train split
    t, v = cache_splits(Features(), TensorSource(train), TensorSource(val), 4, torch.device("cpu"), budget_gb)
    assert (t.mode, v.mode) == ("ram", "disk")
    # one cache's to_device serves the other's batches (the loop passes one batch_fn for train and val)
    assert len(t.to_device(next(iter(loader(v, 4))), torch.device("cpu"))) == 2
    t.close(), v.close()
    t, v = cache_splits(Features(), TensorSource(train), None, 4, torch.device("cpu"), 0.0)
    assert t.mode == "recompute" and v is None


def test_cache_splits_close_both_caches_when_the_block_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(fc.tempfile, "gettempdir", lambda: str(tmp_path))
    train, val = _images(6), _images(4)
    with pytest.raises(RuntimeError, match="boom"):
        with cache_splits(Features(), TensorSource(train), TensorSource(val), 4, torch.device("cpu"), 1e-9) as caches:
            t, v = caches
            assert (t.mode, v.mode) == ("disk", "disk") and list(tmp_path.iterdir()) == []  # anonymous files
            raise RuntimeError("boom")  # a failed fit still releases the files
    assert t.closed and v.closed
    assert fc.cache_modes(t, v) == {"train": "disk", "val": "disk"} and fc.cache_modes(t, None)["val"] is None
