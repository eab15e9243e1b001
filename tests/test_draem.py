"""DRAEM: sub-network shapes, simulated anomalies, focal loss, fractal textures, learning, determinism, save/load."""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_defect_data
from sklearn.metrics import roc_auc_score

import vadbench.models.draem  # noqa: F401  (registers "draem" before models/__init__ lists it)
from vadbench.models import create_model, load_model
from vadbench.models.draem import DiscriminativeNet, DraemNet, ReconstructiveNet, focal_loss, fractal_textures

NAME = "draem"
# 64 px toy images at their own size, 72 steps: the fit takes ~13 s on 2 cores
SMALL = dict(input_size=64, recon_width=8, disc_width=8, textures=32, epochs=12, batch_size=4, patience=0, seed=0)
TINY = {**SMALL, "epochs": 1, "textures": 4, "recon_width": 4, "disc_width": 4}


@pytest.fixture(scope="module")
def fitted(toy_defect_data):
    train = toy_defect_data[0]
    val = make_toy_defect_data(n_train=8, seed=1)[0]
    model = create_model(NAME, **SMALL)
    untrained = model.validation_loss(val)
    report = model.fit(train, val)
    return model, report, untrained, val


def test_architecture_shapes():
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert ReconstructiveNet(3, 4)(x).shape == (2, 3, 64, 64)
        assert DiscriminativeNet(6, 4)(torch.cat([x, x], 1)).shape == (2, 2, 64, 64)
        recon, logits = DraemNet(1, 4, 4)(torch.rand(2, 1, 96, 96))
    assert recon.shape == (2, 1, 96, 96) and logits.shape == (2, 2, 96, 96)
    disc = DiscriminativeNet(2, 4)
    assert len(disc.encoder) == 6 and len(disc.decoder) == 5  # 5 max-pools, a skip at every level
    assert disc.decoder[0][0].in_channels == 16 * 4 and disc.decoder[-1][0].in_channels == 2 * 4
    assert len(ReconstructiveNet(1, 4).encoder) == 5


def test_focal_loss_is_two_class_softmax_focal():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.7).float()
    p_t = torch.softmax(logits, 1).gather(1, mask.long()).squeeze(1)
    direct = (-((1 - p_t) ** 2) * p_t.log()).mean()
    assert torch.allclose(focal_loss(logits, mask, 2.0), direct, atol=1e-6)
    assert torch.allclose(focal_loss(logits, mask, 0.0), F.cross_entropy(logits, mask[:, 0].long()), atol=1e-6)


def test_fractal_textures_are_seeded_and_distinct():
    a, b, c = fractal_textures(6, 64, 0), fractal_textures(6, 64, 0), fractal_textures(6, 64, 1)
    assert a.shape == (6, 64, 64) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {0, 255}
    fill = (a > 0).flatten(1).float().mean(1)
    assert (fill > 0.02).all() and (fill < 0.98).all()
    assert all(not torch.equal(a[i], a[j]) for i in range(6) for j in range(i))


def test_corruption_blends_texture_inside_the_mask_only():
    model = create_model(NAME, **{**TINY, "opacity_min": 1.0, "opacity_max": 1.0, "anomaly_probability": 1.0})
    x = torch.rand(16, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    bank = torch.zeros(3, 64, 64, dtype=torch.uint8)  # flat textures: A = lo everywhere
    x_aug, mask = model.corrupt(x, bank, torch.Generator().manual_seed(1))
    assert x_aug.shape == x.shape and mask.shape == (16, 1, 64, 64)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    outside = mask == 0
    assert torch.equal(x_aug[outside], x[outside])
    for i in range(16):  # β = 1: the masked region is the (flat) texture alone
        inside = x_aug[i][mask[i] > 0]
        assert inside.numel() == 0 or torch.allclose(inside, inside[0].expand_as(inside))
    again = model.corrupt(x, bank, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x_aug) and torch.equal(again[1], mask)


def test_half_of_the_images_stay_clean():
    model = create_model(NAME, **TINY)
    x = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x_aug, mask = model.corrupt(x, fractal_textures(4, 32, 0), torch.Generator().manual_seed(0))
    clean = (x_aug == x).flatten(1).all(1)
    assert 16 <= int(clean.sum()) <= 48  # Bernoulli(½) per image (+ the rare empty Perlin mask)
    assert (mask.flatten(1).amax(1)[clean] == 0).all()  # a clean image has an empty mask
    none = create_model(NAME, **{**TINY, "anomaly_probability": 0.0})
    assert torch.equal(none.corrupt(x, fractal_textures(4, 32, 0), torch.Generator())[0], x)


def test_score_kernel_scales_with_input_size():
    assert create_model(NAME, input_size=128).score_kernel == 11  # 21 at 256 px, as the paper
    assert create_model(NAME, input_size=256).score_kernel == 21
    assert create_model(NAME, input_size=64).score_kernel == 5
    assert create_model(NAME, input_size=64, score_kernel=3).score_kernel == 3
    with pytest.raises(ValueError, match="odd"):
        create_model(NAME, score_kernel=4)


@pytest.mark.parametrize(
    "bad",
    [
        dict(input_size=100),  # not a multiple of 32 (5 max-pools)
        dict(channels=2),
        dict(lr=0.0),
        dict(epochs=0),
        dict(opacity_max=1.5),
        dict(batch_size=1),
        dict(unknown=1),
    ],
)
def test_rejects_bad_params(bad):
    with pytest.raises(pydantic.ValidationError):
        create_model(NAME, **bad)


def test_rejects_inconsistent_params():
    with pytest.raises(ValueError, match="opacity_min"):
        create_model(NAME, opacity_min=0.9, opacity_max=0.5)
    with pytest.raises(ValueError, match="perlin_min_scale_log2"):
        create_model(NAME, perlin_min_scale_log2=3, perlin_max_scale_log2=3)


def test_learns_and_detects_defects(fitted, toy_defect_data):
    model, report, untrained, val = fitted
    _, test, labels, masks = toy_defect_data
    assert report["epochs_run"] == SMALL["epochs"] and len(report["val_loss"]) == SMALL["epochs"]
    assert model.validation_loss(val) < untrained  # reconstruction + segmentation improved on held-out normals
    scores, maps = model.predict(test)
    assert roc_auc_score(labels, scores.numpy()) >= 0.8
    assert roc_auc_score(masks.ravel(), maps.numpy().ravel()) >= 0.8
    assert 0 <= float(maps.min()) and float(maps.max()) <= 1  # probabilities


def test_output_shapes_rgb_and_resolution(fitted):
    model = fitted[0]
    scores, maps = model.predict(torch.rand(3, 3, 96, 80))  # RGB, not 64 px: maps at the input size
    assert scores.shape == (3,) and maps.shape == (3, 96, 80)
    assert scores.dtype == maps.dtype == torch.float32 and torch.isfinite(maps).all()
    grey = torch.rand(2, 1, 64, 64)
    assert torch.allclose(model.predict(grey)[0], model.predict(grey.expand(-1, 3, -1, -1))[0], atol=1e-5)
    with pytest.raises(ValueError, match="expected images"):
        model.predict(torch.rand(2, 2, 32, 32))


def test_same_seed_same_scores_and_save_load(toy_defect_data, tmp_path):
    train, test = toy_defect_data[0][:9], toy_defect_data[1][:4]  # 9 = 2 × 4 + a skipped batch of one
    val = make_toy_defect_data(n_train=4, seed=1)[0]
    a, b, c = (create_model(NAME, **{**TINY, "seed": s}) for s in (0, 0, 1))
    assert a.fit(train, val) == b.fit(train, val)
    c.fit(train, val)
    assert torch.equal(a.predict(test)[0], b.predict(test)[0])
    assert not torch.equal(a.predict(test)[1], c.predict(test)[1])
    a.save(tmp_path / "draem.pt")
    loaded = load_model(tmp_path / "draem.pt")
    for x, y in zip(a.predict(test), loaded.predict(test), strict=True):
        assert torch.equal(x, y)
    assert all(k.startswith("net.") for k in a.learned_state())  # the texture bank is not saved


def test_colour_input_path(toy_defect_data):
    model = create_model(NAME, **{**TINY, "channels": 3})
    model.fit(toy_defect_data[0][:4])  # no val: the last epoch is kept
    scores, maps = model.predict(torch.rand(2, 3, 64, 64))
    assert scores.shape == (2,) and maps.shape == (2, 64, 64) and torch.isfinite(maps).all()
    assert model.net.recon.out.out_channels == 3 and model.net.disc.encoder[0][0].in_channels == 6
