"""fit_cell / score_cell stream the splits: results equal the whole-array reference, maps land on disk."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vadbench.backbones import load_feature_extractor
from vadbench.cell import CellInputs, ScoreSettings, fit_cell, score_cell
from vadbench.data.manifest import ManifestRow, load_split, write_manifest
from vadbench.metrics.pixel import pixel_metrics
from vadbench.models import load_model


def _write(root: Path, rel: str, arr: np.ndarray) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return rel


@pytest.fixture(scope="module")
def prepared(toy_defect_data, tmp_path_factory) -> Path:
    train, test, labels, masks = toy_defect_data
    root = tmp_path_factory.mktemp("prepared")
    u8 = lambda x: (x[0].numpy() * 255).round().astype(np.uint8)  # noqa: E731
    rows = [
        ManifestRow(_write(root, f"train/good/{i:03d}.png", u8(x)), "train", 0, "good")
        for i, x in enumerate(train[:16])
    ]
    rows += [
        ManifestRow(_write(root, f"val/good/{i:03d}.png", u8(x)), "val", 0, "good") for i, x in enumerate(train[16:])
    ]
    for i, (x, y, m) in enumerate(zip(test, labels, masks)):
        name = f"test/blob/{i:03d},a.png" if y else f"test/good/{i:03d}.png"  # a comma in a file name
        mask = _write(root, f"ground_truth/blob/{i:03d}_mask.png", m * 255) if y else ""
        rows.append(ManifestRow(_write(root, name, u8(x)), "test", int(y), "blob" if y else "good", mask))
    write_manifest(root, rows)
    return root


def test_streamed_cell_equals_whole_split_reference(prepared, random_backbone_dir, tmp_path):
    inputs = CellInputs(prepared, random_backbone_dir, image_size=64)
    params = {"n_features": 40, "batch_size": 3}  # batches that do not divide the split
    fit_cell(inputs, "padim", params, tmp_path / "fit", seeds=[0], device="cpu")
    out = score_cell(
        inputs,
        tmp_path / "fit",
        tmp_path / "score",
        tmp_path / "report",
        ScoreSettings(batch_size=5, latency_repeats=2, latency_warmup=1),
        seeds=[0],
        device="cpu",
    )

    # reference: the old way, whole test split as one tensor through the same fitted model
    test = load_split(prepared, "test", image_size=64)
    backbone = load_feature_extractor(random_backbone_dir, ["layer1", "layer2", "layer3"])
    model = load_model(tmp_path / "fit" / "seed-0" / "model.pt", backbone=backbone)
    scores, maps = model.predict(test.images)
    ref = pixel_metrics(maps.numpy(), test.masks.numpy())
    for key in ("pixel_auroc", "pixel_aupr", "pixel_f1_max", "pixel_aupro"):
        assert out["metrics"][key] == ref[key]
    assert out["metrics"]["image_auroc"] > 0.9  # the blobs are found

    saved = np.load(tmp_path / "score" / "maps.npy")
    assert saved.dtype == np.float16 and saved.shape == (len(test), 64, 64)
    np.testing.assert_allclose(saved.astype(np.float32), maps.numpy(), rtol=1e-3, atol=1e-3)
    with open(tmp_path / "score" / "scores.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert all(len(r) == 4 for r in rows)  # "…,a.png" is quoted, not split
    assert any(r[0].endswith(",a.png") for r in rows[1:])
    np.testing.assert_allclose([float(r[3]) for r in rows[1:]], scores.numpy(), rtol=1e-5)
    assert (tmp_path / "report" / "gallery.png").is_file()
    assert json.loads((tmp_path / "score" / "metrics.json").read_text())["n_test"] == len(test)


def test_fit_refuses_anomalies_in_train(prepared, random_backbone_dir, tmp_path):
    rows = [r for r in __import__("vadbench.data.manifest", fromlist=["read_manifest"]).read_manifest(prepared)]
    bad = tmp_path / "bad"
    for r in rows:
        dst = bad / r.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((prepared / r.path).read_bytes())
        if r.mask_path:
            (bad / r.mask_path).parent.mkdir(parents=True, exist_ok=True)
            (bad / r.mask_path).write_bytes((prepared / r.mask_path).read_bytes())
    rows[0] = ManifestRow(rows[0].path, "train", 1, "blob")
    write_manifest(bad, rows)
    with pytest.raises(ValueError, match="normal images only"):
        fit_cell(
            CellInputs(bad, random_backbone_dir, 64),
            "padim",
            {"n_features": 10},
            tmp_path / "f",
            seeds=[0],
            device="cpu",
        )
    assert not (tmp_path / "f").exists()
    torch.manual_seed(0)
