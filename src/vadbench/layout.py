"""Where the pipeline's files live, defined once; stage scripts pass these paths to the library.

Cached DVC outputs (under ``data/``) hold only what is deterministic for fixed params, seed, thread
count and machine kind, so ``dvc.lock`` is identical between clean runs. Measurements (seconds, peak
memory, latency, the device name) go to ``metrics/measured/``: git-tracked, no stage's declared output,
listed as top-level ``metrics:`` in dvc.yaml so `dvc metrics show` and `dvc exp show` still show them.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
FRACTALS = DATA / "fractals"
PRETRAIN = DATA / "pretrain"
BACKBONES = DATA / "backbones"
PREPARED = DATA / "prepared"
SOURCES = DATA / "sources"  # fingerprints of local source trees (stage sources@<dataset>)
SOURCES_CACHE = DATA / ".sources-cache"  # not a DVC output: file-hash caches, the last valid params key
FITS = DATA / "fits"
TEACHERS = DATA / "teachers"  # distill@<model>-<backbone>: EfficientAD's teacher PDN, a marker for other models
#: models whose fit needs a distilled teacher → its PDN size (kept here, torch-free, so the distill stage
#: writes other models' markers without importing torch; tests/test_efficientad.py checks it against the models)
TEACHER_MODELS = {"efficientad_s": "small", "efficientad_m": "medium"}
SCORES = DATA / "scores"
METRICS = Path("metrics")
MEASURED = METRICS / "measured"
MEASURED_PRETRAIN = MEASURED / "pretrain.json"
REPORTS = Path("reports")
#: the page to share; shows measured costs, so (like MEASURED) no stage declares it as an output
REPORT_PAGE = REPORTS / "index.html"


def measured_fit(root: Path, cell: str) -> Path:
    """Fit measurements of one cell (every seed): seconds, peak RSS / CUDA memory, device."""
    return Path(root) / "fit" / f"{cell}.json"


def measured_score(root: Path, cell: str) -> Path:
    """Score measurements of one cell (first seed): latency, throughput, peak memory, device."""
    return Path(root) / "score" / f"{cell}.json"


def teacher_dir(model: str, backbone: str) -> Path:
    """Output of stage distill@<model>-<backbone>: ``teacher.pt`` + ``card.json`` (only ``card.json`` for a
    model without a teacher)."""
    return TEACHERS / f"{model}-{backbone}"


#: the supervised track (stage supervised@<dataset>-<method>-<backbone>): folds' models, pooled scores, metrics.
#: Under SCORES so that `aggregate`, which depends on data/scores, runs after it without a dependency on a path
#: that does not exist when run.supervised_models is empty (the default)
SUPERVISED = SCORES / "supervised"


def supervised_dir(dataset: str, method: str, backbone: str) -> Path:
    """Output of one supervised cell: ``fold-<f>/{model.pt, fit.json}``, ``scores.csv``, ``metrics.json``."""
    return SUPERVISED / f"{dataset}-{method}-{backbone}"


def measured_supervised(root: Path, cell: str) -> Path:
    """Per-fold fit/score seconds and peak memory of one supervised cell."""
    return Path(root) / "supervised" / f"{cell}.json"
