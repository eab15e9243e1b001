"""benchmarks/pretrain_study.py: every variant of the committed study file validates against the params schema."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vadbench.config import load_params
from vadbench.pretrain.params import PretrainParams

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("pretrain_study", ROOT / "benchmarks" / "pretrain_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pretrain_study"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_variants_validate_and_differ():
    study = _study()
    base = load_params(ROOT / "params.yaml")
    variants, models = study.load_variants(ROOT / "benchmarks" / "pretrain_study.yaml", base)
    assert "default" in variants and models

    # `base:` pins the pre-study recipe: `default` stays what was measured although params.yaml moved on to
    # strong augmentation (the `strong_aug` row) and then to 36 epochs with wider crops (`workstation_e36`);
    # `workstation` is profiles/workstation.yaml's recipe
    def pinned(**kw):
        old = dict(augment="basic", epochs=12, milestones=[9], crop_scale=[0.25, 1.0])
        return PretrainParams.model_validate_json(json.dumps({**base.pretrain.model_dump(mode="json"), **old, **kw}))

    default, strong = variants["default"], variants["strong_aug"]
    assert default["fractals"] == base.fractals and default["pretrain"] == pinned()
    assert strong["fractals"] == base.fractals and strong["pretrain"] == pinned(augment="strong")
    assert variants["workstation_e36"]["pretrain"] == base.pretrain  # params.yaml's recipe since 2026-12-07
    workstation = load_params(ROOT / "profiles" / "workstation.yaml")
    assert variants["workstation"]["fractals"] == workstation.fractals
    assert variants["workstation"]["pretrain"] == workstation.pretrain
    recipes = [(v["fractals"].model_dump_json(), v["pretrain"].model_dump_json()) for v in variants.values()]
    assert len(set(recipes)) == len(recipes), "two variants of the study file are the same recipe"
    for m in models.values():
        assert m["model"] in base.models


def test_a_bad_override_names_the_variant(tmp_path):
    study = _study()
    bad = tmp_path / "v.yaml"
    bad.write_text("models: {}\nvariants:\n  oops: {fractal: {image_size: 128}}\n")
    with pytest.raises(ValueError, match="oops.*unknown keys"):
        study.load_variants(bad, load_params(ROOT / "params.yaml"))


def test_the_report_ignores_rows_of_an_old_variant_definition(tmp_path, capsys):
    """Cached results are keyed by the backbone of the variant's current recipe: a row measured with another
    recipe under the same variant name never reaches the table, and a renamed variant keeps its rows."""
    import argparse
    import json

    study = _study()
    base = load_params(ROOT / "params.yaml")
    spec = tmp_path / "v.yaml"
    spec.write_text("models: {padim_l23: {model: padim}}\nvariants:\n  bigger: {fractals: {num_classes: 8}}\n")
    variants, models = study.load_variants(spec, base)
    now, _ = study.backbone_name(variants["bigger"], "resnet18", 0)
    rnd, _ = study.backbone_name(None, "resnet18", 0)
    for variant, backbone, auroc in (("random", rnd, 0.5), ("bigger", "fractal-s0-000000000000", 0.9)):
        (tmp_path / "results" / backbone).mkdir(parents=True)
        row = dict(variant=variant, seed=0, dataset="elpv_mono-256", model="padim_l23", backbone=backbone)
        (tmp_path / "results" / backbone / "elpv_mono-256-padim_l23.json").write_text(
            json.dumps({**row, "image_auroc": auroc})
        )
    args = argparse.Namespace(
        work=tmp_path, seeds=[0], datasets=["elpv_mono"], image_size=256, max_train=0, no_write=True
    )
    study.report(args, variants, models)
    table = capsys.readouterr().out
    assert "| random |" in table and "| bigger |" not in table  # the old recipe's 0.9 is not shown
    (tmp_path / "results" / "fractal-s0-000000000000").rename(tmp_path / "results" / now)
    stale = tmp_path / "results" / now / "elpv_mono-256-padim_l23.json"
    stale.write_text(stale.read_text().replace("fractal-s0-000000000000", now).replace('"bigger"', '"old label"'))
    study.report(args, variants, models)
    assert "| bigger |" in capsys.readouterr().out


def test_the_results_file_keeps_one_table_per_command():
    study = _study()
    a1 = "\n## 2026-12-05 08:00 UTC — `--seeds 0`\n\nold table\n"
    b = "\n## 2026-12-05 09:00 UTC — `--seeds 0 --models padim_l12`\n\nlayers\n"
    a2 = "\n## 2026-12-05 10:00 UTC — `--seeds 0`\n\nnew table\n"
    text = study.merge_report(study.merge_report(study.merge_report("", a1), b), a2)
    assert text.count("\n## ") == 2 and "old table" not in text and "new table" in text and "layers" in text
    assert text.startswith("# Fractal pretraining recipe study")
