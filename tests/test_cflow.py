"""CFlow: conditional coupling log-determinants are exact, positional encoding is right; the flows learn
normal fibers and flag toy defects; shapes, params; uint8 sources = float tensors; the feature cache over
budget (disk, recompute)."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadbench.backbones import load_feature_extractor
from vadbench.data.source import TensorSource
from vadbench.models import create_model
from vadbench.models.cflow import positional_encoding_2d
from vadbench.models.components.flows import AffineCouplingBlock, SequentialFlow, fc_subnet

LAYERS = ["layer2", "layer3"]
FAST = dict(
    layers=LAYERS, coupling_blocks=2, condition_vector=32, fiber_batch_size=64, epochs=3, batch_size=8, lr=1e-3, seed=0
)


@pytest.mark.parametrize("soft", [False, True])
def test_conditional_coupling_log_det_matches_autograd_jacobian(soft):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    blocks = [
        AffineCouplingBlock(5, fc_subnet(2.0), clamp=1.9, cond_channels=4, soft_permutation=soft, rng=rng)
        for _ in range(2)
    ]
    flow = SequentialFlow(blocks).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x, cond = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    _, log_det = flow(x, cond)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v, cond)[0], x).reshape(5, 5)
    assert torch.allclose(log_det[0], torch.linalg.slogdet(jac).logabsdet, atol=1e-8)
    # the condition changes the map: it is an input of the subnets
    assert not torch.allclose(flow(x, cond)[0], flow(x, cond + 1)[0])


def test_positional_encoding_layout():
    pe = positional_encoding_2d(8, height=3, width=5)
    assert pe.shape == (8, 3, 5)
    x, y = torch.arange(5.0), torch.arange(3.0)
    # channels [0, 4): x at frequencies 1 and 1e-2; channels [4, 8): y at the same frequencies
    assert torch.allclose(pe[0, 1], torch.sin(x)) and torch.allclose(pe[1, 2], torch.cos(x))
    assert torch.allclose(pe[2, 0], torch.sin(x * 0.01)) and torch.allclose(pe[4, :, 3], torch.sin(y))
    assert torch.allclose(pe[7, :, 0], torch.cos(y * 0.01))
    with pytest.raises(ValueError, match="divisible by 4"):
        positional_encoding_2d(6, 2, 2)


@pytest.fixture(scope="module")
def backbone(random_backbone_dir):
    return load_feature_extractor(random_backbone_dir, LAYERS)


def _mean_log_prob(model, images):
    """Mean over layers and positions of log p / c: how well the flows model these (normal) images."""
    with torch.no_grad():
        return float(torch.stack([lp.mean() for lp in model._layer_log_probs(model._features(images))]).mean())


def _quick_fit(backbone, train, val, **params):
    """One short epoch on a few images: enough to move every learned tensor, cheap enough for fast tests."""
    model = create_model("cflow", backbone=backbone, **{**FAST, "epochs": 1, **params})
    report = model.fit(train, val)
    return model, report


@pytest.fixture(scope="module")
def quick(backbone, toy_defect_data):
    train = toy_defect_data[0]
    model, report = _quick_fit(backbone, train[:4], train[20:22])
    assert report["feature_cache"] == {"train": "ram", "val": "ram"}  # the default budget holds the toy set
    return model


@pytest.fixture(scope="module")
def fitted(backbone, toy_defect_data):
    train, test, labels, _ = toy_defect_data
    model = create_model("cflow", backbone=backbone, **FAST)
    before = _mean_log_prob(model, test[labels == 0])
    report = model.fit(train[:20], train[20:])
    return model, report, before


@pytest.mark.slow  # trains a model: ~10–60 s on 2 free cores
def test_learns_normal_fibers_and_detects_defects(fitted, toy_defect_data):
    model, report, log_prob_before = fitted
    train, test, labels, masks = toy_defect_data
    # random-teacher features make the bright blobs outliers even for an untrained flow; training
    # must raise the likelihood of unseen normals
    assert report["val_loss"][report["best_epoch"]] < report["val_loss"][0]
    assert _mean_log_prob(model, test[labels == 0]) > log_prob_before + 0.1
    scores, maps = model.predict(test)
    assert roc_auc_score(labels, scores) >= 0.8
    assert roc_auc_score(masks.ravel(), maps.numpy().ravel()) >= 0.8
    # each layer's likelihood is normalised by the likeliest validation fiber of that layer
    with torch.no_grad():
        val_max = torch.stack([lp.max() for lp in model._layer_log_probs(model._features(train[20:]))])
    assert torch.allclose(model.ref_log_prob, val_max)


def test_output_shapes_and_range(quick, toy_defect_data):
    model = quick
    test = toy_defect_data[1][:3]
    scores, maps = model.predict(test)
    assert scores.shape == (3,) and maps.shape == (3, 64, 64)
    assert scores.dtype == maps.dtype == torch.float32 and scores.device.type == "cpu"
    assert (maps >= 0).all() and (maps <= len(LAYERS)).all()
    assert torch.allclose(scores, maps.flatten(1).amax(1))
    # a map does not depend on which other images share its batch
    assert torch.equal(model.predict(test[1:2])[1][0], maps[1])


def test_uint8_source_equals_float_tensor(backbone, quick, toy_defect_data):
    train, test = toy_defect_data[0], toy_defect_data[1][:4]
    as_uint8 = (train * 255).round().to(torch.uint8)  # the toy images are 8-bit: the same values
    model, _ = _quick_fit(backbone, TensorSource(as_uint8[:4]), TensorSource(as_uint8[20:22]))
    assert torch.equal(model.ref_log_prob, quick.ref_log_prob)
    assert torch.equal(model.predict(test)[0], quick.predict(test)[0])


@pytest.mark.parametrize(
    ("budget", "mode", "atol"),
    # fp16 features on disk: measured max |Δ| 2e-5 on these scores (range ≈ 0.2…0.9); recomputation: 0 on CPU
    [(1e-9, "disk", 1e-3), (0.0, "recompute", 1e-5)],
)
def test_cache_over_budget_matches_ram(backbone, quick, toy_defect_data, budget, mode, atol):
    train, test = toy_defect_data[0], toy_defect_data[1]
    model, report = _quick_fit(backbone, train[:4], train[20:22], feature_cache_gb=budget)
    assert report["feature_cache"] == {"train": mode, "val": mode}
    torch.testing.assert_close(model.predict(test)[0], quick.predict(test)[0], rtol=0, atol=atol)


def test_reference_without_val_comes_from_train(backbone, toy_defect_data):
    train = toy_defect_data[0][:3]
    model, report = _quick_fit(backbone, train, None)
    assert report["val_loss"] == [] and report["feature_cache"]["val"] is None
    with torch.no_grad():
        train_max = torch.stack([lp.max() for lp in model._layer_log_probs(model._features(train))])
    assert torch.allclose(model.ref_log_prob, train_max)


@pytest.mark.parametrize(
    "bad",
    [
        dict(condition_vector=30),
        dict(coupling_blocks=0),
        dict(fiber_batch_size=1),
        dict(clamp=-1.0),
        dict(lr="1e-3"),
        dict(feature_cache_gb=-0.5),
    ],
)
def test_params_rejected(backbone, bad):
    with pytest.raises(pydantic.ValidationError):
        create_model("cflow", backbone=backbone, **bad)
