"""f-AnoGAN: WGAN-GP + izi_f encoder shapes, the penalty and izi_f losses, the two phases, determinism, detection."""

from __future__ import annotations

import pydantic
import pytest
import torch
from conftest import make_toy_defect_data
from sklearn.metrics import roc_auc_score

import vadbench.models.fanogan  # noqa: F401  (registers the model)
from vadbench.models import create_model, load_model
from vadbench.models.components.smoothing import gaussian_blur
from vadbench.models.fanogan import Critic, Encoder, Generator

NAME = "fanogan"
SMALL = dict(image_size=32, width=8, nz=16, batch_size=4, gan_epochs=3, enc_epochs=2, seed=0)


@pytest.fixture(scope="module")
def fitted(toy_defect_data):
    model = create_model(NAME, **SMALL)
    report = model.fit(toy_defect_data[0][:12], toy_defect_data[0][12:16])
    return model, report


@pytest.mark.parametrize("size", [32, 64])
def test_architecture_shapes(size):
    g, c, e = Generator(size, 8, 20), Critic(size, 8), Encoder(size, 8, 20)
    with torch.no_grad():
        x = g(torch.randn(3, 20, generator=torch.Generator().manual_seed(0)))
        value, feats = c(x)
        z = e(x)
    assert x.shape == (3, 1, size, size) and float(x.abs().max()) <= 1  # tanh: the [−1, 1] image range
    assert value.shape == (3,) and feats.shape == (3, 8 * size // 8 * 16)  # flattened 4×4 map before the head
    assert z.shape == (3, 20)
    # the critic has no normalisation (the gradient penalty is per sample); the encoder has BatchNorm
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in c.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in e.modules())


@pytest.mark.parametrize(
    "bad", [dict(image_size=40), dict(lr=0.0), dict(n_critic=0), dict(kappa=-1.0), dict(beta2=1.0), dict(unknown=1)]
)
def test_rejects_bad_params(bad):
    with pytest.raises(pydantic.ValidationError):
        create_model(NAME, **bad)


def test_gradient_penalty_and_wasserstein_terms():
    model = create_model(NAME, **SMALL)
    real = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # real = fake: the Wasserstein terms cancel and every mix is x itself → λ · (‖∇C(x)‖ − 1)²
    x = real.clone().requires_grad_(True)
    grad = torch.autograd.grad(model.net.critic(x)[0].sum(), x)[0]
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    loss = model.critic_loss(real, real, torch.Generator().manual_seed(0))
    assert torch.allclose(loss, 10.0 * penalty, rtol=1e-4)
    # without the penalty: the critic's mean gap C(fake) − C(real)
    fake = -real
    no_gp = create_model(NAME, **{**SMALL, "gp_weight": 0.0})
    no_gp.load_learned_state(model.learned_state())
    gap = model.net.critic(fake)[0].mean() - model.net.critic(real)[0].mean()
    assert torch.allclose(no_gp.critic_loss(real, fake, torch.Generator().manual_seed(0)), gap, atol=1e-6)


def test_izif_loss_is_image_plus_kappa_feature_residual():
    model = create_model(NAME, **SMALL).eval()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss, recon = model.izif_loss(x)
        net = model.net
        expected_recon = net.generator(net.encoder(x * 2 - 1))
        image = ((x * 2 - 1 - expected_recon) ** 2).flatten(1).mean(1)
        feats = ((net.critic(x * 2 - 1)[1] - net.critic(expected_recon)[1]) ** 2).mean(1)
    assert loss.shape == (3,) and torch.allclose(recon, expected_recon)
    assert torch.allclose(loss, image + feats, rtol=1e-5)
    kappa0 = create_model(NAME, **{**SMALL, "kappa": 0.0})
    kappa0.load_learned_state(model.learned_state())
    assert torch.allclose(kappa0.eval().izif_loss(x)[0].detach(), image, rtol=1e-5)


def test_two_phases(fitted, toy_defect_data):
    model, report = fitted
    # phase 1: one critic step per batch (12 images / 4 = 3 a pass), a generator step after every 5th
    assert report["gan"]["critic_steps"] == 3 * SMALL["gan_epochs"] and report["gan"]["val_loss"] == []
    assert report["encoder"]["epochs_run"] == SMALL["enc_epochs"] and len(report["encoder"]["val_loss"]) == 2
    # phase 2 trains the encoder only: G (weights and BatchNorm statistics) and C are those phase 1 left
    train = toy_defect_data[0][:12]
    short, longer = (create_model(NAME, **{**SMALL, "enc_epochs": n}) for n in (1, 3))
    short.fit(train, None)  # no validation: the last epoch is kept, so more epochs move the encoder
    longer.fit(train, None)
    for key, value in short.state_dict().items():
        same = torch.equal(value, longer.state_dict()[key])
        assert same != key.startswith("net.encoder."), key


def test_score_and_residual_map(fitted):
    model = fitted[0]
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    scores, maps = model.predict(images)
    assert scores.shape == (2,) and maps.shape == (2, 40, 56) and scores.dtype == maps.dtype == torch.float32
    x = model.to_input(images)
    with torch.no_grad():
        loss, recon = model.izif_loss(x)
    assert torch.allclose(scores, loss, rtol=1e-5)
    own = model.score_and_residual(images)[1]
    assert torch.allclose(own, gaussian_blur(((x - (recon + 1) / 2) ** 2)[:, 0], model.p.smooth_sigma), atol=1e-6)
    with pytest.raises(ValueError, match="expected images"):
        model.predict(torch.rand(2, 2, 32, 32))


def test_deterministic_seeded_and_round_trip(fitted, toy_defect_data, tmp_path):
    model, report = fitted
    train, val, test = toy_defect_data[0][:12], toy_defect_data[0][12:16], toy_defect_data[1][:4]
    again = create_model(NAME, **SMALL)
    assert again.fit(train, val) == report
    assert torch.equal(again.predict(test)[0], model.predict(test)[0])
    other = create_model(NAME, **{**SMALL, "seed": 1})
    other.fit(train, val)
    assert not torch.equal(other.predict(test)[0], model.predict(test)[0])
    model.save(tmp_path / "f.pt")
    for a, b in zip(model.predict(test), load_model(tmp_path / "f.pt").predict(test), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_learns_and_detects_defects():
    """48 normals at 32 px, 750 critic / 150 generator steps + 30 encoder epochs (~55 s): measured image
    AUROC 0.95 from the izi_f score. The bar 0.8 leaves room for another CPU's rounding changing the GAN's
    trajectory; with the paper's lr 1e-4 at this budget the generator does not converge (measured 0.65)."""
    train, test, labels, _ = make_toy_defect_data(n_train=48, n_test=32)
    val = make_toy_defect_data(n_train=8, seed=1)[0]
    model = create_model(NAME, gan_epochs=250, enc_epochs=30, seed=0)
    untrained = model.izif_val_loss(val)
    report = model.fit(train, val)
    assert report["gan"]["critic_steps"] == 750
    assert model.izif_val_loss(val) < 0.25 * untrained  # G(E(x)) reconstructs held-out normals
    scores, _ = model.predict(test)
    assert roc_auc_score(labels, scores.numpy()) >= 0.8
