"""The peer benchmark's pure-python parts (benchmarks/peer_anomalib.py, benchmarks/peer/): no anomalib needed."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import peer_anomalib  # noqa: E402
from peer import report  # noqa: E402
from peer.data import export_folder, limit_train  # noqa: E402
from peer.spec import DEFAULT_MODELS, PEER_CLASS, build_spec, train_patches  # noqa: E402


def test_defaults_and_quick_flag():
    args = peer_anomalib.parse_args([])
    assert args.dataset == ["synthetic_sem"] and args.runs >= 3
    assert args.models == list(DEFAULT_MODELS) and args.coreset_ratio == 0.01
    assert args.patchcore_layers == ["layer2", "layer3"]
    quick = peer_anomalib.parse_args(["--quick"])
    assert quick.runs == 1 and quick.epochs == 1 and len(quick.models) < len(args.models)


def test_folder_dataset_needs_its_dirs(capsys):
    with pytest.raises(SystemExit):
        peer_anomalib.parse_args(["--dataset", "folder"])
    assert "--normal-dir" in capsys.readouterr().err


def test_runs_alternate_sides():
    assert report.alternation(3) == ["ours", "anomalib"] * 3
    with pytest.raises(ValueError):
        report.alternation(0)


def test_summary_and_ratio():
    s = report.summarize([3.0, None, 1.0, 2.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert report.summarize([None]) is None
    assert report.ratio(report.summarize([1.0]), report.summarize([4.0])) == 0.25
    assert report.ratio(None, s) is None


def _runs(fit_ours: float, fit_peer: float, auroc_ours: float, auroc_peer: float) -> dict:
    def rec(fit: float, auroc: float) -> dict:
        return {"fit_s": fit, "peak_mib": 1000.0, "image_auroc": auroc, "pixel_auroc": auroc}

    return {"ours": [rec(fit_ours, auroc_ours)] * 3, "anomalib": [rec(fit_peer, auroc_peer)] * 3}


def test_table_has_three_rows_per_model_and_ratios():
    lines = report.results_table({"patchcore": _runs(2.0, 20.0, 0.90, 0.91), "padim": _runs(1.0, 1.0, 0.8, 0.8)})
    assert len(lines) == 2 + 3 * 2
    ratio_row = lines[4]
    assert "0.10×" in ratio_row and "-1.0 pt" in ratio_row
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_targets_flag_misses():
    text = "\n".join(report.targets({"patchcore": _runs(2.0, 20.0, 0.88, 0.90), "stfpm": _runs(3.0, 2.0, 0.9, 0.9)}))
    assert "fit 10.0× faster ✓" in text and "image_auroc -2.0 pt ✗" in text and "peak RSS 1.00× ✗" in text
    assert "fit time 1.50× anomalib's ✗" in text


def test_each_side_runs_the_same_seeds():
    assert report.alternation(3) == ["ours", "anomalib"] * 3
    assert report.run_seeds(3, 5) == [5, 5, 6, 6, 7, 7]


def test_aupro_table_reports_difference():
    lines = report.aupro_table([{"model": "padim", "side": "ours", "ours_aupro": 0.5, "anomalib_aupro": 0.52}])
    assert lines[-1].endswith("| +2.0e-02 |")


def test_specs_share_hyperparameters():
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    pc = build_spec("patchcore", params["patchcore"], "resnet18", 5, 0.01)
    assert pc.peer["coreset_sampling_ratio"] == pc.ours["coreset_ratio"] == 0.01
    assert pc.peer["layers"] == pc.ours["layers"] and pc.epochs is None
    # anomalib's coreset projects to the JL dimension at eps 0.9 (its own formula, written out) from one random
    # start: ours follows
    import math

    n = train_patches(233, 256, ["layer2", "layer3"])
    assert n == 238_592
    aligned = build_spec("patchcore", params["patchcore"], "resnet18", 5, 0.01, n)
    assert aligned.ours["projection_dim"] == int(4 * math.log(n) / (0.9**2 / 2 - 0.9**3 / 3)) == 305
    assert aligned.ours["num_starts"] == 1
    st = build_spec("stfpm", params["stfpm"], "resnet18", 4, None)
    # anomalib hard-codes SGD lr 0.4, weight decay 1e-3 on a loss summed over the batch, no early stopping: ours
    # (a batch-mean loss) follows with lr × B and weight decay ÷ B, the same SGD steps
    b = st.ours["batch_size"]
    assert st.ours["lr"] == pytest.approx(0.4 * b) and st.ours["weight_decay"] == pytest.approx(0.001 / b)
    assert st.ours["patience"] == 0 and st.ours["epochs"] == st.epochs == 4
    for name in DEFAULT_MODELS:
        spec = build_spec(name, params[name], "resnet18", 2, 0.01, None, 40, 128)
        assert name in PEER_CLASS and spec.mismatches
        assert spec.peer.get("backbone", "resnet18") == "resnet18" and spec.needs_val == (name == "efficientad_s")


def test_efficientad_spec_trains_anomalibs_shape():
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]["efficientad_s"]
    # anomalib: batch 1 for max_epochs, Adam at our lr / weight decay, no padding, PDN-S; ours the same steps
    spec = build_spec("efficientad_s", params, "resnet18", 3, None, None, 40, 128)
    assert spec.ours["batch_size"] == 1 and spec.ours["steps"] == 3 * 40 and spec.epochs == 3
    assert spec.peer == dict(
        teacher_out_channels=384, model_size="small", lr=params["lr"], weight_decay=params["weight_decay"],
        padding=False, pad_maps=True,
    )  # fmt: skip
    # anomalib's autoencoder has a fixed 8×8 bottleneck: both sides' networks see ≥ 256 px
    assert spec.ours["image_size"] == 256
    assert build_spec("efficientad_s", params, "resnet18", 3, None, None, 40, 320).ours["image_size"] == 320
    with pytest.raises(ValueError, match="n_train and image_size"):
        build_spec("efficientad_s", params, "resnet18", 3, None)


def test_teacher_conversion_computes_the_same_features():
    import torch
    from peer.teacher import IMAGENET_MEAN, IMAGENET_STD, PDN_S_KEYS, to_anomalib_pdn_s

    from vadbench.models.components.pdn import pdn

    torch.manual_seed(0)
    ours = pdn("small").double()
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)  # a card other than ImageNet's: the fold must do the work
    state = {k: v.float() for k, v in ours.state_dict().items()}
    converted = to_anomalib_pdn_s(state, mean, std)
    assert set(converted) == {f"{PDN_S_KEYS[k.split('.')[0]]}.{k.split('.')[1]}" for k in state}
    # anomalib's conv1 on ImageNet-normalised input = our conv1 on card-normalised input (no padding: exact)
    x = torch.rand(2, 3, 40, 40, dtype=torch.float64)
    ref = ours[0](((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).double())
    xa = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    got = torch.nn.functional.conv2d(xa, converted["conv1.weight"].double(), converted["conv1.bias"].double())
    assert torch.allclose(got, ref, atol=1e-5)
    # ImageNet's own statistics: conv1 unchanged
    same = to_anomalib_pdn_s(state, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(same["conv1.weight"], state["0.weight"]) and torch.allclose(
        same["conv1.bias"], state["0.bias"]
    )


def test_export_matches_our_pixels_and_full_test_set(tiny_sem, tmp_path):
    from vadbench.data.source import ImageSource

    data = export_folder(tiny_sem, 64, tmp_path / "folder")
    test = ImageSource(tiny_sem, "test", image_size=64)
    assert data["n_test"] == len(test) and data["has_pixel_gt"]
    # the validation normals too (EfficientAD's map quantiles on both sides), never a test image
    val = ImageSource(tiny_sem, "val", image_size=64)
    assert data["n_val"] == len(val) > 0 and len(list((tmp_path / "folder/val/good").glob("v*.png"))) == len(val)
    exported = (tmp_path / "folder/test").rglob("t*.png")
    assert sorted(int(p.stem[1:]) for p in exported) == list(range(len(test)))  # every test image, once
    i = int(np.flatnonzero(test.labels)[0])
    png = np.asarray(Image.open(tmp_path / "folder/test/abnormal" / f"t{i:04d}.png"))
    assert np.array_equal(png, test[i].numpy()[0])
    assert data["masks"].shape == (len(data["gt_index"]), 64, 64)


def test_limit_train_keeps_other_splits(tiny_sem, tmp_path):
    out = limit_train(tiny_sem, tmp_path / "small", 5)
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(tiny_sem / "manifest.csv", newline="") as fh:
        full = list(csv.DictReader(fh))
    assert sum(r["split"] == "train" for r in rows) == 5
    assert [r for r in rows if r["split"] != "train"] == [r for r in full if r["split"] != "train"]
