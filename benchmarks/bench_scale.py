"""Memory and time against dataset size: fit and score peak RSS and seconds per image at N train images.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 1000 5000 20000] [--models padim stfpm fastflow patchcore]
                                               [--image-size 256] [--epochs 1] [--threads N]
                                               [--out benchmarks/results/scale.md] [--fit-only]

For each N a `folder` dataset of 256×256 grey line textures is generated (`bench_prepare.make_tree`:
95 % normal, 5 % with a masked blob) and prepared by the library (val 5 %, test normals 2 %), so the
train split holds N images. Each model is then fitted and scored in fresh child processes through
`vadbench.cell.fit_cell` / `score_cell` — exactly what the DVC stages run — on a seeded random-init
resnet18; a child's whole-process peak RSS (VmHWM, imports and backbone included) is recorded. Trained
models run `--epochs` epochs (default 1: the cost per image per epoch is what scales). PatchCore uses
layer2+3 and a 1 % coreset, as in the paper. Results are appended to `--out` with the slopes and the
extrapolation to a MIIC-sized run (25,160 train images at 256 and 512 px).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import make_tree  # noqa: E402

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
from vadbench.cell import CellInputs, ScoreSettings, fit_cell, score_cell
stage, data, bb, fit_dir, score_dir, model, hparams, size, threads = sys.argv[1:10]
hparams, size = json.loads(hparams), int(size)
torch.set_num_threads(int(threads))
inputs = CellInputs(Path(data), Path(bb), size)
t0 = time.perf_counter()
if stage == "fit":
    fit_cell(inputs, model, hparams, Path(fit_dir), seeds=[0], device="cpu", measured_path=Path(fit_dir + ".json"))
else:
    score_cell(inputs, Path(fit_dir), Path(score_dir), Path(score_dir + "-report"), ScoreSettings(latency_repeats=3),
               seeds=[0], device="cpu", gallery_size=2)
wall = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"wall_s": wall, "peak_rss_mib": hwm}))
"""

PREPARE = r"""
import sys
from pathlib import Path
from vadbench.data.params import FolderParams
from vadbench.data.prepare import prepare_dataset
src, out, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
spec = FolderParams(normal_dir=str(src / "normal"), abnormal_dir=str(src / "abnormal"), mask_dir=str(src / "masks"),
                    image_size=size, val_fraction=0.05, test_normal_fraction=0.02)
prepare_dataset("scale", spec, out_dir=out, seed=0, preview_png=None, progress=False, workers=2)
"""


def model_params(name: str, epochs: int) -> dict:
    """params.yaml's defaults for `name`, with the scale benchmark's few overrides."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    params = dict(yaml.safe_load((root / "params.yaml").read_text())["models"].get(name, {}))
    if name == "patchcore":
        params.update(layers=["layer2", "layer3"], coreset_ratio=0.01)
    if "epochs" in params:
        params.update(epochs=epochs, patience=0)
    return params


def run_child(args: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"child {args[0]} {args[5]} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def n_split(data: Path, split: str) -> int:
    import csv

    with open(data / "manifest.csv") as fh:
        return sum(1 for r in csv.DictReader(fh) if r["split"] == split)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="train images N")
    ap.add_argument("--models", nargs="+", default=["padim", "stfpm", "fastflow", "patchcore"])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per child")
    ap.add_argument("--work", type=Path, default=None, help="keep generated data here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.md"))
    ap.add_argument("--fit-only", action="store_true", help="skip scoring (its time grows with PatchCore's bank)")
    args = ap.parse_args()
    from vadbench.backbones import materialize_backbone

    tmp = tempfile.TemporaryDirectory(prefix="bench_scale_")
    work = args.work or Path(tmp.name)
    bb = work / "backbone"
    if not (bb / "card.json").is_file():
        materialize_backbone(bb, arch="resnet18", init="random", seed=0)
    rows = []
    for n in args.sizes:
        total = int(n / (0.95 * (1 - 0.05 - 0.02))) + 1  # so that the train split holds about n images
        src, data = work / f"src-{n}", work / f"data-{n}"
        if not (data / "manifest.csv").is_file():
            t0 = time.perf_counter()
            make_tree(src, total, args.image_size)
            subprocess.run([sys.executable, "-c", PREPARE, str(src), str(data), str(args.image_size)], check=True)
            print(f"N={n}: generated and prepared {total} images in {time.perf_counter() - t0:.0f} s", flush=True)
        n_train, n_test = n_split(data, "train"), n_split(data, "test")
        for model in args.models:
            hp = json.dumps(model_params(model, args.epochs))
            fit_dir, score_dir = work / f"fit-{model}-{n}", work / f"score-{model}-{n}"
            common = [
                str(data),
                str(bb),
                str(fit_dir),
                str(score_dir),
                model,
                hp,
                str(args.image_size),
                str(args.threads),
            ]
            fit = run_child(["fit", *common])
            score = None if args.fit_only else run_child(["score", *common])
            report = json.loads(Path(str(fit_dir) + ".json").read_text())["0"]
            row = {
                "model": model,
                "n_train": n_train,
                "n_test": n_test,
                "fit_s": fit["wall_s"],
                "fit_s_per_image": report["fit_seconds"] / n_train,
                "fit_peak_mib": fit["peak_rss_mib"],
                "score_s": score and score["wall_s"],
                "score_s_per_image": score and score["wall_s"] / n_test,
                "score_peak_mib": score and score["peak_rss_mib"],
                "load1": os.getloadavg()[0],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            for d in (fit_dir, score_dir):
                subprocess.run(["rm", "-rf", str(d), str(d) + "-report", str(d) + ".json"], check=True)
    write_report(args, rows)


def write_report(args: argparse.Namespace, rows: list[dict]) -> None:
    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M')} — {os.cpu_count()}-core CPU, torch {torch.__version__}, "
        f"{args.image_size}×{args.image_size} grey, random-init resnet18, epochs {args.epochs}, "
        f"{args.threads} torch thread(s) per fit / score\n",
        "| model | N train | fit s | fit s/image | fit peak RSS MiB | N test | score s | score s/image | score peak RSS MiB | load1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        scored = (
            f"{r['score_s']:.0f} | {r['score_s_per_image'] * 1000:.1f} ms | {r['score_peak_mib']:.0f}"
            if r["score_s"] is not None
            else "not run | — | —"
        )
        lines.append(
            f"| {r['model']} | {r['n_train']} | {r['fit_s']:.0f} | {r['fit_s_per_image'] * 1000:.1f} ms | "
            f"{r['fit_peak_mib']:.0f} | {r['n_test']} | {scored} | {r['load1']:.1f} |"
        )
    lines += [
        "",
        "Ratios largest N / smallest N (targets: peak ≤ 1.2×, s/image ≤ 1.2×) and a MIIC-sized run "
        "(25,160 train images) extrapolated from the per-image fit time and peak RSS slope:",
        "",
        "| model | peak ratio | s/image ratio | MiB per 1,000 images | MIIC fit at 256 px | MIIC fit at 512 px (×4 pixels) |",
        "|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["n_train"])
        lo, hi = mine[0], mine[-1]
        span = max(hi["n_train"] - lo["n_train"], 1)
        slope = (hi["fit_peak_mib"] - lo["fit_peak_mib"]) / span * 1000
        per_img = hi["fit_s_per_image"]
        miic_peak = hi["fit_peak_mib"] + slope * (25160 - hi["n_train"]) / 1000
        lines.append(
            f"| {model} | {hi['fit_peak_mib'] / lo['fit_peak_mib']:.2f} | "
            f"{hi['fit_s_per_image'] / lo['fit_s_per_image']:.2f} | {slope:.1f} | "
            f"{per_img * 25160 / 60:.0f} min, ~{miic_peak:.0f} MiB | {4 * per_img * 25160 / 60:.0f} min |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.out.exists():
        args.out.write_text(
            "# Scale: memory and time against the number of training images\n\n"
            "Written by `benchmarks/bench_scale.py` (see its docstring for the protocol).\n"
        )
    with open(args.out, "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
