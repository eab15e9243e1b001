"""Fractal pretraining: learns the classes, logs, checkpoints, resumes exactly, writes timm-loadable weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from vadbench.backbones import read_card
from vadbench.pretrain.data import FractalImages, read_fractal_split
from vadbench.pretrain.params import PretrainParams
from vadbench.pretrain.stage import run_pretrain
from vadbench.pretrain.train import StopRequested, lr_at


def _shape(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One instance of a simple class-specific shape with random position/scale (a stand-in for an IFS)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = rng.uniform(0.4, 0.6, 2) * size
    r = rng.uniform(0.2, 0.3) * size
    dy, dx = yy - cy, xx - cx
    masks = [
        dy**2 + dx**2 <= r**2,  # disc
        (np.abs(dy) <= r) & (np.abs(dx) <= r) & ~((np.abs(dy) < r - 2) & (np.abs(dx) < r - 2)),  # square outline
        ((np.abs(dy) <= 1.5) | (np.abs(dx) <= 1.5)) & (np.abs(dy) <= r) & (np.abs(dx) <= r),  # plus
        (np.abs(dy - dx) <= 1.5) & (np.abs(dx) <= r),  # diagonal line
        (np.abs(np.hypot(dy, dx) - r) <= 1.2),  # ring
        (np.abs(dy) <= r / 3) & (np.abs(dx) <= r),  # bar
    ]
    img = masks[kind % len(masks)].astype(np.float32)
    img *= rng.uniform(0.7, 1.0)
    return (np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1) * 255).astype(np.uint8)


def make_fake_fractals(root: Path, num_classes: int = 4, instances: int = 8, size: int = 32, seed: int = 0) -> Path:
    """data/fractals layout: images/<class:04d>/<instance:04d>.png, manifest.csv (path,class), info.json."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(num_classes):
        for i in range(instances):
            rel = f"images/{c:04d}/{i:04d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_shape(c, size, rng), mode="L").save(root / rel)
            rows.append((rel, c))
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "class"])
        w.writerows(rows)
    (root / "info.json").write_text(json.dumps({"image_size": size, "num_classes": num_classes}))
    return root


@pytest.fixture
def one_thread():
    """Single intra-op thread: on a loaded 2-core machine, 2 OpenMP threads run ~10× slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(
    arch="resnet18",
    batch_size=8,
    lr=0.02,
    milestones=[],
    warmup_epochs=0,
    input_size=32,
    crop_size=28,
    val_fraction=0.25,
)


def _run(fractals: Path, out: Path, work: Path, stop_after_epoch: int | None = None, **kw):
    p = PretrainParams(**{**TINY, **kw})
    return run_pretrain(
        fractals,
        out / "pretrain",
        out / "metrics.json",
        out / "log.csv",
        work,
        p,
        seed=0,
        device="cpu",
        stop_after_epoch=stop_after_epoch,
    )


def test_split_holds_out_instances_of_every_class(tmp_path):
    fr = make_fake_fractals(tmp_path / "fr", num_classes=3, instances=10, size=16)
    a = read_fractal_split(fr, 0.2, seed=1)
    assert a == read_fractal_split(fr, 0.2, seed=1)  # deterministic
    assert {p for p, _ in a.train}.isdisjoint({p for p, _ in a.val})
    assert sorted(lab for _, lab in a.val) == [0, 0, 1, 1, 2, 2]  # 20 % of 10 per class
    assert {p for p, _ in a.val} != {p for p, _ in read_fractal_split(fr, 0.2, seed=2).val}
    (fr / "manifest.csv").write_text("path,label\nimages/0000/0000.png,0\n")
    with pytest.raises(ValueError, match="manifest.csv.*'class'"):
        read_fractal_split(fr, 0.2, seed=1)
    with pytest.raises(FileNotFoundError, match="nowhere/manifest.csv"):
        read_fractal_split(tmp_path / "nowhere", 0.2, seed=1)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    fr = make_fake_fractals(tmp_path / "fr", num_classes=2, instances=4, size=32)
    items = read_fractal_split(fr, 0.25, seed=0).train
    ds = FractalImages(items, input_size=32, crop_size=20, train=True, seed=5)
    x0 = torch.stack([ds[i][0] for i in range(len(ds))])
    again = FractalImages(items, input_size=32, crop_size=20, train=True, seed=5)
    assert torch.equal(x0, torch.stack([again[i][0] for i in reversed(range(len(ds)))]).flip(0))
    ds.set_epoch(1)
    assert not torch.equal(x0, torch.stack([ds[i][0] for i in range(len(ds))]))
    assert x0.shape == (len(items), 1, 20, 20) and 0 <= x0.min() and x0.max() <= 1
    val = FractalImages(items, input_size=24, crop_size=20, train=False)  # resize 32→24, centre crop
    assert val[0][0].shape == (1, 20, 20)


def test_params_reject_inconsistent_values():
    with pytest.raises(ValueError, match="crop_size"):
        PretrainParams(input_size=32, crop_size=40)
    with pytest.raises(ValueError, match="milestones"):
        PretrainParams(epochs=10, milestones=[6, 3])
    with pytest.raises(ValueError, match="nproc_per_node"):
        PretrainParams(batch_size=10, nproc_per_node=4)


def test_multistep_schedule_with_warmup():
    p = PretrainParams(epochs=90, lr=0.1, milestones=[30, 60], gamma=0.1, warmup_epochs=1)
    assert lr_at(p, 0, 0, 10) == pytest.approx(0.01)  # warm-up ramps within epoch 0
    assert lr_at(p, 0, 9, 10) == pytest.approx(0.1)
    assert [lr_at(p, e, 0, 10) for e in (29, 30, 59, 60, 89)] == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001])


def test_pretraining_learns_and_writes_timm_loadable_weights(tmp_path, one_thread):
    fr = make_fake_fractals(tmp_path / "fr", num_classes=4, instances=12, size=32)
    result = _run(fr, tmp_path, tmp_path / "work", epochs=8, batch_size=12, milestones=[6])
    chance = 1 / 4
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val_top1"] >= 2 * chance, result.log  # the held-out instances are recognised
    assert metrics["chance_top1"] == chance and metrics["num_classes"] == 4
    with open(tmp_path / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert set(rows[0]) == {"epoch", "train_loss", "train_top1", "val_top1", "lr"}
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["lr"]) == pytest.approx(0.002)

    card = read_card(tmp_path / "pretrain")
    assert (card.arch, card.init, card.mean, card.std) == ("resnet18", "fractal", (0.2,) * 3, (0.5,) * 3)
    assert card.extra["num_classes"] == 4 and card.extra["val_top1"] == metrics["val_top1"]
    weights = tmp_path / "pretrain" / "weights.safetensors"
    net = timm.create_model(
        "resnet18", pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=str(weights))
    )
    saved = load_file(str(weights))
    assert saved["fc.weight"].shape == (4, 512)  # full classifier kept; features_only dropped it
    for key in ("conv1.weight", "layer3.1.bn2.running_var"):
        assert torch.equal(net.state_dict()[key], saved[key])
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # checkpoints cleaned


def test_interrupted_run_resumes_to_identical_weights(tmp_path, one_thread):
    fr = make_fake_fractals(tmp_path / "fr", num_classes=4, instances=8, size=32)
    full = _run(fr, tmp_path / "full", tmp_path / "work_full", epochs=3)
    with pytest.raises(StopRequested):
        _run(fr, tmp_path / "cut", tmp_path / "work_cut", epochs=3, stop_after_epoch=1)
    assert not (tmp_path / "cut" / "pretrain").exists()  # nothing final is written by an interrupted run
    ckpts = list((tmp_path / "work_cut").glob("*/last.pt"))
    assert len(ckpts) == 1
    assert torch.load(ckpts[0], weights_only=True)["epochs_done"] == 1
    resumed = _run(fr, tmp_path / "cut", tmp_path / "work_cut", epochs=3)
    assert resumed.resumed_from_epoch == 1 and full.resumed_from_epoch == 0
    assert resumed.log == full.log
    assert full.state_dict.keys() == resumed.state_dict.keys()
    for k, v in full.state_dict.items():
        assert torch.equal(v, resumed.state_dict[k]), k


# --- recipe options: objective (classification | simclr), augment (basic | strong) --------------------------

# sha256 of weights.safetensors of `_run(make_fake_fractals(num_classes=4, instances=8, size=32), epochs=2)`
# (TINY params, seed 0, 1 thread), computed with the code of commit baf76a5, BEFORE `objective`/`augment`
# existed, by running exactly that in a script (/tmp/pre/baseline.py at the time). Float kernels differ between
# CPU kinds (vadbench.machine.machine_kind), so the value is recorded per kind; a kind without a value checks only that two runs agree.
DEFAULT_RECIPE_WEIGHTS_SHA256 = {
    "x86_64-AMD-AVX2-torch2.14.1_cu130": "79c7a63d22926aae9ce0a66f51073ba4f9f66208fc9792fe10ba52991c9249ef",
    # 2026-12-07, a 2-core Intel Xeon: the same run with baf76a5's code (a worktree) and with main's gave this
    "x86_64-Intel-AVX512-torch2.14.1_cu130": "dabd20ae984b42796bd371e0b7f77a5808c754b7ac13ced3849eb07cc6420822",
}
# sha256 over the float32 bytes of every training crop of epochs 0 and 1 of the same data (input 32, crop 28,
# hflip, seed 0), same commit: integer crops and an exact /255, so the same on every machine
DEFAULT_RECIPE_CROPS_SHA256 = "ff6d2ca119cb64549f905375a115f6d0ff688bb8dbb26f55edc913b0eb1e17ae"


def test_default_recipe_is_unchanged(tmp_path, one_thread):
    import hashlib

    from vadbench.io import sha256_file
    from vadbench.machine import machine_kind

    fr = make_fake_fractals(tmp_path / "fr", num_classes=4, instances=8, size=32)
    ds = FractalImages(read_fractal_split(fr, 0.25, seed=0).train, input_size=32, crop_size=28, train=True, seed=0)
    h = hashlib.sha256()
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            h.update(ds[i][0].numpy().tobytes())
    assert h.hexdigest() == DEFAULT_RECIPE_CROPS_SHA256, "the basic augmentation's crops changed"

    _run(fr, tmp_path, tmp_path / "work", epochs=2)
    extra = read_card(tmp_path / "pretrain").extra
    assert not {"objective", "augment", "crop_scale", "val_metric"} & set(extra)  # default card: as before
    expected = DEFAULT_RECIPE_WEIGHTS_SHA256.get(machine_kind())
    if expected is None:
        # no hash recorded for this machine kind (float kernels differ between kinds): the weights must at least be
        # reproducible here, byte for byte, from a second run of the same recipe
        _run(fr, tmp_path / "again", tmp_path / "work-again", epochs=2)
        expected = sha256_file(tmp_path / "again" / "pretrain" / "weights.safetensors")
    assert sha256_file(tmp_path / "pretrain" / "weights.safetensors") == expected, (
        "default (classification, basic) weights changed: they must stay byte-identical; if torch/timm changed, "
        "rerun this run at commit baf76a5 and record the hash for this kind"
    )


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        (dict(objective="byol"), "objective"),
        (dict(augment="heavy"), "augment"),
        (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
        (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
        (dict(crop_scale=(0.5, 1.5)), "crop_scale"),
        (dict(simclr_temperature=0.0), "simclr_temperature"),
        (dict(simclr_proj_dim=0), "simclr_proj_dim"),
        (dict(objective="simclr", batch_size=1), "pretrain.batch_size"),
    ],
)
def test_recipe_params_are_validated(kw, key):
    with pytest.raises(ValueError, match=key):
        PretrainParams(**kw)
    p = PretrainParams()
    assert (p.objective, p.augment, p.crop_scale, p.simclr_proj_dim, p.simclr_temperature) == (
        "classification",
        "basic",
        (0.25, 1.0),
        128,
        0.2,
    )


def test_recipe_params_name_the_key_in_params_yaml():
    import copy

    import yaml

    from vadbench.config import ParamsError, parse_params

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    p = parse_params(raw).pretrain
    # params.yaml: classification with strong augmentation (docs/PRETRAINING.md's study); the code's default is basic
    assert (p.objective, p.augment) == ("classification", "strong")
    for key, value in (("objective", "byol"), ("augment", "heavy"), ("crop_scale", [0.6, 0.3])):
        bad = copy.deepcopy(raw)
        bad["pretrain"][key] = value
        with pytest.raises(ParamsError, match=f"pretrain.{key}"):
            parse_params(bad)


def test_strong_augmentation_is_a_function_of_seed_epoch_index_and_view(tmp_path):
    from vadbench.pretrain.augment import strong_view

    fr = make_fake_fractals(tmp_path / "fr", num_classes=2, instances=4, size=32)
    items = read_fractal_split(fr, 0.25, seed=0).train

    def batch(epoch: int, seed: int = 5, order=None) -> torch.Tensor:
        ds = FractalImages(items, 32, 24, train=True, seed=seed, augment="strong", views=2, crop_scale=(0.3, 1.0))
        ds.set_epoch(epoch)
        order = order or range(len(ds))
        return torch.stack([ds[i][0] for i in order])

    x = batch(0)
    assert x.shape == (len(items), 2, 1, 24, 24) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, batch(0, order=list(reversed(range(len(items))))).flip(0))  # independent of load order
    assert not any(torch.equal(a, b) for a, b in zip(x[:, 0], x[:, 1]))  # the two views of an image differ
    assert not torch.equal(x, batch(1)) and not torch.equal(x, batch(0, seed=6))
    # view 0 of strong is not basic's crop; basic keeps its own draws
    basic = FractalImages(items, 32, 24, train=True, seed=5, augment="basic", views=2)
    assert basic[0][0].shape == (2, 1, 24, 24) and not torch.equal(basic[0][0][0], x[0, 0])

    # 3 channels (RGB fractals): same geometry and factors for every channel
    grey = torch.from_numpy(np.array(Image.open(items[0][0]))).unsqueeze(0)
    rgb = grey.expand(3, -1, -1).clone()
    for view in range(4):
        g1, g3 = (torch.Generator().manual_seed(100 + view) for _ in range(2))
        one, three = strong_view(grey, 24, (0.25, 1.0), True, g1), strong_view(rgb, 24, (0.25, 1.0), True, g3)
        assert three.shape == (3, 24, 24) and torch.allclose(three, one.expand(3, -1, -1), atol=1e-6)
    assert strong_view(rgb.permute(1, 2, 0), 24, (0.25, 1.0), True, torch.Generator().manual_seed(0)).shape == (
        3,
        24,
        24,
    )


def test_simclr_learns_resumes_exactly_and_saves_a_timm_backbone(tmp_path, one_thread):
    from vadbench.backbones import load_feature_extractor, materialize_backbone

    fr = make_fake_fractals(tmp_path / "fr", num_classes=4, instances=8, size=32)
    kw = dict(objective="simclr", epochs=3)
    full = _run(fr, tmp_path / "full", tmp_path / "work_full", **kw)
    losses = [r["train_loss"] for r in full.log]
    assert losses[-1] < losses[0], full.log  # NT-Xent falls
    assert all(0 <= r["val_top1"] <= 1 and 0 <= r["train_top1"] <= 1 for r in full.log)

    # interrupted + resumed = uninterrupted (head and optimizer state restored), so also two runs agree bitwise
    with pytest.raises(StopRequested):
        _run(fr, tmp_path / "cut", tmp_path / "work_cut", stop_after_epoch=1, **kw)
    ckpt = torch.load(next((tmp_path / "work_cut").glob("*/last.pt")), weights_only=True)
    assert any(k.startswith("head.") for k in ckpt["model"])
    resumed = _run(fr, tmp_path / "cut", tmp_path / "work_cut", **kw)
    assert resumed.resumed_from_epoch == 1 and resumed.log == full.log
    assert full.state_dict.keys() == resumed.state_dict.keys()
    assert all(torch.equal(v, resumed.state_dict[k]) for k, v in full.state_dict.items())

    out = tmp_path / "full" / "pretrain"
    saved = load_file(str(out / "weights.safetensors"))
    assert not any(k.startswith(("head.", "backbone.", "fc.")) for k in saved)  # the plain timm body only
    extra = read_card(out).extra
    assert (extra["objective"], extra["val_metric"], extra["simclr_proj_dim"]) == ("simclr", "knn1_cosine", 128)
    assert "augment" not in extra  # basic
    net = timm.create_model(
        "resnet18",
        pretrained=True,
        features_only=True,
        pretrained_cfg_overlay=dict(file=str(out / "weights.safetensors")),
    )
    assert torch.equal(net.state_dict()["layer3.1.bn2.running_var"], saved["layer3.1.bn2.running_var"])
    # and through the backbones stage's own path, as PatchCore/PaDiM use it
    materialize_backbone(tmp_path / "bb", arch="resnet18", init="fractal", pretrain_dir=out)
    fx = load_feature_extractor(tmp_path / "bb", ["layer2", "layer3"])
    assert torch.equal(fx.net.state_dict()["layer2.0.conv1.weight"], saved["layer2.0.conv1.weight"])
    assert fx.extract(torch.rand(2, 1, 32, 32))["layer3"].shape[:2] == (2, 256)


def test_strong_augment_classification_is_reproducible(tmp_path, one_thread):
    fr = make_fake_fractals(tmp_path / "fr", num_classes=4, instances=8, size=32)
    kw = dict(augment="strong", crop_scale=(0.4, 1.0), epochs=1)
    a = _run(fr, tmp_path / "a", tmp_path / "wa", **kw)
    b = _run(fr, tmp_path / "b", tmp_path / "wb", **kw)
    assert a.log == b.log and all(torch.equal(v, b.state_dict[k]) for k, v in a.state_dict.items())
    extra = read_card(tmp_path / "a" / "pretrain").extra
    assert (extra["augment"], extra["crop_scale"]) == ("strong", [0.4, 1.0]) and "objective" not in extra
