"""Time of the `aggregate` step over many cells; writes benchmarks/results/aggregate.md.

Target (issue 6): aggregate over 100 cells in <= 30 s on the 2-core CPU machine. Builds 100 cells'
score outputs (metrics.json, costs.json, 200-point ROC/PR curves) in a temp dir — 5 datasets ×
10 models × 2 backbones — then times `vadbench.report.aggregate.aggregate` end to end (tables,
summary files, both overview figures). Repeats and reports the median.

    .venv/bin/python benchmarks/bench_aggregate.py [--cells-per-dataset 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from vadbench.layout import measured_fit, measured_score
from vadbench.report.aggregate import Cell, aggregate

RESULTS = Path(__file__).parent / "results" / "aggregate.md"
MODELS = (
    "patchcore",
    "padim",
    "stfpm",
    "reverse_distillation",
    "fastflow",
    "cflow",
    "panda",
    "cutpaste",
    "sparse_ae",
    "deep_ae",
)


def make_cells(root: Path, n_datasets: int, rng: np.random.Generator) -> list[Cell]:
    cells = []
    for d in range(n_datasets):
        for model in MODELS:
            for backbone, init in (("random", "random"), ("fractal", "fractal")):
                cell = Cell(f"dataset{d}", model, backbone, init)
                out = root / cell.name
                out.mkdir(parents=True)
                quality = {
                    k: float(rng.uniform(0.5, 1.0))
                    for k in (
                        "image_auroc",
                        "image_aupr",
                        "image_f1_max",
                        "image_f1",
                        "pixel_auroc",
                        "pixel_aupr",
                        "pixel_f1_max",
                        "pixel_aupro",
                    )
                }
                (out / "metrics.json").write_text(
                    json.dumps(
                        {**quality, "seeds": [0], "image_size": 128, "parameters": 11_000_000, "model_bytes": 10**6}
                    )
                )
                fit = {"0": {"fit_seconds": 1.0, "fit_peak_rss_mb": 900.0, "device": "cpu"}}
                score = {"latency_ms": 5.0, "throughput_ips": 100.0, "score_peak_rss_mb": 800.0, "device": "cpu"}
                for path, obj in (
                    (measured_fit(root.parent / "measured", cell.name), fit),
                    (measured_score(root.parent / "measured", cell.name), score),
                ):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(obj))
                fpr = np.sort(rng.random(200))
                tpr = np.sort(rng.random(200))
                (out / "roc.csv").write_text("fpr,tpr\n" + "".join(f"{a:.6f},{b:.6f}\n" for a, b in zip(fpr, tpr)))
                (out / "pr.csv").write_text(
                    "recall,precision\n" + "".join(f"{a:.6f},{b:.6f}\n" for a, b in zip(tpr, 1 - fpr))
                )
                cells.append(cell)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cells = make_cells(root / "scores", args.datasets, np.random.default_rng(0))
        for r in range(args.repeats):
            start = time.perf_counter()
            aggregate(
                cells,
                scores_dir=root / "scores",
                metrics_dir=root / f"m{r}",
                reports_dir=root / f"r{r}",
                measured_dir=root / "measured",
            )
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    rows = [
        ("cells", str(len(cells))),
        ("repeats", str(args.repeats)),
        ("median seconds", f"{median:.2f}"),
        ("all runs (s)", ", ".join(f"{t:.2f}" for t in times)),
        ("load average at the end", f"{os.getloadavg()[0]:.1f} (2 cores)"),
        ("target", "≤ 30 s"),
        ("verdict", "met" if median <= 30 else "MISSED"),
    ]
    table = "| what | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# aggregate over many cells\n\n" + __doc__.split("\n\n")[1] + "\n\n" + table)


if __name__ == "__main__":
    main()
