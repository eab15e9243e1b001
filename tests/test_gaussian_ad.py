"""Gaussian AD: detects toy defects, equals a numpy/sklearn reference, streams, needs no seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from vadbench.backbones import load_feature_extractor
from vadbench.data.source import TensorSource
from vadbench.models import create_model, load_model

# layer4 of a random-init resnet18 is a 2×2 grid on these 64-px toy images: levels 1–3 carry the signal
LAYERS = ["layer1", "layer2", "layer3"]


@pytest.fixture(scope="module")
def extractor(random_backbone_dir):
    return load_feature_extractor(random_backbone_dir, LAYERS)


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_detects_and_equals_the_reference(extractor, toy_defect_data, tmp_path, pooling):
    train, test, labels, _ = toy_defect_data
    model = create_model("gaussian_ad", backbone=extractor, layers=LAYERS, batch_size=5, pooling=pooling)

    def pool(f: torch.Tensor) -> np.ndarray:
        return (f.amax(dim=(2, 3)) if pooling == "max" else f.mean(dim=(2, 3))).double().numpy()

    report = model.fit(TensorSource((train * 255).round().to(torch.uint8)))
    scores, maps = model.predict(test)
    assert roc_auc_score(labels, scores.numpy()) >= 0.8
    assert maps.shape == (len(test), 64, 64) and torch.equal(maps[:, 0, 0], scores)
    # reference: whole-split pooled features, sklearn Ledoit-Wolf, Mahalanobis summed over levels
    feats_train, feats_test = extractor(train), extractor(test)
    ref = np.zeros(len(test))
    for layer in LAYERS:
        x = pool(feats_train[layer])
        lw = LedoitWolf().fit(x)
        d = pool(feats_test[layer]) - lw.location_
        ref += np.sqrt(np.einsum("bi,ij,bj->b", d, lw.precision_, d))
        assert report["shrinkage"][layer] == pytest.approx(lw.shrinkage_, abs=1e-6)
    np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-4)
    model.save(tmp_path / "g.pt")
    again = load_model(tmp_path / "g.pt", backbone=extractor)
    assert torch.equal(again.predict(test)[0], scores)


def test_errors(extractor, toy_defect_data):
    with pytest.raises(ValueError, match="at least 2"):
        create_model("gaussian_ad", backbone=extractor, layers=LAYERS).fit(toy_defect_data[0][:1])
    with pytest.raises(RuntimeError, match="before fit"):
        create_model("gaussian_ad", backbone=extractor, layers=LAYERS).predict(toy_defect_data[1][:2])
    with pytest.raises(ValueError, match="missing"):
        create_model("gaussian_ad", backbone=extractor, layers=["layer9"])
