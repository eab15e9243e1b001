"""`vadbench list models|datasets|backbones`: one line each, naming what it is and its key params."""

from __future__ import annotations

from pathlib import Path

from vadbench.cli import main
from vadbench.models import model_names

ROOT = Path(__file__).resolve().parents[1]


def test_list_models_has_a_line_per_registered_model(capsys):
    assert main(["list", "models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == model_names()
    padim = next(line for line in lines if line.startswith("padim "))
    assert "n_features=100" in padim and "pixel maps" in padim


def test_list_datasets_and_backbones(capsys):
    assert main(["list", "datasets", "--params", str(ROOT / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "folder" in out and "root=None" in out and "synthetic_sem: kind synthetic_sem" in out
    assert main(["list", "backbones", "--params", str(ROOT / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert "fractal      resnet18 init fractal (in run)" in out
