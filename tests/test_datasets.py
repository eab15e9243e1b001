"""Loaders (one per dataset kind) and input hygiene, on tiny raw trees built here."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vadbench.data import hygiene
from vadbench.data.download import ManualDownloadError
from vadbench.data.manifest import load_split, read_manifest
from vadbench.data.params import (
    BtadParams,
    ElpvParams,
    FolderParams,
    MiicParams,
    MpddParams,
    MvtecAdParams,
    MvtecLocoParams,
    VisaParams,
)
from vadbench.data.prepare import prepare_real


def img(path: Path, size=(40, 30), mode="L", value=None, seed=0) -> Path:
    """A random image of `mode`; `value` makes it constant (for exact duplicates)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((len(mode),) if mode in ("RGB", "RGBA") else ())
    arr = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return path


def mask(path: Path, size=(40, 30), box=(5, 5, 15, 15), value=255) -> Path:
    arr = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "L").save(path)
    return path


def mvtec_tree(
    root: Path, cat="bottle", n_train=6, n_good=2, types=("crack",), n_bad=2, normal="good", mask_sfx="_mask", **kw
) -> Path:
    c = root / cat
    seed = 0
    for i in range(n_train):
        img(c / "train" / normal / f"{i:03d}.png", seed=(seed := seed + 1), **kw)
    for i in range(n_good):
        img(c / "test" / normal / f"{i:03d}.png", seed=(seed := seed + 1), **kw)
    for t in types:
        for i in range(n_bad):
            img(c / "test" / t / f"{i:03d}.png", seed=(seed := seed + 1), **kw)
            mask(c / "ground_truth" / t / f"{i:03d}{mask_sfx}.png", size=kw.get("size", (40, 30)))
    return root


def run(spec, root: Path, tmp_path: Path, seed=0):
    out = tmp_path / "prepared"
    info = prepare_real("ds", spec, out_dir=out, seed=seed, raw_dir=tmp_path / "raw", progress=False)
    return out, info


def test_mvtec_layout_counts_masks_and_val(tmp_path):
    raw = mvtec_tree(tmp_path / "src", n_train=10, types=("crack", "cut"))
    spec = MvtecAdParams(category="bottle", data_dir=str(raw), image_size=32, val_fraction=0.2, check_counts=False)
    out, info = run(spec, raw, tmp_path)
    assert info["counts"] == {"train": {"good": 8}, "val": {"good": 2}, "test": {"good": 2, "crack": 2, "cut": 2}}
    assert info["channels"] == 1 and info["n_masks"] == 4
    test = load_split(out, "test")
    assert test.images.shape == (6, 1, 32, 32)
    assert test.labels.tolist() == [1, 1, 1, 1, 0, 0]  # manifest order: test/crack, test/cut, test/good
    assert test.masks[test.labels == 1].sum() > 0 and test.masks[test.labels == 0].sum() == 0


def test_published_count_mismatch_is_an_error(tmp_path):
    raw = mvtec_tree(tmp_path / "src")  # far fewer images than the published bottle counts
    spec = MvtecAdParams(category="bottle", data_dir=str(raw), image_size=32)
    with pytest.raises(ValueError, match="published counts"):
        run(spec, raw, tmp_path)
    assert not (tmp_path / "prepared").exists()


def test_btad_ok_ko_and_stem_masks(tmp_path):
    raw = mvtec_tree(tmp_path / "src", cat="02", normal="ok", types=("ko",), mask_sfx="", mode="RGB")
    out, info = run(BtadParams(category="02", data_dir=str(raw), image_size=32), raw, tmp_path)
    assert info["channels"] == 3 and info["counts"]["test"] == {"good": 2, "ko": 2} and info["n_masks"] == 2


def test_visa_relayout_from_1cls_csv_with_index_masks(tmp_path):
    base = tmp_path / "src" / "VisA_20220922"
    rows = []
    for cat in ("candle", "pcb1"):
        for i in range(5):
            p = img(base / cat / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", mode="RGB", seed=i + 10 * len(cat))
            rows.append([cat, "train" if i < 4 else "test", "normal", p.relative_to(base).as_posix(), ""])
        for i in range(2):
            p = img(base / cat / "Data" / "Images" / "Anomaly" / f"{i:03d}.JPG", mode="RGB", seed=100 + i + len(cat))
            m = mask(base / cat / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png", value=2)  # class index, not 255
            rows.append([cat, "test", "anomaly", p.relative_to(base).as_posix(), m.relative_to(base).as_posix()])
    (base / "split_csv").mkdir(parents=True)
    with open(base / "split_csv" / "1cls.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["object", "split", "label", "image", "mask"], *rows])
    spec = VisaParams(
        category="pcb1", data_dir=str(tmp_path / "src"), image_size=32, val_fraction=0.25, check_counts=False
    )
    out, info = run(spec, tmp_path / "src", tmp_path)
    assert info["counts"] == {"train": {"good": 3}, "val": {"good": 1}, "test": {"bad": 2, "good": 1}}
    test = load_split(out, "test")
    assert int(test.masks[test.labels == 1].sum()) > 0  # > 0 binarisation kept the index-valued defects


def test_mvtec_loco_uses_its_validation_and_ors_masks(tmp_path):
    c = tmp_path / "src" / "pushpins"
    for i in range(4):
        img(c / "train" / "good" / f"{i:03d}.png", mode="RGB", seed=i)
    img(c / "validation" / "good" / "000.png", mode="RGB", seed=50)
    img(c / "test" / "good" / "000.png", mode="RGB", seed=60)
    img(c / "test" / "logical_anomalies" / "000.png", mode="RGB", seed=70)
    mask(c / "ground_truth" / "logical_anomalies" / "000" / "000.png", box=(0, 0, 10, 10), value=40)
    mask(c / "ground_truth" / "logical_anomalies" / "000" / "001.png", box=(20, 20, 30, 30), value=40)
    spec = MvtecLocoParams(category="pushpins", data_dir=str(tmp_path / "src"), image_size=40)
    out, info = run(spec, tmp_path / "src", tmp_path)
    assert info["counts"]["val"] == {"good": 1} and info["counts"]["train"] == {"good": 4}
    test = load_split(out, "test", image_size=40)
    bad = test.masks[test.labels == 1][0]
    # both masks survive (OR), at their places: (0..10, 0..10) and (20..30, 20..30) in the 40x30 source
    assert bad[2, 2] == 1 and bad[35, 25] == 1 and bad[35, 5] == 0 and bad[5, 25] == 0


def test_miic_clean_split_no_test_or_anomaly_in_train(tmp_path):
    r = tmp_path / "src"
    for i in range(8):
        img(r / "Anomaly_train" / f"train_normal_{i}.jpg", seed=i)
    img(r / "Anomaly_train" / "train_abnormal_0.jpg", seed=99)  # anomaly inside the train folder
    # Anomaly_test is a subset of Anomaly_train: copy two normals and the anomaly byte for byte
    for i in (0, 1):
        dst = r / "Anomaly_test" / "normal_img" / f"test_normal_{i}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((r / "Anomaly_train" / f"train_normal_{i}.jpg").read_bytes())
    dst = r / "Anomaly_test" / "abnormal_img" / "test_abnormal_0.jpg"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes((r / "Anomaly_train" / "train_abnormal_0.jpg").read_bytes())
    mask(r / "Anomaly_test" / "abnormal_mask" / "test_abnormal_mask_0.png")
    out, info = run(MiicParams(data_dir=str(r), image_size=32, val_fraction=0.0), r, tmp_path)
    rows = read_manifest(out)
    train_hashes = {x.sha256 for x in rows if x.split == "train"}
    test_hashes = {x.sha256 for x in rows if x.split == "test"}
    assert not train_hashes & test_hashes
    assert all(x.label == 0 for x in rows if x.split != "test")
    assert info["counts"]["train"] == {"good": 6}  # 8 normals minus the 2 also in test
    assert len(info["duplicates"]["dropped_duplicates"]) == 3  # 2 normals + the train copy of the anomaly
    assert info["n_masks"] == 1  # paired by numeric id


def test_miic_missing_tells_what_to_fetch(tmp_path):
    (tmp_path / "raw" / "miic").mkdir(parents=True)
    (tmp_path / "raw" / "miic" / "readme.txt").write_text("partial download")
    with pytest.raises(ManualDownloadError, match="researchdata.ntu.edu.sg"):
        run(MiicParams(), tmp_path / "raw", tmp_path)
    with pytest.raises(ManualDownloadError, match="researchdata.ntu.edu.sg"):
        run(MiicParams(), tmp_path / "nothing", tmp_path / "other")


def test_manual_datasets_say_what_to_fetch(tmp_path, monkeypatch):
    (tmp_path / "raw" / "mpdd" / "connector").mkdir(parents=True)  # something there, but not the category
    with pytest.raises(ManualDownloadError, match="bracket_white.*github.com/stepanje/MPDD"):
        prepare_real(
            "m", MpddParams(category="bracket_white"), out_dir=tmp_path / "p", seed=0, raw_dir=tmp_path / "raw"
        )
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as if elpv-dataset were absent
    with pytest.raises(ManualDownloadError, match="pip install elpv-dataset"):
        prepare_real("e", ElpvParams(category="mono"), out_dir=tmp_path / "p", seed=0, raw_dir=tmp_path / "raw")


def _elpv(root: Path) -> Path:
    lines = []
    for i, (prob, kind) in enumerate(
        [(0.0, "mono")] * 10 + [(1.0, "mono")] * 3 + [(1 / 3, "mono")] * 2 + [(0.0, "poly")] * 4
    ):
        img(root / "images" / f"cell{i:04d}.png", size=(30, 30), seed=i)
        lines.append(f"images/cell{i:04d}.png  {prob}  {kind}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("uncertain, n_bad, n_normal", [("drop", 3, 10), ("defective", 5, 10), ("normal", 3, 12)])
def test_elpv_labels_and_uncertain_policy(tmp_path, uncertain, n_bad, n_normal):
    root = _elpv(tmp_path / "elpv")
    spec = ElpvParams(
        category="mono", data_dir=str(root), image_size=30, uncertain=uncertain, test_normal_fraction=0.25
    )
    out, info = run(spec, root, tmp_path)
    rows = read_manifest(out)
    assert sum(r.label for r in rows) == n_bad and all(r.split == "test" for r in rows if r.label)
    assert sum(r.label == 0 for r in rows) == n_normal
    assert info["counts"]["test"]["good"] == round(0.25 * n_normal)


def test_folder_with_and_without_own_test_split(tmp_path):
    src = tmp_path / "src"
    for i in range(10):
        img(src / "normal" / f"n{i}.png", seed=i)
    for i in range(3):
        img(src / "test_normal" / f"t{i}.png", seed=20 + i)
        img(src / "bad" / "scratch" / f"b{i}.png", seed=40 + i)
    img(src / "bad" / "loose.png", seed=60)
    mask(src / "masks" / "scratch" / "b0_gt.png")
    mask(src / "masks" / "scratch" / "b1_gt.png", value=200)  # non-binary: >= 128 counts
    common = dict(
        normal_dir=str(src / "normal"),
        abnormal_dir=str(src / "bad"),
        mask_dir=str(src / "masks"),
        mask_suffix="_gt",
        image_size=32,
        val_fraction=0.1,
    )
    out, info = run(FolderParams(**common, test_normal_dir=str(src / "test_normal")), src, tmp_path)
    assert info["counts"] == {"train": {"good": 9}, "val": {"good": 1}, "test": {"anomaly": 1, "good": 3, "scratch": 3}}
    test = load_split(out, "test")
    assert test.has_mask.tolist().count(False) == 2  # b2 and loose.png have no mask: image-level only
    out2, info2 = run(FolderParams(**common, test_normal_fraction=0.3), src, tmp_path / "b")
    assert info2["counts"]["test"]["good"] == 3 and info2["counts"]["train"]["good"] == 6


# ---- hygiene ---------------------------------------------------------------------------------------


def _folder_spec(src: Path, **kw) -> FolderParams:
    return FolderParams(
        normal_dir=str(src / "normal"), abnormal_dir=str(src / "bad"), image_size=32, mask_dir=str(src / "masks"), **kw
    )


def _small_folder(src: Path, **kw) -> Path:
    for i in range(6):
        img(src / "normal" / f"n{i}.png", seed=i, **kw)
    img(src / "bad" / "b0.png", seed=9, **kw)
    (src / "masks").mkdir(parents=True, exist_ok=True)
    return src


def test_truncated_image_rejected_with_name_or_skipped(tmp_path):
    src = _small_folder(tmp_path / "src", size=(200, 200))
    broken = src / "normal" / "n3.png"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with pytest.raises(hygiene.BadImageError, match="n3.png"):
        run(_folder_spec(src), src, tmp_path)
    assert not (tmp_path / "prepared").exists()
    out, info = run(_folder_spec(src, on_bad_image="skip"), src, tmp_path)
    assert [s["path"] for s in info["skipped"]] == [str(broken)]
    assert all("n3" not in r.path for r in read_manifest(out))


def test_garbage_file_and_oversized_header_rejected_before_decoding(tmp_path):
    src = _small_folder(tmp_path / "src")
    (src / "normal" / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(hygiene.BadImageError, match="junk.png"):
        run(_folder_spec(src), src, tmp_path)
    (src / "normal" / "junk.png").unlink()
    img(src / "normal" / "huge.png", size=(400, 300), value=0)
    with pytest.raises(hygiene.BadImageError, match="huge.png.*max_pixels"):
        run(_folder_spec(src, max_pixels=100_000), src, tmp_path)


def test_mask_size_mismatch_rejected_naming_both(tmp_path):
    src = _small_folder(tmp_path / "src")
    mask(src / "masks" / "b0.png", size=(20, 20))
    with pytest.raises(hygiene.BadImageError, match=r"b0\.png.*b0\.png"):
        run(_folder_spec(src), src, tmp_path)


def test_16bit_rgba_mixed_modes_and_sizes_are_normalised(tmp_path):
    src = _small_folder(tmp_path / "src")
    arr16 = np.full((30, 40), 65535 // 2, np.uint16)
    Image.fromarray(arr16).save(src / "normal" / "deep.png")  # 16-bit grey
    img(src / "normal" / "rgba.png", mode="RGBA", size=(64, 48))  # other size, alpha
    out, info = run(_folder_spec(src), src, tmp_path)
    assert info["channels"] == 3  # one colour image makes the dataset RGB
    deep = next(r for r in read_manifest(out) if "deep" in r.path)
    with Image.open(out / deep.path) as im:
        assert im.mode == "RGB" and im.size == (32, 32)
        assert abs(int(np.asarray(im)[..., 0].mean()) - 127) <= 1  # /257 scaling, not clipping
    grey, info_g = run(_folder_spec(src, channels="grey"), src, tmp_path / "g")
    assert info_g["channels"] == 1 and load_split(grey, "train").images.shape[1] == 1


def _twelve_bit_folder(src: Path) -> Path:
    """Every image 12-bit data in 16-bit PNGs (values 0..4095), as SEM and industrial cameras write them."""
    for i, path in enumerate([*(src / "normal" / f"n{i}.png" for i in range(6)), src / "bad" / "b0.png"]):
        path.parent.mkdir(parents=True, exist_ok=True)
        ramp = np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 2 + i  # 0 .. 3,204
        Image.fromarray(ramp).save(path)
    return src


def test_16bit_sources_of_12_bit_data_get_advice_and_a_bit_depth(tmp_path):
    src = _twelve_bit_folder(tmp_path / "src")
    spec = FolderParams(normal_dir=str(src / "normal"), abnormal_dir=str(src / "bad"), image_size=40)
    _, info = run(spec, src, tmp_path)
    assert info["bit_depth"] == 16 and "set bit_depth: 12" in info["mask_notes"][0]  # read as 16-bit: 15 levels
    out, info = run(spec.model_copy(update={"bit_depth": 12}), src, tmp_path / "12")
    assert info["bit_depth"] == 12 and not any("bit_depth" in n for n in info["mask_notes"])
    row = next(r for r in read_manifest(out) if r.path.endswith("n0.png"))
    with Image.open(src / "normal" / "n0.png") as im16, Image.open(out / row.path) as stored:
        expected = np.asarray(im16).astype(np.int64) * 255 // 4095
        assert np.array_equal(np.asarray(stored), expected)  # 40 px: no resize, the exact scaling
    Image.fromarray(np.full((40, 40), 5000, np.uint16)).save(src / "normal" / "n5.png")
    with pytest.raises(hygiene.BadImageError, match=r"n5\.png.*5000.*bit_depth 12.*set bit_depth to 13"):
        run(spec.model_copy(update={"bit_depth": 12}), src, tmp_path / "bad")


def test_16_bit_scaling_at_bit_depth_16_is_the_old_division_by_257():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    im, peak = hygiene._to_8bit(Path("x.png"), Image.fromarray(values), 16)
    assert peak == 65535 and np.array_equal(np.asarray(im), (values // 257).astype(np.uint8))


def test_empty_category_rejected(tmp_path):
    src = tmp_path / "src"
    (src / "normal").mkdir(parents=True)
    img(src / "bad" / "b.png")
    with pytest.raises(ValueError, match="0 usable train"):
        run(FolderParams(normal_dir=str(src / "normal"), abnormal_dir=str(src / "bad")), src, tmp_path)


def test_zero_one_masks_are_read_at_nonzero_and_said(tmp_path, capsys):
    """A 0/1 mask saved as 8-bit would binarise to nothing at >= 128: it is read at > 0, and prepare says so."""
    src = _small_folder(tmp_path / "src")
    mask(src / "masks" / "b0.png", value=1)
    out, info = run(_folder_spec(src), src, tmp_path)
    test = load_split(out, "test")
    bad = int(np.flatnonzero(test.labels == 1)[0])
    assert test.masks[bad].sum() > 0  # the defect survived
    assert any("b0.png" in n and "0/1 mask" in n for n in info["mask_notes"])
    assert "0/1 mask" in capsys.readouterr().out  # said, not only recorded


def test_empty_mask_of_a_defect_image_is_said(tmp_path):
    src = _small_folder(tmp_path / "src")
    mask(src / "masks" / "b0.png", value=0)
    _, info = run(_folder_spec(src), src, tmp_path)
    assert any("b0.png" in n and "empty" in n for n in info["mask_notes"])


# ---- folder: trees as they are ---------------------------------------------------------------------


def _rows_by(out: Path) -> dict[str, list]:
    rows = read_manifest(out)
    return {split: [r for r in rows if r.split == split] for split in ("train", "val", "test")}


def test_folder_root_reads_an_mvtec_tree_as_it_is(tmp_path):
    raw = mvtec_tree(tmp_path / "src", cat="my_part", n_train=10, n_good=3, types=("dent", "scuff"), n_bad=2)
    (raw / "my_part" / "ground_truth" / "scuff" / "001_mask.png").unlink()  # image-level, not an error
    spec = FolderParams(root=str(raw / "my_part"), image_size=32, val_fraction=0.2)
    out, info = run(spec, raw, tmp_path)
    assert info["counts"] == {"train": {"good": 8}, "val": {"good": 2}, "test": {"dent": 2, "good": 3, "scuff": 2}}
    by = _rows_by(out)
    assert all(r.label == 0 for r in by["train"] + by["val"])
    assert {(r.defect_type, r.label) for r in by["test"]} == {("good", 0), ("dent", 1), ("scuff", 1)}
    masked = sorted(Path(r.path).name for r in by["test"] if r.mask_path)
    assert masked == ["000.png", "000.png", "001.png"]  # dent 000/001 and scuff 000; scuff/001 has none
    assert not any(r.mask_path for r in by["test"] if r.label == 0)
    test = load_split(out, "test")
    assert test.has_mask.tolist().count(False) == 1


def test_folder_root_mask_suffix_and_missing_root(tmp_path):
    raw = mvtec_tree(tmp_path / "src", cat="p", types=("dent",), mask_sfx="_gt")
    _, info = run(FolderParams(root=str(raw / "p"), image_size=32, mask_suffix="_gt"), raw, tmp_path)
    assert info["n_masks"] == 2
    _, info = run(FolderParams(root=str(raw / "p"), image_size=32), raw, tmp_path / "default")
    assert info["n_masks"] == 0  # default `_mask` (or bare stem) finds no `_gt` masks: image-level
    with pytest.raises(FileNotFoundError, match=r"datasets\.<name>\.root: .*nowhere"):
        run(FolderParams(root=str(tmp_path / "nowhere")), raw, tmp_path / "x")


def test_folder_root_or_dirs_is_checked_naming_the_fields(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="normal_dir and abnormal_dir missing.*root"):
        FolderParams()
    with pytest.raises(ValidationError, match="abnormal_dir missing"):
        FolderParams(normal_dir="a")
    with pytest.raises(ValidationError, match="root and normal_dir, abnormal_dir are given"):
        FolderParams(root="r", normal_dir="a", abnormal_dir="b")
    with pytest.raises(ValidationError, match="root and mask_dir are given"):
        FolderParams(root="r", mask_dir="m")
    with pytest.raises(ValidationError, match="normal_dir"):
        FolderParams(normal_dir=[], abnormal_dir="b")  # an empty list is no directory


def test_folder_accepts_lists_of_dirs_without_stem_collisions(tmp_path):
    src = tmp_path / "src"
    for line in ("line1", "line2"):
        off = 0 if line == "line1" else 100
        for i in range(5):
            img(src / line / "ok" / f"n{i}.png", seed=off + i)  # same stems in both lines
        for i in range(2):
            img(src / line / "ng" / "scratch" / f"b{i}.png", seed=off + 50 + i)
            mask(src / line / "masks" / "scratch" / f"b{i}.png", box=(0, 0, 5 + 5 * i + off // 10, 5))
        img(src / line / "test_ok" / "t0.png", seed=off + 70)
    spec = FolderParams(
        normal_dir=[str(src / "line1" / "ok"), str(src / "line2" / "ok")],
        abnormal_dir=[str(src / "line1" / "ng"), str(src / "line2" / "ng")],
        mask_dir=[str(src / "line1" / "masks"), str(src / "line2" / "masks")],
        test_normal_dir=[str(src / "line1" / "test_ok"), str(src / "line2" / "test_ok")],
        image_size=32,
        val_fraction=0.2,
    )
    out, info = run(spec, src, tmp_path)
    assert info["counts"] == {"train": {"good": 8}, "val": {"good": 2}, "test": {"good": 2, "scratch": 4}}
    rows = read_manifest(out)
    assert len({r.path for r in rows}) == len(rows) == 16  # equal stems got distinct output names
    bad = [r for r in rows if r.label == 1]
    assert len({r.mask_path for r in bad}) == 4 and all(r.mask_path for r in bad)
    # each mask stayed with its own image (paired by position): the mask areas differ per line
    test = load_split(out, "test")
    areas = sorted(int(m.sum()) for m, lab in zip(test.masks, test.labels) if lab == 1)
    assert len(set(areas)) == 4


def test_folder_one_mask_dir_for_several_abnormal_dirs_and_ambiguity(tmp_path):
    src = _small_folder(tmp_path / "src")
    img(src / "bad2" / "c0.png", seed=30)
    mask(src / "masks" / "b0.png")
    mask(src / "masks" / "c0.png")
    base = dict(normal_dir=str(src / "normal"), abnormal_dir=[str(src / "bad"), str(src / "bad2")], image_size=32)
    out, info = run(FolderParams(**base, mask_dir=str(src / "masks")), src, tmp_path)
    assert info["n_masks"] == 2 and info["counts"]["test"] == {"anomaly": 2, "good": 1}  # one mask dir serves both
    mask(src / "masks2" / "b0.png")  # b0's mask now in two of three mask dirs: which one is meant?
    three = [str(src / "masks"), str(src / "masks2"), str(src / "masks2")]
    with pytest.raises(ValueError, match=r"b0\.png: masks in more than one mask_dir"):
        run(FolderParams(**base, mask_dir=three), src, tmp_path / "amb")
    missing = base | {"normal_dir": [str(src / "normal"), str(src / "missing")]}
    with pytest.raises(FileNotFoundError, match=r"normal_dir\[1\]: .*missing"):
        run(FolderParams(**missing), src, tmp_path / "m")


def test_folder_good_subfolder_of_abnormal_dir_is_test_normals(tmp_path):
    """normal_dir=train/good, abnormal_dir=test of an MVTec tree: test/good are normals, not a type 'good'."""
    raw = mvtec_tree(tmp_path / "src", cat="c", n_train=8, n_good=3, types=("crack",), n_bad=2)
    c = raw / "c"
    spec = FolderParams(
        normal_dir=str(c / "train" / "good"),
        abnormal_dir=str(c / "test"),
        mask_dir=str(c / "ground_truth"),
        mask_suffix="_mask",
        image_size=32,
        val_fraction=0.25,
    )
    out, info = run(spec, raw, tmp_path)
    # the tree brings its own test normals, so all 8 train normals train (none held out for test)
    assert info["counts"] == {"train": {"good": 6}, "val": {"good": 2}, "test": {"crack": 2, "good": 3}}
    test = [r for r in read_manifest(out) if r.split == "test"]
    assert sorted((r.defect_type, r.label, bool(r.mask_path)) for r in test) == [
        ("crack", 1, True),
        ("crack", 1, True),
        ("good", 0, False),
        ("good", 0, False),
        ("good", 0, False),
    ]


def test_mvtec_ad_own_category_with_data_dir_only(tmp_path):
    from pydantic import ValidationError

    raw = mvtec_tree(tmp_path / "src", cat="gear_wheel", types=("chipped",))
    spec = MvtecAdParams(category="gear_wheel", data_dir=str(raw), image_size=32)  # check_counts left on
    out, info = run(spec, raw, tmp_path)
    assert info["published_check"] is None  # no published counts for a user's category: nothing to compare
    assert info["counts"]["test"] == {"chipped": 2, "good": 2} and info["n_masks"] == 2
    with pytest.raises(ValidationError, match="category\n.*'gear_wheel' is not an MVTec AD category.*bottle.*data_dir"):
        MvtecAdParams(category="gear_wheel")  # a download needs an official name
    with pytest.raises(ValidationError, match="category"):
        MvtecAdParams(category="../etc", data_dir=str(raw))  # a name, not a path
    assert MvtecAdParams(category="bottle").category == "bottle"


def test_fingerprint_covers_root_and_every_listed_dir(tmp_path):
    from vadbench.data.fingerprint import fingerprint, source_dirs

    raw = mvtec_tree(tmp_path / "src", cat="p")
    fp = fingerprint(FolderParams(root=str(raw / "p")))
    assert list(fp) == ["root"] and len(fp["root"]["files"]) == 6 + 2 + 2 + 2
    spec = FolderParams(
        normal_dir=[str(raw / "p" / "train"), str(raw / "p" / "test" / "good")],
        abnormal_dir=str(raw / "p" / "test"),
        mask_dir=[str(raw / "p" / "ground_truth")],
    )
    assert [k for k, _ in source_dirs(spec)] == ["normal_dir[0]", "normal_dir[1]", "abnormal_dir", "mask_dir[0]"]
    fp = fingerprint(spec)
    assert len(fp["normal_dir[0]"]["files"]) == 6 and len(fp["normal_dir[1]"]["files"]) == 2
