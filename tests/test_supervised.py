"""The supervised track: k-fold protocol, the transfer-learning classifier, SuperSimpleNet's supervised mode,
params validation and the leaderboard's separate section."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vadbench.config import ParamsError, parse_params
from vadbench.supervised.augment import DIHEDRAL, dihedral
from vadbench.supervised.classifier import MAJORITY, TransferClassifier, discriminative_groups
from vadbench.supervised.protocol import FoldData, TooFewAnomaliesError, assign_folds, make_folds
from vadbench.supervised.thresholds import f1_max_threshold
from vadbench.supervised.track import pooled_metrics, run_supervised_cell

TYPES = ["particle"] * 9 + ["bridge"] * 7 + ["open"] * 5 + ["scratch"] * 3 + ["stain"] * 1


# -- protocol --------------------------------------------------------------------------------------------
def test_folds_partition_every_anomaly_once_and_are_stratified() -> None:
    k = 5
    folds = make_folds(TYPES, k, seed=3)
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested.tolist()) == list(range(len(TYPES)))  # each anomaly tested exactly once
    for f in folds:
        parts = [set(f.train.tolist()), set(f.val.tolist()), set(f.test.tolist())]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])  # disjoint
        assert set().union(*parts) == set(range(len(TYPES)))
        assert f.val.tolist() == folds[(f.index + 1) % k].test.tolist()  # validation = the next fold
    sizes = [len(f.test) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    assigned = assign_folds(TYPES, k, seed=3)
    for t, n in Counter(TYPES).items():  # stratified: each type spread as evenly as its count allows
        per_fold = Counter(assigned[np.array(TYPES) == t].tolist())
        counts = [per_fold.get(f, 0) for f in range(k)]
        assert max(counts) - min(counts) <= 1, (t, counts)
        assert sum(counts) == n


def test_folds_are_seeded() -> None:
    a, b = assign_folds(TYPES, 5, seed=0), assign_folds(TYPES, 5, seed=0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, assign_folds(TYPES, 5, seed=1))


def test_too_few_anomalies_is_a_named_error() -> None:
    with pytest.raises(TooFewAnomaliesError) as err:
        assign_folds(["open", "open", "stain"], 5, seed=0, dataset="tiny_line")
    msg = str(err.value)
    assert "tiny_line" in msg and "5-fold" in msg and "3 labelled anomalies" in msg and "'open': 2" in msg
    assert err.value.k == 5 and err.value.counts == {"open": 2, "stain": 1}
    with pytest.raises(ValueError, match="folds must be ≥ 3"):
        assign_folds(TYPES, 2, seed=0)


def test_fold_sources_keep_test_normals_out_of_training(tiny_sem: Path) -> None:
    data = FoldData(tiny_sem, 3, seed=0)
    test_normals = {data.test_src.paths[i] for i in data.test_normals}
    tested = []
    for fold in data.folds:
        src = data.sources(fold)
        assert not test_normals & set(src.train.paths) and not test_normals & set(src.val.paths)
        assert set(src.test.paths) - test_normals == {p for p, y in zip(src.test.paths, src.test.labels) if y}
        assert not set(src.train.paths) & set(src.test.paths) and not set(src.val.paths) & set(src.test.paths)
        assert int(src.train.labels.sum()) > 0 and int(src.val.labels.sum()) > 0
        assert (src.val.labels == 0).sum() == len(data.val_src)  # every validation normal validates
        tested += [p for p, y in zip(src.test.paths, src.test.labels) if y]
        image, label = src.train[len(src.train) - 1]
        assert image.dtype == torch.uint8 and float(label) == 1.0  # streamed uint8 items, anomalies last
    assert sorted(tested) == sorted(data.test_src.paths[i] for i in data.anomalies)
    with pytest.raises(TooFewAnomaliesError, match="synthetic_sem"):
        FoldData(tiny_sem, 25, seed=0)


def test_masks_of_image_level_anomalies_are_marked_unknown(tiny_sem: Path, tmp_path: Path) -> None:
    import dataclasses
    import shutil

    from vadbench.data.manifest import read_manifest, write_manifest

    copy = tmp_path / "image_level"
    shutil.copytree(tiny_sem, copy)
    rows = [  # labelled per image only, as ELPV's anomalies
        dataclasses.replace(r, mask_path="") if r.label == 1 and r.defect_type != "particle" else r
        for r in read_manifest(copy)
    ]
    write_manifest(copy, rows)
    data = FoldData(copy, 3, seed=0)
    train = data.sources(data.folds[0], with_masks=True).train
    seen = set()
    for i in range(len(train)):
        _, mask, label, known = train[i]
        particle = train.defect_types[i] == "particle"
        assert bool(known) == (float(label) == 0.0 or particle), train.paths[i]
        assert mask.any() == (float(label) == 1.0 and particle)
        seen.add((float(label), bool(known)))
    assert seen == {(0.0, True), (1.0, True), (1.0, False)}


def test_thresholds_and_pooled_metrics() -> None:
    assert f1_max_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 0.8
    assert f1_max_threshold(np.array([0.1, 0.3]), np.array([0, 0])) > 0.3  # no anomalies: above every normal
    s = [np.array([0.1, 0.9, 0.8]), np.array([0.2, 0.7, 0.3])]
    y = [np.array([0, 1, 1]), np.array([0, 1, 0])]
    m = pooled_metrics(s, y, [0.5, 0.5])
    assert m["image_auroc"] == pytest.approx(1.0) and m["fold_auroc"] == [1.0, 1.0]
    assert m["image_precision"] == 1.0 and m["image_recall"] == 1.0
    m = pooled_metrics(s, y, [0.95, 0.25])  # fold thresholds apply to their own folds only
    assert m["image_recall"] == pytest.approx(1 / 3, abs=1e-6) and m["image_precision"] == pytest.approx(0.5)


# -- classifier ------------------------------------------------------------------------------------------
class _Toy(torch.utils.data.Dataset):
    """(uint8 image, float label) items with `labels`: the classifier's fit/score contract without a dataset."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray) -> None:
        self.images = (images * 255).round().to(torch.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.images[i], torch.tensor(float(self.labels[i]))


def _toy_set(n_normal: int, n_defect: int, seed: int, size: int = 64) -> _Toy:
    """Line-pattern images (conftest's texture); defective ones carry a bright 12-20 px square somewhere."""
    from conftest import _line_image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n_normal + n_defect):
        img = _line_image(rng, size)
        if i >= n_normal:
            side = int(rng.integers(12, 21))
            y, x = rng.integers(0, size - side, 2)
            img[y : y + side, x : x + side] = 0.95
        images.append(img)
        labels.append(int(i >= n_normal))
    return _Toy(torch.from_numpy(np.stack(images)[:, None]).float(), np.array(labels))


def _toy_splits() -> tuple[_Toy, _Toy, _Toy]:
    # imbalanced train (the minority is oversampled), a small validation set, a balanced test set
    return _toy_set(24, 8, seed=1), _toy_set(8, 4, seed=2), _toy_set(12, 12, seed=3)


FAST = dict(stage1_epochs=1, stage2_epochs=5, batch_size=8)


@pytest.fixture(scope="module")
def toy_classifier(random_backbone_dir: Path, tmp_path_factory) -> tuple[TransferClassifier, tuple, Path]:
    torch.manual_seed(0)
    train, val, test = _toy_splits()
    model = TransferClassifier.from_backbone(random_backbone_dir, **FAST)
    report = model.fit(train, val)
    assert report["n_oversampled"] == 48  # 8 anomalies repeated to match 24 normals
    assert "stage1" in report and "stage2" in report
    path = tmp_path_factory.mktemp("clf") / "model.pt"
    model.save(path)
    return model, (train, val, test), path


def test_classifier_learns_bright_defects(toy_classifier) -> None:
    from vadbench.metrics.image import image_metrics

    model, (_, _, test), _ = toy_classifier
    variants = model.score_variants(test)
    for name in ("none", "mean", "vote"):
        auroc = image_metrics(variants[name], test.labels, None)["image_auroc"]
        assert auroc > 0.9, (name, auroc)


def test_tta_variants(toy_classifier) -> None:
    model, (_, _, test), _ = toy_classifier
    x = torch.stack([test[i][0] for i in range(6)]).float() / 255
    views = model.view_probabilities(x)
    assert views.shape == (6, len(DIHEDRAL)) == (6, 8)
    turned = model.view_probabilities(dihedral(x, 1))  # the 8 views of a turned image are the same 8 views
    assert torch.allclose(views.mean(1), turned.mean(1), atol=1e-5)
    v = model.variants_from_views(views)
    assert np.allclose(v["none"], views[:, 0].numpy()) and np.allclose(v["mean"], views.mean(1).numpy())
    assert set(np.round(v["vote"] * 8, 6).tolist()) <= set(range(9))
    assert MAJORITY == 5 / 8 and model.fixed_thresholds == {"vote": MAJORITY}


def test_classifier_save_load_identical(toy_classifier) -> None:
    model, (_, _, test), path = toy_classifier
    loaded = TransferClassifier.load(path)
    x = torch.stack([test[i][0] for i in range(8)]).float() / 255
    assert torch.equal(model.view_probabilities(x), loaded.view_probabilities(x))
    assert float(loaded.view_threshold) == float(model.view_threshold)
    assert loaded.hparams == model.hparams


def test_classifier_is_seeded(random_backbone_dir: Path) -> None:
    train, val, _ = _toy_splits()
    few = {**FAST, "stage2_epochs": 1}
    out = []
    for _ in range(2):
        torch.manual_seed(0)  # dropout draws from the global generator: the track seeds it per fold
        m = TransferClassifier.from_backbone(random_backbone_dir, **few)
        m.fit(train, val)
        out.append(m.state_dict())
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])


def test_discriminative_learning_rates(random_backbone_dir: Path) -> None:
    model = TransferClassifier.from_backbone(random_backbone_dir, stage="layer4")
    groups = discriminative_groups(model.net, lr=1e-3, ratio=0.01, weight_decay=0.0)
    lrs = [g["lr"] for g in groups]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-2] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:-2], lrs[1:-1]))  # rising from the stem to the last stage
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.net.parameters()))  # every parameter in exactly one group
    assert len(groups) == 7  # resnet: conv1, bn1, layer1-4, head
    from safetensors.torch import load_file

    weights = load_file(str(random_backbone_dir / "weights.safetensors"))  # the body comes from the weight source
    assert torch.equal(model.net.body.layer4[0].conv1.weight, weights["layer4.0.conv1.weight"])
    with pytest.raises(ValueError, match="layer9"):
        TransferClassifier.from_backbone(random_backbone_dir, stage="layer9")


# -- the cell runner, SuperSimpleNet supervised, report -----------------------------------------------------
def test_supervised_cell_outputs_and_ssn_mode(tiny_sem: Path, random_backbone_dir: Path, tmp_path: Path) -> None:
    data = FoldData(tiny_sem, 3, seed=0)
    hp = {"epochs": 2, "batch_size": 8, "hidden_dim": 32, "cls_channels": 8}
    m = run_supervised_cell(
        "supersimplenet_supervised", hp, data, random_backbone_dir, tmp_path / "cell", seed=0, device="cpu", folds=[0]
    )
    assert m["folds"] == 3 and m["n_labelled_anomalies"] == 24 and m["primary_variant"] == "cls"
    assert set(m["variants"]) == {"cls", "map_max"} and 0 <= m["image_auroc"] <= 1
    assert m["per_fold"][0]["n_train_anomalous"] == 8 and m["hparams"]["seed"] == 0
    rows = (tmp_path / "cell" / "scores.csv").read_text().splitlines()
    assert rows[0] == "fold,path,label,defect_type,cls,map_max" and len(rows) == 1 + 12 + 8
    from vadbench.supervised.supersimplenet import SupervisedSuperSimpleNet

    fold = data.sources(data.folds[0])
    loaded = SupervisedSuperSimpleNet.load(tmp_path / "cell" / "fold-0" / "model.pt", random_backbone_dir)
    assert loaded.model.p.stop_grad is False  # the supervised setting lets the image loss shape the map
    again = loaded.score_variants(fold.test)
    import csv

    with open(tmp_path / "cell" / "scores.csv") as fh:
        saved = [float(r["cls"]) for r in csv.DictReader(fh)]
    assert np.allclose(again["cls"], saved, rtol=1e-5)


def test_leaderboard_has_a_separate_supervised_section(tmp_path: Path) -> None:
    import json

    from vadbench.report.leaderboard import Cell
    from vadbench.report.supervised import collect_supervised, render_supervised

    cell = tmp_path / "sem-classifier-fractal"
    cell.mkdir()
    v = {"image_auroc": 0.97, "fold_auroc_mean": 0.96, "fold_auroc_std": 0.02, "image_aupr": 0.9, "image_f1": 0.8}
    metrics = {"primary_variant": "mean", "folds": 5, "n_labelled_anomalies": 48, "variants": {"mean": v, "none": v}}
    (cell / "metrics.json").write_text(json.dumps(metrics))
    table = collect_supervised([Cell("sem", "classifier", "fractal", "fractal")], tmp_path)
    assert table["score"].tolist() == ["mean", "none (variant)"]
    md = render_supervised(table)
    assert "## Supervised (k-fold)" in md and "| 5 | 48 |" in md and "not comparable" in md
    assert render_supervised(collect_supervised([], tmp_path)) == ""


# -- params ----------------------------------------------------------------------------------------------
def _params(**changes) -> dict:
    raw = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("params.yaml").read_text())
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("supervised.folds", 2, "supervised.folds"),
        ("supervised.classifier.tta", "median", "supervised.classifier.tta"),
        ("supervised.classifier.stage2_lr", 0, "supervised.classifier.stage2_lr"),
        ("supervised.classifier.stage", "layer 3", "supervised.classifier.stage"),
        ("supervised.classifier.unknown", 1, "supervised.classifier.unknown"),
        ("supervised.classifier.seed", 3, "supervised.classifier.seed: set seeds with run.seeds"),
        ("supervised.supersimplenet_supervised", {"epochs": 0}, "supervised.supersimplenet_supervised.epochs"),
        ("run.supervised_models", ["knn"], "run.supervised_models: unknown method 'knn'"),
        ("run.supervised_models", ["classifier", "classifier"], "run.supervised_models lists a name twice"),
    ],
)
def test_params_validation_names_the_key(key: str, value, message: str) -> None:
    with pytest.raises(ParamsError, match=message.replace("(", r"\(")):
        parse_params(_params(**{key: value}))


def test_default_grid_has_no_supervised_cells_and_full_profile_has_them() -> None:
    root = Path(__file__).resolve().parents[1]
    assert parse_params(_params()).run.supervised_cells() == []
    full = yaml.safe_load((root / "profiles" / "full.yaml").read_text())
    assert full["run"]["supervised_models"] == ["classifier", "supersimplenet_supervised"]


def test_classifier_input_size_resizes_before_the_net(random_backbone_dir: Path) -> None:
    import torch.nn.functional as F

    torch.manual_seed(0)
    plain = TransferClassifier.from_backbone(random_backbone_dir, **FAST).eval()
    sized = TransferClassifier.from_backbone(random_backbone_dir, **FAST, input_size=96).eval()
    sized.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = plain.logits(F.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False))
        assert torch.allclose(sized.logits(x), expected, atol=1e-6)
        assert not torch.allclose(plain.logits(x), expected, atol=1e-3)
