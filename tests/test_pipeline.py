"""The DVC stage graph end to end on a tiny params set, in a temporary copy of the project.

Proves: the whole chain runs; a second `dvc repro` does nothing; a PatchCore param reruns only
PatchCore's cells (+ aggregate); a fractal param reruns fractals → pretrain → backbones and the
fractal-backbone cells but not the random-backbone cells; forced reruns give identical metrics;
`dvc exp run -S` works and `dvc exp show` sees the metrics.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def tiny_params() -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["run"].update(
        {
            "datasets": ["synthetic_sem"],
            "models": ["patchcore", "padim"],
            "pixel_models": ["sparse_ae"],
            "backbones": ["random", "fractal"],
            "seeds": [0],
        }
    )  # other run keys (supervised_models, ...) as params.yaml has them
    p["models"]["sparse_ae"].update(epochs=2)
    p["fractals"].update(num_classes=4, instances_per_class=8, image_size=32, points=2000, pad=1, workers=1)
    p["pretrain"].update(epochs=1, batch_size=16, milestones=[], warmup_epochs=0)
    p["datasets"]["synthetic_sem"].update(image_size=64, n_train=12, n_val=4, n_test_normal=6, n_test_per_defect=2)
    p["score"].update(latency_repeats=2, latency_warmup=1)
    return p


def _env(project: Path) -> dict[str, str]:
    # the project's own copy of src/ first: the editable install points at the live tree, which may change
    # while this module runs (an edit mid-test made a forced rerun differ from the run before it)
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(project / "src"),
    }


def _run(args: list[str], cwd: Path) -> str:
    env = _env(cwd)
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(args)} failed:\n{out[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _set(project: Path, mutate) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    mutate(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "stages", "src", "weights", ".dvc/config", ".dvcignore"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "tmp"))
        elif src.exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    (dst / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    _run(["git", "init", "-q"], dst)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], dst)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], dst)
    return dst


CELLS = {
    f"{s}@synthetic_sem-{m}-{b}"
    for s in ("fit", "score")
    for m in ("patchcore", "padim")
    for b in ("random", "fractal")
}
PIXEL_CELLS = {"fit_pixels@synthetic_sem-sparse_ae", "score_pixels@synthetic_sem-sparse_ae"}  # no backbone: once
# EfficientAD's teacher stage: a constant marker for every other model (their fits depend on a file that never changes)
MARKERS = {f"distill@{m}-{b}" for m in ("patchcore", "padim") for b in ("random", "fractal")}


def test_full_chain_then_noop(project):
    ran = _ran(_run(["dvc", "repro"], project))
    assert (
        ran
        == {"check", "fractals", "pretrain", "backbones", "prepare@synthetic_sem", "aggregate"}
        | CELLS
        | PIXEL_CELLS
        | MARKERS
    )
    summary = json.loads((project / "metrics" / "summary.json").read_text())
    assert set(summary["synthetic_sem"]) == {"patchcore", "padim", "sparse_ae"}
    assert set(summary["synthetic_sem"]["sparse_ae"]) == {"none"}
    for png in (
        "reports/leaderboard.png",
        "reports/curves.png",
        "reports/synthetic_sem/preview.png",
        "reports/cells/synthetic_sem-patchcore-fractal/gallery.png",
        "reports/fractals_preview.png",
    ):
        assert (project / png).is_file(), png
    lock = (project / "dvc.lock").read_bytes()
    assert _ran(_run(["dvc", "repro"], project)) == {"check"}  # validation only: nothing else reruns
    assert (project / "dvc.lock").read_bytes() == lock


def test_dvc_plots_page_renders_offline(project):
    """`dvc plots show` on the real outputs renders every curve and image in headless Chromium."""
    import browser

    report = browser.check_dvc_plots_page(project, html_template=browser.offline_template())
    n_cells, n_datasets = 5, 1
    # ROC + PR per cell and the pretrain curve; a gallery per cell, a preview per dataset, 3 overview PNGs
    assert browser.problems(report, expect_vega=2 * n_cells + 1, expect_images=n_cells + n_datasets + 3) == [], report


def test_patchcore_param_reruns_only_patchcore(project):
    _set(project, lambda p: p["models"]["patchcore"].update(num_neighbors=5))
    status = _run(["dvc", "status"], project)
    assert "patchcore" in status and "padim" not in status
    ran = _ran(_run(["dvc", "repro"], project))
    assert ran == {c for c in CELLS if "-patchcore-" in c} | {"aggregate", "check"}


def test_fractal_param_reruns_only_fractal_chain(project):
    _set(project, lambda p: p["fractals"].update(num_classes=5))
    ran = _ran(_run(["dvc", "repro"], project))
    assert {"fractals", "pretrain", "backbones", "aggregate"} <= ran
    assert {c for c in CELLS if c.endswith("-fractal")} <= ran
    assert not {c for c in CELLS if c.endswith("-random")} & ran
    assert not PIXEL_CELLS & ran  # pixel models depend on no backbone
    assert "prepare@synthetic_sem" not in ran


def test_adding_efficientad_runs_only_its_teacher_and_cells(project):
    """The distilled teacher is one stage per model × backbone: adding EfficientAD reruns nothing else."""

    def add(p: dict) -> None:
        p["run"]["models"].append("efficientad_s")
        p["models"]["efficientad_s"].update(steps=2, batch_size=2, image_size=64)
        p["distill"].update(steps=2, batch_size=2, image_size=32, norm_images=8, penalty_images=4)

    text = (project / "params.yaml").read_text()
    _set(project, add)
    try:
        ran = _ran(_run(["dvc", "repro"], project))
        own = {f"{s}@{c}-{b}" for b in ("random", "fractal") for s, c in (("distill", "efficientad_s"),)}
        own |= {f"{s}@synthetic_sem-efficientad_s-{b}" for s in ("fit", "score") for b in ("random", "fractal")}
        # the other models' markers rerun (the distill params changed) but write the same bytes: no cell reruns
        assert ran == own | MARKERS | {"check", "aggregate"}
        assert (project / "data" / "teachers" / "efficientad_s-fractal").is_dir()
    finally:
        (project / "params.yaml").write_text(text)
    assert _ran(_run(["dvc", "repro"], project)) <= {"check", "aggregate"} | MARKERS


def _lock_diff(a: str, b: str) -> str:
    import difflib

    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), "before", "after", n=2))[:6000]


def test_forced_rerun_gives_identical_metrics_and_lock(project):
    """Every cached output is deterministic (measurements live in metrics/measured/): so is dvc.lock."""
    names = ("summary.json", "leaderboard.csv", "leaderboard.md")
    before = {n: (project / "metrics" / n).read_bytes() for n in names}
    lock = (project / "dvc.lock").read_text()
    # every stage kind once, forced in place over its own previous outputs (the whole chain twice from clean,
    # byte-identical, is `make verify`'s job): fractals → pretrain → backbones, prepare, the distill marker, a
    # backbone cell, a pixel cell and aggregate
    forced = [
        "fractals",
        "pretrain",
        "backbones",
        "prepare@synthetic_sem",
        "distill@padim-fractal",
        "fit@synthetic_sem-padim-fractal",
        "score@synthetic_sem-padim-fractal",
        "fit_pixels@synthetic_sem-sparse_ae",
        "score_pixels@synthetic_sem-sparse_ae",
        "aggregate",
    ]
    assert _ran(_run(["dvc", "repro", "-f", "-s", *forced], project)) == set(forced)
    after = {n: (project / "metrics" / n).read_bytes() for n in names}
    assert before == after
    new_lock = (project / "dvc.lock").read_text()
    assert new_lock == lock, _lock_diff(lock, new_lock)
    costs = json.loads((project / "metrics" / "measured" / "costs.json").read_text())
    assert costs["synthetic_sem"]["padim"]["random"]["fit_seconds"] > 0
    assert "costs.json" in _run(["dvc", "metrics", "show"], project)
    assert "Costs" in (project / "reports" / "index.html").read_text()


def test_invalid_params_stop_a_plain_repro(project):
    """Even with nothing to rerun, `dvc repro` validates params.yaml first and names the bad key."""
    text = (project / "params.yaml").read_text()
    try:
        (project / "params.yaml").write_text(text + "seeds: [0, 1, 2]\n")
        env = _env(project)
        res = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode != 0 and "seeds" in res.stdout + res.stderr
    finally:
        (project / "params.yaml").write_text(text)


def test_sigkill_mid_fit_then_rerun_gives_identical_outputs(project):
    """A fit killed with SIGKILL leaves no trace that matters: the rerun's outputs are byte-identical."""
    import signal
    import time

    cell = "synthetic_sem-sparse_ae-none"
    fit_dir = project / "data" / "fits" / cell

    def snapshot() -> dict[str, bytes]:
        return {p.relative_to(fit_dir).as_posix(): p.read_bytes() for p in sorted(fit_dir.rglob("*")) if p.is_file()}

    before = snapshot()
    env = _env(project)
    log = project.parent / "sigkill-repro.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["dvc", "repro", "-f", "-s", "fit_pixels@synthetic_sem-sparse_ae"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list(fit_dir.parent.glob(f".{cell}.tmp-*")):
            time.sleep(0.05)  # the fit is writing into its temp dir: kill it there
        started = bool(list(fit_dir.parent.glob(f".{cell}.tmp-*")))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert started, f"the fit never started writing:\n{log.read_text()[-3000:]}"
    # DVC may have removed the old output before the command ran; the killed command wrote only into its temp
    # dir (ignored by DVC: .dvcignore). A plain repro brings the same bytes back (rerun, or restored from DVC's
    # run cache) and nothing else changes
    ran = _ran(_run(["dvc", "repro"], project))
    assert ran <= {"check", "fit_pixels@synthetic_sem-sparse_ae"}
    assert snapshot() == before
    # rerunning the killed stage gives the same bytes and removes what the killed run left behind
    ran = _ran(_run(["dvc", "repro", "-f", "-s", "fit_pixels@synthetic_sem-sparse_ae"], project))
    assert "fit_pixels@synthetic_sem-sparse_ae" in ran
    after = snapshot()
    assert sorted(after) == sorted(before)
    assert after == before, [k for k in before if before[k] != after.get(k)]
    assert not list(fit_dir.parent.glob(f".{cell}.*"))  # leftovers cleaned up
    assert _ran(_run(["dvc", "repro"], project)) == {"check"}


def test_folder_edit_reruns_exactly_its_prepare_chain(project):
    """A `folder` dataset's files are dependencies: editing one image reruns its prepare and cells only."""
    import numpy as np
    from PIL import Image

    src = project / "own"
    rng = np.random.default_rng(0)
    for sub, n in (("ok", 10), ("ng/blob", 3)):
        (src / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(src / sub / f"{i}.png")

    grid = yaml.safe_load((project / "params.yaml").read_text())["run"]

    def add(p):
        p["datasets"]["own"] = {
            "kind": "folder",
            "normal_dir": str(src / "ok"),
            "abnormal_dir": str(src / "ng"),
            "image_size": 64,
            "val_fraction": 0.2,
            "test_normal_fraction": 0.2,
        }
        # one cell per dataset is enough to see what an edit reruns (the grid is a cross product: every extra
        # model or backbone would add two stages per run here); the synthetic_sem cells stay as they are
        p["run"].update(datasets=["synthetic_sem", "own"], models=["padim"], pixel_models=[], backbones=["random"])

    _set(project, add)
    _run(["dvc", "repro"], project)
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(src / "ok" / "3.png")  # edit one source image
    ran = _ran(_run(["dvc", "repro"], project))
    own = {s for s in ran if "@own" in s}
    assert own == {"prepare@own", "fit@own-padim-random", "score@own-padim-random"}
    assert ran - own == {"check", "aggregate"}
    assert _ran(_run(["dvc", "repro"], project)) == {"check"}
    _set(project, lambda p: (p["datasets"].pop("own"), p["run"].update(grid)))


def test_exp_run_with_set_param(project):
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"], project)
    _run(["dvc", "exp", "run", "-S", "models.padim.n_features=40"], project)
    shown = _run(["dvc", "exp", "show", "--json"], project)
    assert "image_auroc" in shown and "n_features" in shown
