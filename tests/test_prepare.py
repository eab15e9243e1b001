"""prepare_dataset end to end: splits, duplicates, determinism, info.json, crop, params, stage output."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from test_datasets import img, mask, mvtec_tree  # tests/ is on sys.path (rootdir conftest)

from vadbench.config import ParamsError, load_params, parse_params
from vadbench.data.loaders import Source
from vadbench.data.manifest import load_split, read_manifest
from vadbench.data.params import FolderParams, MvtecAdParams
from vadbench.data.prepare import prepare_dataset
from vadbench.data.split import plan_splits
from vadbench.io import sha256_tree

REPO = Path(__file__).resolve().parents[1]


def _sources(n_train: int, n_test: int) -> tuple[list[Source], dict[str, str]]:
    srcs = [Source(Path(f"/x/train/{i:03d}.png"), "train", 0, "good") for i in range(n_train)]
    srcs += [
        Source(Path(f"/x/test/{i:03d}.png"), "test", i % 2, "good" if i % 2 == 0 else "bad") for i in range(n_test)
    ]
    return srcs, {str(s.path): hashlib.sha256(str(s.path).encode()).hexdigest() for s in srcs}


def test_val_carve_is_seeded_and_leaves_test_alone():
    srcs, hashes = _sources(50, 10)
    a, _ = plan_splits(srcs, hashes, seed=3, val_fraction=0.2)
    b, _ = plan_splits(list(reversed(srcs)), hashes, seed=3, val_fraction=0.2)  # input order is irrelevant
    c, _ = plan_splits(srcs, hashes, seed=4, val_fraction=0.2)
    val = lambda plan: sorted(str(s.path) for s in plan if s.split == "val")  # noqa: E731
    assert val(a) == val(b) and val(a) != val(c) and len(val(a)) == 10
    assert all(s.label == 0 for s in a if s.split == "val")
    assert sorted(str(s.path) for s in a if s.split == "test") == sorted(str(s.path) for s in srcs if s.split == "test")


def test_duplicates_never_straddle_train_and_test():
    srcs, hashes = _sources(20, 6)
    hashes["/x/train/005.png"] = hashes["/x/test/002.png"]  # a test image also in train
    hashes["/x/train/007.png"] = hashes["/x/train/003.png"]  # a duplicate inside train
    plan, report = plan_splits(srcs, hashes, seed=0, val_fraction=0.25)
    kept = {str(s.path): s.split for s in plan}
    assert "/x/train/005.png" not in kept and kept["/x/test/002.png"] == "test"
    assert ("/x/train/003.png" in kept) != ("/x/train/007.png" in kept)
    assert {d["dropped"] for d in report.dropped_duplicates} == {"/x/train/005.png", "/x/train/007.png"}
    by_hash: dict[str, set[str]] = {}
    for s in plan:
        by_hash.setdefault(hashes[str(s.path)], set()).add(s.split)
    assert all(len(splits) == 1 for splits in by_hash.values())


def test_anomaly_in_train_is_refused():
    with pytest.raises(ValueError, match="anomalous"):
        plan_splits([Source(Path("/x/a.png"), "train", 1, "bad")], {"/x/a.png": "0"}, seed=0, val_fraction=0.1)


def _folder(src: Path) -> FolderParams:
    for i in range(30):
        img(src / "normal" / f"n{i:02d}.png", seed=i, mode="RGB", size=(48, 40))
    img(src / "normal" / "copy_of_bad.png", seed=100, mode="RGB", size=(48, 40))  # same bytes as bad/x/b0
    for i in range(4):
        img(src / "bad" / "x" / f"b{i}.png", seed=100 + i, mode="RGB", size=(48, 40))
        mask(src / "masks" / "x" / f"b{i}.png", size=(48, 40))
    return FolderParams(
        normal_dir=str(src / "normal"),
        abnormal_dir=str(src / "bad"),
        mask_dir=str(src / "masks"),
        image_size=32,
        center_crop=24,
        val_fraction=0.2,
        test_normal_fraction=0.2,
    )


def test_prepare_is_deterministic_and_writes_info(tmp_path):
    spec = _folder(tmp_path / "src")
    infos = [
        prepare_dataset("toy", spec, out_dir=tmp_path / f"p{k}", seed=7, preview_png=None, progress=False)
        for k in range(2)
    ]
    assert sha256_tree(tmp_path / "p0") == sha256_tree(tmp_path / "p1")
    info = json.loads((tmp_path / "p0" / "info.json").read_text())
    assert info == infos[0]
    assert (info["kind"], info["image_size"], info["center_crop"], info["channels"]) == ("folder", 32, 24, 3)
    rows = read_manifest(tmp_path / "p0")
    assert all(len(r.sha256) == 64 for r in rows)
    # the normal that duplicates a test anomaly never trains; the duplicate is reported
    assert [d["dropped"].endswith("copy_of_bad.png") for d in info["duplicates"]["dropped_duplicates"]] == [True]
    assert sum(v for v in info["counts"]["val"].values()) == round(0.2 * 24)
    other = prepare_dataset("toy", spec, out_dir=tmp_path / "p2", seed=8, preview_png=None, progress=False)
    assert other["counts"] == info["counts"] and sha256_tree(tmp_path / "p2") != sha256_tree(tmp_path / "p0")


def test_worker_processes_give_identical_output(tmp_path):
    src = tmp_path / "src"
    for i in range(70):  # >= 64: the process pool is used
        img(src / "normal" / f"n{i:02d}.png", seed=i, size=(20, 20))
    img(src / "bad" / "b.png", seed=99, size=(20, 20))
    spec = FolderParams(normal_dir=str(src / "normal"), abnormal_dir=str(src / "bad"), image_size=16)
    for w in (1, 2):
        prepare_dataset("w", spec, out_dir=tmp_path / f"w{w}", seed=0, preview_png=None, progress=False, workers=w)
    assert sha256_tree(tmp_path / "w1") == sha256_tree(tmp_path / "w2")
    assert len(read_manifest(tmp_path / "w2")) == 71


def test_load_split_applies_the_datasets_center_crop(tmp_path):
    spec = _folder(tmp_path / "src")
    out = tmp_path / "p"
    prepare_dataset("toy", spec, out_dir=out, seed=0, preview_png=None, progress=False)
    test = load_split(out, "test")  # crop comes from info.json
    full = load_split(out, "test", center_crop=32)
    assert test.images.shape[-2:] == (24, 24) and test.masks.shape[-2:] == (24, 24)
    assert np.array_equal(test.images.numpy(), full.images[..., 4:28, 4:28].numpy())
    assert np.array_equal(test.masks.numpy(), full.masks[:, 4:28, 4:28].numpy())
    with pytest.raises(ValueError, match="center_crop 40 is larger"):
        load_split(out, "test", center_crop=40)


def test_crop_larger_than_image_size_is_a_param_error(tmp_path):
    spec = MvtecAdParams(category="bottle", image_size=32, center_crop=64, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"datasets\.x\.center_crop"):
        prepare_dataset("x", spec, out_dir=tmp_path / "p", seed=0, preview_png=None)


def test_params_validate_new_kinds_with_key_paths():
    base = {
        "run": {"datasets": ["mvtec_ad_bottle"], "models": ["patchcore"], "backbones": ["random"]},
        "backbones": {"random": {"arch": "resnet18", "init": "random"}},
        "models": {},
    }
    ok = parse_params(base | {"datasets": {"mvtec_ad_bottle": {"kind": "mvtec_ad", "category": "bottle"}}})
    assert ok.datasets["mvtec_ad_bottle"].category == "bottle"
    with pytest.raises(ParamsError, match="mvtec_ad_bottle.*category"):
        parse_params(base | {"datasets": {"mvtec_ad_bottle": {"kind": "mvtec_ad", "category": "bottel"}}})
    with pytest.raises(ParamsError, match="sha256"):
        parse_params(
            base | {"datasets": {"mvtec_ad_bottle": {"kind": "mvtec_ad", "category": "bottle", "sha256": "abc"}}}
        )


def test_published_counts_match_and_stage_prints_them(tmp_path, monkeypatch, capsys):
    # a stand-in bottle with exactly the published counts (209 / 20 / 63), tiny images
    raw = mvtec_tree(
        tmp_path / "raw",
        n_train=209,
        n_good=20,
        types=("broken_large", "broken_small", "contamination"),
        n_bad=21,
        size=(8, 8),
    )
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "run": {"datasets": ["mvtec_ad_bottle"], "models": ["patchcore"], "backbones": ["random"]},
                "backbones": {"random": {"arch": "resnet18", "init": "random"}},
                "models": {},
                "datasets": {
                    "mvtec_ad_bottle": {
                        "kind": "mvtec_ad",
                        "category": "bottle",
                        "data_dir": str(raw),
                        "image_size": 16,
                    }
                },
            }
        )
    )
    # the stage's own run(); only the preview is switched off (data/preview.py belongs to another helper)
    sys.path.insert(0, str(REPO))
    try:
        import stages.prepare as stage
    finally:
        sys.path.remove(str(REPO))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        stage, "prepare_dataset", lambda *a, **k: prepare_dataset(*a, **(k | {"preview_png": None, "progress": False}))
    )
    stage.run(load_params(params), "mvtec_ad_bottle")
    out = capsys.readouterr().out
    assert "match the published" in out and "'test_bad': 63" in out
    assert re.search(r"train\s+188\b.*\n\s+val\s+21\b.*\n\s+test\s+83\b", out)  # per-split totals, in order
    info = json.loads((tmp_path / "data" / "prepared" / "mvtec_ad_bottle" / "info.json").read_text())
    assert info["published_check"]["match"] is True
    assert sum(info["counts"]["train"].values()) + sum(info["counts"]["val"].values()) == 209
