"""fractals generator options (compose.py): multi-fractal collages, backgrounds, colour renders, and
pretraining's reading of colour PNGs. The plain output's pinned hashes live in test_fractals_build.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from vadbench.fractals import FractalsParams, build, ifs, kernels, read_manifest, regenerate, write_preview
from vadbench.fractals.instances import FLIPS, Renderer
from vadbench.io import sha256_tree
from vadbench.pretrain.data import FractalImages, read_fractal_split
from vadbench.pretrain.train import InputPrep

OPT = dict(
    num_classes=3,
    instances_per_class=6,
    image_size=48,
    points=3000,
    pad=1,
    search_size=96,
    search_points=4000,
    search_pad=2,
    filling_threshold=0.15,
    workers=1,
)
ALL = dict(composition="multi", background="fractal", colour="colour")  # every option at once


def _build(tmp: Path, name: str, seed: int = 0, **over) -> Path:
    out = tmp / name / "fractals"
    build.generate(out, FractalsParams(**{**OPT, **over}), seed, progress=False)
    return out


def _png(root: Path, row: dict) -> np.ndarray:
    return np.array(Image.open(root / row["path"]))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("plain"), "p")


@pytest.fixture(scope="module")
def every(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("every"), "e", **ALL)


# --- kernels --------------------------------------------------------------------------------------------------
def test_label_render_has_the_grey_render_pixels_and_one_label_per_map() -> None:
    maps = ifs.sample_sigma(np.random.default_rng(2), 4, 4)
    r = Renderer(40, 3000, 1)
    for flip in FLIPS:
        labels, grey = r.render_labels(maps, 9, flip), r.render(maps, 9, flip)
        assert np.array_equal(labels > 0, grey > 0)
    assert set(np.unique(labels)) <= set(range(5)) and len(np.unique(labels)) >= 3
    pts_a, pts_b, lab, bbox = np.empty((500, 2)), np.empty((500, 2)), np.empty(500, np.uint8), np.empty(4)
    cum = ifs.cumulative(maps)
    n = kernels.chaos_game(maps, cum, 500, np.uint64(5), pts_a, bbox)
    assert kernels.chaos_game_labels(maps, cum, 500, np.uint64(5), pts_b, lab, np.empty(4)) == n == 500
    assert np.array_equal(pts_a, pts_b)  # the same stream and arithmetic: the same points


def test_plasma_is_seeded_and_spans_zero_to_the_level() -> None:
    grid = np.empty((65, 65))
    a, b, c = (np.empty((48, 48), np.uint8) for _ in range(3))
    kernels.plasma_into(np.uint64(3), 128.0, grid, a)
    kernels.plasma_into(np.uint64(3), 128.0, grid, b)
    kernels.plasma_into(np.uint64(4), 128.0, grid, c)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() == 0 and a.max() == 128 and len(np.unique(a)) > 60  # a smooth field, not a few levels


def test_area_downscale_is_the_exact_area_mean_and_commutes_with_flips() -> None:
    src = np.random.default_rng(0).integers(0, 256, (48, 48, 2)).astype(np.uint8)
    half = np.empty((24, 24, 2), np.uint8)
    kernels.area_downscale(src, half)
    blocks = src.reshape(24, 2, 24, 2, 2).astype(int).sum((1, 3))
    assert np.array_equal(half, (blocks + 2) // 4)  # 2×2 means, rounded half up
    odd, flipped = np.empty((17, 17, 2), np.uint8), np.empty((17, 17, 2), np.uint8)
    kernels.area_downscale(src, odd)
    kernels.area_downscale(np.ascontiguousarray(src[::-1, ::-1]), flipped)
    assert np.array_equal(flipped, odd[::-1, ::-1])
    const = np.empty((17, 17, 1), np.uint8)
    kernels.area_downscale(np.full((48, 48, 1), 200, np.uint8), const)
    assert (const == 200).all()


# --- builds ---------------------------------------------------------------------------------------------------
def test_options_give_the_same_bytes_across_runs_and_worker_counts(every: Path, tmp_path: Path) -> None:
    assert sha256_tree(_build(tmp_path, "w2", workers=2, **ALL)) == sha256_tree(every)  # search phase + 2 workers
    grey = dict(composition="multi", background="diamond_square")
    assert sha256_tree(_build(tmp_path, "g1", **grey)) == sha256_tree(_build(tmp_path, "g2", **grey))
    assert sha256_tree(_build(tmp_path, "g3", seed=1, **grey)) != sha256_tree(tmp_path / "g1" / "fractals")


def test_option_images_regenerate_and_info_records_the_options(every: Path) -> None:
    info = json.loads((every / "info.json").read_text())
    assert {k: info["params"][k] for k in ALL} == ALL and info["params"]["multi_count"] == [4, 10]
    for r in read_manifest(every):
        assert np.array_equal(regenerate(every, r), _png(every, r))
        assert (json.loads(r["instance_params"])["kind"], r["patch"], r["flip"]) == ("multi", "-1", "none")
        assert 4 <= json.loads(r["instance_params"])["count"] <= 10


def test_colour_pngs_are_rgb_with_map_colours_on_a_tinted_background(every: Path, tmp_path: Path) -> None:
    img = Image.open(every / "images/0000/0000.png")
    assert img.mode == "RGB" and img.size == (48, 48)
    a = np.asarray(img).astype(int)
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 20  # map colours, blends and the blurred background
    assert (a.max(-1) - a.min(-1) > 10).mean() > 0.5  # mostly coloured pixels, not grey ones
    write_preview(every, tmp_path / "preview.png", columns=3)
    grid = Image.open(tmp_path / "preview.png")
    assert grid.mode == "RGB" and np.array_equal(np.asarray(grid)[2:50, 2:50], np.asarray(img))


def test_single_image_on_a_background_keeps_the_fractal_pixels(plain: Path, tmp_path: Path) -> None:
    for background in ("diamond_square", "fractal"):
        out = _build(tmp_path, background, background=background, background_level=0.5)
        for r, q in zip(read_manifest(plain), read_manifest(out)):
            fractal, img = _png(plain, r) > 0, _png(out, q)
            assert (r["instance_params"], r["render_seed"]) == (q["instance_params"], q["render_seed"])
            assert (img[fractal] == 255).all() and img[~fractal].max() <= 128  # 0.5 of full scale
            if background == "diamond_square":
                assert (img[~fractal] > 0).mean() > 0.95  # dense noise, not black


def test_multi_images_hold_several_fractals_of_their_class(plain: Path, tmp_path: Path) -> None:
    # small pastes, so that they seldom merge: each fractal is then one blob once its dust is closed
    multi = _build(tmp_path, "m", composition="multi", multi_count=(6, 8), multi_scale=(0.15, 0.3))

    def blobs(root: Path) -> list[int]:
        closed = (ndimage.binary_dilation(_png(root, r) > 0) for r in read_manifest(root))
        return [ndimage.label(c, np.ones((3, 3)))[1] for c in closed]

    assert np.median(blobs(multi)) >= 3 and np.median(blobs(multi)) > np.median(blobs(plain))
    singles = {r["sha256"] for r in read_manifest(plain)}
    assert all(r["sha256"] not in singles for r in read_manifest(multi))
    assert all(6 <= json.loads(r["instance_params"])["count"] <= 8 for r in read_manifest(multi))


# --- pretraining ----------------------------------------------------------------------------------------------
def test_pretraining_reads_colour_as_three_channels_and_grey_as_one(every: Path, plain: Path) -> None:
    mean, std = torch.full((1, 3, 1, 1), 0.2), torch.full((1, 3, 1, 1), 0.5)
    for root, channels in ((every, 3), (plain, 1)):
        val = read_fractal_split(root, 0.2, seed=0).val
        ds = FractalImages(val, input_size=48, crop_size=40, train=False)
        x, _ = ds[0]
        png = _png(root, {"path": Path(val[0][0]).relative_to(root)})
        want = png.transpose(2, 0, 1) if channels == 3 else png[None]
        assert x.shape == (channels, 40, 40) and torch.equal(
            (x * 255).round(), torch.from_numpy(want[:, 4:44, 4:44]).float()
        )
        batch = torch.stack([ds[i][0] for i in range(len(ds))])
        prep = InputPrep(mean, std, channels_last=False, amp_dtype=None, device=torch.device("cpu"))
        model_input = prep(batch)
        assert model_input.shape == (len(ds), 3, 40, 40)
        if channels == 1:
            assert torch.equal(model_input[:, 0], model_input[:, 2])
        assert FractalImages(val, input_size=32, crop_size=28, train=True)[0][0].shape == (channels, 28, 28)
