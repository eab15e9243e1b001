"""benchmarks/pretrain_study.py: every variant of the committed study file validates against the params schema."""

import importlib.util
import sys
from pathlib import Path

import pytest

from vadbench.config import load_params

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
    assert variants["default"]["fractals"] == base.fractals and variants["default"]["pretrain"] == base.pretrain
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
