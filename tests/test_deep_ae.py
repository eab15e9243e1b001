"""Deep autoencoder (DAE, MSE + SSIM): learns to reconstruct normals, finds toy defects, round-trips, is deterministic."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from conftest import make_toy_defect_data
from sklearn.metrics import roc_auc_score

from vadbench.data.source import TensorSource
from vadbench.models import create_model
from vadbench.models.deep_ae import DeepAENet

NAME = "deep_ae"
SMALL = dict(epochs=4, batch_size=8, seed=0)


@pytest.fixture(scope="module")
def fitted(toy_defect_data):
    train = toy_defect_data[0]
    val = make_toy_defect_data(n_train=8, seed=1)[0]
    model = create_model(NAME, **SMALL)
    untrained_loss = model.reconstruction_loss(val)
    report = model.fit(train, val)
    return model, report, untrained_loss, val


def test_architecture_shapes():
    net = DeepAENet()
    with torch.no_grad():
        recon, z = net(torch.rand(2, 1, 128, 128))
    assert recon.shape == (2, 1, 128, 128) and z.shape == (2, 128)
    assert net.to_latent.in_features == 256 * 8 * 8 and net.from_latent.out_features == 16384
    assert len(net.encoder) == 4 and len(net.decoder) == 4
    assert 0 <= float(recon.min()) and float(recon.max()) <= 1


def test_learns_and_detects_defects(fitted, toy_defect_data):
    model, report, untrained_loss, val = fitted
    _, test, labels, masks = toy_defect_data
    assert report["epochs_run"] == SMALL["epochs"]
    # beats its own untrained state on held-out normals
    assert model.reconstruction_loss(val) < untrained_loss
    scores, maps = model.predict(test)
    assert roc_auc_score(labels, scores.numpy()) >= 0.8
    # a 4-epoch DAE still blurs the line edges, which the SSIM half of the map marks
    assert roc_auc_score(masks.ravel(), maps.numpy().ravel()) >= 0.7


def test_output_shapes_rgb_and_resolution(fitted):
    model = fitted[0]
    images = torch.rand(3, 3, 96, 80)  # RGB, not 128×128: maps come back at the input size
    scores, maps = model.predict(images)
    assert scores.shape == (3,) and maps.shape == (3, 96, 80)
    assert scores.dtype == maps.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(maps).all()
    # grey input with the same luminance gives the same result as its RGB replica
    grey = torch.rand(2, 1, 64, 64)
    assert torch.allclose(model.predict(grey)[0], model.predict(grey.expand(-1, 3, -1, -1))[0], atol=1e-5)


@pytest.mark.parametrize(
    "bad", [dict(lr=-1.0), dict(epochs=0), dict(score_reduction="median"), dict(ssim_map_weight=1.5), dict(unknown=1)]
)
def test_rejects_bad_params(bad):
    with pytest.raises(pydantic.ValidationError):
        create_model(NAME, **bad)


def test_rejects_bad_images(fitted):
    with pytest.raises(ValueError, match="expected images"):
        fitted[0].predict(torch.rand(2, 2, 32, 32))


def test_ssim_properties():
    from vadbench.models.components.ssim import ssim, ssim_map

    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim_map(x, x), torch.ones_like(x), atol=1e-5)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert float(ssim(x, noisy)) < float(ssim(x, (x + 0.05).clamp(0, 1))) < 1
    assert torch.allclose(ssim(x, noisy), ssim(noisy, x))


def test_map_combines_ssim_and_l2(fitted):
    model = fitted[0]
    x = torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    recon = x.flip(-1)
    pure_l2 = create_model(NAME, **{**SMALL, "ssim_map_weight": 0.0}).residual(x, recon)
    assert torch.allclose(pure_l2, (x - recon) ** 2)
    assert not torch.allclose(model.residual(x, recon), pure_l2)


def test_mean_reduction_is_map_mean(fitted):
    model = fitted[0]
    mean_model = create_model(NAME, **{**SMALL, "score_reduction": "mean"})
    mean_model.load_learned_state(model.learned_state())
    images = torch.from_numpy(np.random.default_rng(0).random((2, 1, 128, 128), dtype=np.float32))
    scores, maps = mean_model.eval().predict(images)
    assert torch.allclose(scores, maps.flatten(1).mean(1), rtol=1e-4)


def test_uint8_source_fits_the_same_model_as_the_float_tensor(toy_defect_data):
    """fit streams its sources (to_input per batch): a uint8 TensorSource of the same images = the tensor."""
    train, test = toy_defect_data[0][:12], toy_defect_data[1][:4]
    val = make_toy_defect_data(n_train=5, seed=1)[0]
    params = {**SMALL, "epochs": 1, "batch_size": 5}  # 12 = 2 × 5 + a short batch of two
    u8 = lambda x: TensorSource((x * 255).round().to(torch.uint8))  # noqa: E731
    a, b = create_model(NAME, **params), create_model(NAME, **params)
    assert a.fit(train, val) == b.fit(u8(train), u8(val))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert torch.equal(a.predict(test)[1], b.predict(test)[1])
    assert a.reconstruction_loss(val) == b.reconstruction_loss(u8(val))
