"""`vadbench predict`: a fitted cell scores new images as the score stage would, decodes them as prepare does."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vadbench import predict as predict_module
from vadbench.cell import CellInputs, ScoreSettings, fit_cell, score_cell
from vadbench.cli import main
from vadbench.data import hygiene
from vadbench.data.manifest import ManifestRow, write_manifest
from vadbench.predict import decode_image, load_fitted_cell, predict_files

CELL = "toy-padim-random"


def _write(root: Path, rel: str, arr: np.ndarray) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return rel


def build_fitted_root(
    toy_defect_data,
    backbone_dir: Path,
    root: Path,
    *,
    score: bool = True,
    cells: tuple[tuple[str, str, dict], ...] = (),
) -> Path:
    """A pipeline checkout in `root`: data/prepared/toy, data/backbones/random, the fitted padim cell (and its
    score stage output for the metrics.json threshold), built without DVC as tests/test_cell.py does."""
    train, test, labels, masks = toy_defect_data
    prepared = root / "data" / "prepared" / "toy"
    u8 = lambda x: (x[0].numpy() * 255).round().astype(np.uint8)  # noqa: E731
    rows = [
        ManifestRow(_write(prepared, f"train/good/{i:03d}.png", u8(x)), "train", 0, "good")
        for i, x in enumerate(train[:16])
    ]
    rows += [
        ManifestRow(_write(prepared, f"val/good/{i:03d}.png", u8(x)), "val", 0, "good")
        for i, x in enumerate(train[16:])
    ]
    for i, (x, y, m) in enumerate(zip(test[:8], labels, masks)):
        name = f"test/blob/{i:03d}.png" if y else f"test/good/{i:03d}.png"
        mask = _write(prepared, f"ground_truth/blob/{i:03d}_mask.png", m * 255) if y else ""
        rows.append(ManifestRow(_write(prepared, name, u8(x)), "test", int(y), "blob" if y else "good", mask))
    write_manifest(prepared, rows)
    (prepared / "info.json").write_text(json.dumps({"image_size": 64, "center_crop": None, "channels": 1}))
    backbones = root / "data" / "backbones"
    backbones.mkdir(parents=True)
    (backbones / "random").symlink_to(backbone_dir, target_is_directory=True)
    inputs = CellInputs(prepared, backbones / "random", image_size=64)
    fit_cell(inputs, "padim", {"n_features": 20}, root / "data" / "fits" / CELL, seeds=[0], device="cpu")
    for model, backbone, params in cells:  # more cells, fitted only
        cell_inputs = CellInputs(prepared, None if backbone == "none" else backbones / backbone, image_size=64)
        fit_cell(
            cell_inputs, model, params, root / "data" / "fits" / f"toy-{model}-{backbone}", seeds=[0], device="cpu"
        )
    if score:
        score_cell(
            inputs,
            root / "data" / "fits" / CELL,
            root / "data" / "scores" / CELL,
            root / "reports" / CELL,
            ScoreSettings(batch_size=5, latency_repeats=1, latency_warmup=0),
            seeds=[0],
            device="cpu",
        )
    return root


@pytest.fixture(scope="session")
def fitted_root(toy_defect_data, random_backbone_dir, tmp_path_factory) -> Path:
    return build_fitted_root(toy_defect_data, random_backbone_dir, tmp_path_factory.mktemp("pipeline"))


def _args(root: Path, *extra: str) -> list[str]:
    return ["--cell", CELL, "--root", str(root), "--params", str(root / "absent.yaml"), *extra]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_equals_the_score_stage(fitted_root, tmp_path, capsys):
    out = tmp_path / "pred"
    rc = main(["predict", *_args(fitted_root, "--out", str(out), "--device", "cpu", "--quiet"),
               str(fitted_root / "data" / "prepared" / "toy" / "test")])  # fmt: skip
    assert rc == 0
    assert "8 image(s) scored" in capsys.readouterr().out
    rows = _rows(out / "scores.csv")
    assert list(rows[0]) == ["path", "score", "anomalous", "threshold", "overlay", "error"]
    staged = {r["path"]: float(r["score"]) for r in _rows(fitted_root / "data" / "scores" / CELL / "scores.csv")}
    metrics = json.loads((fitted_root / "data" / "scores" / CELL / "metrics.json").read_text())
    for r in rows:
        rel = Path(r["path"]).relative_to(fitted_root / "data" / "prepared" / "toy").as_posix()
        # same pixels, same model; other batch composition → float noise only
        assert float(r["score"]) == pytest.approx(staged[rel], rel=1e-5, abs=1e-5)
        thr = float(r["threshold"])
        assert thr == pytest.approx(metrics["per_seed"]["0"]["threshold"], abs=2e-6)  # from val, not test
        assert r["anomalous"] == str(int(float(r["score"]) > thr)) and r["error"] == ""
        overlay = Image.open(out / r["overlay"])
        assert overlay.size == (128, 64) and overlay.mode == "RGB"  # image | heat-map overlay


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "I;16", "LA"])
def test_decode_matches_prepare(fitted_root, tmp_path, mode):
    """Any size / mode prepare accepts → the very pixels prepare stores and ImageSource reads."""
    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (90, 70), dtype=np.uint16))
    else:
        bands = len(mode)
        im = Image.fromarray(rng.integers(0, 256, (90, 70, bands), dtype=np.uint8), mode)
    path = tmp_path / "x.png"
    im.save(path)
    fitted = load_fitted_cell(
        CELL, fits=fitted_root / "data" / "fits", prepared=fitted_root / "data" / "prepared",
        backbones=fitted_root / "data" / "backbones", device="cpu",
    )  # fmt: skip
    rendered = hygiene.render((str(path), (), "half", True, 64, 10**8, fitted.bit_depth))  # what prepare writes
    assert rendered.error is None
    stored = np.array(Image.open(io.BytesIO(rendered.png)))[None]
    assert np.array_equal(decode_image(path, fitted), stored)


def test_decode_uses_the_dataset_s_bit_depth(fitted_root, tmp_path):
    fitted = load_fitted_cell(
        CELL, fits=fitted_root / "data" / "fits", prepared=fitted_root / "data" / "prepared",
        backbones=fitted_root / "data" / "backbones", device="cpu",
    )  # fmt: skip
    assert fitted.bit_depth == 16  # synthetic_sem's info.json has none: 16
    path = tmp_path / "x12.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 4096, (90, 70), dtype=np.uint16)).save(path)
    twelve = dataclasses.replace(fitted, bit_depth=12)
    rendered = hygiene.render((str(path), (), "half", True, 64, 10**8, 12))
    assert np.array_equal(decode_image(path, twelve), np.array(Image.open(io.BytesIO(rendered.png)))[None])
    assert decode_image(path, twelve).mean() > 8 * decode_image(path, fitted).mean()  # 16 would crush it
    prepared = tmp_path / "prepared"  # what prepare_real records for a dataset with bit_depth: 12
    prepared.mkdir()
    (prepared / "info.json").write_text(json.dumps({"bit_depth": 12}))
    assert predict_module._bit_depth(prepared) == 12
    (prepared / "info.json").write_text(json.dumps({"bit_depth": 20}))
    with pytest.raises(ValueError, match="bit_depth must be an integer 9..16"):
        predict_module._bit_depth(prepared)


def test_bad_files_are_listed_and_the_rest_scored(fitted_root, tmp_path, capsys):
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(np.full((100, 80, 3), 120, np.uint8)).save(images / "sub" / "big,rgb.jpg")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(images / "a.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "notes.txt").write_text("not an image: skipped in folders")
    (images / ".hidden.png").write_bytes(b"")
    out = tmp_path / "pred"
    rc = main(["predict", *_args(fitted_root, "--out", str(out), "--quiet", "--batch-size", "1"), str(images)])
    captured = capsys.readouterr()
    assert rc == 1  # something could not be decoded: non-zero, but everything else was scored
    assert "2 image(s) scored" in captured.out and "1 could not be decoded" in captured.out
    assert "broken.png" in captured.err
    rows = {Path(r["path"]).name: r for r in _rows(out / "scores.csv")}
    assert set(rows) == {"a.png", "big,rgb.jpg", "broken.png"}
    assert rows["broken.png"]["score"] == "" and "broken.png" in rows["broken.png"]["error"]
    assert (out / rows["big,rgb.jpg"]["overlay"]).is_file() and rows["big,rgb.jpg"]["overlay"].endswith("big,rgb.png")


def test_a_cell_never_fitted_says_how_to_fit_it(fitted_root, tmp_path, capsys):
    rc = main(["predict", "--cell", "toy-stfpm-random", "--root", str(fitted_root), "--params", "absent.yaml",
               str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "never fitted" in err and "dvc repro fit@toy-stfpm-random" in err
    assert main(["predict", "--cell", "toy-padim", "--root", str(fitted_root), str(tmp_path)]) == 2


def test_streams_in_batches(fitted_root, tmp_path):
    fitted = load_fitted_cell(
        CELL, fits=fitted_root / "data" / "fits", prepared=fitted_root / "data" / "prepared",
        backbones=fitted_root / "data" / "backbones", device="cpu",
    )  # fmt: skip
    seen = []
    predict = fitted.model.predict
    fitted.model.predict = lambda x: (seen.append(len(x)), predict(x))[1]  # type: ignore[method-assign]
    prepared = fitted_root / "data" / "prepared" / "toy"
    summary = predict_files(fitted, [prepared / s for s in ("train", "val", "test")], tmp_path, batch_size=3)
    assert summary["n_scored"] == 32 and max(seen) == 3 and sum(seen) == 32


def test_image_level_and_backbone_free_cells(toy_defect_data, random_backbone_dir, tmp_path, capsys):
    more = (("gaussian_ad", "random", {}), ("sparse_ae", "none", {"epochs": 1, "batch_size": 4}))
    root = build_fitted_root(toy_defect_data, random_backbone_dir, tmp_path / "root", score=False, cells=more)
    test_dir = root / "data" / "prepared" / "toy" / "test"
    for cell, overlays in (("toy-gaussian_ad-random", False), ("toy-sparse_ae-none", True)):
        out = tmp_path / cell
        rc = main(["predict", "--cell", cell, "--root", str(root), "--params", "absent.yaml", "--out", str(out),
                   "--quiet", str(test_dir)])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        rows = _rows(out / "scores.csv")
        assert len(rows) == 8 and all(r["threshold"] and r["anomalous"] in ("0", "1") for r in rows)
        assert all(bool(r["overlay"]) == overlays for r in rows)  # an image-level map is no heat map
        assert (out / "overlays").is_dir() == overlays


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_cpu(fitted_root, tmp_path):
    test_dir = fitted_root / "data" / "prepared" / "toy" / "test"
    args = _args(fitted_root, "--quiet", "--no-overlays")
    assert main(["predict", *args, "--device", "cpu", "--out", str(tmp_path / "cpu"), str(test_dir)]) == 0
    assert main(["predict", *args, "--device", "cuda", "--out", str(tmp_path / "cuda"), str(test_dir)]) == 0
    cpu, cuda = _rows(tmp_path / "cpu" / "scores.csv"), _rows(tmp_path / "cuda" / "scores.csv")
    for a, b in zip(cpu, cuda):
        assert float(a["score"]) == pytest.approx(float(b["score"]), rel=1e-3, abs=1e-3)
