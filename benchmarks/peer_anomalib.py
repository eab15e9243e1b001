"""Side by side with anomalib, in one run: fit/score time, peak RSS and accuracy on the same images and weights.

    make peer-env                                   # once: .venv-peer with anomalib (the `[peer]` extra's pins)
    .venv/bin/python benchmarks/peer_anomalib.py    # defaults: synthetic_sem, six models, 3 runs per side
    .venv/bin/python benchmarks/peer_anomalib.py --quick               # smoke check: 3 models, 1 epoch, 1 run
    .venv/bin/python benchmarks/peer_anomalib.py --dataset elpv_mono --image-size 256 --max-train 233 \
        --models patchcore
    .venv/bin/python benchmarks/peer_anomalib.py --dataset folder --normal-dir D --abnormal-dir D [--mask-dir D]
    .venv/bin/python benchmarks/peer_anomalib.py --models efficientad_s --epochs 1   # on request: 256 px networks

anomalib lives in its own interpreter (`--peer-python`, default `.venv-peer/bin/python`; `make peer-env` builds
it: python3.11 venv, torch 2.14.1 / torchvision 0.29.1, then `pip install -e '.[peer]'`-equivalent pins without
our package). anomalib is never a dependency of the pipeline: the parent and our children run in our venv.

Protocol, per dataset × backbone × model:

* one prepared dataset (our `prepare`; `--max-train` keeps the first N train images), exported once as an
  MVTec-style folder of the exact uint8 pixels our models see, at `--image-size` — both sides read the same images;
* the same weights: our materialised backbone (`random`: timm's seeded random init, seed 0; `fractal`:
  `--fractal-dir`, default data/backbones/fractal), loaded by anomalib through timm's local-file route, and the
  backbone card's mean/std on both sides;
* runs alternate ours, anomalib, ours, … (`--runs` each), every run a fresh process (peak RSS = that run's VmHWM,
  imports included), a side's k-th run with model seed `--seed` + k (so accuracy is a median over seeds, not one
  seed's draw; the backbone weights stay those of `--seed`), medians with min–max;
* trained models run `--epochs` epochs on both sides; neither side sees validation normals (anomalib's Folder
  gets no validation loader, ours fits with `val=None`): no early stopping, no best-epoch restore, last epoch kept;
  EfficientAD is the exception: both sides get the validation normals for its map quantiles, and both use one
  teacher PDN distilled from the backbone on our fractals (`--fractals-dir`; once per backbone, `peer/teacher.py`);
  fit time per epoch is the whole fit (backbone build included) divided by the epochs;
* both sides dump raw test scores and maps; the metrics are computed here with OUR metric code on both, on the
  full test set (anomalib's Folder default would move half of it into validation: `val_split_mode="none"`);
  anomalib's own AUPRO is computed on the identical maps of each side and its difference reported;
* what differs and cannot be aligned is listed per model in the results (`peer/spec.py`).

Results are appended to `--out` (default benchmarks/results/peer_anomalib.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from peer import report  # noqa: E402
from peer.spec import ALL_MODELS, DEFAULT_MODELS, PEER_CLASS, build_spec, train_patches  # noqa: E402
from peer.teacher import prepare_teacher  # noqa: E402

DATASETS = ("synthetic_sem", "elpv_mono", "elpv_poly", "folder")
DEFAULT_SIZE = {"synthetic_sem": 128, "elpv_mono": 256, "elpv_poly": 256, "folder": 256}
QUICK = dict(models=["patchcore", "padim", "stfpm"], epochs=1, runs=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", nargs="+", default=["synthetic_sem"], choices=DATASETS)
    ap.add_argument("--normal-dir", help="folder dataset: normal images")
    ap.add_argument("--abnormal-dir", help="folder dataset: anomalous images")
    ap.add_argument("--mask-dir", help="folder dataset: masks mirroring --abnormal-dir")
    ap.add_argument("--image-size", type=int, default=None, help="default: 128 synthetic_sem, 256 others")
    ap.add_argument("--max-train", type=int, default=None, help="keep the first N train images")
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=ALL_MODELS)
    ap.add_argument("--backbones", nargs="+", default=["random"], choices=["random", "fractal"])
    ap.add_argument("--fractal-dir", type=Path, default=ROOT / "data/backbones/fractal")
    ap.add_argument(
        "--fractals-dir", type=Path, default=ROOT / "data/fractals", help="fractal images: EfficientAD's teacher"
    )
    ap.add_argument("--runs", type=int, default=3, help="runs per side, alternating")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of every trained model, both sides")
    ap.add_argument("--coreset-ratio", type=float, default=0.01, help="PatchCore, both sides (the paper's 1 %%)")
    ap.add_argument(
        "--patchcore-layers", nargs="+", default=["layer2", "layer3"], help="PatchCore, both sides (the paper's)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both sides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help=f"smoke check: {QUICK}")
    ap.add_argument(
        "--report-only", action="store_true", help="run nothing: tables from the run folders already under --work"
    )
    ap.add_argument("--peer-python", type=Path, default=ROOT / ".venv-peer/bin/python")
    ap.add_argument("--work", type=Path, default=ROOT / "build/peer")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peer_anomalib.md")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.runs < 1 or args.epochs < 1:
        ap.error("--runs and --epochs must be ≥ 1")
    if "folder" in args.dataset and not (args.normal_dir and args.abnormal_dir):
        ap.error("--dataset folder needs --normal-dir and --abnormal-dir")
    return args


def model_params(name: str) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load((ROOT / "params.yaml").read_text())["models"][name])


def distill_params() -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load((ROOT / "params.yaml").read_text())["distill"])


def machine() -> str:
    from vadbench.machine import cpu_model

    mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")) / 2**20
    return f"{cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def run_child(cmd: list[str], env: dict[str, str], label: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")


def child_env(peer: bool) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if peer:
        env.pop("PYTHONPATH", None)  # the peer interpreter never sees our package
    return env


def score_run(run_dir: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Our metric code on one run's raw outputs (either side)."""
    import numpy as np

    from vadbench.metrics.image import image_metrics
    from vadbench.metrics.pixel import pixel_metrics

    info = json.loads((run_dir / "run.json").read_text())
    scores = np.load(run_dir / "scores.npy")
    if len(scores) != len(data["labels"]):
        raise RuntimeError(f"{run_dir}: {len(scores)} scores for {len(data['labels'])} test images")
    image = image_metrics(scores, data["labels"], None)
    info["image_auroc"] = image["image_auroc"]
    if data["has_pixel_gt"]:
        maps = np.load(run_dir / "maps.npy", mmap_mode="r")[data["gt_index"]]
        pixel = pixel_metrics(maps, data["masks"], fpr_limit=0.3)
        info["pixel_auroc"], info["pixel_aupro"] = pixel["pixel_auroc"], pixel["pixel_aupro"]
    return info


def peer_aupro(args: argparse.Namespace, run_dir: Path, data: dict[str, Any]) -> float:
    import numpy as np

    maps_path, masks_path = run_dir / "gt_maps.npy", run_dir / "gt_masks.npy"
    np.save(maps_path, np.load(run_dir / "maps.npy")[data["gt_index"]])
    np.save(masks_path, data["masks"])
    out = run_dir / "anomalib_aupro.json"
    cmd = [str(args.peer_python), str(ROOT / "benchmarks/peer/anomalib_child.py"), "aupro"]
    run_child([*cmd, str(maps_path), str(masks_path), str(out)], child_env(True), f"anomalib AUPRO {run_dir}")
    maps_path.unlink()
    masks_path.unlink()
    return json.loads(out.read_text())["aupro"]


def bench_model(
    args: argparse.Namespace, name: str, dataset_dir: Path, folder: Path, bb_dir: Path, data: dict[str, Any]
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]], tuple[str, ...]]:
    params = model_params(name)
    if name == "patchcore":
        params["layers"] = list(args.patchcore_layers)
    card = json.loads((bb_dir / "card.json").read_text())
    patches = train_patches(data["n_train"], data["image_size"], params["layers"]) if name == "patchcore" else None
    spec = build_spec(
        name, params, card["arch"], args.epochs, args.coreset_ratio, patches, data["n_train"], data["image_size"]
    )
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "anomalib": []}
    base = args.work / "runs" / f"{dataset_dir.name}-{bb_dir.name}-{name}"
    if args.report_only:  # an interrupted run's finished runs, in their order
        done = sorted(d for d in base.glob("*-*") if (d / "run.json").is_file())
        sides = [d.name.split("-", 1)[1] for d in done]
        for d, side in zip(done, sides):
            rec = score_run(d, data) if (d / "maps.npy").is_file() or not data["has_pixel_gt"] else _stored(d)
            if spec.epochs:
                rec["fit_s_per_epoch"] = rec["fit_s"] / spec.epochs
            runs[side].append(rec)
        return runs, [], spec.mismatches
    shutil.rmtree(base, ignore_errors=True)
    extra_ours: dict[str, Any] = {}
    extra_peer: dict[str, Any] = {}
    if spec.needs_val:
        if not data["n_val"]:
            raise ValueError(f"{name} needs validation normals; {dataset_dir} has no val split")
        extra_ours["use_val"], extra_peer["val_dir"] = True, "val/good"
    if name == "efficientad_s":
        teacher = prepare_teacher(args.work / f"teacher-{bb_dir.name}", bb_dir, args.fractals_dir, distill_params(),
                                  args.seed)  # fmt: skip
        extra_ours["teacher_dir"] = str(teacher["ours"])
        extra_peer.update(teacher_root=str(teacher["anomalib_root"]), penalty_dir=str(teacher["penalty"]),
                          net_size=spec.ours["image_size"])  # fmt: skip
    seeds = report.run_seeds(args.runs, args.seed)
    for i, side in enumerate(report.alternation(args.runs)):
        run_dir = base / f"{i:02d}-{side}"
        run_dir.mkdir(parents=True)
        job = run_dir / "job.json"
        common = dict(image_size=data["image_size"], out_dir=str(run_dir), seed=seeds[i], threads=args.threads)
        if side == "ours":
            job.write_text(json.dumps(dict(common, dataset_dir=str(dataset_dir), backbone_dir=str(bb_dir),
                                           model=name, hparams=spec.ours, **extra_ours)))  # fmt: skip
            cmd = [sys.executable, str(ROOT / "benchmarks/peer/ours_child.py"), str(job)]
        else:
            peer_job = dict(common, folder=str(folder), model_class=PEER_CLASS[name], kwargs=spec.peer,
                            pre_trained="pre_trained" in _peer_args(name), epochs=spec.epochs,
                            batch_size=spec.ours.get("batch_size", 16), arch=card["arch"],
                            weights=str(bb_dir / "weights.safetensors"), mean=card["mean"], std=card["std"],
                            **extra_peer)  # fmt: skip
            job.write_text(json.dumps(peer_job))
            cmd = [str(args.peer_python), str(ROOT / "benchmarks/peer/anomalib_child.py"), "run", str(job)]
        load = os.getloadavg()[0]
        run_child(cmd, child_env(side == "anomalib"), f"{side} {name} run {i}")
        rec = score_run(run_dir, data)
        rec["load1"] = load
        (run_dir / "record.json").write_text(json.dumps({k: v for k, v in rec.items() if k != "paths"}))
        if spec.epochs:
            rec["fit_s_per_epoch"] = rec["fit_s"] / spec.epochs
        runs[side].append(rec)
        print(f"{name} {side} #{i}: " + json.dumps({k: rec.get(k) for k, *_ in report.COLUMNS}), flush=True)
    aupro_rows = []
    if data["has_pixel_gt"]:
        for side in report.SIDES:
            first = base / f"{report.alternation(args.runs).index(side):02d}-{side}"
            aupro_rows.append(
                dict(
                    model=name,
                    side=side,
                    ours_aupro=runs[side][0].get("pixel_aupro"),
                    anomalib_aupro=peer_aupro(args, first, data),
                )  # fmt: skip
            )
    for side in report.SIDES:  # the maps of later runs are only needed for their metrics
        for d in base.glob(f"*-{side}"):
            (d / "maps.npy").unlink(missing_ok=True)
    return runs, aupro_rows, spec.mismatches


def _stored(run_dir: Path) -> dict[str, Any]:
    """A finished run's record (written once its metrics were computed; its maps may be gone)."""
    return json.loads((run_dir / "record.json").read_text())


def _peer_args(name: str) -> set[str]:
    """anomalib constructor arguments that take `pre_trained` (STFPM has none: its teacher is always pretrained;
    EfficientAd none: its teacher is a PDN file, here ours)."""
    return set() if name in ("stfpm", "efficientad_s") else {"pre_trained"}


def backbone_dir(args: argparse.Namespace, which: str) -> Path:
    from vadbench.backbones import materialize_backbone

    out = args.work / f"backbone-{which}"
    if (out / "card.json").is_file():
        return out
    if which == "random":
        materialize_backbone(out, arch="resnet18", init="random", seed=args.seed)
    else:
        if not (args.fractal_dir / "card.json").is_file():
            raise FileNotFoundError(f"{args.fractal_dir}: no fractal backbone (run `dvc repro backbones` or pass one)")
        shutil.copytree(args.fractal_dir, out)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.peer_python.is_file():
        raise SystemExit(f"{args.peer_python} not found: run `make peer-env` (or pass --peer-python)")
    from peer.data import export_folder, limit_train, prepare

    args.work.mkdir(parents=True, exist_ok=True)
    started, load0 = time.time(), os.getloadavg()
    sections = []
    for dataset in args.dataset:
        size = args.image_size or DEFAULT_SIZE[dataset]
        folder_spec = {k: v for k, v in dict(normal_dir=args.normal_dir, abnormal_dir=args.abnormal_dir,
                                             mask_dir=args.mask_dir).items() if v}  # fmt: skip
        prepared = prepare(dataset, args.work / f"prepared-{dataset}-{size}", size, args.seed, folder_spec)
        if args.max_train:
            prepared = limit_train(prepared, args.work / f"prepared-{dataset}-{size}-n{args.max_train}", args.max_train)
        folder = args.work / f"folder-{prepared.name}"
        shutil.rmtree(folder, ignore_errors=True)
        data = export_folder(prepared, size, folder)
        data["image_size"] = size
        for which in args.backbones:
            bb = backbone_dir(args, which)
            per_model, aupro_rows, notes = {}, [], {}
            for name in args.models:
                runs, rows, mismatch = bench_model(args, name, prepared, folder, bb, data)
                per_model[name], notes[name] = runs, mismatch
                aupro_rows += rows
            sections.append(section(dataset, which, size, data, per_model, aupro_rows, notes))
    write(args, sections, started, load0)


def section(dataset: str, backbone: str, size: int, data: dict[str, Any], per_model: dict, aupro_rows: list,
            notes: dict[str, tuple[str, ...]]) -> list[str]:  # fmt: skip
    versions = {}
    for runs in per_model.values():
        for rec in runs["anomalib"][:1]:
            versions = {k: rec.get(k) for k in ("anomalib", "lightning", "torch", "threads")}
    n_anom = int(data["labels"].sum())
    lines = [
        f"### {dataset}, {backbone} resnet18, {size}×{size}: {data['n_train']} train, "
        f"{data['n_test']} test ({n_anom} anomalous)",
        "",
        f"anomalib side: {versions}",
        "",
        *report.results_table(per_model),
        "",
        "Targets (medians):",
        "",
        *report.targets(per_model),
        "",
    ]
    if aupro_rows:
        lines += ["AUPRO on identical maps (our implementation vs anomalib's current `AUPRO`):", ""]
        lines += report.aupro_table(aupro_rows) + [""]
    lines += ["Mismatches that remain:", ""]
    lines += [f"- {m}: {n}" for m, ns in notes.items() for n in ns] + [""]
    return lines


def write(args: argparse.Namespace, sections: list[list[str]], started: float, load0: tuple[float, ...]) -> None:
    import torch

    minutes = (time.time() - started) / 60
    load1 = os.getloadavg()
    head = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} — `{' '.join(sys.argv[1:]) or '(defaults)'}`",
        "",
        f"Machine: {machine()}; ours: torch {torch.__version__}, {args.threads} threads on both sides. "
        f"Wall time {minutes:.1f} min; load average at start {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f}, "
        f"at end {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} (1/5/15 min).",
        *(
            [
                "**Rebuilt with --report-only from the finished runs of an interrupted invocation: wall time and load "
                "below are this rebuild's; the runs' own loads are in their record.json.**",
                "",
            ]
            if args.report_only
            else []
        ),  # fmt: skip
        f"Runs per side: {args.runs} (alternating); trained models: {args.epochs} epochs on both sides. "
        f"Run k of each side fits with model seed {args.seed}+k (both sides the same seeds; backbone weights: seed "
        f"{args.seed}). Cells: median (min–max); ratios of medians; accuracy differences in AUROC points.",
        "",
    ]
    text = "\n".join(head + [line for s in sections for line in s]) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.out.exists():
        args.out.write_text(
            "# Peer benchmark: vadbench vs anomalib\n\n"
            "Written by `benchmarks/peer_anomalib.py` (protocol and fairness settings in its docstring).\n\n"
        )
    with open(args.out, "a") as fh:
        fh.write("\n" + text)


if __name__ == "__main__":
    main()
