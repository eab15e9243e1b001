"""CFA: the loss equals a brute-force reference, the bank streams, layers are checked, and it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadbench.backbones import load_feature_extractor
from vadbench.data.source import ImageSource, TensorSource, float_batches
from vadbench.models import create_model
from vadbench.models.cfa import coupled_hypersphere_loss, kmeans, softmin_score, squared_distances

LAYERS = ["layer1", "layer2", "layer3"]


@pytest.fixture(scope="module")
def backbone(random_backbone_dir):
    return load_feature_extractor(random_backbone_dir, LAYERS)


def _reference_loss(phi, bank, r, k, j, alpha, nu):
    """Loops over every patch: sorted squared distances, hinge on the K nearest and the J after them."""
    b, d, h, w = phi.shape
    att, rep = [], []
    for i in range(b):
        for y in range(h):
            for x in range(w):
                f = phi[i, :, y, x]
                dists = sorted(float(((f - c) ** 2).sum()) for c in bank)
                att += [max(0.0, dd - r * r) for dd in dists[:k]]
                rep += [max(0.0, r * r - dd - alpha) for dd in dists[k : k + j]]
    return (np.mean(att) + np.mean(rep)) / nu


@pytest.mark.parametrize("r", [0.0, 1.5, 3.0])
def test_loss_equals_brute_force(r):
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64)
    bank = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    radius = torch.tensor([r], dtype=torch.float64)
    got = coupled_hypersphere_loss(squared_distances(phi, bank), radius, k=3, j=2, alpha=0.5, nu=1e-3)
    want = _reference_loss(phi, bank, r, 3, 2, 0.5, 1e-3)
    assert want > 0
    assert float(got) == pytest.approx(want, rel=1e-9)


def test_radius_gets_gradient_both_ways():
    # attraction wants r larger, repulsion smaller: both terms reach r
    phi = torch.zeros(1, 2, 1, 1)
    bank = torch.tensor([[0.0, 2.0], [0.0, 0.5], [0.0, 3.0]])  # d² = 4, 0.25, 9
    r = torch.tensor([1.0], requires_grad=True)
    coupled_hypersphere_loss(squared_distances(phi, bank), r, k=1, j=1, alpha=0.0, nu=1.0).backward()
    # att = 0.25 − 1 → 0 (inside); rep = 1 − 4 → 0: nothing active, no gradient
    assert float(r.grad) == 0.0
    r2 = torch.tensor([2.5], requires_grad=True)
    coupled_hypersphere_loss(squared_distances(phi, bank), r2, k=1, j=1, alpha=0.0, nu=1.0).backward()
    assert float(r2.grad) == pytest.approx(2 * 2.5)  # rep = r² − 4 active: d/dr = 2r


def test_softmin_score_reference():
    gen = torch.Generator().manual_seed(1)
    phi = torch.randn(1, 4, 2, 2, generator=gen, dtype=torch.float64)
    bank = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    got = softmin_score(squared_distances(phi, bank), k=3)
    rows = phi.flatten(2).transpose(1, 2)[0]
    d = torch.cdist(rows, bank).sort(1).values[:, :3]
    want = torch.exp(-d[:, 0]) / torch.exp(-d).sum(1) * d[:, 0]
    torch.testing.assert_close(got[0], want)


def test_kmeans_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centers[:, None] + 0.1 * torch.randn(3, 20, 2, generator=gen)).reshape(-1, 2)
    found = kmeans(x, 3, 100, torch.Generator().manual_seed(0))
    dist = torch.cdist(found, centers).min(1).values
    assert (dist < 0.1).all(), found


def test_bank_streams_same_for_any_batch_size(backbone, toy_defect_data):
    train = TensorSource(toy_defect_data[0][:10])
    model = create_model("cfa", backbone=backbone, seed=0)
    banks = []
    for bs in (3, 10):
        model.init_bank(model.embed(x) for x in float_batches(train, bs, "cpu"))
        banks.append(model.bank.clone())
    torch.testing.assert_close(banks[0], banks[1], rtol=0, atol=1e-6)
    # = the mean over images of φ at each grid position (h·w centroids, row-major)
    with torch.no_grad():
        phi = model.head(model.embed(toy_defect_data[0][:10]))
    torch.testing.assert_close(banks[0], phi.mean(0).flatten(1).T, rtol=1e-5, atol=1e-5)
    assert banks[0].shape == (16 * 16, 448)  # 64 px → layer1 grid 16×16; resnet18 layer1–3: 64 + 128 + 256


def test_gamma_c_and_gamma_d_shrink_bank_and_descriptor(backbone, toy_defect_data):
    model = create_model("cfa", backbone=backbone, gamma_c=4, gamma_d=2, seed=0)
    model.init_bank([model.embed(toy_defect_data[0][:4])])
    assert model.bank.shape == (16 * 16 // 4, 224)


def test_named_errors(backbone, toy_defect_data):
    with pytest.raises(ValueError, match="network order"):
        create_model("cfa", backbone=backbone, layers=["layer2", "layer1"])
    with pytest.raises(ValueError, match="repeated"):
        create_model("cfa", backbone=backbone, layers=["layer1", "layer1"])
    with pytest.raises(ValueError, match="missing"):
        create_model("cfa", backbone=backbone, layers=["layer1", "layer4"])
    model = create_model("cfa", backbone=backbone, gamma_c=64, k=3, j=3)  # 256 positions → 4 centroids < 6
    with pytest.raises(ValueError, match="k \\+ j"):
        model.init_bank([model.embed(toy_defect_data[0][:2])])
    with pytest.raises(RuntimeError, match="before fit"):
        create_model("cfa", backbone=backbone).predict(toy_defect_data[1][:2])
    with pytest.raises(ValueError, match="empty"):
        create_model("cfa", backbone=backbone).init_bank([])


def test_fit_reduces_val_loss_and_moves_radius(backbone, toy_defect_data):
    train = toy_defect_data[0]
    model = create_model("cfa", backbone=backbone, epochs=3, batch_size=4, seed=0)
    report = model.fit(train[:12], train[20:])
    assert report["val_loss"][report["best_epoch"]] < report["val_loss"][0]
    assert report["radius"] > 1e-3  # r starts at 1e-5 and is trained
    assert report["bank_centroids"] == 256 and report["feature_cache"]["train"] == "ram"


def _evaluate(model, test):
    scores, maps = zip(*(model.predict(x) for x in float_batches(test, 16, "cpu")))
    scores, maps = torch.cat(scores), torch.cat(maps)
    masks = np.stack([test.mask(i).numpy() for i in range(len(test))])
    return roc_auc_score(test.labels, scores.numpy()), roc_auc_score(masks.ravel(), maps.numpy().ravel()), scores, maps


def test_learns_synthetic_sem_and_beats_the_untrained_descriptor(backbone, tiny_sem):
    # ~6 s of training on 2 free cores (20 epochs × 8 steps on cached features)
    train, val, test = (ImageSource(tiny_sem, s) for s in ("train", "val", "test"))
    untrained = create_model("cfa", backbone=backbone, seed=0)
    untrained.init_bank(untrained.embed(x) for x in float_batches(train, 16, "cpu"))  # the bank, no adaptation
    model = create_model("cfa", backbone=backbone, epochs=20, batch_size=4, seed=0)
    model.fit(train, val)
    auroc, pixel, scores, maps = _evaluate(model, test)
    auroc_before, pixel_before, _, _ = _evaluate(untrained, test)
    # measured: image 0.875 / pixel 0.943 after, 0.736 / 0.929 before
    assert auroc >= 0.8 and auroc > auroc_before + 0.05, (auroc, auroc_before)
    assert pixel >= 0.9, (pixel, pixel_before)
    assert maps.shape == (len(test), 64, 64)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))  # image score = the map's maximum
