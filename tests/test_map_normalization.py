"""Per-position map standardisation: removes position-bound artefacts of normals, keeps real anomalies."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadbench.models.components.map_normalization import PositionalMapNorm


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
    # calibrate runs the map function over the validation images in batches
    images = torch.rand(5, 1, 8, 8)
    norm.calibrate(lambda b: b[:, 0], images, 2, torch.device("cpu"), "toy")
    assert norm.mean.shape == (8, 8) and bool((norm.std > 0).all())
