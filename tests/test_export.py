"""`vadbench export`: exported TorchScript / ONNX graphs give the torch model's scores and maps (parity proof).

Parity runs over every registered model with the contract test's QUICK settings, so a new model is covered
(or must be listed, with its reason, in `export.NOT_EXPORTABLE` and docs/DEPLOY.md).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from test_model_contract import QUICK, _build
from test_predict import CELL, fitted_root  # noqa: F401 - the shared fitted-cell fixture

from vadbench import export
from vadbench.cli import main
from vadbench.models import model_names

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")
ROOT = Path(__file__).resolve().parents[1]
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
# fit + export in ~1 s each; the trained models (a QUICK epoch each) run in the slow suite
FAST = {"padim", "patchcore", "panda", "sparse_ae"}

_fitted: dict[str, torch.nn.Module] = {}


def _fitted_model(name: str, toy_defect_data, backbone_dir: Path) -> torch.nn.Module:
    if name not in _fitted:
        train = toy_defect_data[0]
        model, _ = _build(name, backbone_dir, seed=0)
        model.fit(train[:8], train[8:10])
        _fitted[name] = model.eval()
    return _fitted[name]


def _spec(model: torch.nn.Module) -> export.ExportSpec:
    mean, std = export.normalization_of(model)
    return export.ExportSpec(
        f"toy-{model.name}-random", 0, model.name, 1, 64, 64, 0.25, "test", mean, std, model.has_pixel_maps
    )


def _cases() -> list:
    cases = []
    for name in model_names():
        for fmt in export.FORMATS:
            marks = [] if name in FAST else [pytest.mark.slow]
            if fmt == "onnx" and not HAS_ORT:
                marks.append(pytest.mark.skip(reason="onnxruntime not installed: pip install -e '.[onnx]'"))
            cases.append(pytest.param(name, fmt, marks=marks, id=f"{name}-{fmt}"))
    return cases


@pytest.mark.parametrize(("name", "fmt"), _cases())
def test_exported_graph_equals_torch(name, fmt, toy_defect_data, random_backbone_dir, tmp_path):
    assert name in QUICK, f"{name} has no QUICK settings in tests/test_model_contract.py: add them there"
    model = _fitted_model(name, toy_defect_data, random_backbone_dir)
    spec = _spec(model)
    out = tmp_path / f"m{export.SUFFIX[fmt]}"
    if export.not_exportable_reason(name, fmt) is not None:
        with pytest.raises(export.ExportError, match="cannot be exported"):
            export.export_model(model, spec, fmt, out)
        assert not out.exists()
        return
    meta = export.export_model(model, spec, fmt, out, input_dtype="uint8")
    # a batch the export's own check never saw (other size, other images), fed as uint8 and as float
    images = toy_defect_data[1][:5]
    with torch.no_grad():
        reference = model.predict(images)
    tol = export.tolerance_for(reference)
    u8 = (images * 255).round().to(torch.uint8)
    if fmt == "torchscript":
        graph = torch.jit.load(str(out), map_location="cpu")
        outputs = [graph(u8), graph(images)]
        stored = export.torchscript_metadata(out)
    else:
        outputs = [export.run_onnx(out, u8)]
        stored = export.onnx_metadata(out)
    for got in outputs:
        diffs = export.max_differences(reference, got)
        assert diffs["scores"] <= tol and diffs["maps"] <= tol, (diffs, tol)
        assert got[1].shape == (5, 64, 64) and got[0].dtype == got[1].dtype == torch.float32
    assert stored == meta and stored["threshold"] == 0.25 and stored["input"]["shape"] == ["B", 1, 64, 64]
    assert stored["normalize_mean"] == spec.normalize_mean and stored["parity"]["maps"] <= stored["parity"]["tolerance"]


def _documented_not_exportable() -> dict[str, set[str]]:
    """The `| model | format | reason |` rows of docs/DEPLOY.md's non-exportable table."""
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    section = text.split("## Models that do not export", 1)[1].split("\n## ", 1)[0]
    out: dict[str, set[str]] = {}
    for model, fmt in re.findall(r"^\|\s*`(\w+)`\s*\|\s*(\w+)\s*\|", section, flags=re.M):
        out.setdefault(model, set()).add(fmt)
    return out


def test_non_exportable_list_is_exactly_the_documented_one():
    listed = {name: set(formats) for name, formats in export.NOT_EXPORTABLE.items()}
    assert listed == _documented_not_exportable()
    assert set(listed) <= set(model_names())
    assert all(set(f) <= set(export.FORMATS) for f in listed.values())


def test_cli_export_of_a_fitted_cell(fitted_root, tmp_path, capsys):  # noqa: F811
    args = ["--cell", CELL, "--root", str(fitted_root), "--params", str(tmp_path / "absent.yaml")]
    out = tmp_path / "cell.pt"
    assert main(["export", *args, "--format", "torchscript", "--out", str(out)]) == 0
    assert "parity on CPU" in capsys.readouterr().out
    meta = export.torchscript_metadata(out)
    metrics = json.loads((fitted_root / "data" / "scores" / CELL / "metrics.json").read_text())
    assert meta["threshold"] == pytest.approx(metrics["per_seed"]["0"]["threshold"], abs=2e-6)
    assert meta["cell"] == CELL and meta["model"] == "padim" and "validation normals" in meta["threshold_source"]
    if HAS_ORT:
        assert main(["export", *args, "--format", "onnx", "--out", str(tmp_path / "cell.onnx")]) == 0
        assert export.onnx_metadata(tmp_path / "cell.onnx")["threshold"] == meta["threshold"]


def test_cli_export_errors_and_list(fitted_root, tmp_path, capsys):  # noqa: F811
    assert main(["export", "--list"]) == 0
    listing = capsys.readouterr().out
    assert (
        "sparse_ae              onnx         NOT exportable" in listing
        and "exportable (parity" in listing
        and "padim" in listing
    )
    rc = main(["export", "--cell", "toy-sparse_ae-none", "--format", "onnx", "--root", str(fitted_root)])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be exported to onnx" in err and len(err.strip().splitlines()) == 1
    rc = main(["export", "--cell", "toy-stfpm-random", "--format", "torchscript", "--root", str(fitted_root)])
    assert rc == 2 and "dvc repro fit@toy-stfpm-random" in capsys.readouterr().err
    assert main(["export", "--cell", CELL]) == 2  # no --format
