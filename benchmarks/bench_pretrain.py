"""Pretraining throughput and AD feature-extraction speed on this CPU → benchmarks/results/pretrain.md.

    .venv/bin/python benchmarks/bench_pretrain.py [--repeats 3] [--out benchmarks/results/pretrain.md]

Every measurement runs in a fresh child process (thread count and OMP_WAIT_POLICY only take effect at
start-up); variants alternate within each repeat so a load spike hits all of them; figures are medians.
  * train: resnet18 SGD step (forward, backward, update) on random 3-channel crops, images/s;
  * extract: frozen resnet18 layer1..layer3 at 128 px (the AD image size), batch 16, images/s:
    eager vs channels_last alternating in one process (speed-up = median per-pair time ratio), and
    torch.compile once (compile time reported separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(kind: str, size: int, batch: int, variant: str, iters: int) -> dict:
    import timm
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size)
    info: dict = {"threads": torch.get_num_threads()}
    if kind == "train":
        model = timm.create_model("resnet18", num_classes=16)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        y = torch.randint(0, 16, (batch,))

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    elif variant == "pair":
        # eager vs channels_last alternating in one process: a load spike hits both, the ratio survives
        nets = {"eager": timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3)).eval()}
        nets["channels_last"] = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3)).eval()
        nets["channels_last"].load_state_dict(nets["eager"].state_dict())
        nets["channels_last"] = nets["channels_last"].to(memory_format=torch.channels_last)
        xs = {"eager": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
        times: dict[str, list[float]] = {k: [] for k in nets}
        with torch.no_grad():
            for i in range(2 + 2 * iters):
                for k in ("eager", "channels_last") if i % 2 else ("channels_last", "eager"):
                    t0 = time.perf_counter()
                    nets[k](xs[k])
                    if i >= 2:
                        times[k].append(time.perf_counter() - t0)
        ratio = statistics.median(a / b for a, b in zip(times["eager"], times["channels_last"]))
        return {
            **info,
            "images_per_s": batch / statistics.median(times["eager"]),
            "channels_last_images_per_s": batch / statistics.median(times["channels_last"]),
            "channels_last_speedup": ratio,
        }
    else:
        net = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3)).eval()
        if variant == "compile":
            t0 = time.perf_counter()
            net = torch.compile(net)
            with torch.no_grad():
                net(x)
            info["compile_s"] = time.perf_counter() - t0

        def step() -> None:
            with torch.no_grad():
                net(x)

    for _ in range(2):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {**info, "images_per_s": batch / statistics.median(times)}


def run_child(args: list[str], env_extra: dict[str, str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True, timeout=900, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


CASES = [  # (label, kind, size, batch, variant, env)
    ("train 56 px, 1 thread", "train", 56, 32, "eager", {"OMP_NUM_THREADS": "1"}),
    ("train 56 px, 2 threads", "train", 56, 32, "eager", {"OMP_NUM_THREADS": "2"}),
    (
        "train 56 px, 2 threads, OMP_WAIT_POLICY=PASSIVE",
        "train",
        56,
        32,
        "eager",
        {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    ),
    (
        "train 112 px, 2 threads, PASSIVE",
        "train",
        112,
        32,
        "eager",
        {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    ),
    (
        "extract 128 px eager (vs channels_last, alternating), 2 threads, PASSIVE",
        "extract",
        128,
        16,
        "pair",
        {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    ),
    (
        "extract 128 px torch.compile, 2 threads, PASSIVE (first repeat only)",
        "extract",
        128,
        16,
        "compile",
        {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pretrain.md")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "SIZE", "BATCH", "VARIANT"))
    a = ap.parse_args()
    if a.child:
        kind, size, batch, variant = a.child
        print(json.dumps(child(kind, int(size), int(batch), variant, a.iters)))
        return
    results: dict[str, list[dict]] = {c[0]: [] for c in CASES}
    load = []
    for r in range(a.repeats):
        for label, kind, size, batch, variant, env in CASES:
            if variant == "compile" and r > 0:
                continue  # ~3 min of compiling per run here; one figure is enough to decide
            load.append(os.getloadavg()[0])
            try:
                results[label].append(run_child([kind, str(size), str(batch), variant, "--iters", str(a.iters)], env))
            except subprocess.CalledProcessError as err:  # e.g. no C++ compiler for torch.compile
                results[label].append({"error": err.stderr.strip().splitlines()[-1][:120]})
            print(f"[{r + 1}/{a.repeats}] {label}: {results[label][-1]}", flush=True)
    lines = [
        "# Pretraining and feature-extraction throughput (CPU)",
        "",
        f"`benchmarks/bench_pretrain.py --repeats {a.repeats} --iters {a.iters}`, {platform.processor() or 'x86_64'}, "
        f"{os.cpu_count()} cores, torch {__import__('torch').__version__}. Shared machine: 1-min load average "
        f"{min(load):.1f}–{max(load):.1f} during the run (other jobs were running). Medians over repeats.",
        "",
        "| case | images/s (median) | all repeats | notes |",
        "|---|---:|---|---|",
    ]
    for label, rows in results.items():
        ok = [r["images_per_s"] for r in rows if "images_per_s" in r]
        notes = "; ".join(sorted({r["error"] for r in rows if "error" in r}))
        if any("channels_last_speedup" in r for r in rows):
            cl = [r["channels_last_images_per_s"] for r in rows if "channels_last_images_per_s" in r]
            sp = [r["channels_last_speedup"] for r in rows if "channels_last_speedup" in r]
            notes = (
                f"channels_last {statistics.median(cl):.1f} img/s; per-pair speed-up median "
                f"{statistics.median(sp):.2f}× ({', '.join(f'{v:.2f}' for v in sp)}) "
            ) + notes
        if any("compile_s" in r for r in rows):
            notes = f"compile {statistics.median(r['compile_s'] for r in rows if 'compile_s' in r):.0f} s " + notes
        med = f"{statistics.median(ok):.1f}" if ok else "n/a"
        lines.append(f"| {label} | {med} | {', '.join(f'{v:.1f}' for v in ok)} | {notes} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
