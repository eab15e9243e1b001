"""synthetic_sem: layout/manifest contract, determinism, masks = changed region, detectability, preview."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from scipy import ndimage

from vadbench.data.manifest import load_split, read_manifest
from vadbench.data.params import SEM_DEFECTS, SyntheticSemParams
from vadbench.data.preview import render_preview
from vadbench.data.synthetic_sem import MASK_THRESHOLD, generate_synthetic_sem, image_seed, render_sample
from vadbench.io import sha256_tree

SMALL = SyntheticSemParams(image_size=64, n_train=5, n_val=2, n_test_normal=3, n_test_per_defect=2)


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sem") / "synthetic_sem"
    counts = generate_synthetic_sem(out, SMALL, seed=3)
    return out, counts


def _png_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_layout_counts_and_manifest_follow_params(small_ds):
    root, counts = small_ds
    assert counts == {"train": {"good": 5}, "val": {"good": 2}, "test": {"good": 3} | {d: 2 for d in SEM_DEFECTS}}
    assert len(list((root / "train/good").glob("*.png"))) == 5
    assert len(list((root / "val/good").glob("*.png"))) == 2
    rows = read_manifest(root)
    assert sorted({r.split for r in rows}) == ["test", "train", "val"]
    assert sum(r.split == "test" and r.label == 1 for r in rows) == 2 * len(SEM_DEFECTS)
    for r in rows:
        with Image.open(root / r.path) as im:
            assert (im.mode, im.size) == ("L", (64, 64))
        if r.label == 0:
            assert r.defect_type == "good" and r.mask_path == ""
            continue
        assert r.mask_path == f"ground_truth/{r.defect_type}/{Path(r.path).stem}_mask.png"
        mask = np.asarray(Image.open(root / r.mask_path))
        assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    assert not (root / "ground_truth" / "good").exists()
    info = json.loads((root / "info.json").read_text())
    assert info["kind"] == "synthetic_sem" and info["seed"] == 3 and info["counts"] == counts
    assert SyntheticSemParams.model_validate(info["params"]) == SMALL
    test = load_split(root, "test")  # the common loader reads it: masks line up with labels
    assert (test.masks.flatten(1).amax(1).numpy() > 0).tolist() == (test.labels == 1).tolist()


def test_same_seed_same_bytes_other_seed_other_images(small_ds, tmp_path):
    root, _ = small_ds
    again = tmp_path / "again"
    generate_synthetic_sem(again, SMALL, seed=3)
    assert sha256_tree(again) == sha256_tree(root)  # PNGs, masks, manifest and info.json
    other = tmp_path / "other"
    generate_synthetic_sem(other, SMALL, seed=4)
    a, b = _png_bytes(root), _png_bytes(other)
    assert a.keys() == b.keys()
    differing = [k for k in a if k.endswith(".png") and "ground_truth" not in k and a[k] != b[k]]
    assert len(differing) == sum(not k.startswith("ground_truth") for k in a)


def test_images_keep_their_seed_when_counts_change(small_ds, tmp_path):
    root, _ = small_ds
    bigger = SMALL.model_copy(update={"n_train": 7, "n_test_per_defect": 3, "defect_types": ["open", "particle"]})
    out = tmp_path / "bigger"
    generate_synthetic_sem(out, bigger, seed=3)
    a, b = _png_bytes(root), _png_bytes(out)
    shared = [k for k in a if k in b]
    assert any(k.startswith("train/") for k in shared) and any(k.startswith("test/open/") for k in shared)
    assert all(a[k] == b[k] for k in shared)
    assert len(b) == 7 + 2 + 3 + 2 * 3 * 2  # images + masks
    assert (out / "train/good/006.png").is_file() and not (out / "test/bridge").exists()


def test_atomic_write_replaces_and_leaves_no_temp(small_ds, tmp_path):
    out = tmp_path / "ds"
    generate_synthetic_sem(out, SMALL, seed=3)
    (out / "stale.txt").write_text("from an older run")
    generate_synthetic_sem(out, SMALL, seed=3)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


@pytest.mark.parametrize("defect", SEM_DEFECTS)
def test_mask_is_exactly_the_region_the_defect_changed(defect):
    for i in range(4):
        seed = image_seed(11, f"test/{defect}", i)
        bad, mask = render_sample(seed, 128, defect)
        good, no_mask = render_sample(seed, 128, None)  # same layout and noise, no defect
        assert not no_mask.any()
        m = mask > 0
        assert m.sum() >= 4, f"{defect} #{i}: empty mask"
        diff = np.abs(bad.astype(np.int16) - good.astype(np.int16))
        # inside: clearly altered; the mask holds most of all change
        assert diff[m].mean() > 15, f"{defect} #{i}: mask pixels barely changed ({diff[m].mean():.1f})"
        assert np.mean(diff[m] >= 5) > 0.8
        assert diff[m].sum() / diff.sum() > 0.75
        # beyond a 1-px rim of the mask only sub-threshold blur tails remain
        far = ~ndimage.binary_dilation(m)
        assert diff[far].max() <= MASK_THRESHOLD * 255 + 4
        assert diff[far].mean() < 0.5


@pytest.mark.parametrize("defect", ["particle", "open", "stain"])
def test_defect_scale_grows_the_defect(defect):
    def area(scale: float) -> int:
        seeds = [image_seed(2, f"test/{defect}", i) for i in range(4)]
        return sum(int((render_sample(s, 128, defect, defect_scale=scale)[1] > 0).sum()) for s in seeds)

    areas = [area(1.0), area(2.0)]
    assert areas[1] > 1.5 * areas[0], areas


def _patch_descriptors(img: np.ndarray) -> np.ndarray:
    """(P, 64): 8×8 patches, stride 4, of the 2×-downsampled, per-image standardised image."""
    x = img.astype(np.float32).reshape(64, 2, 64, 2).mean((1, 3))
    x = (x - x.mean()) / (x.std() + 1e-6)  # take out the global brightness/contrast of each image
    win = np.lib.stride_tricks.sliding_window_view(x, (8, 8))[::4, ::4]
    return win.reshape(-1, 64)


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def test_defects_are_detectable_by_a_simple_patch_distance():
    """Nearest-normal-patch distance (a numpy PatchCore without a network) separates defects from normals."""
    bank = np.concatenate([_patch_descriptors(render_sample(image_seed(5, "train", i), 128)[0]) for i in range(24)])
    bank_sq = (bank**2).sum(1)

    def score(img: np.ndarray) -> float:
        q = _patch_descriptors(img)
        d2 = (q**2).sum(1)[:, None] - 2 * q @ bank.T + bank_sq[None]
        return float(np.sqrt(np.clip(d2.min(1), 0, None)).max())

    normals = np.array([score(render_sample(image_seed(5, "test/good", i), 128)[0]) for i in range(12)])
    aurocs = {}
    for d in SEM_DEFECTS:
        s = np.array([score(render_sample(image_seed(5, f"test/{d}", i), 128, d)[0]) for i in range(6)])
        aurocs[d] = _auroc(normals, s)
    assert np.mean(list(aurocs.values())) > 0.8, aurocs
    assert sum(a > 0.7 for a in aurocs.values()) >= 5, aurocs


@pytest.mark.parametrize(
    ("update", "key"),
    [
        ({"n_train": 0}, "n_train"),
        ({"n_test_per_defect": 0}, "n_test_per_defect"),
        ({"defect_types": ["particle", "dent"]}, "defect_types"),
        ({"defect_types": []}, "defect_types"),
        ({"image_size": 32}, "image_size"),
        ({"supersample": 0}, "supersample"),
        ({"defect_scale": 0.1}, "defect_scale"),
        ({"n_val": "20"}, "n_val"),  # strict: no silent coercion
        ({"colour": "grey"}, "colour"),  # unknown key
    ],
)
def test_invalid_params_are_rejected_naming_the_key(update, key):
    raw = SMALL.model_dump(mode="json") | update
    with pytest.raises(ValidationError) as err:
        SyntheticSemParams.model_validate_json(json.dumps(raw))
    assert any(key in map(str, e["loc"]) for e in err.value.errors()), str(err.value)


def test_duplicate_defect_type_is_rejected():
    with pytest.raises(ValidationError, match="defect_types lists a type twice"):
        SyntheticSemParams(defect_types=["open", "open"])


def test_unknown_defect_and_bad_seed_are_rejected_by_the_generator(tmp_path):
    with pytest.raises(ValueError, match="unknown defect type 'dent'"):
        render_sample(image_seed(0, "train", 0), 128, "dent")
    with pytest.raises(ValueError, match="seed"):
        generate_synthetic_sem(tmp_path / "x", SMALL, seed=-1)
    assert not (tmp_path / "x").exists()


def test_preview_is_deterministic_and_shows_every_type(small_ds, tmp_path):
    root, _ = small_ds
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    render_preview(root, a, per_type=2)
    render_preview(root, b, per_type=2)
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as im:
        w, h = im.size
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert h > w  # 7 rows (good + 6 defects) of 2
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.sum() > 50  # mask outlines were drawn
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_preview_works_for_rgb_datasets_without_masks(tmp_path):
    """Generic: an RGB, image-level-only dataset (e.g. a real dataset) previews too."""
    root = tmp_path / "rgb"
    rng = np.random.default_rng(0)
    rows = [
        ("train/good/0.png", "train", 0, "good"),
        ("test/good/0.png", "test", 0, "good"),
        ("test/crack/0.png", "test", 1, "crack"),
    ]
    for path, *_ in rows:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / path)
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "split", "label", "defect_type", "mask_path", "sha256"])
        w.writerows([(p, s, lab, t, "", "") for p, s, lab, t in rows])
    out = tmp_path / "p.png"
    render_preview(root, out, per_type=3)
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    with pytest.raises(ValueError, match="per_type"):
        render_preview(root, out, per_type=0)


def test_params_yaml_error_names_the_dataset_key():
    """Through the real loader: the message carries the full key path of params.yaml."""
    import yaml

    from vadbench.config import ParamsError, parse_params

    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    name = next(n for n, spec in raw["datasets"].items() if spec.get("kind") == "synthetic_sem")
    raw["datasets"][name]["image_size"] = 32
    with pytest.raises(ParamsError, match=rf"datasets\.{name}\.image_size"):
        parse_params(raw)
