"""params.yaml validation: every mistake is caught up front with the key path named."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vadbench.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_params_are_valid(raw):
    params = parse_params(raw)
    assert params.run.models and params.run.backbones and params.run.datasets
    for name in params.run.models + params.run.pixel_models:
        params.model_params(name)  # every listed model's section validates


def test_grid_cells_run_pixel_models_once_per_dataset(raw):
    run = parse_params(raw).run
    cells = run.cells()
    assert len(cells) == len(run.datasets) * (len(run.models) * len(run.backbones) + len(run.pixel_models))
    assert len(set(cells)) == len(cells)
    pixel = [c for c in cells if c[2] == "none"]
    assert sorted(m for _, m, _ in pixel) == sorted(run.pixel_models) and run.pixel_models


def _error(raw: dict, mutate) -> str:
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(ParamsError) as info:
        parse_params(bad)
    return str(info.value)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p.update(unknown_key=1), "unknown_key"),
        (lambda p: p["fractals"].update(num_classes="many"), "fractals.num_classes"),
        (lambda p: p["fractals"].update(num_clases=3), "fractals.num_clases"),
        (lambda p: p["fractals"].update(num_classes=0), "fractals.num_classes"),
        (lambda p: p["pretrain"].update(epochs=-1), "pretrain.epochs"),
        (lambda p: p["run"].update(models=["patchcore", "nosuchmodel"]), "nosuchmodel"),
        (lambda p: p["run"].update(backbones=["random", "nosuchbackbone"]), "run.backbones"),
        (lambda p: p["run"].update(datasets=["nosuchdata"]), "run.datasets"),
        (lambda p: p["models"]["patchcore"].update(coreset_ratio=2.0), "models.patchcore.coreset_ratio"),
        (lambda p: p["models"]["patchcore"].update(bogus=True), "models.patchcore.bogus"),
        (lambda p: p["backbones"]["random"].update(init="imagenett"), "backbones.random.init"),
        (lambda p: p.update(device="tpu"), "device"),
        (lambda p: p["datasets"]["synthetic_sem"].update(n_train=0), "n_train"),
        (lambda p: p["datasets"]["synthetic_sem"].update(kind="nosuchkind"), "datasets.synthetic_sem"),
        (lambda p: p["run"].update(models=["patchcore", "sparse_ae"]), "list it under run.pixel_models"),
        (lambda p: p["run"].update(pixel_models=["deep_ae", "padim"]), "run.pixel_models: 'padim' needs a backbone"),
        (lambda p: p["run"].update(models=[], pixel_models=[]), "nothing to benchmark"),
        (lambda p: p["run"].update(pixel_models=["deep_ae", "deep_ae"]), "run.pixel_models lists a name twice"),
        (lambda p: p["backbones"].update(none={"arch": "resnet18", "init": "random"}), "backbones.none"),
    ],
)
def test_invalid_params_name_the_key(raw, mutate, expected):
    assert expected in _error(raw, mutate)


def test_fractal_backbone_arch_must_match_pretrain(raw):
    msg = _error(raw, lambda p: p["pretrain"].update(arch="resnet50"))
    assert "backbones.fractal.arch" in msg and "pretrain.arch" in msg


def test_file_backbone_needs_a_file(raw):
    msg = _error(raw, lambda p: p["backbones"].update(mine={"arch": "resnet18", "init": "file"}))
    assert "backbones.mine" in msg and "file" in msg
    # imagenet may omit `file`: the timm/Hugging Face cache is then the only (offline) source
    ok = copy.deepcopy(raw)
    ok["backbones"]["imagenet"].pop("file")
    parse_params(ok)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(bad)


def test_cli_validate_exit_codes(raw, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(raw))
    ok = subprocess.run([sys.executable, "-m", "vadbench.cli", "validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "cells" in ok.stdout
    raw2 = copy.deepcopy(raw)
    raw2["models"]["patchcore"]["num_neighbors"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw2))
    res = subprocess.run([sys.executable, "-m", "vadbench.cli", "validate", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "models.patchcore.num_neighbors" in res.stderr


def test_stage_refuses_invalid_params_before_writing(raw, tmp_path):
    """A stage run with broken params exits 2 and creates no output."""
    raw2 = copy.deepcopy(raw)
    raw2["datasets"]["synthetic_sem"]["image_size"] = "big"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw2))
    res = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "fit.py"), "synthetic_sem", "patchcore", "random"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert "datasets.synthetic_sem" in res.stderr and "image_size" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_paper_profile_is_valid_and_current():
    """profiles/paper.yaml validates and equals what profiles/make_paper.py makes from params.yaml."""
    import importlib.util

    profile = ROOT / "profiles" / "paper.yaml"
    params = load_params(profile)
    assert params.pretrain.arch == "wide_resnet50_2" and params.fractals.num_classes == 1000
    assert {params.backbones[b].init for b in params.run.backbones} == {"random", "fractal", "imagenet"}
    spec = importlib.util.spec_from_file_location("make_paper", ROOT / "profiles" / "make_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    regenerated = module.HEADER + yaml.safe_dump(
        module.paper(yaml.safe_load((ROOT / "params.yaml").read_text())), sort_keys=False, width=110
    )
    assert profile.read_text() == regenerated, "profiles/paper.yaml is stale: run python profiles/make_paper.py"


def test_stages_refuse_cells_outside_the_grid(raw):
    from vadbench.cli import require_in_grid

    params = parse_params(raw)
    require_in_grid(params, "synthetic_sem", "sparse_ae", "none")
    require_in_grid(params, "synthetic_sem", "patchcore", "fractal")
    for cell in (
        ("synthetic_sem", "sparse_ae", "fractal"),
        ("synthetic_sem", "patchcore", "none"),
        ("nodata", None, None),
    ):
        with pytest.raises(ParamsError, match="not in"):
            require_in_grid(params, *cell)


def test_every_error_is_reported_at_once_and_names_are_shell_safe():
    import yaml as _yaml

    from vadbench.config import ParamsError, parse_params

    raw = _yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["seeds"] = [0, 1, 2]  # misplaced top-level key
    raw["run"]["models"] = [*raw["run"]["models"], "nosuchmodel"]
    raw["datasets"]["x;touch${IFS}pwned;"] = raw["datasets"]["synthetic_sem"]
    raw["run"]["datasets"] = ["x;touch${IFS}pwned;"]
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    msg = str(info.value)
    assert "seeds: Extra inputs" in msg and "unknown model 'nosuchmodel'" in msg
    assert "must match ^[A-Za-z0-9_]+$" in msg


def test_full_profile_is_valid_current_and_runs_every_model():
    """profiles/full.yaml validates, equals what make_full.py makes, and its grid holds every registered model."""
    import importlib.util

    from vadbench.models import model_names

    profile = ROOT / "profiles" / "full.yaml"
    params = load_params(profile)
    assert sorted(params.run.models + params.run.pixel_models) == model_names()
    spec = importlib.util.spec_from_file_location("make_full", ROOT / "profiles" / "make_full.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    regenerated = module.HEADER + yaml.safe_dump(
        module.full(yaml.safe_load((ROOT / "params.yaml").read_text())), sort_keys=False, width=110
    )
    assert profile.read_text() == regenerated, "profiles/full.yaml is stale: run python profiles/make_full.py"


def test_workstation_profile_is_valid_and_current():
    """profiles/workstation.yaml validates, equals what make_workstation.py makes, and differs from the default
    only where it says: the fractal recipe, the grid and the two frozen-feature models' settings."""
    import importlib.util

    profile = ROOT / "profiles" / "workstation.yaml"
    params = load_params(profile)
    default = load_params(ROOT / "params.yaml")
    spec = importlib.util.spec_from_file_location("make_workstation", ROOT / "profiles" / "make_workstation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    regenerated = module.HEADER + yaml.safe_dump(
        module.workstation(yaml.safe_load((ROOT / "params.yaml").read_text())), sort_keys=False, width=110
    )
    assert profile.read_text() == regenerated, (
        "profiles/workstation.yaml is stale: run python profiles/make_workstation.py"
    )
    assert params.run.backbones == ["random", "fractal"] and {"elpv_mono", "elpv_poly"} <= set(params.run.datasets)
    for key, value in {**module.FRACTALS}.items():
        assert getattr(params.fractals, key) == value
    changed = {k for k, v in params.pretrain.model_dump().items() if getattr(default.pretrain, k) != v}
    assert changed and changed <= set(module.PRETRAIN)  # keys the default already shares may be restated
    recipe = params.pretrain.model_dump(mode="json")
    assert all(recipe[k] == v for k, v in module.PRETRAIN.items())
    assert params.models["stfpm"] == default.models["stfpm"]


def test_validation_record_skips_nothing_that_could_fail(raw, tmp_path):
    """The `check` stage's record of the last valid params: same bytes → same Params; any edit is validated
    in full again (an invalid model param still stops it), and a stale record is never trusted."""
    path, record = tmp_path / "params.yaml", tmp_path / "cache" / "params.validated"
    path.write_text(yaml.safe_dump(raw))
    full = load_params(path, record)
    key = record.read_text()
    assert len(key) == 64 and load_params(path, record) == full == load_params(path)
    bad = copy.deepcopy(raw)
    bad["models"]["padim"]["n_features"] = 0  # caught only by the model's own Params (the full check)
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match=r"models\.padim\.n_features"):
        load_params(path, record)
    assert record.read_text() == key  # a failed validation records nothing
    record.write_text("0" * 64)  # stale: another params file or source tree
    with pytest.raises(ParamsError, match=r"models\.padim\.n_features"):
        load_params(path, record)
    path.write_text(yaml.safe_dump(raw))
    assert load_params(path, record) == full and record.read_text() == key
