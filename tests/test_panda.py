"""PANDA: compactness fine-tuning of a backbone copy + kNN score, on toy defects with a random backbone."""

from __future__ import annotations

import pytest
import torch
from conftest import make_toy_defect_data
from sklearn.metrics import roc_auc_score

from vadbench.backbones import load_feature_extractor
from vadbench.data.source import TensorSource
from vadbench.models import create_model

NAME = "panda"
LAYERS = ["layer1", "layer2"]
SMALL = dict(layers=LAYERS, trainable=["layer2"], epochs=2, batch_size=16, seed=0)


@pytest.fixture(scope="module")
def data():
    # 48 train images cover the 8 line phases several times, so kNN compares like with like
    train, test, labels, masks = make_toy_defect_data(n_train=48, n_test=32)
    val = make_toy_defect_data(n_train=8, seed=1)[0]
    return train, val, test, labels


@pytest.fixture(scope="module")
def extractor(random_backbone_dir):
    return load_feature_extractor(random_backbone_dir, LAYERS)


def _compactness(model, images, center):
    return float(((model.features(images) - center) ** 2).sum(1).mean())


@pytest.fixture(scope="module")
def fitted(extractor, data):
    train, val, _, _ = data
    model = create_model(NAME, backbone=extractor, **SMALL)
    center0 = model.features(train).mean(0)
    before = _compactness(model, val, center0)
    report = model.fit(train, val)
    return model, report, before


def test_fine_tuning_compacts_normals_and_detects_defects(fitted, data, extractor):
    model, report, before = fitted
    _, val, test, labels = data
    assert report["epochs_run"] == SMALL["epochs"]
    # the objective improves on held-out normals (beats the not fine-tuned state)
    assert _compactness(model, val, model.center) < before
    # the fine-tuned copy moved; the frozen original did not
    tuned = dict(model.encoder.named_parameters())
    moved = [n for n, p in extractor.net.named_parameters() if not torch.equal(p, tuned[n])]
    assert moved and all(n.startswith("layer2") for n in moved)
    scores, maps = model.predict(test)
    assert roc_auc_score(labels, scores.numpy()) >= 0.8


def test_outputs_are_image_level(fitted, data):
    model = fitted[0]
    test = data[2][:5]
    scores, maps = model.predict(test)
    assert scores.shape == (5,) and maps.shape == (5, 64, 64)
    assert scores.dtype == maps.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.equal(maps, scores.view(-1, 1, 1).expand_as(maps))
    assert type(model).has_pixel_maps is False
    # RGB input with equal channels is the same image to the backbone
    assert torch.allclose(model.predict(test.expand(-1, 3, -1, -1))[0], scores)


def test_state_holds_the_fine_tuned_copy(fitted):
    keys = fitted[0].learned_state().keys()
    assert any(k.startswith("encoder.") for k in keys) and "train_features" in keys
    assert not any(k.startswith("backbone.") for k in keys)


def test_predict_before_fit_and_bad_params(extractor):
    with pytest.raises(RuntimeError, match="before fit"):
        create_model(NAME, backbone=extractor, **SMALL).predict(torch.rand(1, 1, 32, 32))
    for bad in (dict(k=0), dict(lr=-1.0), dict(grad_clip=0.0), dict(layers=[]), dict(extra=1)):
        with pytest.raises(ValueError):
            create_model(NAME, backbone=extractor, **{**SMALL, **bad})
    with pytest.raises(ValueError, match="trainable modules"):
        create_model(NAME, backbone=extractor, **{**SMALL, "trainable": ["layer9"]})
    with pytest.raises(ValueError, match="needs a backbone"):
        create_model(NAME, **SMALL)


def test_max_pooling_keeps_a_small_local_change(extractor):
    """A defect on 1 % of the image moves the max-pooled feature far more than the image-wide average."""
    from vadbench.models.components.backbone_finetune import pooled_features, trainable_copy

    net = trainable_copy(extractor, []).eval()
    image = torch.full((1, 3, 64, 64), 0.3)
    defect = image.clone()
    defect[..., 30:36, 30:36] = 1.0
    with torch.no_grad():
        x, y = extractor.normalize(image), extractor.normalize(defect)
        change = {p: float((pooled_features(net, y, p) - pooled_features(net, x, p)).norm()) for p in ("avg", "max")}
        size = {p: float(pooled_features(net, x, p).norm()) for p in ("avg", "max")}
    assert change["max"] / size["max"] > 3 * change["avg"] / size["avg"], (change, size)


def _uint8(images):
    return (images * 255).round().to(torch.uint8)


def test_uint8_source_fits_the_same_model_as_the_float_tensor(extractor, data):
    """fit streams its sources: a uint8 TensorSource of the same (8-bit) images gives the same model."""
    train, val, test, _ = data
    params = {**SMALL, "epochs": 1}
    a = create_model(NAME, backbone=extractor, **params)
    ra = a.fit(train[:24], val)
    b = create_model(NAME, backbone=extractor, **params)
    rb = b.fit(TensorSource(_uint8(train[:24])), TensorSource(_uint8(val)))
    assert ra == rb
    assert torch.equal(a.train_features, b.train_features)
    assert torch.equal(a.predict(test)[0], b.predict(test)[0])
    # a uint8 batch is scaled, not taken as 0..255 floats (val: 8-bit values; the test blobs are 0.95)
    assert torch.equal(a.features(_uint8(val)), a.features(val))


def test_features_pick_the_models_layers(random_backbone_dir):
    """An extractor built with more layers than the model asks for: only `layers` are pooled."""
    wide = load_feature_extractor(random_backbone_dir, ["layer1", "layer2", "layer3"])
    model = create_model(NAME, backbone=wide, **SMALL)
    assert model.features(torch.rand(2, 1, 32, 32)).shape == (2, sum(wide.channels_of(LAYERS)))
    with pytest.raises(ValueError, match="missing"):
        narrow = load_feature_extractor(random_backbone_dir, ["layer1"])
        create_model(NAME, backbone=narrow, **{**SMALL, "trainable": ["layer1"]})
