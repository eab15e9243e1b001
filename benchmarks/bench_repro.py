"""Wall time of the whole default `dvc repro`, per stage, plus every cell's fit time, latency and memory.

    .venv/bin/python benchmarks/bench_repro.py                  # default grid → benchmarks/results/repro.md
    .venv/bin/python benchmarks/bench_repro.py --profile full   # every model → benchmarks/results/repro_full.md
    .venv/bin/python benchmarks/bench_repro.py --profile full --workdir build/repro-full   # resumable

Clones the committed HEAD into a temporary directory (empty `data/`, no DVC cache), runs `dvc repro`
there with this checkout's virtual environment and the clone's own sources first on `PYTHONPATH`, and
timestamps each "Running stage" line of DVC's output. The issue's budget is "the whole default run
≤ 10 minutes on 2 cores" for the default: this is the measurement, on whatever machine runs it. With
`--profile NAME` the clone first switches to profiles/NAME.yaml (`vadbench profile NAME`).

The full profile takes hours on 2 cores: with `--workdir DIR` the clone stays in DIR and every finished
stage's time is appended to DIR/stages.jsonl, and the report is rewritten after each stage (marked
incomplete until `dvc repro` ends). Running the same command again resumes: DVC skips the stages
already done in that clone, and a stage that was interrupted runs again from its start.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def repro_env(project: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(project / "src"),
        "HF_HUB_OFFLINE": "1",
    }
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the Makefile
    return env


def run_repro(project: Path, on_stage_done: Callable[[str, float], None]) -> None:
    """Run `dvc repro` in `project`, calling `on_stage_done(stage, seconds)` as each stage ends.

    A stage ends when DVC starts the next one (or exits): the seconds include DVC's own bookkeeping after it."""
    start = time.perf_counter()
    current: tuple[str, float] | None = None
    with subprocess.Popen(
        ["dvc", "repro"],
        cwd=project,
        env=repro_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("Running stage '"):
                now = time.perf_counter()
                if current is not None:
                    on_stage_done(current[0], now - current[1])
                current = (line.split("'")[1], now)
                print(f"[{now - start:7.1f} s] {current[0]}", flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"dvc repro failed in {project} (exit {proc.returncode}); stages timed so far are kept")
    if current is not None:
        on_stage_done(current[0], time.perf_counter() - current[1])


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


def stage_count(project: Path) -> int | None:
    """How many stages the expanded dvc.yaml holds (what a fresh `dvc repro` runs), or None if DVC cannot say."""
    res = subprocess.run(
        ["dvc", "stage", "list", "--all"], cwd=project, env=repro_env(project), capture_output=True, text=True
    )
    return len([line for line in res.stdout.splitlines() if line.strip()]) if res.returncode == 0 else None


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_atomic(path: Path, text: str) -> None:
    from vadbench.io import atomic_file

    with atomic_file(path, "w") as fh:
        fh.write(text)


def save_log(path: Path, log: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in log))


def _load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def report(project: Path, profile: str | None, log: list[dict], n_stages: int | None, finished: bool) -> str:
    """The results page from the run log (every invocation's stage times; the last time of a stage counts)."""
    from vadbench.machine import cpu_model

    runs = [r for r in log if r["kind"] == "run"]
    times: dict[str, float] = {}
    for r in log:
        if r["kind"] == "stage":
            times[r["stage"]] = r["seconds"]
    total = sum(times.values())
    cpu = [r.get("cpu_seconds") for r in runs]
    first, last = runs[0], runs[-1]
    lines = [
        f"# Whole `dvc repro`: {'default params.yaml' if profile is None else f'profile {profile}'}\n",
        f"Generated by `benchmarks/bench_repro.py`, started {first['utc']} UTC, commit {first['commit']}, "
        f"{os.cpu_count()} CPU(s) ({cpu_model()}), load average {_load(first.get('load1'))} at the start"
        + (f" and {last['load1_end']:.1f} at the end" if finished and "load1_end" in last else "")
        + ". A fresh clone (empty `data/`, no DVC cache); installation not included.\n",
    ]
    if len(runs) > 1:
        lines.append(
            f"Run in {len(runs)} invocations (`--workdir`: each resumed `dvc repro` in the same clone, which skips the "
            "stages already done); a stage interrupted mid-way was rerun whole and only its complete time counts.\n"
        )
    of = "" if n_stages is None else f" of {n_stages}"
    if finished:
        cpu_text = (
            f"; the run used {sum(cpu):.0f} CPU-seconds (user + system of every process it started: a "
            "load-independent check on the wall time)"
            if all(c is not None for c in cpu)
            else "; CPU-seconds not known (an invocation was interrupted)"
        )
        lines.append(f"**Total: {total / 60:.1f} min ({total:.0f} s)** for {len(times)}{of} stages{cpu_text}.\n")
    else:
        lines.append(
            f"**Incomplete: {len(times)}{of} stages timed so far, {total / 60:.1f} min ({total:.0f} s)**; the run has "
            "not finished (rerun with the same `--workdir` to go on).\n"
        )
    lines += ["| stage | wall s |", "|---|---|", *[f"| {name} | {sec:.1f} |" for name, sec in times.items()]]
    if finished:
        lines += [
            "\n## Cells (quality: metrics/summary.json; seconds and memory: this run's metrics/measured/{fit,score}/)\n",
            "| dataset | model | backbone | image AUROC | pixel AUROC | fit s | latency ms | fit peak RSS MB | params M |",
            "|---|---|---|---|---|---|---|---|---|",
            *cell_rows(project),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None, help="run profiles/<name>.yaml instead of params.yaml (e.g. full)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/repro.md or results/repro_<profile>.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="clone into DIR/clone and keep it, with the stage times in DIR/stages.jsonl; if DIR already holds a "
        "clone, resume its run (DVC skips finished stages). The report is rewritten after every stage.",
    )
    args = ap.parse_args()
    if args.out is None:
        name = "repro.md" if args.profile is None else f"repro_{args.profile}.md"
        args.out = ROOT / "benchmarks" / "results" / name
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vadbench-repro-"))
    project, log_path = work / "clone", work / "stages.jsonl"
    resume = args.workdir is not None and (project / "dvc.yaml").is_file()
    try:
        if resume:
            wanted = f"profiles/{args.profile}.yaml" if args.profile else "the committed params.yaml"
            expected = (
                (project / "profiles" / f"{args.profile}.yaml").read_bytes()
                if args.profile
                else subprocess.run(
                    ["git", "show", "HEAD:params.yaml"], cwd=project, capture_output=True, check=True
                ).stdout
            )
            if (project / "params.yaml").read_bytes() != expected:
                raise SystemExit(
                    f"{project}/params.yaml is not {wanted}: resume with the --profile it was started with"
                )
        else:
            subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
            if args.profile is not None:
                subprocess.run([str(BIN / "vadbench"), "profile", args.profile], cwd=project, check=True)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True, text=True, check=True
        ).stdout.strip()
        n_stages = stage_count(project)
        run = {
            "kind": "run",
            "utc": f"{datetime.now(UTC):%Y-%m-%d %H:%M}",
            "commit": commit,
            "load1": os.getloadavg()[0],
        }
        log = [*read_log(log_path), run]
        save_log(log_path, log)

        def stage_done(stage: str, seconds: float) -> None:
            log.append({"kind": "stage", "stage": stage, "seconds": seconds})
            save_log(log_path, log)
            write_atomic(args.out, report(project, args.profile, log, n_stages, finished=False))

        cpu_before = _children_cpu_seconds()
        run_repro(project, stage_done)
        run.update(cpu_seconds=_children_cpu_seconds() - cpu_before, load1_end=os.getloadavg()[0])
        save_log(log_path, log)
        text = report(project, args.profile, log, n_stages, finished=True)
        print(text)
        write_atomic(args.out, text)
    finally:
        if args.keep or args.workdir is not None:
            print(f"kept {project}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
