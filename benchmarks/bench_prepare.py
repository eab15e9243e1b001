"""Benchmark `prepare` on a synthetic 10,000-image `folder` dataset: wall time and peak memory.

    .venv/bin/python benchmarks/bench_prepare.py [--n 10000] [--size 256] [--workers 2] [--repeats 3]
                                                 [--out benchmarks/results/prepare.md]

The tree (normal/, abnormal/<type>/, masks/) is generated once into a temp dir (not timed). Each
repeat runs prepare in a fresh child process and reports its wall time and the main process's peak
RSS (VmHWM) after imports and after prepare — the difference is what prepare itself holds. The
decode workers (spawned, PIL + numpy only) each hold one image at a time. Reports the median wall
time, with the load average (the machine is shared: compare medians, not single runs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import sys, time
from pathlib import Path
from vadbench.data.params import FolderParams
from vadbench.data.prepare import prepare_dataset
src, out = Path(sys.argv[1]), Path(sys.argv[2])
spec = FolderParams(normal_dir=str(src / "normal"), abnormal_dir=str(src / "abnormal"), mask_dir=str(src / "masks"),
                    image_size=int(sys.argv[3]), val_fraction=0.1, test_normal_fraction=0.1)
def hwm_mib() -> float:
    # VmHWM (peak RSS of this process image); ru_maxrss would also count the pre-exec parent
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
base = hwm_mib()
t0 = time.perf_counter()
info = prepare_dataset("bench", spec, out_dir=out, seed=0, preview_png=None, progress=False, workers=int(sys.argv[4]))
wall = time.perf_counter() - t0
import resource
cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
          for f in ("ru_utime", "ru_stime"))  # the workers have exited: their CPU time is in CHILDREN
print(wall, info["n_images"], base, hwm_mib(), cpu)
"""


def make_tree(root: Path, n: int, size: int, seed: int = 0) -> None:
    """n images: 95% normal line textures, 5% with a bright blob (and its mask), all distinct."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    n_bad = n // 20
    for i in range(n):
        pitch = int(rng.integers(6, 14))
        img = 60 + 120 * (((xx + i) % pitch) < pitch // 2) + rng.integers(0, 20, (size, size))
        kind, folder = ("normal", root / "normal") if i >= n_bad else ("bad", root / "abnormal" / f"type{i % 3}")
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "bad":
            cy, cx, r = int(rng.integers(20, size - 20)), int(rng.integers(20, size - 20)), int(rng.integers(4, 12))
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img = np.where(blob, 250, img)
            mdir = root / "masks" / folder.name
            mdir.mkdir(parents=True, exist_ok=True)
            Image.fromarray((blob * 255).astype(np.uint8)).save(mdir / f"{i:05d}.png")
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:05d}.png", compress_level=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=256, help="source image side")
    ap.add_argument("--image-size", type=int, default=128, help="prepared image side")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="prepare's decode/encode processes")
    ap.add_argument("--out", type=Path, default=None, help="append a markdown row here")
    ap.add_argument("--src", type=Path, default=None, help="keep/reuse the generated tree here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        src = args.src or Path(tmp) / "src"
        if not (src / "normal").is_dir():
            t0 = time.perf_counter()
            make_tree(src, args.n, args.size)
            print(f"generated {args.n} images of {args.size}px in {time.perf_counter() - t0:.1f} s", flush=True)
        walls, cpus, rss = [], [], []
        for k in range(args.repeats):
            load = os.getloadavg()[0]
            res = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(src),
                    str(Path(tmp) / f"out{k}"),
                    str(args.image_size),
                    str(args.workers),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            wall, n_images, base, peak, cpu = res.stdout.split()
            walls.append(float(wall))
            cpus.append(float(cpu))
            rss.append((float(base), float(peak)))
            print(
                f"repeat {k}: {float(wall):.1f} s wall, {float(cpu):.1f} s CPU (incl. import), {n_images} images, "
                f"main peak RSS {float(base):.0f} MiB after imports → {float(peak):.0f} MiB after prepare, "
                f"load1 {load:.2f}",
                flush=True,
            )
            shutil.rmtree(Path(tmp) / f"out{k}")
    line = (
        f"| {time.strftime('%Y-%m-%d %H:%M')} | {args.n} | {args.size}→{args.image_size} | {args.workers} | "
        f"{args.repeats} | {statistics.median(walls):.1f} | {min(walls):.1f}–{max(walls):.1f} | "
        f"{statistics.median(cpus):.1f} | "
        f"{max(r[0] for r in rss):.0f} → {max(r[1] for r in rss):.0f} | "
        f"{os.getloadavg()[0]:.2f} |"
    )
    print(line)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
