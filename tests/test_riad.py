"""RIAD: disjoint cell masks, inpainting only from context, MSGMS, determinism, round trip, learns the toy defects."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from conftest import make_toy_defect_data
from sklearn.metrics import roc_auc_score

import vadbench.models.riad  # noqa: F401  (registers "riad" before models/__init__ lists it)
from vadbench.models import create_model, load_model
from vadbench.models.riad import (
    InpaintUNet,
    cell_partition,
    gradient_magnitude,
    inpaint,
    msgms_error_map,
    msgms_loss,
)

NAME = "riad"
TINY = dict(epochs=1, batch_size=4, width=4, seed=0)  # fast: determinism, persistence, shapes
LEARN = dict(epochs=4, batch_size=4, width=8, seed=0)  # 6 steps per epoch on the 24 toy images


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny(toy_defect_data):
    model = create_model(NAME, **TINY)
    model.fit_report = model.fit(toy_defect_data[0][:8], toy_defect_data[0][8:10])
    return model


def test_unet_shapes_and_widths():
    net = InpaintUNet(width=4)
    with torch.no_grad():
        out = net(torch.rand(2, 1, 128, 128))
    assert out.shape == (2, 1, 128, 128) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert [d[0].out_channels for d in net.down] == [4, 8, 16, 32, 32]  # the reference's 1, 2, 4, 8, 8 × width
    assert [u.conv[0].in_channels for u in net.up] == [64, 32, 16, 8]  # upsampled + skip concatenated


def test_cell_partition_is_disjoint_balanced_and_seeded():
    sets = cell_partition(3, 64, 8, 3, _gen())
    assert sets.shape == (3, 1, 64, 64) and sets.dtype == torch.int64 and set(sets.unique().tolist()) == {0, 1, 2}
    cells = sets[:, 0, ::8, ::8]  # one value per 8×8 cell ...
    assert torch.equal(sets, cells.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None])  # ... constant in it
    counts = torch.stack([(cells == j).flatten(1).sum(1) for j in range(3)])
    assert (counts.max(0).values - counts.min(0).values <= 1).all()  # 64 cells → 22/21/21
    assert not torch.equal(sets[0], sets[1])  # one partition per image
    assert torch.equal(sets, cell_partition(3, 64, 8, 3, _gen()))
    assert not torch.equal(sets, cell_partition(3, 64, 8, 3, _gen(1)))
    odd = cell_partition(1, 20, 8, 2, _gen())  # ⌈20/8⌉ = 3 cells a side, cropped
    assert odd.shape == (1, 1, 20, 20)


def test_each_pixel_is_inpainted_from_context_only():
    """Changing every pixel of one set leaves the reconstruction of that set bit-identical."""
    net = InpaintUNet(width=4).eval()
    x = torch.rand(2, 1, 32, 32, generator=_gen())
    sets = cell_partition(2, 32, 4, 3, _gen(1))
    with torch.no_grad():
        base = inpaint(net, x, sets, 3)
        for j in range(3):
            hidden = sets == j
            changed = inpaint(net, torch.where(hidden, torch.rand(x.shape, generator=_gen(2 + j)), x), sets, 3)
            assert torch.equal(changed[hidden], base[hidden])
            assert not torch.equal(changed[~hidden], base[~hidden])  # visible context does matter
    assert base.shape == x.shape


def test_gradient_magnitude_and_msgms():
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16) * 0.01
    g = gradient_magnitude(ramp)
    assert torch.allclose(g[..., 1:-1, 1:-1], torch.full_like(g[..., 1:-1, 1:-1], 0.02), atol=1e-5)  # Prewitt/3
    assert float(gradient_magnitude(torch.full((1, 1, 8, 8), 0.3)).max()) < 1e-5
    x = torch.rand(2, 1, 64, 64, generator=_gen())
    y = (x + 0.1 * torch.randn(x.shape, generator=_gen(1))).clamp(0, 1)
    assert float(msgms_loss(x, x)) == pytest.approx(0, abs=1e-6)
    assert float(msgms_error_map(x, x).abs().max()) < 1e-5
    assert 0 < float(msgms_loss(x, y)) < 1 and torch.allclose(msgms_loss(x, y), msgms_loss(y, x))
    emap = msgms_error_map(x, y)
    assert emap.shape == (2, 1, 64, 64) and float(emap.min()) >= 0
    # coarser noise is worse at every scale → larger loss
    assert float(msgms_loss(x, (x + 0.3 * torch.randn(x.shape, generator=_gen(1))).clamp(0, 1))) > float(
        msgms_loss(x, y)
    )


def test_loss_is_zero_for_a_perfect_reconstruction_and_differentiable_on_flat_images():
    model = create_model(NAME, **TINY)
    x = torch.rand(2, 1, 64, 64, generator=_gen())
    assert float(model.loss(x, x)) == pytest.approx(0, abs=1e-5)
    flat = torch.full((2, 1, 64, 64), 0.5, requires_grad=True)
    model.loss(torch.full((2, 1, 64, 64), 0.5), flat).backward()
    assert torch.isfinite(flat.grad).all()  # the ε inside the gradient-magnitude sqrt


def test_same_seed_same_scores_other_seed_differs(tiny, toy_defect_data):
    train, test = toy_defect_data[0], toy_defect_data[1][:4]
    again = create_model(NAME, **TINY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)  # masks and order come from own generators: the global RNG plays no part
        assert again.fit(train[:8], train[8:10]) == tiny.fit_report  # same losses, epoch by epoch
    rng = torch.get_rng_state()
    again.predict(test)
    assert torch.equal(rng, torch.get_rng_state())  # predict draws nothing
    assert torch.equal(again.predict(test)[0], tiny.predict(test)[0])
    other = create_model(NAME, **{**TINY, "seed": 1})
    other.fit(train[:8], train[8:10])
    assert not torch.equal(other.predict(test)[1], tiny.predict(test)[1])
    # the validation criterion uses fixed masks: the same number every time it is evaluated
    assert tiny.reconstruction_loss(train[8:10]) == tiny.reconstruction_loss(train[8:10])


def test_save_load_round_trip_and_batch_independence(tiny, toy_defect_data, tmp_path):
    test = toy_defect_data[1][:5]
    scores, maps = tiny.predict(test)
    tiny.save(tmp_path / "riad.pt")
    loaded = load_model(tmp_path / "riad.pt")
    assert loaded.hparams == tiny.hparams
    assert "test_sets" not in tiny.learned_state()  # rebuilt from the seed, not stored
    s2, m2 = loaded.predict(test)
    assert torch.equal(scores, s2) and torch.equal(maps, m2)
    # the test partitions are fixed, not drawn per batch: an image scores the same alone or in a batch
    assert torch.allclose(tiny.predict(test[2:3])[0], scores[2:3], atol=1e-5)


def test_output_shapes_rgb_resolution_and_image_size(tiny):
    scores, maps = tiny.predict(torch.rand(3, 3, 96, 80, generator=_gen()))
    assert scores.shape == (3,) and maps.shape == (3, 96, 80)
    assert scores.dtype == maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert torch.allclose(scores, tiny.anomaly_maps(torch.rand(3, 3, 96, 80, generator=_gen())).flatten(1).amax(1))
    small = create_model(NAME, **{**TINY, "image_size": 32, "cell_sizes": [2, 4]})
    assert small.anomaly_maps(torch.rand(2, 1, 64, 64)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="expected images"):
        tiny.predict(torch.rand(2, 2, 32, 32))


@pytest.mark.parametrize(
    "bad",
    [
        dict(cell_sizes=[2, 128]),  # a cell larger than half the image
        dict(cell_sizes=[]),
        dict(num_masks=1),
        dict(image_size=100),  # the U-Net halves four times
        dict(image_size=16, gms_scales=4),
        dict(width=1),
        dict(lr=0.0),
        dict(unknown=1),
    ],
)
def test_rejects_bad_params(bad):
    with pytest.raises(pydantic.ValidationError):
        create_model(NAME, **bad)


@pytest.mark.slow
def test_learns_and_detects_defects(toy_defect_data):
    """Trained on the toy lines, it finds both the bright blobs and dark blobs that a raw-gradient score misses.

    The bright blobs are easy (an untrained net already scores them well: they are the strongest edges in the
    image); the dark ones sit at the lines' own grey level, so only a model that expects the lines sees them."""
    train, test, labels, masks = toy_defect_data
    val = make_toy_defect_data(n_train=8, seed=1)[0]
    dark = torch.where(torch.from_numpy(masks)[:, None] > 0, torch.tensor(64 / 255), test)
    model = create_model(NAME, **LEARN)
    untrained_loss = model.reconstruction_loss(val)
    untrained_dark = roc_auc_score(masks.ravel(), model.predict(dark)[1].numpy().ravel())
    report = model.fit(train, val)
    assert report["epochs_run"] == LEARN["epochs"]
    assert model.reconstruction_loss(val) < 0.5 * untrained_loss
    for images in (test, dark):
        scores, maps = model.predict(images)
        assert roc_auc_score(labels, scores.numpy()) >= 0.9
        assert roc_auc_score(masks.ravel(), maps.numpy().ravel()) >= 0.9
    assert untrained_dark < 0.7  # what training adds (measured: 0.44 untrained vs 0.996 trained)
    assert np.isfinite(report["val_loss"]).all()
