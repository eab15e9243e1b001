"""SimpleNet: truncated L1 equals its definition, maps/shapes, named errors, and it learns on tiny synthetic_sem."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadbench.backbones import load_feature_extractor
from vadbench.data.params import SyntheticSemParams
from vadbench.data.source import ImageSource, float_batches
from vadbench.data.synthetic_sem import generate_synthetic_sem
from vadbench.models import create_model
from vadbench.models.components.feature_discriminator import truncated_l1
from vadbench.models.components.smoothing import upsample_and_smooth

LAYERS = ["layer2", "layer3"]
# larger defects (as tests/test_cfa.py) and 60 train images: a random backbone at 25 epochs stays near 0.7
TINY = SyntheticSemParams(image_size=64, n_train=60, n_val=6, n_test_normal=16, n_test_per_defect=4, defect_scale=2.0)


@pytest.fixture(scope="module")
def backbone(random_backbone_dir):
    return load_feature_extractor(random_backbone_dir, LAYERS)


@pytest.fixture(scope="module")
def tiny_sem(tmp_path_factory):
    root = tmp_path_factory.mktemp("sem") / "synthetic_sem"
    generate_synthetic_sem(root, TINY, seed=0)
    return {s: ImageSource(root, s) for s in ("train", "val", "test")}


def _scores(model, source):
    return np.concatenate([model.predict(b)[0].numpy() for b in float_batches(source, 16, torch.device("cpu"))])


def test_truncated_l1_equals_its_definition():
    normal, anomalous = torch.tensor([1.0, 0.2, -0.4]), torch.tensor([-1.0, 0.3])
    expected = np.mean([0.0, 0.3, 0.9]) + np.mean([0.0, 0.8])  # max(0, .5 − n), max(0, .5 + a)
    assert truncated_l1(normal, anomalous, 0.5).item() == pytest.approx(expected)
    assert truncated_l1(normal, anomalous[:0], 0.5).item() == pytest.approx(np.mean([0.0, 0.3, 0.9]))


def test_loss_is_truncated_l1_of_adapted_and_noisy_features(backbone, toy_defect_data):
    model = create_model("simplenet", backbone=backbone, embed_dim=32, hidden_dim=16, seed=0).eval()
    feats = model._features(toy_defect_data[0][:2])
    assert feats[0].shape == (2, 32, 8, 8)  # layer2 grid at 64 px
    model._noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        loss = model.loss(feats)
        adapted = model.adaptor(feats[0])
        noise = torch.randn(adapted.shape, generator=torch.Generator().manual_seed(5)) * model.p.noise_std
        d = model.discriminator(torch.cat([adapted, adapted + noise])).numpy()
    n, a = d[:2].ravel(), d[2:].ravel()
    ref = np.maximum(0, 0.5 - n).mean() + np.maximum(0, 0.5 + a).mean()
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_map_is_smoothed_negative_discriminator_and_score_its_max(backbone, toy_defect_data):
    model = create_model("simplenet", backbone=backbone, embed_dim=32, hidden_dim=16, epochs=1, batch_size=4)
    train = toy_defect_data[0]
    model.fit(train[:4], train[20:22])
    test = toy_defect_data[1][:3]
    scores, maps = model.predict(test)
    assert scores.shape == (3,) and maps.shape == (3, 64, 64) and scores.dtype == maps.dtype == torch.float32
    with torch.no_grad():
        patch = -model.scores_of(model._features(test)[0])
    torch.testing.assert_close(maps, upsample_and_smooth(patch, (64, 64), 4.0))
    assert torch.equal(scores, maps.flatten(1).amax(1))


def test_named_errors(backbone):
    with pytest.raises(ValueError, match="neighborhood must be odd"):
        create_model("simplenet", backbone=backbone, neighborhood=2)
    with pytest.raises(ValueError, match=r"missing \['layer4'\]"):
        create_model("simplenet", backbone=backbone, layers=["layer2", "layer4"])
    for bad in (dict(epochs=0), dict(noise_std=0.0), dict(margin=-1.0), dict(map_normalization="max")):
        with pytest.raises(pydantic.ValidationError):
            create_model("simplenet", backbone=backbone, **bad)
    model = create_model("simplenet", backbone=backbone, map_normalization="per_position")
    with pytest.raises(ValueError, match="at least 2 validation images"):
        model.fit(torch.rand(4, 1, 64, 64), None)


@pytest.mark.slow  # 100 epochs on 60 images at 64 px: ~45 s on 2 free cores
def test_learns_on_tiny_synthetic_sem(backbone, tiny_sem):
    test = tiny_sem["test"]
    model = create_model("simplenet", backbone=backbone, epochs=100, batch_size=8, seed=1)
    before = roc_auc_score(test.labels, _scores(model.eval(), test))
    report = model.fit(tiny_sem["train"], tiny_sem["val"])
    after = roc_auc_score(test.labels, _scores(model, test))
    assert after >= 0.8, (after, before)
    assert after > before, (after, before)
    assert report["epochs_run"] == 100 and report["feature_cache"]["train"] == "ram"


def test_feature_standardizer_matches_batch_statistics():
    from vadbench.models.components.feature_discriminator import FeatureStandardizer

    x = torch.randn(6, 5, 4, 3) * torch.tensor([0.1, 1.0, 2.0, 0.0, 3.0])[None, :, None, None] + 2.0
    rows = x.transpose(0, 1).reshape(5, -1).double()
    mean, std = rows.mean(1), rows.std(1, unbiased=False)
    for mode in ("global", "channel"):
        norm = FeatureStandardizer(5, mode)
        norm.fit([x[:2], x[2:]])  # streamed in two batches
        torch.testing.assert_close(norm.mean, mean.float())
        want = (std**2).mean().sqrt().expand(5) if mode == "global" else std.clamp(min=0.01 * std.median())
        torch.testing.assert_close(norm.scale, want.float())
        torch.testing.assert_close(norm(x), (x - norm.mean[:, None, None]) / norm.scale[:, None, None])
    ident = FeatureStandardizer(5, "none")
    ident.fit([x])
    assert torch.equal(ident(x), x)
