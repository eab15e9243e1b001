"""Summaries and the markdown tables of the peer benchmark (pure python: the tests import it)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

SIDES = ("ours", "anomalib")
# (key in a run record, column title, digits, lower is better)
COLUMNS = (
    ("fit_s", "fit s", 1, True),
    ("fit_s_per_epoch", "fit s/epoch", 2, True),
    ("score_s", "score s", 2, True),
    ("latency_ms", "latency ms", 1, True),
    ("peak_mib", "peak RSS MiB", 0, True),
    ("image_auroc", "image AUROC", 3, False),
    ("pixel_auroc", "pixel AUROC", 3, False),
    ("pixel_aupro", "AUPRO", 3, False),
)
TIMED = {"fit_s", "fit_s_per_epoch", "score_s", "latency_ms", "peak_mib"}


def alternation(n: int) -> list[str]:
    """A B A B …: the side of each of 2n runs, ours first."""
    if n < 1:
        raise ValueError(f"need at least one run per side, got {n}")
    return [SIDES[i % 2] for i in range(2 * n)]


def run_seeds(n: int, base: int) -> list[int]:
    """The model seed of each run of `alternation(n)`: a side's k-th run uses base + k, so each side's accuracy
    is a median over n seeds (the same n seeds on both sides), not one seed's luck."""
    return [base + i // len(SIDES) for i in range(len(SIDES) * n)]


def summarize(values: Sequence[float | None]) -> dict[str, float] | None:
    """Median, min, max of the defined values (None when there are none)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio(ours: dict[str, float] | None, theirs: dict[str, float] | None) -> float | None:
    """ours / anomalib of the medians (None if either is missing or anomalib's is 0)."""
    if ours is None or theirs is None or theirs["median"] == 0:
        return None
    return ours["median"] / theirs["median"]


def _cell(s: dict[str, float] | None, digits: int) -> str:
    if s is None:
        return "n/a"
    text = f"{s['median']:.{digits}f}"
    if s["n"] > 1:
        text += f" ({s['min']:.{digits}f}–{s['max']:.{digits}f})"
    return text


def model_rows(model: str, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Three table rows (ours, anomalib, ratio) of one model from its per-side run records."""
    stats = {side: {key: summarize([r.get(key) for r in runs.get(side, [])]) for key, *_ in COLUMNS} for side in SIDES}
    lines = []
    for side in SIDES:
        n = len(runs.get(side, []))
        cells = [_cell(stats[side][key], d) for key, _, d, _ in COLUMNS]
        lines.append(f"| {model if side == 'ours' else ''} | {side} ({n}) | " + " | ".join(cells) + " |")
    ratios = []
    for key, _, _, _ in COLUMNS:
        r = ratio(stats["ours"][key], stats["anomalib"][key])
        if r is None:
            ratios.append("n/a")
        elif key in TIMED:
            ratios.append(f"{r:.2f}×")
        else:  # accuracy: the difference in points is what the targets are stated in
            diff = 100 * (stats["ours"][key]["median"] - stats["anomalib"][key]["median"])
            ratios.append(f"{diff:+.1f} pt")
    lines.append("| | ours / anomalib | " + " | ".join(ratios) + " |")
    return lines


def results_table(per_model: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    head = "| model | side (runs) | " + " | ".join(title for _, title, _, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for model, runs in per_model.items():
        lines += model_rows(model, runs)
    return lines


def aupro_table(rows: list[dict[str, Any]]) -> list[str]:
    """rows: {model, side, ours_aupro, anomalib_aupro} on identical maps."""
    lines = [
        "| model | maps from | our AUPRO@0.3 | anomalib AUPRO@0.3 | anomalib − ours |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r.get("ours_aupro"), r.get("anomalib_aupro")
        diff = f"{b - a:+.1e}" if a is not None and b is not None else "n/a"
        fa = f"{a:.4f}" if a is not None else "n/a"
        fb = f"{b:.4f}" if b is not None else "n/a"
        lines.append(f"| {r['model']} | {r['side']} | {fa} | {fb} | {diff} |")
    return lines


def targets(per_model: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """The issue's targets, met or not, from the medians (PatchCore: fit ≥ 5× faster, RSS ≤ 0.6×, AUROC ±1 pt;
    trained models: fit s/epoch not slower, AUROC ±2 pt)."""
    out = []
    for model, runs in per_model.items():
        s = {side: {k: summarize([r.get(k) for r in runs.get(side, [])]) for k, *_ in COLUMNS} for side in SIDES}
        checks = []
        tol = 1.0 if model == "patchcore" else 2.0
        for key in ("image_auroc", "pixel_auroc"):
            if s["ours"][key] and s["anomalib"][key]:
                d = 100 * (s["ours"][key]["median"] - s["anomalib"][key]["median"])
                checks.append(f"{key} {d:+.1f} pt {'✓' if d >= -tol else '✗'} (≥ −{tol:g})")
        if model == "patchcore":
            r = ratio(s["ours"]["fit_s"], s["anomalib"]["fit_s"])
            if r:
                checks.append(f"fit {1 / r:.1f}× faster {'✓' if 1 / r >= 5 else '✗'} (≥ 5×)")
            r = ratio(s["ours"]["peak_mib"], s["anomalib"]["peak_mib"])
            if r:
                checks.append(f"peak RSS {r:.2f}× {'✓' if r <= 0.6 else '✗'} (≤ 0.6×)")
        else:
            r = ratio(s["ours"]["fit_s_per_epoch"], s["anomalib"]["fit_s_per_epoch"])
            if r is None:
                r = ratio(s["ours"]["fit_s"], s["anomalib"]["fit_s"])
            if r:
                checks.append(f"fit time {r:.2f}× anomalib's {'✓' if r <= 1 else '✗'} (≤ 1×)")
        out.append(f"- {model}: " + "; ".join(checks))
    return out
