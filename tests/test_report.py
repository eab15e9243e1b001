"""Aggregate: leaderboard rows, Δ-tables, summary files and figures from per-cell outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vadbench.io import read_rows, release_rows
from vadbench.layout import measured_fit, measured_score
from vadbench.metrics.cost import PeakMemory
from vadbench.report.aggregate import Cell, aggregate
from vadbench.report.gallery import pick_gallery_cases, render_gallery
from vadbench.report.leaderboard import delta_table


def _write_cell(scores_dir: Path, cell: Cell, image_auroc: float, pixel_auroc: float | None) -> None:
    d = scores_dir / cell.name
    measured = scores_dir.parent / "measured"
    d.mkdir(parents=True)
    metrics = {
        "image_auroc": image_auroc,
        "image_aupr": 0.5,
        "image_f1_max": 0.6,
        "image_f1": 0.4,
        "pixel_auroc": pixel_auroc,
        "pixel_aupr": None if pixel_auroc is None else 0.3,
        "pixel_f1_max": None if pixel_auroc is None else 0.35,
        "pixel_aupro": None if pixel_auroc is None else 0.7,
        "image_size": 128,
        "center_crop": None,
        "seeds": [0],
        "parameters": 1000,
        "model_bytes": 2000,
    }
    if pixel_auroc is None:
        metrics["na_reasons"] = {"pixel_auroc": "image-level method: no pixel anomaly maps"}
    (d / "metrics.json").write_text(json.dumps(metrics))
    fit = {"0": {"fit_seconds": 1.5, "fit_peak_rss_mb": 500.0, "device": "cpu"}}
    score = {"latency_ms": 3.0, "throughput_ips": 100.0, "score_peak_rss_mb": 400.0, "device": "cpu"}
    for path, obj in ((measured_fit(measured, cell.name), fit), (measured_score(measured, cell.name), score)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))
    pd.DataFrame({"fpr": [0, 0.5, 1], "tpr": [0, 0.9, 1]}).to_csv(d / "roc.csv", index=False)
    pd.DataFrame({"recall": [0, 0.5, 1], "precision": [1, 0.9, 0.5]}).to_csv(d / "pr.csv", index=False)


@pytest.fixture()
def cells(tmp_path):
    spec = [
        (Cell("sem", "patchcore", "fractal", "fractal"), 0.95, 0.97),
        (Cell("sem", "patchcore", "random", "random"), 0.85, 0.90),
        (Cell("sem", "panda", "fractal", "fractal"), 0.80, None),
        (Cell("sem", "panda", "random", "random"), 0.70, None),
    ]
    for cell, a, b in spec:
        _write_cell(tmp_path / "scores", cell, a, b)
    return [c for c, _, _ in spec]


def test_aggregate_writes_leaderboard_and_deltas(tmp_path, cells):
    quality = aggregate(
        cells,
        scores_dir=tmp_path / "scores",
        metrics_dir=tmp_path / "metrics",
        reports_dir=tmp_path / "reports",
        measured_dir=tmp_path / "measured",
    )
    assert len(quality) == 4
    lb = pd.read_csv(tmp_path / "metrics" / "leaderboard.csv")
    assert list(lb[["model", "backbone"]].itertuples(index=False, name=None)) == [
        ("panda", "fractal"),
        ("panda", "random"),
        ("patchcore", "fractal"),
        ("patchcore", "random"),
    ]
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert summary["sem"]["patchcore"]["fractal"]["image_auroc"] == 0.95
    assert summary["sem"]["panda"]["random"]["pixel_auroc"] is None
    md = (tmp_path / "metrics" / "leaderboard.md").read_text()
    assert "fractal − random" in md and "n/a" in md and "image-level method" in md
    deltas = delta_table(quality)
    pc = deltas[deltas["model"] == "patchcore"].iloc[0]
    assert pc["image_auroc"] == pytest.approx(0.10) and pc["pixel_auroc"] == pytest.approx(0.07)
    assert pd.isna(deltas[deltas["model"] == "panda"].iloc[0]["pixel_auroc"])
    for png in ("leaderboard.png", "curves.png"):
        assert (tmp_path / "reports" / png).stat().st_size > 1000
    # measurements stay out of the deterministic files; they land in the measured dir
    assert "fit_seconds" not in md and "latency" not in (tmp_path / "metrics" / "leaderboard.csv").read_text()
    costs = json.loads((tmp_path / "measured" / "costs.json").read_text())
    assert costs["sem"]["patchcore"]["fractal"]["fit_seconds"] == 1.5
    assert costs["sem"]["patchcore"]["fractal"]["parameters"] == 1000
    assert "| patchcore | fractal | 1.5 |" in (tmp_path / "measured" / "costs.md").read_text()


def test_aggregate_is_byte_identical_when_rerun(tmp_path, cells):
    outputs = []
    for run in ("a", "b"):
        aggregate(
            cells,
            scores_dir=tmp_path / "scores",
            metrics_dir=tmp_path / run,
            reports_dir=tmp_path / f"r{run}",
            measured_dir=tmp_path / f"m{run}",
        )
        outputs.append(
            {p.name: p.read_bytes() for p in [*(tmp_path / run).iterdir(), *(tmp_path / f"r{run}").iterdir()]}
        )
    assert outputs[0] == outputs[1]


def test_missing_cell_names_the_stage(tmp_path, cells):
    extra = Cell("sem", "padim", "random", "random")
    with pytest.raises(FileNotFoundError, match="score@sem-padim-random"):
        aggregate(
            [*cells, extra],
            scores_dir=tmp_path / "scores",
            metrics_dir=tmp_path / "m",
            reports_dir=tmp_path / "r",
            measured_dir=tmp_path / "measured",
        )


def test_gallery_picks_false_alarms_misses_and_typical_hits(tmp_path):
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.5, 0.95])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    groups = dict(pick_gallery_cases(scores, labels, per_group=2))
    assert groups["highest-scored normals"] == [1, 2]
    assert groups["lowest-scored defects"] == [4, 5]
    assert set(groups["typical defects"]).isdisjoint(groups["lowest-scored defects"])
    rng = np.random.default_rng(0)
    images = rng.random((7, 1, 32, 32)).astype(np.float32)
    masks = np.zeros((7, 32, 32), np.uint8)
    masks[3:, 10:20, 10:20] = 1
    out = tmp_path / "g.png"
    render_gallery(images, masks, rng.random((7, 32, 32)), scores, labels, out, per_group=2, title="t")
    first = out.read_bytes()
    render_gallery(images, masks, rng.random((7, 32, 32)) * 0 + 1, scores, labels, out, per_group=2, title="t")
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and out.read_bytes() != first


def test_gallery_of_a_memory_mapped_split_keeps_it_out_of_memory(tmp_path):
    """The colour scale samples every k-th map: read through a strided view of the memmap, that made the
    whole file resident (1.0× its size, kernel folios around each access); read row by row it stays small."""
    n, side = 2048, 128  # 128 MiB of maps; the colour scale samples 256 of them
    maps = np.lib.format.open_memmap(tmp_path / "maps.npy", mode="w+", dtype=np.float32, shape=(n, side, side))
    for s in range(0, n, 32):  # written as score_cell writes it: batch by batch, released once written
        maps[s : s + 32] = np.random.default_rng(s).random((min(32, n - s), side, side), dtype=np.float32)
        release_rows(maps, s, s + 32)
    scores = np.random.default_rng(0).random(n)
    labels = (np.arange(n) % 10 == 0).astype(np.int64)
    images, masks = np.zeros((n, 1, side, side), np.float32), np.zeros((n, side, side), np.uint8)
    warm = np.zeros((2, side, side), np.float32)  # matplotlib's own first-use memory, outside the measurement
    render_gallery(images[:2], masks[:2], warm, scores[:2], np.array([0, 1]), tmp_path / "warm.png", per_group=1)
    with PeakMemory() as mem:
        render_gallery(images, masks, maps, scores, labels, tmp_path / "g.png", per_group=2)
    assert mem.method == "vmhwm"  # the kernel's exact peak, not a sampled one
    ratio = mem.peak_rss_delta_bytes / maps.nbytes
    assert ratio < 0.4, f"gallery peak above start = {ratio:.2f}× the maps file"


def test_read_rows_copies_exactly_the_asked_rows_of_a_memmap_and_of_an_array(tmp_path):
    data = np.arange(10 * 3 * 4, dtype=np.float32).reshape(10, 3, 4)
    mm = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float32, shape=data.shape)
    mm[:] = data
    for source in (mm, data):
        got = read_rows(source, [7, 0, 7, 9])
        assert got.dtype == np.float32 and not isinstance(got, np.memmap)
        np.testing.assert_array_equal(got, data[[7, 0, 7, 9]])
    assert read_rows(mm, []).shape == (0, 3, 4)
