"""SuperSimpleNet (unsupervised): Perlin-masked feature noise, loss = its definition, shapes, errors, learning."""

from __future__ import annotations

import pydantic
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchvision.ops import sigmoid_focal_loss

from vadbench.backbones import load_feature_extractor
from vadbench.models import create_model
from vadbench.models.components.feature_discriminator import focal_loss_with_logits
from vadbench.models.components.smoothing import upsample_and_smooth

LAYERS = ["layer2", "layer3"]
SMALL = dict(hidden_dim=16, cls_channels=8, epochs=1, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def backbone(random_backbone_dir):
    return load_feature_extractor(random_backbone_dir, LAYERS)


def test_focal_loss_equals_torchvision():
    logits, targets = torch.randn(2, 1, 5, 5), (torch.rand(2, 1, 5, 5) > 0.5).float()
    for gamma in (0.0, 2.0, 4.0):
        ref = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=gamma, reduction="mean")
        torch.testing.assert_close(focal_loss_with_logits(logits, targets, gamma), ref)


def test_features_are_upscaled_and_noise_stays_inside_perlin_masks(backbone, toy_defect_data):
    model = create_model("supersimplenet", backbone=backbone, upscale=2.0, **SMALL).eval()
    feats = model._features(toy_defect_data[0][:8])[0]
    assert feats.shape == (8, 384, 16, 16)  # 2 × layer2's 8×8 grid at 64 px, ΣC = 128 + 256
    model._gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        noisy, masks, labels = model.synthetic_anomalies(feats)
    assert noisy.shape == (16, 384, 16, 16) and masks.shape == (16, 1, 16, 16)
    both = torch.cat([feats, feats])
    delta = (noisy - both).abs()
    assert torch.all(delta[(masks == 0).expand_as(delta)] == 0)  # no noise outside the mask
    assert delta[(masks > 0).expand_as(delta)].mean() > 0.005
    assert torch.equal(labels, masks.flatten(1).amax(1))
    assert 0 < labels.sum() < 16  # some copies stay normal (emptied masks), some are anomalous
    model._gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        again = model.synthetic_anomalies(feats)
    assert all(torch.equal(a, b) for a, b in zip((noisy, masks, labels), again))


def test_loss_is_truncated_l1_plus_focal_terms(backbone, toy_defect_data):
    model = create_model("supersimplenet", backbone=backbone, **SMALL).eval()
    feats = model._features(toy_defect_data[0][:4])
    model._gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        loss = model.loss(feats)
        model._gen = torch.Generator().manual_seed(1)
        noisy, masks, labels = model.synthetic_anomalies(model.adaptor(feats[0]))
        seg, logit = model.heads(noisy)
    normal, anomalous = seg[masks == 0], seg[masks > 0]
    ref = torch.clamp(normal + 0.5, min=0).mean() + torch.clamp(0.5 - anomalous, min=0).mean()
    ref = ref + sigmoid_focal_loss(seg, masks, alpha=-1, gamma=4, reduction="mean")
    ref = ref + sigmoid_focal_loss(logit, labels, alpha=-1, gamma=4, reduction="mean")
    torch.testing.assert_close(loss, ref)


def test_anomalies_without_masks_add_only_the_image_loss(backbone, toy_defect_data):
    """An image-level-labelled anomaly (no mask file) must not teach the map "defect-free" (supervised mode)."""
    model = create_model("supersimplenet", backbone=backbone, **SMALL).eval()
    with torch.no_grad():
        adapted = model.adaptor(model._features(toy_defect_data[0][:4])[0])
        seg, logit = model.heads(adapted)
    masks = torch.zeros(seg.shape)
    masks[2, :, :2, :2] = 1.0
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    known = torch.tensor([True, False, True, True])
    with torch.no_grad():
        loss = model.target_loss(adapted, masks, labels, known)
        other = masks.clone()
        other[1] = 1.0  # whatever the unknown image's mask holds, it is ignored
        assert torch.equal(loss, model.target_loss(adapted, other, labels, known))
        everything = model.target_loss(adapted, masks, labels)
        assert torch.equal(everything, model.target_loss(adapted, masks, labels, torch.ones(4, dtype=torch.bool)))
        assert not torch.equal(loss, everything)
        only_image = model.target_loss(adapted, masks, labels, torch.zeros(4, dtype=torch.bool))
    s, m = seg[known], masks[known]
    ref = torch.clamp(s[m == 0] + 0.5, min=0).mean() + torch.clamp(0.5 - s[m > 0], min=0).mean()
    ref = ref + sigmoid_focal_loss(s, m, alpha=-1, gamma=4, reduction="mean")
    image = sigmoid_focal_loss(logit, labels, alpha=-1, gamma=4, reduction="mean")
    torch.testing.assert_close(loss, ref + image)
    torch.testing.assert_close(only_image, image)  # no known mask in the batch: the image loss alone, no NaN


def test_predict_map_from_seg_head_score_from_cls_head(backbone, toy_defect_data):
    train, test = toy_defect_data[0], toy_defect_data[1][:3]
    model = create_model("supersimplenet", backbone=backbone, **SMALL)
    model.fit(train[:4], train[20:22])
    scores, maps = model.predict(test)
    assert scores.shape == (3,) and maps.shape == (3, 64, 64) and scores.dtype == maps.dtype == torch.float32
    with torch.no_grad():
        seg, logit = model.heads(model.adaptor(model.feature_norm(model._features(test)[0])))
    torch.testing.assert_close(scores, torch.sigmoid(logit))
    torch.testing.assert_close(maps, upsample_and_smooth(seg[:, 0], (64, 64), 4.0))
    by_map = create_model("supersimplenet", backbone=backbone, **{**SMALL, "score": "map_max"})
    by_map.load_learned_state(model.learned_state())
    torch.testing.assert_close(by_map.predict(test)[0], maps.flatten(1).amax(1))


def test_named_errors(backbone):
    with pytest.raises(ValueError, match="neighborhood must be odd"):
        create_model("supersimplenet", backbone=backbone, neighborhood=4)
    with pytest.raises(ValueError, match="perlin_min_scale_log2 must be < perlin_max_scale_log2"):
        create_model("supersimplenet", backbone=backbone, perlin_min_scale_log2=3, perlin_max_scale_log2=3)
    with pytest.raises(ValueError, match="layer4"):
        create_model("supersimplenet", backbone=backbone, layers=["layer2", "layer4"])
    for bad in (dict(epochs=0), dict(score="mean"), dict(perlin_threshold=2.0), dict(empty_probability=1.5)):
        with pytest.raises(pydantic.ValidationError):
            create_model("supersimplenet", backbone=backbone, **bad)


@pytest.mark.slow  # ~10–20 s on 2 free cores
def test_learns_toy_defects(backbone, toy_defect_data):
    train, test, labels, masks = toy_defect_data
    model = create_model("supersimplenet", backbone=backbone, epochs=60, batch_size=8, seed=0)
    before = roc_auc_score(labels, model.eval().predict(test)[0])
    model.fit(train[:20], train[20:])
    scores, maps = model.predict(test)
    after = roc_auc_score(labels, scores)
    assert after >= 0.8 and after > before, (after, before)
