"""benchmarks/bench_scale.py: the report of fitted-and-scored rows beside fit-only ones, and its ratios."""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _row(model: str, n: int, fit_s_per_image: float, peak: float, scored: bool) -> dict:
    score = {"score_s": 30.0, "score_s_per_image": 0.3, "score_peak_mib": 1300.0} if scored else {}
    return {
        "model": model,
        "n_train": n,
        "n_test": n // 10,
        "fit_s": fit_s_per_image * n,
        "fit_s_per_image": fit_s_per_image,
        "fit_peak_mib": peak,
        "score_s": None,
        "score_s_per_image": None,
        "score_peak_mib": None,
        "load1": 2.0,
        **score,
    }


def test_report_marks_unscored_rows_and_takes_ratios_largest_over_smallest_n(tmp_path):
    import bench_scale

    out = tmp_path / "scale.md"
    args = argparse.Namespace(image_size=256, epochs=1, threads=1, out=out)
    rows = [_row("patchcore", 1000, 0.100, 1600.0, True), _row("patchcore", 20000, 0.110, 1760.0, False)]
    bench_scale.write_report(args, rows)
    text = out.read_text()
    assert "| patchcore | 1000 | 100 | 100.0 ms | 1600 | 100 | 30 | 300.0 ms | 1300 | 2.0 |" in text
    assert "| patchcore | 20000 | 2200 | 110.0 ms | 1760 | 2000 | not run | — | — | 2.0 |" in text
    # peak 1760 / 1600 = 1.10, s/image 0.110 / 0.100 = 1.10, (1760 − 1600) / 19 thousand images = 8.4 MiB
    assert "| patchcore | 1.10 | 1.10 | 8.4 |" in text
    bench_scale.write_report(args, rows[:1])  # a second run appends under the same heading
    assert out.read_text().count("# Scale:") == 1 and out.read_text().count("1 torch thread(s)") == 2
