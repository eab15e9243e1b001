"""Every library module a DVC stage runs is one of its `deps`: editing it reruns the stage.

A stage whose code path reaches a module that dvc.yaml does not list keeps its cached outputs when that
module changes — `dvc repro` reports "nothing to do" while a fresh run would give other bytes. The
imports of each stage script are followed statically (function-level imports too) through the library;
a name imported from a package resolves to the submodule that defines it. Not followed, by design:

- configuration (`config`, `cli`, `schema`, `layout`, `*.params`): it validates params.yaml, whose values
  are the stages' `params`; file names in `layout` are the stages' `outs`;
- the model registry (`models/__init__.py`): it imports every model file, and adding a method must not
  rerun the others' cells; each cell depends on its own `models/${item.model}.py` and `models/base.py`;
- imports listed in `IMPORTED_NOT_RUN` below: reached through a shared module but not run by that stage.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
NOT_FOLLOWED = re.compile(r"^vadbench\.(cli|config|schema|layout|export|models)$|\.params$")
SCORING = {  # cell.py serves fit and score; these run only in score_cell
    "src/vadbench/metrics/__init__.py",
    "src/vadbench/metrics/_util.py",
    "src/vadbench/metrics/image.py",
    "src/vadbench/metrics/pixel.py",
    "src/vadbench/report/__init__.py",
    "src/vadbench/report/figures.py",
    "src/vadbench/report/gallery.py",
}
BACKBONE = {  # cell.py imports the feature extractor; pixel models have no backbone
    "src/vadbench/backbones/__init__.py",
    "src/vadbench/backbones/extractor.py",
    "src/vadbench/backbones/weights.py",
}
FRACTAL_TEXTURES = {  # DRAEM, a pixel model (fit_pixels), renders its texture bank with the IFS code at fit
    f"src/vadbench/fractals/{name}.py" for name in ("__init__", "build", "compose", "ifs", "instances", "kernels")
}
#: stage → modules its import graph reaches that the stage never runs (with the reason above each set)
IMPORTED_NOT_RUN = {
    "fit": SCORING | FRACTAL_TEXTURES,
    "score": FRACTAL_TEXTURES,
    "fit_pixels": SCORING | BACKBONE,
    "score_pixels": BACKBONE | FRACTAL_TEXTURES,
    # `from vadbench.backbones.weights import ...` runs the package __init__, which imports the extractor
    "pretrain": {"src/vadbench/backbones/__init__.py", "src/vadbench/backbones/extractor.py"},
}


def _module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in `path`, relative ones resolved."""
    package: list[str] = []
    if path.is_relative_to(SRC):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            found.append((module, [alias.name for alias in node.names]))
    return [(m, names) for m, names in found if m == "vadbench" or m.startswith("vadbench.")]


def _defining_module(package: str, name: str) -> str:
    """`from package import name` → the submodule that defines `name` (a re-export followed once)."""
    if _module_file(f"{package}.{name}") is not None:
        return f"{package}.{name}"
    init = _module_file(package)
    if init is not None and init.name == "__init__.py":
        for module, names in _imports(init):
            if name in names:
                return module
    return package


def _modules_run(script: Path) -> set[str]:
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module, names in _imports(path):
            targets = {_defining_module(module, n) for n in names} if names else {module}
            for target in targets:
                parts = target.split(".")
                for depth in range(2, len(parts) + 1):  # a submodule import runs its packages' __init__ too
                    prefix = ".".join(parts[:depth])
                    if NOT_FOLLOWED.search(prefix):
                        continue  # vadbench.models.patchcore: skip the registry, follow the model file
                    file = _module_file(prefix)
                    if file is not None and not (file.name == "__init__.py" and depth < len(parts) and _inert(file)):
                        todo.append(file)
    return {str(p.relative_to(ROOT)) for p in seen if p.is_relative_to(SRC)}


def _inert(init: Path) -> bool:
    """A package __init__ holding only a docstring, imports and __all__ (importing it runs nothing else
    than the submodules, which are followed on their own)."""
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            continue
        return False
    return True


def _stages() -> list:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [pytest.param(name, (spec.get("do") or spec).get("deps", []), id=name) for name, spec in stages.items()]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize(("stage", "deps"), _stages())
def test_every_module_a_stage_runs_is_one_of_its_deps(stage, deps):
    scripts = [ROOT / d for d in deps if d.startswith("stages/")]
    assert scripts, f"dvc.yaml stage {stage!r} lists no stages/ script among its deps"
    model_files = [d for d in deps if "${item.model}" in d]
    if model_files:  # a cell runs its own model file (${item.model}.py): every one is walked, each may be the item
        scripts += [p for p in (SRC / "vadbench/models").glob("*.py") if p.name not in ("__init__.py", "base.py")]
    run = set().union(*(_modules_run(s) for s in scripts)) - IMPORTED_NOT_RUN.get(stage, set())
    if model_files:  # ... and is covered by ${item.model}.py
        run = {p for p in run if not re.fullmatch(r"src/vadbench/models/(?!base\.py)[a-z0-9_]+\.py", p)}
    missing = sorted(p for p in run if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not list them in deps"


def test_the_walk_finds_a_known_chain():
    """The walk itself: score reaches pixel metrics through cell.py, and io.py through several modules."""
    run = _modules_run(ROOT / "stages/score.py")
    assert {"src/vadbench/cell.py", "src/vadbench/metrics/pixel.py", "src/vadbench/io.py"} <= run
    assert "src/vadbench/config.py" not in run
