"""CutPaste: 3-way self-supervised fine-tuning + Gaussian density, on toy defects with a random backbone."""

from __future__ import annotations

import pytest
import torch
from conftest import make_toy_defect_data
from sklearn.metrics import roc_auc_score

from vadbench.backbones import load_feature_extractor
from vadbench.data.source import TensorSource
from vadbench.models import create_model
from vadbench.models.components.cutpaste_augment import cutpaste, cutpaste_batch, scar, scar_batch, three_way_batch

NAME = "cutpaste"
LAYERS = ["layer1", "layer2"]
SMALL = dict(layers=LAYERS, trainable=["layer2"], epochs=3, batch_size=16, seed=0)


@pytest.fixture(scope="module")
def data():
    train, test, labels, masks = make_toy_defect_data(n_train=48, n_test=32)
    val = make_toy_defect_data(n_train=8, seed=1)[0]
    return train, val, test, labels


@pytest.fixture(scope="module")
def extractor(random_backbone_dir):
    return load_feature_extractor(random_backbone_dir, LAYERS)


@pytest.fixture(scope="module")
def fitted(extractor, data):
    train, val, _, _ = data
    model = create_model(NAME, backbone=extractor, **SMALL)
    before = model.pretext_loss(train, seed=123)
    report = model.fit(train, val)
    return model, report, before


def test_augmentations_are_local_seeded_and_in_range():
    img = make_toy_defect_data(n_train=1)[0][0]
    for aug in (cutpaste, scar):
        a = aug(img, torch.Generator().manual_seed(0))
        b = aug(img, torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and a.shape == img.shape
        changed = (a != img).float().mean()
        assert 0 < changed < 0.5  # a local patch, not the whole image
        assert 0 <= float(a.min()) and float(a.max()) <= 1
    x, y = three_way_batch(img[None].expand(4, -1, -1, -1), torch.Generator().manual_seed(1))
    assert x.shape == (12, 1, 64, 64) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(x[:4], img[None].expand(4, -1, -1, -1))


def test_learns_pretext_task_and_detects_defects(fitted, data):
    model, report, before = fitted
    train, _, test, labels = data
    assert report["epochs_run"] == SMALL["epochs"] and 0 <= report["shrinkage"] <= 1
    # beats its untrained state on the task it is trained for
    assert model.pretext_loss(train, seed=123) < before
    scores, _ = model.predict(test)
    assert roc_auc_score(labels, scores.numpy()) >= 0.8


def test_outputs_are_image_level(fitted, data):
    model, test = fitted[0], data[2][:5]
    scores, maps = model.predict(test)
    assert scores.shape == (5,) and maps.shape == (5, 64, 64)
    assert scores.dtype == maps.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.equal(maps, scores.view(-1, 1, 1).expand_as(maps))
    assert type(model).has_pixel_maps is False and (scores >= 0).all()


def test_predict_before_fit_and_bad_params(extractor):
    with pytest.raises(RuntimeError, match="before fit"):
        create_model(NAME, backbone=extractor, **SMALL).predict(torch.rand(1, 1, 32, 32))
    for bad in (dict(batch_size=1), dict(lr=0.0), dict(momentum=1.0), dict(head_dims=[0]), dict(extra=1)):
        with pytest.raises(ValueError):
            create_model(NAME, backbone=extractor, **{**SMALL, **bad})
    with pytest.raises(ValueError, match="trainable modules"):
        create_model(NAME, backbone=extractor, **{**SMALL, "trainable": ["fc"]})


def test_batchwise_augmentations_equal_the_whole_set_draws():
    """All CutPastes batch by batch, then all Scars, on one generator = three_way_batch of the whole set."""
    images = make_toy_defect_data(n_train=7, seed=2)[0]
    whole, _ = three_way_batch(images, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    cp = torch.cat([cutpaste_batch(images[i : i + 3], gen) for i in range(0, 7, 3)])
    sc = torch.cat([scar_batch(images[i : i + 3], gen) for i in range(0, 7, 3)])
    assert torch.equal(whole, torch.cat([images, cp, sc]))


def test_pretext_loss_does_not_depend_on_the_batch_size(fitted, data):
    model, val = fitted[0], data[1]
    losses = [model.pretext_loss(val, seed=7, batch_size=b) for b in (3, 8)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_uint8_source_fits_the_same_model_as_the_float_tensor(extractor, data):
    """fit streams its sources: a uint8 TensorSource of the same (8-bit) images gives the same model."""
    train, val, test, _ = data
    params = {**SMALL, "epochs": 1}
    u8 = lambda x: TensorSource((x * 255).round().to(torch.uint8))  # noqa: E731
    a = create_model(NAME, backbone=extractor, **params)
    ra = a.fit(train[:24], val)
    b = create_model(NAME, backbone=extractor, **params)
    rb = b.fit(u8(train[:24]), u8(val))
    assert ra == rb
    assert torch.equal(a.mean, b.mean) and torch.equal(a.precision, b.precision)
    assert torch.equal(a.predict(test)[0], b.predict(test)[0])
