"""STFPM: learns to flag toy defects with a random teacher; shapes, persistence, determinism, params."""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from vadbench.backbones import load_feature_extractor
from vadbench.models import create_model

LAYERS = ["layer1", "layer2", "layer3"]
FAST = dict(epochs=30, batch_size=8, patience=5, seed=0)  # ≤ 90 SGD steps


@pytest.fixture(scope="module")
def teacher(random_backbone_dir):
    return load_feature_extractor(random_backbone_dir, LAYERS)


@pytest.fixture(scope="module")
def quick(teacher, toy_defect_data):
    """One short epoch on a few images: enough to move every learned tensor, cheap enough for fast tests."""
    train = toy_defect_data[0]
    model = create_model("stfpm", backbone=teacher, **dict(epochs=1, batch_size=4, seed=0))
    model.fit(train[:4], train[20:22])
    return model


@pytest.fixture(scope="module")
def fitted(teacher, toy_defect_data):
    train, test, labels, _ = toy_defect_data
    model = create_model("stfpm", backbone=teacher, **FAST)
    # the untrained baseline gets the same validation-fitted map normalisation as the trained model
    model.map_norm.calibrate(model.anomaly_maps, train[20:], 8, torch.device("cpu"), "stfpm")
    before = model.predict(test)
    report = model.fit(train[:20], train[20:])
    return model, report, before


@pytest.mark.slow  # trains a model: ~10–60 s on 2 free cores
def test_beats_untrained_and_detects_defects(fitted, toy_defect_data):
    model, report, before = fitted
    _, test, labels, masks = toy_defect_data
    scores, maps = model.predict(test)
    auroc, auroc_before = roc_auc_score(labels, scores), roc_auc_score(labels, before[0])
    pixel, pixel_before = (roc_auc_score(masks.ravel(), m.numpy().ravel()) for m in (maps, before[1]))
    # an untrained student already disagrees most on bright blobs (pixel AUROC ~0.92), but the
    # image ranking is chance until the student has learned the normal features
    assert auroc > auroc_before + 0.1, (auroc, auroc_before)
    assert pixel >= 0.85, (pixel, pixel_before)
    # the per-position map normalisation (default) keeps the normals' border discrepancies, which a
    # random teacher's zero padding makes hard to learn in a test-sized budget, out of the image score
    assert auroc >= 0.8, auroc
    assert report["val_loss"][report["best_epoch"]] < report["val_loss"][0]


def test_output_shapes_and_rgb_input(quick, toy_defect_data):
    model = quick
    test = toy_defect_data[1][:3]
    scores, maps = model.predict(test)
    assert scores.shape == (3,) and maps.shape == (3, 64, 64)
    assert scores.dtype == maps.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.allclose(scores, maps.flatten(1).amax(1))
    rgb_scores, _ = model.predict(test.expand(-1, 3, -1, -1))  # grey replicated = same image
    assert torch.allclose(rgb_scores, scores, atol=1e-6)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        model.predict(test[:, 0])


def test_map_is_product_or_sum_of_layer_cosine_distances(quick, teacher, toy_defect_data):
    model = quick
    summed = create_model("stfpm", backbone=teacher, **{**FAST, "map_aggregation": "sum"})
    summed.load_learned_state(model.learned_state())
    summed.eval()  # predict would switch to eval itself; anomaly_maps alone does not
    test = toy_defect_data[1][:4]
    with torch.no_grad():
        t_feats = teacher(test)
        s_feats = model.student(teacher.normalize(test))
    layer_maps = [
        F.interpolate((1 - F.cosine_similarity(t, s, dim=1))[:, None], size=(64, 64), mode="bilinear")[:, 0]
        for t, s in zip(t_feats, s_feats)
    ]
    with torch.no_grad():
        product, total = model.anomaly_maps(test), summed.anomaly_maps(test)
    assert torch.allclose(product, layer_maps[0] * layer_maps[1] * layer_maps[2], atol=1e-5)
    assert torch.allclose(total, sum(layer_maps), atol=1e-5)
    # what predict returns: the raw map standardised per position with the validation normals' moments
    z = (product - model.map_norm.mean) / model.map_norm.std
    torch.testing.assert_close(model.predict(test)[1], z, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "bad",
    [dict(epochs=0), dict(lr=-1.0), dict(momentum=1.0), dict(map_aggregation="max"), dict(layers=[]), dict(epochs="3")],
)
def test_params_rejected(teacher, bad):
    with pytest.raises(pydantic.ValidationError):
        create_model("stfpm", backbone=teacher, **bad)


def test_layers_must_match_teacher(teacher):
    with pytest.raises(ValueError, match="backbone returns"):
        create_model("stfpm", backbone=teacher, layers=["layer2", "layer3"])
