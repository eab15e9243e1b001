"""FastFlow: coupling-block log-determinants are exact; the flows learn normal features and flag toy
defects; shapes, params; uint8 sources = float tensors; the feature cache over budget (disk, recompute)."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadbench.backbones import load_feature_extractor
from vadbench.data.source import TensorSource
from vadbench.models import create_model
from vadbench.models.components.flows import AffineCouplingBlock, SequentialFlow, conv_subnet

LAYERS = ["layer1", "layer2", "layer3"]
FAST = dict(flow_steps=2, epochs=4, batch_size=8, patience=2, seed=0)


def test_conv_coupling_log_det_matches_autograd_jacobian():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    flow = SequentialFlow([AffineCouplingBlock(3, conv_subnet(k, 2.0), clamp=2.0, rng=rng) for k in (3, 1)]).double()
    with torch.no_grad():  # move off the near-identity init so the check is not trivial
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(1, 3, 3, 2, dtype=torch.float64)
    z, log_det = flow(x)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v)[0], x).reshape(x.numel(), x.numel())
    assert z.shape == x.shape
    assert torch.allclose(log_det[0], torch.linalg.slogdet(jac).logabsdet, atol=1e-8)


@pytest.fixture(scope="module")
def backbone(random_backbone_dir):
    return load_feature_extractor(random_backbone_dir, LAYERS)


def _normal_likelihood(model, images):
    """Mean per-position likelihood exp(−½·mean_c z²) of normal images, over levels (= −mean map)."""
    return float(-model.predict(images)[1].mean())


QUICK = dict(flow_steps=2, epochs=2, batch_size=4, seed=0)


def _quick_fit(backbone, train, val, **params):
    """Two short epochs on a few images: enough to move every learned tensor, cheap enough for fast tests."""
    model = create_model("fastflow", backbone=backbone, **{**QUICK, **params})
    report = model.fit(train, val)
    return model, report


@pytest.fixture(scope="module")
def quick(backbone, toy_defect_data):
    train = toy_defect_data[0]
    model, report = _quick_fit(backbone, train[:6], train[20:23])
    assert report["feature_cache"] == {"train": "ram", "val": "ram"}  # the default budget holds the toy set
    return model


@pytest.fixture(scope="module")
def fitted(backbone, toy_defect_data):
    train, test, labels, _ = toy_defect_data
    model = create_model("fastflow", backbone=backbone, **FAST)
    before = _normal_likelihood(model, test[labels == 0])
    report = model.fit(train[:20], train[20:])
    return model, report, before


@pytest.mark.slow  # trains a model: ~10–60 s on 2 free cores
def test_learns_normal_features_and_detects_defects(fitted, toy_defect_data):
    model, report, likelihood_before = fitted
    _, test, labels, masks = toy_defect_data
    # a random teacher's layer-normalised features already make the bright blobs outliers, so the
    # untrained flow ranks them well too; what training must add is a higher likelihood of normals
    assert report["val_loss"][report["best_epoch"]] < report["val_loss"][0]
    assert _normal_likelihood(model, test[labels == 0]) > likelihood_before + 0.05
    scores, maps = model.predict(test)
    assert roc_auc_score(labels, scores) >= 0.8
    assert roc_auc_score(masks.ravel(), maps.numpy().ravel()) >= 0.8


def test_output_shapes_and_range(quick, toy_defect_data):
    model = quick
    test = toy_defect_data[1][:3]
    scores, maps = model.predict(test)
    assert scores.shape == (3,) and maps.shape == (3, 64, 64)
    assert scores.dtype == maps.dtype == torch.float32 and scores.device.type == "cpu"
    assert (maps <= 0).all() and (maps >= -1).all()  # minus a likelihood in (0, 1]
    assert torch.allclose(scores, maps.flatten(1).amax(1))
    rgb_scores, _ = model.predict(test.expand(-1, 3, -1, -1))
    assert torch.allclose(rgb_scores, scores, atol=1e-6)


def test_uint8_source_equals_float_tensor(backbone, quick, toy_defect_data):
    train, test = toy_defect_data[0], toy_defect_data[1][:4]
    as_uint8 = (train * 255).round().to(torch.uint8)  # the toy images are 8-bit: the same values
    model, _ = _quick_fit(backbone, TensorSource(as_uint8[:6]), TensorSource(as_uint8[20:23]))
    assert torch.equal(model.predict(test)[0], quick.predict(test)[0])


@pytest.mark.parametrize(
    ("budget", "mode", "atol"),
    # fp16 features on disk: measured max |Δ| 4e-5 on these scores (range ≈ −0.6…−0.2); recomputation: 0 on CPU
    [(1e-9, "disk", 1e-3), (0.0, "recompute", 1e-5)],
)
def test_cache_over_budget_matches_ram(backbone, quick, toy_defect_data, budget, mode, atol):
    train, test = toy_defect_data[0], toy_defect_data[1]
    model, report = _quick_fit(backbone, train[:6], train[20:23], feature_cache_gb=budget)
    assert report["feature_cache"] == {"train": mode, "val": mode}
    torch.testing.assert_close(model.predict(test)[0], quick.predict(test)[0], rtol=0, atol=atol)


@pytest.mark.parametrize(
    "bad",
    [
        dict(flow_steps=0),
        dict(clamp=0.0),
        dict(hidden_ratio=-1.0),
        dict(lr=0.0),
        dict(epochs="3"),
        dict(depth=4),
        dict(feature_cache_gb=-1.0),
    ],
)
def test_params_rejected(backbone, bad):
    with pytest.raises(pydantic.ValidationError):
        create_model("fastflow", backbone=backbone, **bad)


def test_layers_are_picked_by_name(backbone):
    with pytest.raises(ValueError, match="missing \\['layer4'\\]"):
        create_model("fastflow", backbone=backbone, layers=["layer2", "layer4"])
    # a backbone with more layers than the model needs: the model picks its own
    model = create_model("fastflow", backbone=backbone, **{**QUICK, "layers": ["layer2"]})
    assert len(model.flows) == 1 and model.flows[0].blocks[0].channels == 128
    images = torch.rand(2, 1, 64, 64)
    assert model.predict(images)[1].shape == (2, 64, 64)
