"""PaDiM: detection on toy defects, Gaussians and distances against numpy/scipy references, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from vadbench.backbones import load_feature_extractor
from vadbench.data.source import TensorSource
from vadbench.metrics.cost import PeakMemory
from vadbench.models import create_model, load_model
from vadbench.models.padim import PaDiM, inverse_covariances, inverse_per_matrix


@pytest.fixture(scope="module")
def extractor(random_backbone_dir):
    return load_feature_extractor(random_backbone_dir, layers=PaDiM.Params().layers)


@pytest.fixture(scope="module")
def fitted(extractor, toy_defect_data):
    train, test, _, _ = toy_defect_data
    model = create_model("padim", backbone=extractor, seed=0)
    report = model.fit(train)
    scores, maps = model.predict(test)
    return model, report, scores, maps


def test_detects_toy_defects(fitted, toy_defect_data):
    _, _, labels, masks = toy_defect_data
    _, _, scores, maps = fitted
    assert roc_auc_score(labels, scores.numpy()) >= 0.9
    assert roc_auc_score(masks.ravel(), maps.numpy().ravel()) >= 0.9


def test_shapes(fitted, toy_defect_data):
    model, report, scores, maps = fitted
    test = toy_defect_data[1]
    assert scores.shape == (len(test),) and maps.shape == (len(test), 64, 64)
    assert scores.dtype == maps.dtype == torch.float32 and maps.device.type == "cpu"
    # resnet18 layer1..3 = 64 + 128 + 256 channels on layer1's 16×16 grid (stride 4 of 64²)
    assert report["total_channels"] == 448 and report["grid"] == [16, 16]
    assert model.channel_idx.shape == (100,) and model.channel_idx.unique().numel() == 100
    assert model.mean.shape == (100, 16, 16) and model.inv_covariance.shape == (256, 100, 100)
    # image score = max of the map
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))


def _embeddings(model: PaDiM, images: torch.Tensor) -> np.ndarray:
    """(N, d, 16, 16) float64: layers resized by pixel repetition (nearest), kept channels — written out."""
    feats = model.backbone(images)  # layer1 (16²), layer2 (8²), layer3 (4²)
    full = torch.cat(
        [f.repeat_interleave(16 // f.shape[-1], -1).repeat_interleave(16 // f.shape[-2], -2) for f in feats.values()], 1
    )
    return full[:, model.channel_idx].double().numpy()


def test_gaussians_and_distances_match_reference(fitted, toy_defect_data):
    model, _, _, maps = fitted
    train, test = toy_defect_data[0], toy_defect_data[1]
    x = _embeddings(model, train)
    # channels are kept per layer before resizing: exactly the written-out concatenate-then-select embedding
    with torch.no_grad():
        np.testing.assert_array_equal(model._embed(test[:3]).double().numpy(), _embeddings(model, test[:3]))
    for pos in [(0, 0), (7, 9), (15, 3)]:
        v = x[:, :, pos[0], pos[1]]  # (N, d)
        cov = np.cov(v, rowvar=False) + 0.01 * np.eye(v.shape[1])
        np.testing.assert_allclose(model.mean[:, pos[0], pos[1]].numpy(), v.mean(0), rtol=1e-4, atol=1e-5)
        inv = model.inv_covariance[pos[0] * 16 + pos[1]].double().numpy()
        np.testing.assert_allclose(inv @ cov, np.eye(v.shape[1]), atol=2e-3)
    # full map: Mahalanobis with the reference inverse, bilinear up, scipy smoothing
    t = _embeddings(model, test[:3])
    mean = x.mean(0)
    dist = np.zeros((3, 16, 16))
    for i in range(16):
        for j in range(16):
            inv = np.linalg.inv(np.cov(x[:, :, i, j], rowvar=False) + 0.01 * np.eye(100))
            delta = t[:, :, i, j] - mean[:, i, j]
            dist[:, i, j] = np.sqrt(np.einsum("bi,ij,bj->b", delta, inv, delta))
    up = F.interpolate(torch.from_numpy(dist)[:, None], size=(64, 64), mode="bilinear")[:, 0].numpy()
    ref = np.stack([ndimage.gaussian_filter(u, sigma=4) for u in up])
    np.testing.assert_allclose(maps[:3].numpy(), ref, rtol=2e-3, atol=2e-3)


def test_save_load_round_trip(fitted, extractor, toy_defect_data, tmp_path):
    model, _, scores, maps = fitted
    model.save(tmp_path / "padim.pt")
    loaded = load_model(tmp_path / "padim.pt", backbone=extractor)
    for key in ("channel_idx", "mean", "inv_covariance"):
        assert torch.equal(getattr(loaded, key), getattr(model, key))
    s2, m2 = loaded.predict(toy_defect_data[1])
    assert torch.equal(s2, scores) and torch.equal(m2, maps)


def test_determinism_and_seed(fitted, extractor, toy_defect_data):
    model, _, scores, _ = fitted
    train, test = toy_defect_data[0], toy_defect_data[1]
    again = create_model("padim", backbone=extractor, seed=0)
    again.fit(train)
    assert torch.equal(again.inv_covariance, model.inv_covariance)
    assert torch.equal(again.predict(test)[0], scores)
    other = create_model("padim", backbone=extractor, seed=1, n_features=20)
    other.fit(train)
    assert not torch.equal(other.channel_idx, model.channel_idx[:20])


def test_streamed_fit_equals_one_batch_fit(fitted, extractor, toy_defect_data):
    """Moments accumulated over a stream of small batches equal one batch of every image (float64 sums)."""
    model, _, scores, _ = fitted
    train, test = toy_defect_data[0], toy_defect_data[1]
    whole = create_model("padim", backbone=extractor, seed=0, batch_size=len(train))
    whole.fit(train)
    streamed = create_model("padim", backbone=extractor, seed=0, batch_size=5)
    streamed.fit(TensorSource((train * 255).round().to(torch.uint8)))
    torch.testing.assert_close(streamed.mean, whole.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(streamed.inv_covariance, whole.inv_covariance, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed.predict(test)[0], whole.predict(test)[0], rtol=1e-5, atol=1e-5)


def test_params_validation_and_errors(extractor, toy_defect_data):
    with pytest.raises(ValidationError, match="extra"):
        create_model("padim", backbone=extractor, n_features=10, covariance="diag")
    for bad in ({"n_features": 0}, {"epsilon": 0.0}, {"layers": []}, {"sigma": -0.5}, {"n_features": 1.5}):
        with pytest.raises(ValidationError):
            create_model("padim", backbone=extractor, **bad)
    with pytest.raises(ValueError, match="exceeds"):
        create_model("padim", backbone=extractor, n_features=449).fit(toy_defect_data[0])
    with pytest.raises(ValueError, match="at least 2 train images"):
        create_model("padim", backbone=extractor).fit(toy_defect_data[0][:1])
    with pytest.raises(RuntimeError, match="not fitted"):
        create_model("padim", backbone=extractor).predict(toy_defect_data[1][:1])


def test_params_yaml_section_is_complete_and_valid():
    section = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())["models"]["padim"]
    PaDiM.Params.model_validate(section)
    # every hyperparameter is visible in params.yaml, except `seed` (the fit stage passes the top-level seed)
    assert set(section) == set(PaDiM.Params.model_fields) - {"seed"}


def test_inverse_is_exact_for_wide_matrices_on_several_threads():
    """The batched MKL inverse of torch 2.14.1 breaks for d > 128 on 2+ CPU threads (raises or returns wrong
    matrices); PaDiM's n_features may be 550 (the paper profile), so its inverse must be right there."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 192, 256, dtype=torch.float64, generator=g)
    cov = x @ x.transpose(1, 2) / 256 + 0.01 * torch.eye(192, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inv = inverse_per_matrix(cov)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(cov @ inv, torch.eye(192, dtype=torch.float64).expand_as(cov), atol=1e-9, rtol=0)
    small = cov[:, :64, :64].contiguous()  # where the batched call is right, the per-matrix one equals it bitwise
    assert torch.equal(inverse_per_matrix(small), torch.linalg.inv(small))


def _moments(positions: int, d: int, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(positions, n, d, dtype=torch.float64, generator=g)
    return x.transpose(1, 2) @ x, x.mean(1)  # Σxxᵀ (P, d, d), means (P, d)


def test_inverse_covariances_equal_the_whole_tensor_formula_bitwise():
    sum_outer, mean = _moments(150, 24)  # 150 positions: two full chunks of 64 and a partial one
    cov = (sum_outer - 40 * mean[:, :, None] * mean[:, None, :]) / 39
    cov += 0.01 * torch.eye(24, dtype=torch.float64)
    expected = inverse_per_matrix(cov).float()
    got = inverse_covariances(sum_outer, mean, 40, 0.01)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_inverse_covariances_peak_stays_below_the_moments_size():
    """Whole-tensor temporaries took ~2.5× Σxxᵀ on top of it (34 GB in all for the paper profile's d = 550 on a
    64×64 grid); chunks keep the extra to the float32 result (0.5×) plus a few chunks."""
    sum_outer, mean = _moments(2048, 96)
    with PeakMemory() as mem:
        inverse_covariances(sum_outer, mean, 40, 0.01)
    assert mem.method == "vmhwm"  # the kernel's exact peak, not a sampled one
    extra = mem.peak_rss_delta_bytes / (sum_outer.numel() * 8)
    assert extra < 1.0, f"peak above start = {extra:.2f}× Σxxᵀ"
