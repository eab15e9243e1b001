"""Wall time of the whole default `dvc repro`, per stage, plus every cell's fit time, latency and memory.

    .venv/bin/python benchmarks/bench_repro.py                  # default grid → benchmarks/results/repro.md
    .venv/bin/python benchmarks/bench_repro.py --profile full   # every model → benchmarks/results/repro_full.md

Clones the committed HEAD into a temporary directory (empty `data/`, no DVC cache), runs `dvc repro`
there with this checkout's virtual environment and the clone's own sources first on `PYTHONPATH`, and
timestamps each "Running stage" line of DVC's output. The issue's budget is "the whole default run
≤ 10 minutes on 2 cores" for the default: this is the measurement, on whatever machine runs it. With
`--profile NAME` the clone first switches to profiles/NAME.yaml (`vadbench profile NAME`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_repro(project: Path) -> tuple[float, list[tuple[str, float]]]:
    """Run `dvc repro` in `project`; return (total seconds, [(stage, seconds), ...] in run order)."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(project / "src"),
        "HF_HUB_OFFLINE": "1",
    }
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the Makefile
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    with subprocess.Popen(
        ["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("Running stage '"):
                marks.append((line.split("'")[1], time.perf_counter()))
                print(f"[{time.perf_counter() - start:7.1f} s] {marks[-1][0]}", flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"dvc repro failed in {project} (exit {proc.returncode})")
    end = time.perf_counter()
    stops = [t for _, t in marks[1:]] + [end]
    return end - start, [(name, stop - t) for (name, t), stop in zip(marks, stops)]


def cell_rows(project: Path) -> list[str]:
    """One row per cell: quality from metrics/summary.json, costs from this run's per-cell measurements.

    Not from metrics/measured/costs.json: `aggregate` writes it, and a fresh clone whose score outputs equal the
    committed ones skips `aggregate` (its inputs are unchanged), leaving the committed costs in place."""
    from vadbench import layout

    costs = json.loads((project / "metrics" / "measured" / "costs.json").read_text())  # for parameter counts
    quality = json.loads((project / "metrics" / "summary.json").read_text())
    measured = project / layout.MEASURED
    rows = []
    for dataset, models in quality.items():
        for model, backbones in models.items():
            for backbone, q in backbones.items():
                cell = f"{dataset}-{model}-{backbone}"
                fit = json.loads(layout.measured_fit(measured, cell).read_text())
                first = fit[min(fit, key=int)]
                score = json.loads(layout.measured_score(measured, cell).read_text())
                params = costs.get(dataset, {}).get(model, {}).get(backbone, {}).get("parameters")
                pix = "n/a" if q.get("pixel_auroc") is None else f"{q['pixel_auroc']:.3f}"
                n_params = "?" if params is None else f"{params / 1e6:.2f}"
                rows.append(
                    f"| {dataset} | {model} | {backbone} | {q['image_auroc']:.3f} | {pix} | {first['fit_seconds']:.1f} | "
                    f"{score['latency_ms']:.1f} | {first['fit_peak_rss_mb']:.0f} | {n_params} |"
                )
    return rows


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None, help="run profiles/<name>.yaml instead of params.yaml (e.g. full)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/repro.md or results/repro_<profile>.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = ap.parse_args()
    if args.out is None:
        name = "repro.md" if args.profile is None else f"repro_{args.profile}.md"
        args.out = ROOT / "benchmarks" / "results" / name
    tmp = Path(tempfile.mkdtemp(prefix="vadbench-repro-"))
    project = tmp / "clone"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True, text=True)
        if args.profile is not None:
            subprocess.run([str(BIN / "vadbench"), "profile", args.profile], cwd=project, check=True)
        load = os.getloadavg()[0]
        cpu_before = _children_cpu_seconds()
        total, stages = run_repro(project)
        cpu = _children_cpu_seconds() - cpu_before
        load_end = os.getloadavg()[0]
        lines = [
            f"# Whole `dvc repro`: {'default params.yaml' if args.profile is None else f'profile {args.profile}'}\n",
            f"Generated by `benchmarks/bench_repro.py` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit "
            f"{commit.stdout.strip()}, {os.cpu_count()} CPU(s) ({_cpu_name()}), load average {load:.1f} at start and "
            f"{load_end:.1f} at the end. A fresh clone (empty `data/`, no DVC cache); installation not included.\n",
            f"**Total: {total / 60:.1f} min ({total:.0f} s)** for {len(stages)} stages; the run used {cpu:.0f} CPU-seconds "
            f"(user + system of every process it started: a load-independent check on the wall time).\n",
            "| stage | wall s |",
            "|---|---|",
            *[f"| {name} | {sec:.1f} |" for name, sec in stages],
            "\n## Cells (quality: metrics/summary.json; seconds and memory: this run's metrics/measured/{fit,score}/)\n",
            "| dataset | model | backbone | image AUROC | pixel AUROC | fit s | latency ms | fit peak RSS MB | params M |",
            "|---|---|---|---|---|---|---|---|---|",
            *cell_rows(project),
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    finally:
        if args.keep:
            print(f"kept {project}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
