"""The interface every registered model keeps: shapes, save/load, seeding, params validation.

One parametrised test per rule instead of a copy in every model's test file; the model files test
what is particular to each method (its maps, losses and detection quality).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from vadbench.backbones import load_feature_extractor
from vadbench.models import create_model, load_model, model_class, model_names

ROOT = Path(__file__).resolve().parents[1]
# the smallest settings that still run every code path once
QUICK = {
    "patchcore": {},
    "padim": {"n_features": 20},
    "stfpm": {"epochs": 1, "batch_size": 4},
    "reverse_distillation": {"epochs": 1, "batch_size": 4},
    "fastflow": {"epochs": 1, "flow_steps": 1, "batch_size": 4},
    "cflow": {"epochs": 1, "coupling_blocks": 1, "condition_vector": 16, "fiber_batch_size": 64, "batch_size": 4},
    "panda": {"epochs": 1, "batch_size": 4},
    "cutpaste": {"epochs": 1, "batch_size": 4},
    "sparse_ae": {"epochs": 1, "batch_size": 4},
    "deep_ae": {"epochs": 1, "batch_size": 4},
    "gaussian_ad": {},
    "simplenet": {"epochs": 1, "batch_size": 4, "embed_dim": 32, "hidden_dim": 16},
    "supersimplenet": {"epochs": 1, "batch_size": 4, "hidden_dim": 16, "cls_channels": 8},
    "cfa": {"epochs": 1, "batch_size": 4},
    "efficientad_s": {"teacher": "random", "image_size": 64, "steps": 2, "batch_size": 4},
    "efficientad_m": {"teacher": "random", "image_size": 64, "steps": 2, "batch_size": 4},
    "draem": {"epochs": 1, "batch_size": 4, "input_size": 64, "recon_width": 4, "disc_width": 4, "textures": 4},
    "riad": {"epochs": 1, "batch_size": 4, "width": 4},
    "iad_inpaint": {"epochs": 1, "batch_size": 4, "width": 4},
    "ganomaly": {"image_size": 16, "width": 4, "nz": 8, "epochs": 1, "batch_size": 4},
    "fanogan": {
        "image_size": 16,
        "width": 4,
        "nz": 8,
        "gan_epochs": 1,
        "enc_epochs": 1,
        "batch_size": 4,
        "n_critic": 2,
    },
}


def test_every_registered_model_is_covered():
    assert sorted(QUICK) == model_names()


def _build(name: str, backbone_dir: Path, seed: int):
    cls = model_class(name)
    params = {**QUICK[name], **({"seed": seed} if "seed" in cls.Params.model_fields else {})}
    if not cls.needs_backbone:
        return create_model(name, **params), None
    layers = cls.Params.model_validate(params).layers
    backbone = load_feature_extractor(backbone_dir, layers)
    return create_model(name, backbone=backbone, **params), backbone


@pytest.fixture(scope="module")
def data(toy_defect_data):
    train, test = toy_defect_data[0], toy_defect_data[1]
    return train[:8], train[8:10], test[:4]


@pytest.mark.parametrize("name", sorted(QUICK))
def test_fit_predict_save_load_and_seed(name, data, random_backbone_dir, tmp_path):
    train, val, test = data
    model, backbone = _build(name, random_backbone_dir, seed=0)
    report = model.fit(train, val)
    assert isinstance(report, dict)
    scores, maps = model.predict(test)
    assert scores.shape == (4,) and maps.shape == (4, 64, 64)
    assert scores.dtype == maps.dtype == torch.float32 and scores.device.type == maps.device.type == "cpu"
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()

    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["name"] == name and payload["state"]
    assert not any(k.startswith("backbone.") for k in payload["state"])  # the frozen backbone is not copied
    loaded = load_model(tmp_path / "m.pt", backbone=backbone)
    for a, b in zip((scores, maps), loaded.predict(test)):
        assert torch.equal(a, b)

    again, _ = _build(name, random_backbone_dir, seed=0)
    again.fit(train, val)
    assert torch.equal(again.predict(test)[1], maps)  # same seed → identical maps
    if "seed" in model_class(name).Params.model_fields:  # a model without randomness has no seed
        other, _ = _build(name, random_backbone_dir, seed=1)
        other.fit(train, val)
        assert not torch.equal(other.predict(test)[1], maps)  # the seed reaches the model's randomness


@pytest.mark.parametrize("name", sorted(QUICK))
def test_params_are_validated_and_documented(name):
    cls = model_class(name)
    with pytest.raises(ValueError, match="no_such_param"):
        cls.Params.model_validate({"no_such_param": 1})
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["models"][name]
    cls.Params.model_validate(section)  # the params.yaml section is valid as written
    assert "seed" not in section  # seeds come from run.seeds
