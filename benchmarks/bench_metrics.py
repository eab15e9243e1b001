"""Speed and memory of the exact pixel metrics on a realistic test set; writes benchmarks/results/metrics.md.

Target (issue 6): all pixel metrics for 1,000 maps of 256x256 (65.5 M pixels) in <= 20 s and <= 2 GiB
peak RSS on the 2-core CPU machine. Each measurement runs in a fresh process so its peak RSS (kernel
VmHWM, inputs included) is its own; configurations alternate and repeat, medians are reported.

    .venv/bin/python benchmarks/bench_metrics.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

RESULTS = Path(__file__).parent / "results" / "metrics.md"


def make_data(n: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """maps (n, size, size) float32, masks (n, size, size) uint8: every other image has 1-4 random blobs
    covering ~1-3 % of its pixels; maps are smooth (upsampled 32x32 noise, like a feature-map model) with
    fine noise, and higher inside blobs."""
    rng = np.random.default_rng(seed)
    maps = np.empty((n, size, size), np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        low = rng.random((size // 8, size // 8)).astype(np.float32)
        maps[i] = ndimage.zoom(low, 8, order=1) + 0.05 * rng.random((size, size), dtype=np.float32)
        if i % 2:
            target = rng.uniform(0.01, 0.03) * size * size
            for _ in range(rng.integers(1, 5)):
                r = np.sqrt(target / rng.integers(1, 5) / np.pi) * rng.uniform(0.7, 1.3)
                cy, cx = rng.integers(0, size, 2)
                blob = ((yy - cy) / r) ** 2 + ((xx - cx) / (r * rng.uniform(0.5, 1.5))) ** 2 <= 1
                masks[i][blob] = 1
            maps[i] += masks[i] * rng.uniform(0.2, 0.8)
    return maps, masks


def child(n: int, chunk: int, check: bool) -> None:
    from vadbench.metrics import pixel_metrics
    from vadbench.metrics.cost import PeakMemory

    maps, masks = make_data(n)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        got = pixel_metrics(maps, masks, fpr_limit=0.3, chunk_pixels=chunk)
        seconds = time.perf_counter() - t0
    out = {
        "seconds": seconds,
        "peak_rss": mem.peak_rss_bytes,
        "delta_rss": mem.peak_rss_delta_bytes,
        "defect_frac": float(masks.mean()),
        "metrics": got,
    }
    if check:  # the same numbers from scikit-learn on the flattened arrays, and its cost
        from sklearn.metrics import average_precision_score, roc_auc_score

        t0 = time.perf_counter()
        ref = {
            "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
            "pixel_aupr": average_precision_score(masks.ravel(), maps.ravel()),
        }
        out["sklearn_seconds"] = time.perf_counter() - t0
        out["max_abs_diff_vs_sklearn"] = max(abs(got[k] - v) for k, v in ref.items())
    print(json.dumps(out))


def run_child(n: int, chunk: int, check: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), str(chunk)] + (["--check"] if check else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="100 images only (smoke run)")
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, check=args.check)
        return

    n_full = 100 if args.quick else 1000
    from vadbench.metrics.pixel import DEFAULT_CHUNK_PIXELS

    configs = [(n_full, DEFAULT_CHUNK_PIXELS), (n_full, 1 << 21), (n_full, 1 << 26)]
    load_before = os.getloadavg()
    runs: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeats):  # alternate configurations so load bursts hit all of them
        for c in configs:
            runs[c].append(run_child(*c))
    check = run_child(100, DEFAULT_CHUNK_PIXELS, check=True)
    load_after = os.getloadavg()

    gib = 1024**3
    lines = [
        "# Pixel metrics: speed and memory",
        "",
        f"Exact pixel AUROC, AP, F1-max and AUPRO@0.3 (`vadbench.metrics.pixel_metrics`) on synthetic maps "
        f"256x256, every other image with blobs (defect fraction of all pixels "
        f"{runs[configs[0]][0]['defect_frac']:.4f}). Fresh process per run; peak RSS = kernel VmHWM during "
        f"the call, inputs ({n_full} x 256 x 256 float32 maps + uint8 masks) included. "
        f"Median (min-max) of {args.repeats} alternating runs.",
        "",
        f"Machine: {os.cpu_count()} CPUs, shared with other jobs; load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f} (1 min).",
        "",
        "| images | pixels | chunk_pixels | seconds | peak RSS GiB | RSS added by call GiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for (n, chunk), rs in runs.items():
        sec = [r["seconds"] for r in rs]
        peak = np.median([r["peak_rss"] for r in rs]) / gib
        added = np.median([r["delta_rss"] for r in rs]) / gib
        lines.append(
            f"| {n} | {n * 65536 / 1e6:.1f} M | {chunk} | {np.median(sec):.2f} ({min(sec):.2f}-{max(sec):.2f}) "
            f"| {peak:.2f} | {added:.2f} |"
        )
    m = runs[configs[0]][0]["metrics"]
    lines += [
        "",
        f"Metrics of the default run: {json.dumps({k: v for k, v in m.items() if k != 'na_reasons'})}",
        "",
        f"Check on 100 images (6.6 M pixels): max |difference| to scikit-learn AUROC/AP "
        f"{check['max_abs_diff_vs_sklearn']:.1e}; ours {check['seconds']:.2f} s vs scikit-learn (AUROC + AP only) "
        f"{check['sklearn_seconds']:.2f} s.",
        "",
        "Target: <= 20 s and <= 2 GiB for 1,000 images.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
