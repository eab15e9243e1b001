"""Weight sources (random, fractal, imagenet, file), their errors, and normalisation reaching the extractor."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from vadbench.backbones import BackboneCard, load_feature_extractor, materialize_backbone, read_card
from vadbench.backbones.weights import IMAGENET_MEAN, IMAGENET_STD
from vadbench.config import BackboneSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: with other jobs on the 2 cores, 2 spinning OpenMP threads run ~10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _timm_state(arch: str, seed: int, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model(arch, pretrained=False, **kw).state_dict().items()}


def _fake_pretrain_dir(root: Path, arch: str = "resnet18", num_classes: int = 4) -> Path:
    """What the pretrain stage writes: weights with a `num_classes` head + a fractal card (mean 0.2, std 0.5)."""
    from vadbench.io import sha256_file

    root.mkdir(parents=True)
    save_file(_timm_state(arch, 7, num_classes=num_classes), str(root / "weights.safetensors"))
    card = BackboneCard(
        arch=arch,
        init="fractal",
        mean=(0.2,) * 3,
        std=(0.5,) * 3,
        weights_sha256=sha256_file(root / "weights.safetensors"),
        extra={"num_classes": num_classes},
    )
    (root / "card.json").write_text(json.dumps(card.to_json()))
    return root


def test_random_init_is_seeded(tmp_path):
    a = materialize_backbone(tmp_path / "a", arch="resnet18", init="random", seed=3)
    b = materialize_backbone(tmp_path / "b", arch="resnet18", init="random", seed=3)
    c = materialize_backbone(tmp_path / "c", arch="resnet18", init="random", seed=4)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert (a.mean, a.std) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_imagenet_file_loads_with_the_tags_normalisation(tmp_path, suffix):
    state = _timm_state("resnet18", 1)
    path = tmp_path / f"resnet18.tv_in1k{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    card = materialize_backbone(tmp_path / "bb", arch="resnet18.tv_in1k", init="imagenet", file=path)
    assert card.init == "imagenet" and card.mean == IMAGENET_MEAN and card.std == IMAGENET_STD
    saved = load_file(str(tmp_path / "bb" / "weights.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in state.items())
    fx = load_feature_extractor(tmp_path / "bb", ["layer2"])
    assert torch.equal(fx.net.state_dict()["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])


def test_user_checkpoint_with_wrapper_prefix_and_other_head_loads_as_file(tmp_path):
    state = _timm_state("resnet18", 2, num_classes=10)  # a user's 10-class fine-tune
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 5}, path)
    card = materialize_backbone(
        tmp_path / "bb", arch="resnet18", init="file", file=path, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    assert (card.mean, card.std) == ((0.5,) * 3, (0.25,) * 3)
    fx = load_feature_extractor(tmp_path / "bb", ["layer1", "layer3"])
    assert torch.equal(fx.net.state_dict()["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])


@pytest.mark.timeout(5)  # offline and missing must fail at once, never wait on a hub retry loop
@pytest.mark.parametrize("init", ["imagenet", "file"])
def test_missing_weights_file_fails_fast_naming_the_path(tmp_path, init):
    missing = tmp_path / "weights" / "resnet18.tv_in1k.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        materialize_backbone(
            tmp_path / "bb", arch="resnet18.tv_in1k", init=init, file=missing, hf_cache_dir=tmp_path / "empty_hub"
        )
    assert not (tmp_path / "bb").exists()


def test_imagenet_weights_come_from_the_hub_cache_when_present(tmp_path):
    """Layout written by huggingface_hub: models--<org>--<name>/{refs/main, snapshots/<rev>/<file>}."""
    repo = tmp_path / "hub" / "models--timm--resnet18.tv_in1k"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    state = _timm_state("resnet18", 5)
    save_file(state, str(repo / "snapshots" / rev / "model.safetensors"))
    card = materialize_backbone(
        tmp_path / "bb",
        arch="resnet18.tv_in1k",
        init="imagenet",
        file=tmp_path / "weights" / "absent.safetensors",
        hf_cache_dir=tmp_path / "hub",
    )
    assert "model.safetensors" in card.source
    saved = load_file(str(tmp_path / "bb" / "weights.safetensors"))
    assert torch.equal(saved["conv1.weight"], state["conv1.weight"])


def test_weights_for_another_arch_fail_clearly(tmp_path):
    path = tmp_path / "resnet34.safetensors"
    save_file(_timm_state("resnet34", 0), str(path))
    with pytest.raises(ValueError, match=r"resnet34\.safetensors.*do not fit timm architecture 'resnet18'"):
        materialize_backbone(tmp_path / "bb", arch="resnet18", init="file", file=path)
    narrow = tmp_path / "narrow.safetensors"  # same keys, other widths: a shape mismatch, not a crash
    save_file(_timm_state("resnet18d", 0), str(narrow))
    with pytest.raises(ValueError, match="do not fit"):
        materialize_backbone(tmp_path / "bb", arch="resnet18", init="file", file=narrow)


def test_fractal_card_normalisation_reaches_the_feature_extractor(tmp_path):
    pre = _fake_pretrain_dir(tmp_path / "pretrain")
    card = materialize_backbone(tmp_path / "fractal", arch="resnet18", init="fractal", pretrain_dir=pre)
    assert (card.mean, card.std) == ((0.2,) * 3, (0.5,) * 3) and card.extra["num_classes"] == 4
    fx = load_feature_extractor(tmp_path / "fractal", ["layer2"])
    assert fx.mean.flatten().tolist() == pytest.approx([0.2] * 3) and fx.std.flatten().tolist() == pytest.approx(
        [0.5] * 3
    )
    x = torch.rand(2, 1, 64, 64)
    ours = fx(x)["layer2"]
    assert torch.allclose(ours, fx.net((x.expand(-1, 3, -1, -1) - 0.2) / 0.5)[0])
    imagenet_fed = fx.net(
        (x.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    )[0]
    assert not torch.allclose(ours, imagenet_fed, atol=1e-3)  # the fractal-AD paper's mismatch is not repeated


def test_fractal_source_checks_arch_and_integrity(tmp_path):
    pre = _fake_pretrain_dir(tmp_path / "pretrain")
    with pytest.raises(ValueError, match="set pretrain.arch"):
        materialize_backbone(tmp_path / "x", arch="resnet50", init="fractal", pretrain_dir=pre)
    save_file(_timm_state("resnet18", 8, num_classes=4), str(pre / "weights.safetensors"))
    with pytest.raises(ValueError, match="does not match the sha256"):
        materialize_backbone(tmp_path / "x", arch="resnet18", init="fractal", pretrain_dir=pre)
    with pytest.raises(FileNotFoundError, match="none/card.json.*run the pretrain stage"):
        materialize_backbone(tmp_path / "x", arch="resnet18", init="fractal", pretrain_dir=tmp_path / "none")


def test_extractor_is_frozen_and_batched_extraction_matches(random_backbone_dir):
    fx = load_feature_extractor(random_backbone_dir, ["layer1", "layer3"])
    fx.train()
    assert not fx.training and not fx.net.training
    assert all(not p.requires_grad for p in fx.parameters())
    x = torch.rand(5, 1, 32, 32)
    whole = fx(x)
    parts = fx.extract(x, batch_size=2)
    assert {k: tuple(f.shape) for k, f in parts.items()} == {"layer1": (5, 64, 8, 8), "layer3": (5, 256, 2, 2)}
    assert fx.channels == {"layer1": 64, "layer3": 256} and fx.channels_of(["layer3"]) == [256]
    assert all(torch.allclose(whole[k], parts[k], atol=1e-5) for k in whole)
    fast = load_feature_extractor(random_backbone_dir, ["layer1", "layer3"], channels_last=True)
    assert all(f.is_contiguous() and torch.allclose(f, whole[k], atol=1e-4) for k, f in fast(x).items())
    # names, not positions: layers listed out of network order still get their own maps
    rev = load_feature_extractor(random_backbone_dir, ["layer3", "layer1"])
    assert rev.channels == {"layer1": 64, "layer3": 256}
    assert all(torch.allclose(rev(x)[k], whole[k], atol=1e-5) for k in whole)
    with pytest.raises(ValueError, match="missing"):
        fx.channels_of(["layer2"])
    with pytest.raises(ValueError, match="layer9"):
        load_feature_extractor(random_backbone_dir, ["layer9"])


def test_backbones_stage_materializes_every_listed_backbone(tmp_path, monkeypatch):
    _fake_pretrain_dir(tmp_path / "data" / "pretrain")
    params = SimpleNamespace(
        seed=0,
        run=SimpleNamespace(backbones=["random", "fractal"]),
        backbones={
            "random": BackboneSpec(arch="resnet18", init="random"),
            "fractal": BackboneSpec(arch="resnet18", init="fractal"),
            "unused": BackboneSpec(arch="resnet18", init="file", file="weights/none.pth"),
        },
    )
    monkeypatch.setattr("vadbench.config.load_params", lambda *args: params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["stages/backbones.py"])
    runpy.run_path(str(ROOT / "stages" / "backbones.py"), run_name="__main__")
    out = tmp_path / "data" / "backbones"
    assert sorted(p.name for p in out.iterdir()) == ["fractal", "random"]  # one atomic dir, no temp leftovers
    assert read_card(out / "fractal").mean == (0.2,) * 3 and read_card(out / "random").init == "random"
