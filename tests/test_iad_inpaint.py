"""IAD + inpainting: masks, inpainting from context only, determinism, round trip, learns tiny synthetic_sem."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vadbench.data.source import ImageSource, float_batches
from vadbench.models import create_model, load_model
from vadbench.models.iad_inpaint import DilatedInpaintNet, inpaint, random_box_masks, window_masks

NAME = "iad_inpaint"
TINY = dict(epochs=1, batch_size=4, width=4, seed=0)  # fast: determinism, persistence, shapes
# 64 px: the tiny dataset's size; window and holes scaled with it (16 and 8–24 px at 128)
SMALL = dict(image_size=64, window=8, hole_min=4, hole_max=12, batch_size=4, width=8, seed=0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny(toy_defect_data):
    model = create_model(NAME, **TINY)
    model.fit_report = model.fit(toy_defect_data[0][:8], toy_defect_data[0][8:10])
    return model


def test_window_masks_cover_each_pixel_once_per_phase_with_visible_neighbours():
    masks = window_masks(64, 8, 2, 2)
    assert masks.shape == (8, 1, 64, 64) and set(masks.unique().tolist()) == {0.0, 1.0}
    for phase in (masks[:4], masks[4:]):
        assert torch.equal(phase.sum(0), torch.ones(1, 64, 64))  # disjoint, covering
    assert not torch.equal(masks[0], masks[4])  # the second tiling is shifted
    # phase 0 hides whole 8×8 squares, and a hidden square's right / lower neighbours are visible
    m = masks[0, 0]
    assert torch.equal(m, m[::8, ::8].repeat_interleave(8, 0).repeat_interleave(8, 1))
    cells = m[::8, ::8]
    assert not (cells[:, :-1] * cells[:, 1:]).any() and not (cells[:-1] * cells[1:]).any()
    assert window_masks(64, 8, 3, 1).shape == (9, 1, 64, 64)


def test_random_box_masks_are_seeded_rectangles():
    m = random_box_masks(4, 64, 3, 4, 12, _gen())
    assert m.shape == (4, 1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m, random_box_masks(4, 64, 3, 4, 12, _gen()))
    assert not torch.equal(m, random_box_masks(4, 64, 3, 4, 12, _gen(1)))
    assert not torch.equal(m[0], m[1])  # one draw per image
    one = random_box_masks(200, 64, 1, 6, 6, _gen())[:, 0]
    rows, cols = one.amax(2), one.amax(1)
    assert (rows.sum(1) <= 6).all() and (cols.sum(1) <= 6).all() and (rows.sum(1) >= 3).all()  # ≥ half inside
    assert torch.equal(one.sum((1, 2)), rows.sum(1) * cols.sum(1))  # a rectangle
    assert one[:, 0].any() and one[:, -1].any()  # borders get holes too


def test_net_shapes_and_range():
    net = DilatedInpaintNet(width=4, dilations=(2, 4))
    with torch.no_grad():
        out = net(torch.rand(2, 2, 32, 48))
    assert out.shape == (2, 1, 32, 48) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_hidden_pixels_are_inpainted_from_context_only():
    """Changing every hidden pixel leaves the whole output bit-identical; changing the context does not."""
    net = DilatedInpaintNet(width=4).eval()
    x = torch.rand(2, 1, 32, 32, generator=_gen())
    mask = window_masks(32, 8, 2, 1)[1:2]
    noise = torch.rand(x.shape, generator=_gen(1))
    with torch.no_grad():
        base = inpaint(net, x, mask)
        assert torch.equal(inpaint(net, torch.where(mask > 0, noise, x), mask), base)
        changed = inpaint(net, torch.where(mask > 0, x, noise), mask)
    hidden = mask.expand_as(x) > 0
    assert torch.equal(base[~hidden], x[~hidden])  # visible pixels are copied, never predicted
    assert not torch.equal(changed[hidden], base[hidden])  # the context does matter


def test_hole_loss_counts_only_hidden_pixels():
    model = create_model(NAME, **TINY)
    x = torch.rand(2, 1, 64, 64, generator=_gen())
    mask = window_masks(64, 16, 2, 1)[:1].expand(2, 1, 64, 64)
    assert float(model.hole_loss(x, x, mask)) == pytest.approx(0, abs=1e-6)
    y = torch.where(mask > 0, x, 1 - x)  # wrong only outside the holes
    l1 = create_model(NAME, **{**TINY, "ssim_weight": 0.0})
    assert float(l1.hole_loss(x, y, mask)) == 0
    assert float(l1.hole_loss(x, 1 - x, mask)) == pytest.approx(float((2 * x - 1).abs()[mask > 0].mean()))
    # SSIM's 11×11 window reaches a few pixels across a hole's edge, nothing more
    assert float(model.hole_loss(x, y, mask)) < 0.5 * float(model.hole_loss(x, 1 - x, mask))


def test_same_seed_same_scores_other_seed_differs(tiny, toy_defect_data):
    train, test = toy_defect_data[0], toy_defect_data[1][:4]
    again = create_model(NAME, **TINY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)  # masks and order come from own generators: the global RNG plays no part
        assert again.fit(train[:8], train[8:10]) == tiny.fit_report
    rng = torch.get_rng_state()
    again.predict(test)
    assert torch.equal(rng, torch.get_rng_state())  # predict draws nothing
    assert torch.equal(again.predict(test)[0], tiny.predict(test)[0])
    other = create_model(NAME, **{**TINY, "seed": 1})
    other.fit(train[:8], train[8:10])
    assert not torch.equal(other.predict(test)[1], tiny.predict(test)[1])
    assert tiny.reconstruction_loss(train[8:10]) == tiny.reconstruction_loss(train[8:10])  # fixed val masks


def test_save_load_round_trip_and_batch_independence(tiny, toy_defect_data, tmp_path):
    test = toy_defect_data[1][:5]
    scores, maps = tiny.predict(test)
    tiny.save(tmp_path / "iad.pt")
    loaded = load_model(tmp_path / "iad.pt")
    assert loaded.hparams == tiny.hparams
    state = tiny.learned_state()
    assert "test_masks" not in state and state["map_norm.mean"].shape == (128, 128)  # masks rebuilt, norm saved
    s2, m2 = loaded.predict(test)
    assert torch.equal(scores, s2) and torch.equal(maps, m2)
    assert torch.allclose(tiny.predict(test[2:3])[0], scores[2:3], atol=1e-5)  # fixed masks: no batch effect


def test_output_shapes_rgb_and_normalisation(tiny, toy_defect_data):
    images = torch.rand(3, 3, 96, 80, generator=_gen())
    scores, maps = tiny.predict(images)
    assert scores.shape == (3,) and maps.shape == (3, 96, 80) and torch.isfinite(maps).all()
    assert torch.allclose(scores, tiny.anomaly_maps(images).flatten(1).amax(1))
    # per position: the validation normals' own maps come out standardised (mean 0 at every pixel)
    val = toy_defect_data[0][8:10]
    assert float(tiny.anomaly_maps(val).mean(0).abs().max()) < 1e-4
    raw = create_model(NAME, **{**TINY, "map_normalization": "none"})
    assert torch.equal(raw.anomaly_maps(val), raw.raw_maps(val))
    with pytest.raises(ValueError, match="at least 2 validation images"):
        create_model(NAME, **TINY).fit(toy_defect_data[0][:4], toy_defect_data[0][4:5])
    with pytest.raises(ValueError, match="expected images"):
        tiny.predict(torch.rand(2, 2, 32, 32))


@pytest.mark.parametrize(
    "bad",
    [
        dict(image_size=126),  # two stride-2 convolutions
        dict(window=80),  # more than half the image
        dict(window=15),  # the shifted tiling needs an even window
        dict(hole_min=20, hole_max=10),
        dict(dilations=[]),
        dict(window_groups=1),  # a hidden square would touch hidden neighbours
        dict(l1_weight=0, ssim_weight=0),
        dict(width=1),
        dict(unknown=1),
    ],
)
def test_rejects_bad_params(bad):
    with pytest.raises(pydantic.ValidationError):
        create_model(NAME, **bad)


def _evaluate(model, test) -> tuple[float, float]:
    scores, maps = zip(*(model.predict(x) for x in float_batches(test, 16, "cpu")))
    masks = np.stack([test.mask(i).numpy() for i in range(len(test))])
    return (
        roc_auc_score(test.labels, torch.cat(scores).numpy()),
        roc_auc_score(masks.ravel(), torch.cat(maps).numpy().ravel()),
    )


@pytest.mark.slow
def test_learns_tiny_synthetic_sem_and_beats_its_untrained_self(tiny_sem):
    # ~9 s of training on 2 shared cores (14 epochs × 8 steps at 64 px)
    train, val, test = (ImageSource(tiny_sem, s) for s in ("train", "val", "test"))
    untrained = create_model(NAME, **{**SMALL, "epochs": 1, "lr": 1e-12})  # calibrated, not trained
    untrained.fit(train, val)
    model = create_model(NAME, **{**SMALL, "epochs": 14, "patience": 0})
    report = model.fit(train, val)
    assert report["val_loss"][report["best_epoch"]] < 0.5 * report["val_loss"][0]
    auroc, pixel = _evaluate(model, test)
    auroc_before, pixel_before = _evaluate(untrained, test)
    # measured: image 0.88 / pixel 0.96 after, 0.73 / 0.79 before (20 epochs: 0.91 / 0.96)
    assert auroc >= 0.8 and auroc > auroc_before + 0.05, (auroc, auroc_before)
    assert pixel >= 0.9 and pixel > pixel_before, (pixel, pixel_before)
