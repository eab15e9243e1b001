"""params.yaml → typed, validated config objects (the only place that knows the file's shape).

Stage scripts call `load_params` first: any unknown key, wrong type, out-of-range value or unknown
model/dataset/backbone name stops the run with one error naming the key path, before any work.
The library itself never reads params.yaml; stages pass it typed values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from vadbench.data.params import DatasetSpec
from vadbench.fractals.params import FractalsParams
from vadbench.pretrain.params import PretrainParams
from vadbench.schema import StrictModel
from vadbench.supervised.params import SUPERVISED_METHODS, SupervisedParams


class ParamsError(ValueError):
    """params.yaml is invalid; the message names every offending key path."""


#: the backbone slot of cells whose model trains from pixels (run.pixel_models)
NO_BACKBONE = "none"


class RunGrid(StrictModel):
    """The benchmark grid: one fit/score cell per dataset × model × backbone, plus one per dataset × pixel
    model (autoencoders trained from pixels: a backbone would change nothing, so they run once)."""

    datasets: list[str] = Field(min_length=1)
    models: list[str] = Field([], description="models on a backbone: one cell per backbone")
    pixel_models: list[str] = Field([], description="backbone-free models: one cell per dataset, backbone 'none'")
    backbones: list[str] = Field(min_length=1)
    seeds: list[int] = Field(
        [0], min_length=1, description="one fit per seed per cell; the leaderboard shows mean ± std"
    )
    supervised_models: list[str] = Field(
        [], description="supervised track (k-fold over labelled anomalies): one cell per dataset × backbone"
    )

    @model_validator(mode="after")
    def _unique(self) -> RunGrid:
        for key in ("datasets", "models", "pixel_models", "backbones", "seeds", "supervised_models"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"run.{key} lists a name twice: {values}")
        if not self.models and not self.pixel_models:
            raise ValueError("run.models and run.pixel_models are both empty: nothing to benchmark")
        return self

    def cells(self) -> list[tuple[str, str, str]]:
        """Every (dataset, model, backbone) the pipeline fits and scores, in dvc.yaml's order."""
        on_backbones = [(d, m, b) for d in self.datasets for m in self.models for b in self.backbones]
        return on_backbones + [(d, m, NO_BACKBONE) for d in self.datasets for m in self.pixel_models]

    def supervised_cells(self) -> list[tuple[str, str, str]]:
        """Every (dataset, supervised method, backbone) of the supervised track, in dvc.yaml's order."""
        return [(d, m, b) for d in self.datasets for m in self.supervised_models for b in self.backbones]


class BackboneSpec(StrictModel):
    arch: str = Field(description="timm architecture, optionally with a weights tag (resnet18.tv_in1k)")
    init: Literal["random", "fractal", "imagenet", "file"]
    file: str | None = Field(
        None, description="local weights file (init file; init imagenet: else the timm/HF cache, never a download)"
    )
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _file_when_needed(self) -> BackboneSpec:
        if self.init == "file" and not self.file:
            raise ValueError("init 'file' needs `file`: a local weights file (nothing is downloaded)")
        if self.init in ("random", "fractal") and self.file:
            raise ValueError(f"init {self.init!r} takes no `file`")
        return self


class ScoreParams(StrictModel):
    batch_size: int = Field(16, ge=1)
    latency_warmup: int = Field(2, ge=0)
    latency_repeats: int = Field(10, ge=1, description="batch-1 timings; the median is reported")


class AggregateParams(StrictModel):
    threshold_quantile: float = Field(0.99, gt=0, lt=1, description="operating threshold from validation normals")
    aupro_fpr_limit: float = Field(0.3, gt=0, le=1)
    gallery_size: int = Field(4, ge=1, le=16)


class DistillParams(StrictModel):
    """Teacher-PDN distillation for EfficientAD (stage distill@<model>-<backbone>,
    `models.components.teacher_distill`); the paper: 60,000 steps, batch 16, Adam lr 1e-4, weight decay
    1e-5, PDN input 256 px (backbone 512 px), WideResNet-101 layer2+3 on ImageNet."""

    layers: list[str] = Field(
        ["layer2", "layer3"], min_length=1, description="backbone layers distilled (first: stride 8)"
    )
    image_size: int = Field(64, ge=32, le=1024, description="PDN input side; the backbone sees twice it (paper: 256)")
    steps: int = Field(200, ge=1, le=10_000_000, description="Adam steps (paper: 60,000)")
    batch_size: int = Field(8, ge=1, le=4096, description="paper: 16")
    lr: float = Field(1e-4, gt=0, le=1)
    weight_decay: float = Field(1e-5, ge=0)
    grayscale: float = Field(0.1, ge=0, le=1, description="random-grayscale probability (paper: 0.1)")
    norm_images: int = Field(512, ge=1, description="images for the targets' channel mean/std (paper: 10,000)")
    penalty_images: int = Field(256, ge=0, description="fractal images stored with the teacher for the penalty loss")


#: dataset, model and backbone names become DVC stage names, paths and command arguments
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")


class Params(StrictModel):
    seed: int = Field(0, ge=0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    loader_workers: int = Field(0, ge=0, le=64, description="DataLoader processes decoding images (0: main process)")
    threads: int = Field(
        2, ge=1, le=512, description="torch intra-op threads of every stage: CPU results depend on it, so it is pinned"
    )
    run: RunGrid
    fractals: FractalsParams = FractalsParams()
    pretrain: PretrainParams = PretrainParams()
    backbones: dict[str, BackboneSpec]
    datasets: dict[str, DatasetSpec]
    models: dict[str, dict[str, Any]]
    score: ScoreParams = ScoreParams()
    aggregate: AggregateParams = AggregateParams()
    distill: DistillParams = DistillParams()  # EfficientAD's teacher (stage distill)
    supervised: SupervisedParams = SupervisedParams()  # the supervised track (stage supervised)

    def model_params(self, name: str) -> BaseModel:
        """The validated params object of model `name` (its class's `Params`)."""
        from vadbench.models import model_class

        return model_class(name).Params.model_validate_json(json.dumps(self.models.get(name, {})))


def _check_names(p: Params) -> list[str]:
    from vadbench.models import model_class, model_names

    errors = []
    for key, defined in (("datasets", p.datasets), ("backbones", p.backbones)):
        for name in getattr(p.run, key):
            if name not in defined:
                errors.append(f"run.{key}: {name!r} is not defined under `{key}:` (defined: {sorted(defined)})")
    registered = model_names()
    for name in sorted(set(p.run.models) | set(p.run.pixel_models) | set(p.models)):
        where = "run.models" if name in p.run.models else "run.pixel_models" if name in p.run.pixel_models else "models"
        if name not in registered:
            errors.append(f"{where}: unknown model {name!r}; available: {registered}")
            continue
        needs_backbone = model_class(name).needs_backbone
        if name in p.run.models and not needs_backbone:
            errors.append(f"run.models: {name!r} trains from pixels without a backbone; list it under run.pixel_models")
        if name in p.run.pixel_models and needs_backbone:
            errors.append(f"run.pixel_models: {name!r} needs a backbone; list it under run.models")
        if "seed" in p.models.get(name, {}):
            errors.append(f"models.{name}.seed: set seeds with run.seeds (every model gets each seed), not per model")
            continue
        try:
            p.model_params(name)
        except ValidationError as err:
            errors.extend(_format(err, prefix=f"models.{name}"))
    errors += _check_supervised(p)
    if NO_BACKBONE in p.backbones:
        errors.append(f"backbones.{NO_BACKBONE}: the name is reserved for the cells of run.pixel_models")
    for name in p.run.backbones:
        spec = p.backbones.get(name)
        if spec is not None and spec.init == "fractal" and spec.arch.split(".")[0] != p.pretrain.arch:
            errors.append(
                f"backbones.{name}.arch: {spec.arch!r} must equal pretrain.arch ({p.pretrain.arch!r}) for init fractal"
            )
    named = [(f"run.{key}", getattr(p.run, key)) for key in ("datasets", "models", "pixel_models", "backbones")]
    named += [(section, list(getattr(p, section))) for section in ("datasets", "backbones", "models")]
    for where, names in named:
        for name in names:
            if not NAME_PATTERN.match(name):
                errors.append(
                    f"{where}: name {name!r} must match {NAME_PATTERN.pattern} (letters, digits, underscore: "
                    "it becomes a DVC stage name, a path and a command argument)"
                )
    return errors


def _check_supervised(p: Params) -> list[str]:
    """run.supervised_models names, and the supervised methods' params (SuperSimpleNet's by its own class)."""
    errors = []
    for name in getattr(p.run, "supervised_models", []):
        if name not in SUPERVISED_METHODS:
            errors.append(f"run.supervised_models: unknown method {name!r}; available: {list(SUPERVISED_METHODS)}")
    sup = getattr(p, "supervised", None)
    if sup is None:
        return errors
    if "seed" in sup.classifier.model_fields_set:
        errors.append("supervised.classifier.seed: set seeds with run.seeds, not per method")
    ssn = sup.supersimplenet_supervised
    if "seed" in ssn:
        errors.append("supervised.supersimplenet_supervised.seed: set seeds with run.seeds, not per method")
    else:
        from vadbench.models import model_class

        try:
            model_class("supersimplenet").Params.model_validate_json(json.dumps(ssn))
        except ValidationError as err:
            errors.extend(_format(err, prefix="supervised.supersimplenet_supervised"))
    return errors


def _check_names_raw(raw: dict[str, Any]) -> list[str]:
    """`_check_names` on a mapping that failed validation: each check that its shape allows, none that crash."""
    from types import SimpleNamespace

    def section(key: str) -> dict[str, Any]:
        value = raw.get(key)
        return value if isinstance(value, dict) else {}

    run = section("run")
    lists = {
        k: run.get(k) if isinstance(run.get(k), list) else []
        for k in ("datasets", "models", "pixel_models", "backbones")
    }
    backbones = {
        k: SimpleNamespace(init=v.get("init"), arch=str(v.get("arch", "")))
        for k, v in section("backbones").items()
        if isinstance(v, dict)
    }
    pretrain = SimpleNamespace(arch=str(section("pretrain").get("arch", PretrainParams().arch)))
    models = {k: v for k, v in section("models").items() if isinstance(v, dict)}
    ns = SimpleNamespace(
        run=SimpleNamespace(**{k: [str(x) for x in v] for k, v in lists.items()}),
        datasets=section("datasets"),
        backbones=backbones,
        models=models,
        pretrain=pretrain,
    )
    ns.model_params = lambda name: Params.model_params(ns, name)  # type: ignore[arg-type]
    try:
        return _check_names(ns)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a best effort on top of the validation errors
        return []


def _format(err: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for e in err.errors():
        parts = [str(x) for x in e["loc"] if not str(x).startswith("function-after")]
        if not prefix and len(parts) >= 3 and parts[0] == "datasets":
            del parts[2]  # pydantic puts the `kind` tag in the path: datasets.<name>.<kind>.<key>
        loc = ".".join(parts)
        path = ".".join(filter(None, [prefix, loc]))
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {json.dumps(got)[:60]})"
        lines.append(f"{path}: {e['msg']}{shown}")
    return lines


def parse_params(raw: Any, source: str = "params.yaml", check_models: bool = True) -> Params:
    """Validate an already-loaded mapping; raise ParamsError listing every problem.

    `check_models=False` skips the model/dataset/backbone name and per-model params checks (they import every
    registered model): only for a mapping already known to pass them (`load_params`' validation record)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        params = Params.model_validate_json(json.dumps(raw))
    except ValidationError as err:
        # every problem at once: the type/range errors, plus the name checks that the raw mapping allows
        errors = _format(err) + [e for e in _check_names_raw(raw) if e not in _format(err)]
        raise ParamsError(f"{source} is invalid:\n  " + "\n  ".join(errors)) from None
    errors = _check_names(params) if check_models else []
    if errors:
        raise ParamsError(f"{source} is invalid:\n  " + "\n  ".join(errors))
    return params


def load_params(path: str | Path = "params.yaml", validated_cache: Path | None = None) -> Params:
    """params.yaml → validated Params, or ParamsError naming every problem.

    `validated_cache`: a file recording the last successful validation. The full check imports every
    registered model (torch, timm: ~4 s), which the always-run `check` stage would pay on every no-op
    `dvc repro`; when the params bytes, the vadbench sources and the pydantic version are those of the
    recorded success, the result is known and only the schema (no model imports) is rebuilt."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found")
    text = path.read_bytes()
    key = _validation_key(text) if validated_cache is not None else None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    known_valid = key is not None and _read_text(validated_cache) == key
    params = parse_params(raw, str(path), check_models=not known_valid)
    if key is not None and not known_valid:
        from vadbench.io import write_text  # atomic: a killed run leaves the old record or none

        write_text(Path(validated_cache), key)
    return params


def _validation_key(params_bytes: bytes) -> str:
    """sha256 over the params bytes, every vadbench source file (path + bytes) and the pydantic version:
    the inputs that decide whether validation passes."""
    import hashlib

    import pydantic

    h = hashlib.sha256(params_bytes)
    h.update(pydantic.VERSION.encode())
    root = Path(__file__).resolve().parent
    for src in sorted(root.rglob("*.py")):
        h.update(src.relative_to(root).as_posix().encode())
        h.update(src.read_bytes())
    return h.hexdigest()


def _read_text(path: Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None
