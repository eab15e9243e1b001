"""Greedy-coreset speed and peak memory, plus PatchCore / PaDiM fit and predict times.

    .venv/bin/python benchmarks/bench_coreset.py              # full run → benchmarks/results/coreset.md
    .venv/bin/python benchmarks/bench_coreset.py --quick      # small sizes, prints only

Each coreset measurement runs in its own child process, so peak RSS (VmHWM, reset through
/proc/self/clear_refs right before selection) belongs to that selection alone; a sampler thread
reads VmRSS while it runs to show whether memory grows with the iterations. The "naive" variant
grows a (N, 2) tensor with torch.cat every pick, the pattern of the official code, for comparison.
Two feature sets: "gaussian" (unstructured: our selection's pruning finds little to skip and takes its
full-pass fallback) and "clustered" (256 centres plus small noise, closer to patch features of repeating
textures, where a pick can get closer to few rows and the pruned path reads only those).
Timings on this shared 2-core machine are noisy: every figure is a median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _naive_greedy(points, n_select: int):
    """Per-pick allocations (cat + min), as in the official approximate greedy sampler."""
    import torch

    current = torch.cdist(points, points[:10]).mean(1, keepdim=True)
    picks = []
    for _ in range(n_select):
        i = int(torch.argmax(current))
        picks.append(i)
        current = torch.cat([current, torch.cdist(points, points[i : i + 1])], dim=1).min(dim=1, keepdim=True).values
    return picks


def _features(n: int, dim: int, data: str):
    """(n, dim) float32, seeded: "gaussian" N(0, I), or "clustered" (256 N(0, I) centres + N(0, 0.1²) noise)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    if data == "clustered":
        centres = torch.randn(256, dim, generator=gen)
        return centres[torch.randint(256, (n,), generator=gen)] + 0.1 * torch.randn(n, dim, generator=gen)
    if data != "gaussian":
        raise ValueError(f"unknown feature set {data!r}: gaussian | clustered")
    return torch.randn(n, dim, generator=gen)


def child(n: int, dim: int, ratio: float, threads: int, variant: str, data: str) -> dict:
    """One measurement (runs in a fresh process): returns timings and RSS figures in MB."""
    import torch

    from vadbench.models.components.coreset import coreset_size, greedy_coreset_indices, random_projection

    torch.set_num_threads(threads)
    feats = _features(n, dim, data)
    m = coreset_size(n, ratio)
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            samples.append(_rss_mb())

    rss_before = _rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: peak from here on
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "ours":
        greedy_coreset_indices(feats, m, torch.Generator().manual_seed(0))
    else:
        _naive_greedy(random_projection(feats, 128, torch.Generator().manual_seed(0)), m)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    done.set()
    sampler.join()
    q = len(samples) // 4 or 1
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "ms_per_pick": 1e3 * seconds / m,
        "picks": m,
        "rss_before_mb": rss_before,
        "peak_delta_mb": _rss_mb("VmHWM") - rss_before,
        "rss_first_quarter_mb": statistics.median(samples[:q]) if samples else rss_before,
        "rss_last_quarter_mb": statistics.median(samples[-q:]) if samples else rss_before,
    }


def run_child(args: list[str], timeout: float) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_models(repeats: int, sizes: list[tuple[int, int, int]], threads: int) -> list[dict]:
    """Fit seconds and predict latency (batch and per image) on toy line images with a random resnet18."""
    import tempfile

    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_toy_defect_data

    from vadbench.backbones import load_feature_extractor, materialize_backbone
    from vadbench.models import create_model, model_class

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bdir = Path(tmp) / "random"
        materialize_backbone(bdir, arch="resnet18", init="random", seed=0)
        for n_train, n_test, size in sizes:
            train, test, _, _ = make_toy_defect_data(n_train=n_train, n_test=n_test, size=size)
            for name in ("patchcore", "padim"):
                fe = load_feature_extractor(bdir, layers=model_class(name).Params().layers)
                fit_s, pred_s, one_s, fit_c, pred_c = [], [], [], [], []
                fe(test[:2])  # warm-up: first-call allocations are not part of the method's cost
                for _ in range(repeats):
                    model = create_model(name, backbone=fe)
                    t, c = time.perf_counter(), time.process_time()
                    report = model.fit(train)
                    fit_s.append(time.perf_counter() - t)
                    fit_c.append(time.process_time() - c)
                    t, c = time.perf_counter(), time.process_time()
                    for i in range(0, len(test), 16):  # predict takes one batch (the score stage's batches)
                        model.predict(test[i : i + 16])
                    pred_s.append(time.perf_counter() - t)
                    pred_c.append(time.process_time() - c)
                    t = time.perf_counter()
                    for i in range(5):
                        model.predict(test[i : i + 1])
                    one_s.append((time.perf_counter() - t) / 5)
                rows.append(
                    {
                        "model": name,
                        "images": f"{n_train} train / {n_test} test, {size}²",
                        "fit_s": statistics.median(fit_s),
                        "predict_s": statistics.median(pred_s),
                        "fit_cpu_s": statistics.median(fit_c),
                        "predict_cpu_s": statistics.median(pred_c),
                        "latency_ms": 1e3 * statistics.median(one_s),
                        "report": report,
                    }
                )
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=6, metavar=("N", "DIM", "RATIO", "THREADS", "VARIANT", "DATA"))
    ap.add_argument("--quick", action="store_true", help="small sizes, no results file")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads for the coreset runs")
    ap.add_argument("--model-threads", type=int, default=1, help="torch threads for the model timings")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "coreset.md")
    a = ap.parse_args()
    if a.child:
        n, dim, ratio, threads, variant, data = a.child
        print(json.dumps(child(int(n), int(dim), float(ratio), int(threads), variant, data)))
        return

    n, dim, ratio = (5000, 1536, 0.1) if a.quick else (50000, 1536, 0.1)
    naive_n = 5000 if a.quick else 20000
    lines = [
        "# Greedy coreset and PatchCore / PaDiM costs",
        "",
        f"Generated by `benchmarks/bench_coreset.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine: "
        f"medians of {a.repeats} runs, alternating settings).",
        "",
        "## Coreset selection (features N×D, 10 %, JL projection to 128 dims)",
        "",
        "| variant | features | N × D | torch threads | picks | wall s | CPU s | ms/pick (wall) | RSS before (MB) "
        "| peak Δ RSS (MB) | RSS 1st quarter → last quarter (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    configs = [
        *[("ours", data, n, t) for data in ("gaussian", "clustered") for t in a.threads],
        *[("naive", data, naive_n, 1) for data in ("gaussian", "clustered")],
    ]
    results: dict[tuple, list[dict]] = {c: [] for c in configs}
    for _ in range(a.repeats):
        for variant, data, size, threads in configs:  # alternate, so a slow spell hits every setting
            results[(variant, data, size, threads)].append(
                run_child([str(size), str(dim), str(ratio), str(threads), variant, data], 1800)
            )
    for (variant, data, size, threads), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lines.append(
            f"| {variant} | {data} | {size}×{dim} | {threads} | {int(med['picks'])} | {med['seconds']:.1f} "
            f"| {med['cpu_seconds']:.1f} | {med['ms_per_pick']:.2f} "
            f"| {med['rss_before_mb']:.0f} | {med['peak_delta_mb']:.0f} "
            f"| {med['rss_first_quarter_mb']:.0f} → {med['rss_last_quarter_mb']:.0f} |"
        )
        print(lines[-1], flush=True)
    sizes = [(24, 16, 64)] if a.quick else [(24, 16, 64), (100, 80, 128)]
    rows = bench_models(a.repeats, sizes, a.model_threads)
    lines += [
        "",
        f"## Models on toy line images (random resnet18, default params, {a.model_threads} torch thread(s))",
        "",
        "| model | data | fit wall (CPU) s | predict all (batches of 16) wall (CPU) s | batch-1 latency wall (ms) | fit report |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['images']} | {r['fit_s']:.2f} ({r['fit_cpu_s']:.2f}) | {r['predict_s']:.2f} ({r['predict_cpu_s']:.2f}) "
        f"| {r['latency_ms']:.1f} | "
        f"`{json.dumps(r['report'])}` |"
        for r in rows
    ]
    lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}.")
    if not a.quick:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {a.out}")
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
