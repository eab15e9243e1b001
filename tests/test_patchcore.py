"""PatchCore: detection on toy defects, exact scoring against a brute-force reference, persistence, params,
the memory budget (single pass identical to the unbudgeted algorithm; chunked path detects within budget)."""

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

from vadbench.backbones import load_feature_extractor, pick
from vadbench.data.source import TensorSource
from vadbench.models import create_model, load_model
from vadbench.models.components.coreset import subsample_indices
from vadbench.models.components.patch_features import locally_aware_embedding, nearest_neighbors, to_rows
from vadbench.models.components.smoothing import gaussian_blur
from vadbench.models.patchcore import GIB, PatchCore


@pytest.fixture(scope="module")
def extractor(random_backbone_dir):
    return load_feature_extractor(random_backbone_dir, layers=PatchCore.Params().layers)


@pytest.fixture(scope="module")
def fitted(extractor, toy_defect_data):
    train, test, _, _ = toy_defect_data
    model = create_model("patchcore", backbone=extractor, seed=0)
    report = model.fit(train)
    scores, maps = model.predict(test)
    return model, report, scores, maps


def test_detects_toy_defects(fitted, toy_defect_data):
    _, _, labels, masks = toy_defect_data
    _, _, scores, maps = fitted
    # a random-init ResNet still separates a bright blob from line texture: both levels are far above 0.5
    assert roc_auc_score(labels, scores.numpy()) >= 0.9
    assert roc_auc_score(masks.ravel(), maps.numpy().ravel()) >= 0.9


def test_prediction_shapes_and_bank_size(fitted, toy_defect_data):
    train, test, _, _ = toy_defect_data
    model, report, scores, maps = fitted
    assert scores.shape == (len(test),) and maps.shape == (len(test), 64, 64)
    assert scores.dtype == maps.dtype == torch.float32 and scores.device.type == "cpu"
    # 64² input, layer2 stride 8 → 8×8 patches per image; coreset keeps floor(10 %)
    assert report["patches"] == len(train) * 64
    assert model.memory_bank.shape == (int(0.1 * len(train) * 64), 128 + 256)
    assert report["bank_strategy"] == "single_pass" and report["chunks"] == 1 and report["union_reductions"] == 0


def test_single_pass_equals_the_unbudgeted_algorithm(fitted, extractor, toy_defect_data):
    # the previous implementation, written out: every patch of every image in one matrix, one greedy pass
    model = fitted[0]
    train = toy_defect_data[0]
    rows = [
        to_rows(locally_aware_embedding(pick(extractor(train[i : i + 16]), model.p.layers), 3))
        for i in range(0, len(train), 16)
    ]
    bank = torch.cat(rows)
    keep = subsample_indices(
        bank, "greedy_coreset", 0.1, torch.Generator().manual_seed(0), projection_dim=128, num_starts=10
    )
    assert torch.equal(model.memory_bank, bank[keep])


def test_fit_streams_a_source_like_a_tensor(fitted, extractor, toy_defect_data):
    model, _, scores, _ = fitted
    train, test = toy_defect_data[0], toy_defect_data[1]
    again = create_model("patchcore", backbone=extractor, seed=0)
    again.fit(TensorSource((train * 255).round().to(torch.uint8)))
    assert torch.equal(again.memory_bank, model.memory_bank)
    assert torch.equal(again.predict(test)[0], scores)


@pytest.fixture(scope="module")
def chunked(extractor, toy_defect_data):
    # 24 images × 64 patches × 384 dims: one pass needs ~4 MB; 2 MB of budget and ≤ 256-row chunks force 6 chunks
    train, test, _, _ = toy_defect_data
    model = create_model("patchcore", backbone=extractor, seed=0, memory_budget_gb=2e6 / GIB, coreset_chunk_patches=256)
    report = model.fit(train)
    return model, report, *model.predict(test)


def test_budget_path_detects_within_the_budget(chunked, toy_defect_data):
    _, _, labels, masks = toy_defect_data
    model, report, scores, maps = chunked
    assert report["bank_strategy"] == "chunked" and report["chunks"] == 6 and report["chunk_patches"] == 256
    budget = model.p.memory_budget_gb * GIB
    assert report["planned_bank_bytes"] <= budget
    assert model.memory_bank.numel() * model.memory_bank.element_size() <= budget
    # every chunk keeps ⌊10 %⌋ of its 256 rows: the union has 6 × 25 rows
    assert model.memory_bank.shape == (6 * 25, 384) and report["union_reductions"] == 0
    assert roc_auc_score(labels, scores.numpy()) >= 0.9
    assert roc_auc_score(masks.ravel(), maps.numpy().ravel()) >= 0.9


def test_budget_path_is_seeded_and_its_bank_is_drawn_from_the_patches(chunked, extractor, toy_defect_data):
    model = chunked[0]
    train = toy_defect_data[0]
    again = create_model(
        "patchcore",
        backbone=extractor,
        seed=0,
        **{k: model.hparams[k] for k in ("memory_budget_gb", "coreset_chunk_patches")},
    )
    again.fit(train)
    assert torch.equal(again.memory_bank, model.memory_bank)
    bank = torch.cat(
        [
            to_rows(locally_aware_embedding(pick(extractor(train[i : i + 16]), model.p.layers), 3))
            for i in range(0, 24, 16)
        ]
    )
    # each bank row is one of the training patches, and the first chunk's picks are that chunk's own coreset
    assert torch.equal(bank[torch.cdist(model.memory_bank, bank).argmin(1)], model.memory_bank)
    first = subsample_indices(bank[:256], "greedy_coreset", 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(model.memory_bank[:25], bank[:256][first])


def test_union_larger_than_the_budget_is_reduced(extractor, toy_defect_data):
    train, test, labels, _ = toy_defect_data
    # ratio 0.5: the union (768 rows × 1.5 kB) does not fit 1 MB next to a chunk: coreset of the union
    model = create_model("patchcore", backbone=extractor, seed=0, coreset_ratio=0.5, memory_budget_gb=1e6 / GIB)
    report = model.fit(train)
    assert report["bank_strategy"] == "chunked" and report["union_reductions"] >= 1
    assert model.memory_bank.shape[0] < 0.5 * report["patches"]
    assert model.memory_bank.numel() * 4 <= 1e6 / 2
    assert roc_auc_score(labels, model.predict(test)[0].numpy()) >= 0.9


def test_float16_bank_scores_close_to_float32(fitted, extractor, toy_defect_data):
    model, _, scores, maps = fitted
    train, test = toy_defect_data[0], toy_defect_data[1]
    half = create_model("patchcore", backbone=extractor, seed=0, bank_dtype="float16")
    half.fit(train)
    assert half.memory_bank.dtype == torch.float16
    assert torch.equal(half.memory_bank, model.memory_bank.half())  # same picks, stored in half precision
    s16, m16 = half.predict(test)
    assert s16.dtype == m16.dtype == torch.float32
    np.testing.assert_allclose(s16.numpy(), scores.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(m16.numpy(), maps.numpy(), rtol=2e-3, atol=2e-3)


def test_budget_errors(extractor, toy_defect_data):
    train = toy_defect_data[0]
    with pytest.raises(ValueError, match="identity keeps all"):
        create_model("patchcore", backbone=extractor, sampler="identity", memory_budget_gb=1e6 / GIB).fit(train)
    with pytest.raises(ValueError, match="too small"):
        create_model("patchcore", backbone=extractor, memory_budget_gb=1e4 / GIB).fit(train)


def reference_predict(model: PatchCore, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Paper eq. 7 and the map, written out in float64 numpy from the bank and the patch features."""
    maps_l = pick(model.backbone(images), model.p.layers)
    emb = locally_aware_embedding(maps_l, 3)
    b, d, h, w = emb.shape
    q = emb.permute(0, 2, 3, 1).reshape(b, h * w, d).double().numpy()
    bank = model.memory_bank.double().numpy()
    bank_d = np.sqrt(((bank[:, None] - bank[None]) ** 2).sum(-1))
    scores, maps = [], []
    for qi in q:
        dist = np.sqrt(((qi[:, None] - bank[None]) ** 2).sum(-1))  # (P, K)
        patch = dist.min(1)
        worst = int(patch.argmax())
        m_star = int(dist[worst].argmin())
        support = np.argsort(bank_d[m_star], kind="stable")[: model.p.num_neighbors]
        weight = 1 - np.exp(patch[worst]) / np.exp(dist[worst, support]).sum()
        scores.append(weight * patch[worst])
        up = F.interpolate(torch.from_numpy(patch.reshape(1, 1, h, w)), size=images.shape[-2:], mode="bilinear")
        maps.append(ndimage.gaussian_filter(up[0, 0].numpy(), sigma=4))
    return np.array(scores), np.stack(maps)


def test_scores_and_maps_match_reference(fitted, toy_defect_data):
    model, _, scores, maps = fitted
    _, test, _, _ = toy_defect_data
    ref_scores, ref_maps = reference_predict(model, test)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(maps.numpy(), ref_maps, rtol=1e-3, atol=1e-4)


def test_save_load_round_trip(fitted, extractor, toy_defect_data, tmp_path):
    model, _, scores, maps = fitted
    model.save(tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt", backbone=extractor)
    assert torch.equal(loaded.memory_bank, model.memory_bank) and loaded.hparams == model.hparams
    s2, m2 = loaded.predict(toy_defect_data[1])
    assert torch.equal(s2, scores) and torch.equal(m2, maps)


def test_same_seed_same_bank_other_seed_other_bank(fitted, extractor, toy_defect_data):
    model, _, scores, _ = fitted
    train, test = toy_defect_data[0], toy_defect_data[1]
    again = create_model("patchcore", backbone=extractor, seed=0)
    again.fit(train)
    assert torch.equal(again.memory_bank, model.memory_bank)
    assert torch.equal(again.predict(test)[0], scores)
    other = create_model("patchcore", backbone=extractor, seed=1)
    other.fit(train)
    assert not torch.equal(other.memory_bank, model.memory_bank)


@pytest.mark.parametrize("sampler", ["random", "identity"])
def test_other_samplers(extractor, toy_defect_data, sampler):
    train, test, labels, _ = toy_defect_data
    model = create_model("patchcore", backbone=extractor, sampler=sampler, coreset_ratio=0.25)
    report = model.fit(train)
    expected = report["patches"] if sampler == "identity" else int(0.25 * report["patches"])
    assert model.memory_bank.shape[0] == expected
    assert roc_auc_score(labels, model.predict(test)[0].numpy()) >= 0.9


def test_target_dim_and_plain_max(extractor, toy_defect_data):
    train, test, _, _ = toy_defect_data
    model = create_model("patchcore", backbone=extractor, target_embed_dimension=96, num_neighbors=1)
    model.fit(train[:6])
    assert model.memory_bank.shape[1] == 96
    scores, _ = model.predict(test[:4])
    # num_neighbors=1: no re-weighting, the image score is the largest nearest-neighbour distance
    emb = locally_aware_embedding(pick(extractor(test[:4]), model.p.layers), 3, target_dim=96)
    q = emb.permute(0, 2, 3, 1).reshape(4, -1, 96)
    expected = torch.cdist(q.double(), model.memory_bank.double()).amin(2).amax(1)
    np.testing.assert_allclose(scores.numpy(), expected.numpy(), rtol=1e-4)


def test_nearest_neighbors_chunks_match_brute_force():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(53, 12, generator=g), torch.randn(40, 12, generator=g)
    full = ((q[:, None] - bank[None]) ** 2).sum(-1).sqrt()
    d, i = nearest_neighbors(q, bank, k=3, max_elements=100)  # 2 queries per chunk
    ref_d, ref_i = full.topk(3, dim=1, largest=False)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(d, ref_d, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbors_half_bank_in_chunks(k):
    # a float16 bank is read 7 rows at a time, each converted: same result as the converted bank at once
    g = torch.Generator().manual_seed(1)
    q, bank = torch.randn(53, 12, generator=g), torch.randn(40, 12, generator=g).half()
    d, i = nearest_neighbors(q, bank, k=k, max_elements=100, bank_chunk=7)
    full = ((q[:, None] - bank.float()[None]) ** 2).sum(-1).sqrt()
    ref_d, ref_i = full.topk(k, dim=1, largest=False)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(d, ref_d, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 5, 7)])  # 5×7 < the 33-px kernel: repeated reflection
def test_gaussian_blur_equals_scipy(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = np.stack([ndimage.gaussian_filter(a, sigma=4) for a in x.numpy()])
    np.testing.assert_allclose(gaussian_blur(x, 4.0).numpy(), ref, atol=1e-12)


def test_params_validation_and_errors(extractor, random_backbone_dir):
    with pytest.raises(ValidationError, match="extra"):
        PatchCore.Params.model_validate({"coreset_ratio": 0.1, "bogus": 1})
    for bad in (
        {"coreset_ratio": 0.0},
        {"coreset_ratio": 1.5},
        {"num_neighbors": 0},
        {"sampler": "kmeans"},
        {"layers": []},
        {"batch_size": 0},
        {"sigma": -1.0},
        {"memory_budget_gb": 0.0},
        {"coreset_chunk_patches": 0},
        {"bank_dtype": "bfloat16"},
    ):
        with pytest.raises(ValidationError):
            create_model("patchcore", backbone=extractor, **bad)
    with pytest.raises(ValueError, match="odd"):
        create_model("patchcore", backbone=extractor, neighborhood=2)
    with pytest.raises(RuntimeError, match="fit"):
        create_model("patchcore", backbone=extractor).predict(torch.rand(1, 1, 64, 64))
    only_l2 = load_feature_extractor(random_backbone_dir, layers=["layer2"])
    with pytest.raises(ValueError, match="missing"):
        create_model("patchcore", backbone=only_l2).fit(torch.rand(2, 1, 64, 64))


def test_params_yaml_section_is_complete_and_valid():
    section = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())["models"]["patchcore"]
    PatchCore.Params.model_validate(section)
    # every hyperparameter is visible in params.yaml, except `seed` (the fit stage passes the top-level seed)
    assert set(section) == set(PatchCore.Params.model_fields) - {"seed"}
