"""Per-position map standardisation: removes position-bound artefacts of normals, keeps real anomalies."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadbench.data.source import TensorSource
from vadbench.models.components.map_normalization import PositionalMapNorm, RunningMoments


def _maps(n: int, gen: torch.Generator, defect: bool = False) -> torch.Tensor:
    """(n, 32, 32) maps: small noise inside, a loud and noisy 3-px border (the short-training artefact),
    and for `defect` a 4×4 bump in the interior, weaker than the border's typical values."""
    maps = 0.1 * torch.rand(n, 32, 32, generator=gen)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[3:-3, 3:-3] = False
    maps[:, border] += 2.0 + torch.rand(n, int(border.sum()), generator=gen)
    if defect:
        for i in range(n):
            y, x = torch.randint(6, 22, (2,), generator=gen).tolist()
            maps[i, y : y + 4, x : x + 4] += 1.0
    return maps


def test_border_artefact_no_longer_decides_the_image_score():
    gen = torch.Generator().manual_seed(0)
    val, normal, anomalous = _maps(20, gen), _maps(30, gen), _maps(30, gen, defect=True)
    test = torch.cat([normal, anomalous])
    labels = [0] * 30 + [1] * 30
    raw_auroc = roc_auc_score(labels, test.flatten(1).amax(1))
    norm = PositionalMapNorm("per_position")
    norm.fit(val, "toy")
    auroc = roc_auc_score(labels, norm(test).flatten(1).amax(1))
    assert raw_auroc < 0.7 and auroc > 0.95, (raw_auroc, auroc)
    z = norm(val)  # validation maps come out centred with unit-ish spread at every position
    assert z.mean(0).abs().max() < 0.5 and 0.5 < float(z.std(0).median()) < 1.5


def test_none_is_identity_and_errors_are_clear():
    maps = torch.rand(3, 8, 8)
    ident = PositionalMapNorm("none")
    ident.fit(maps, "toy")
    assert torch.equal(ident(maps), maps)
    norm = PositionalMapNorm("per_position")
    with pytest.raises(RuntimeError, match="before fit"):
        norm(maps)
    with pytest.raises(ValueError, match="models.toy.map_normalization"):
        norm.fit(maps[:1], "toy")
    with pytest.raises(ValueError, match="models.toy.map_normalization"):
        norm.calibrate(lambda b: b[:, 0], None, 4, torch.device("cpu"), "toy")
    norm.fit(maps, "toy")
    with pytest.raises(ValueError, match="training image size"):
        norm(torch.rand(2, 16, 16))
    with pytest.raises(ValueError, match="needs at least 2 validation images, got 1"):
        norm.calibrate(lambda b: b[:, 0], torch.rand(1, 1, 8, 8), 4, torch.device("cpu"), "toy")
    # calibrate runs the map function over the validation images in batches
    images = torch.rand(5, 1, 8, 8)
    norm.calibrate(lambda b: b[:, 0], images, 2, torch.device("cpu"), "toy")
    assert norm.mean.shape == (8, 8) and bool((norm.std > 0).all())


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_streamed_moments_equal_whole_split_moments(offset):
    """Running sums over batches of any size give maps.mean(0) and the unbiased maps.std(0) of all maps at
    once to float64 precision, also when the maps' mean is large against their spread (shifted sums)."""
    gen = torch.Generator().manual_seed(0)
    maps = offset + torch.rand(37, 12, 10, generator=gen, dtype=torch.float64) * torch.linspace(1e-3, 2, 10)
    for batch in (1, 5, 16, 37):
        moments = RunningMoments()
        for start in range(0, len(maps), batch):
            moments.update(maps[start : start + batch])
        mean, std = moments.mean_std()
        assert moments.n == 37 and mean.dtype == std.dtype == torch.float64
        torch.testing.assert_close(mean, maps.mean(0), rtol=1e-12, atol=1e-12 * max(offset, 1))
        torch.testing.assert_close(std, maps.std(0), rtol=1e-9, atol=1e-12 * max(offset, 1))


def test_calibrate_streams_a_source_like_the_tensor_fit():
    """calibrate over a uint8 source, batch by batch, = fit on all validation maps at once (the floor included)."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (11, 1, 16, 16), generator=gen, dtype=torch.uint8)

    def maps_fn(x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and float(x.max()) <= 1.0  # float batches in [0, 1] reach the map function
        return x[:, 0] ** 2 * torch.linspace(0, 1, 16)  # a zero-variance column exercises the median floor

    whole = PositionalMapNorm("per_position")
    val_maps = maps_fn(images.float() / 255)
    whole.fit(val_maps, "toy")
    ref_std = val_maps.double().std(0)
    ref_std = ref_std.clamp_min(0.1 * float(ref_std.median()))  # the median-based floor
    torch.testing.assert_close(whole.mean, val_maps.double().mean(0).float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(whole.std, ref_std.float(), rtol=0, atol=1e-7)
    streamed = PositionalMapNorm("per_position")
    streamed.calibrate(maps_fn, TensorSource(images), 3, torch.device("cpu"), "toy")
    torch.testing.assert_close(streamed.mean, whole.mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(streamed.std, whole.std, rtol=0, atol=1e-7)
    assert float(streamed.std[:, 0].min()) > 0  # floored, not zero
