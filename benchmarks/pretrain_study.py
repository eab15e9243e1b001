"""Fractal pretraining recipe study (issue 17): which fractal recipe transfers to real surfaces?

    python benchmarks/pretrain_study.py --variants benchmarks/pretrain_study.yaml --seeds 0 1 2
    python benchmarks/pretrain_study.py --only default res128 --datasets elpv_mono   # a subset
    python benchmarks/pretrain_study.py --report-only                                # rebuild the tables

For every variant (overrides of params.yaml's `fractals:` / `pretrain:` sections) and seed: generate the
fractals, pretrain the backbone (both seeded with the seed), then fit and score every downstream model on
every dataset with that backbone and with the seeded random init of the same architecture. Downstream
models are frozen-feature methods (PatchCore, PaDiM) with params.yaml's settings and the layers given per
model entry; they are seeded with the same seed. Every finished step is cached under --work, so an
interrupted study resumes, and adding a variant runs only that variant.

Writes benchmarks/results/pretrain_study.md: per variant the pretraining seconds (wall, at the recorded load)
and per dataset × model the image AUROC (pixel AUROC where masks exist), mean ± std over seeds, and the
difference to random init in AUROC points, paired by seed.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is first imported: per-fit bars would bury the log

# isort: split
import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import vadbench  # noqa: F401  before torch: it sets OMP_WAIT_POLICY=PASSIVE (5-10× on shared cores)

# isort: split
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from peer.data import limit_train, prepare  # noqa: E402

from vadbench.backbones import load_feature_extractor  # noqa: E402
from vadbench.backbones.extractor import FeatureExtractor  # noqa: E402
from vadbench.backbones.weights import materialize_backbone  # noqa: E402
from vadbench.cell import predict_stream  # noqa: E402
from vadbench.config import Params, load_params  # noqa: E402
from vadbench.data.source import ImageSource, float_batches  # noqa: E402
from vadbench.fractals import generate  # noqa: E402
from vadbench.fractals.build import params_hash  # noqa: E402
from vadbench.fractals.params import FractalsParams  # noqa: E402
from vadbench.io import write_json, write_text  # noqa: E402
from vadbench.machine import cpu_model, machine_kind  # noqa: E402
from vadbench.metrics.image import image_metrics  # noqa: E402
from vadbench.metrics.pixel import pixel_metrics  # noqa: E402
from vadbench.models import create_model, model_class  # noqa: E402
from vadbench.pretrain.params import PretrainParams  # noqa: E402
from vadbench.pretrain.stage import run_pretrain  # noqa: E402
from vadbench.runtime import seed_everything, set_deterministic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "pretrain_study.md"
DATASETS = ("elpv_mono", "elpv_poly", "synthetic_sem")


def _digest(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def load_variants(path: Path, base: Params) -> tuple[dict[str, dict], dict[str, dict]]:
    """variants.yaml → ({name: {"fractals": FractalsParams, "pretrain": PretrainParams, "note": str}}, models).

    A variant is params.yaml's sections, then the file's `base:` overrides (which pin the study's reference
    recipe, so that a later change of params.yaml's defaults never redefines a measured row), then its own
    overrides. `profile: NAME` starts from profiles/NAME.yaml's sections instead of params.yaml + `base:`.
    """
    spec = yaml.safe_load(path.read_text())
    pinned = spec.get("base") or {}
    variants = {}
    for name, over in spec["variants"].items():
        over = over or {}
        unknown = set(over) - {"fractals", "pretrain", "note", "profile"}
        if unknown:
            raise ValueError(
                f"{path}: variant {name!r}: unknown keys {sorted(unknown)} (fractals, pretrain, profile, note)"
            )
        if "profile" in over:
            prof = load_params(ROOT / "profiles" / f"{over['profile']}.yaml")
            start = {sec: getattr(prof, sec).model_dump(mode="json") for sec in ("fractals", "pretrain")}
        else:
            start = {
                sec: {**getattr(base, sec).model_dump(mode="json"), **pinned.get(sec, {})}
                for sec in ("fractals", "pretrain")
            }
        # JSON mode, as params.yaml is validated: YAML lists become the schema's tuples
        fr = FractalsParams.model_validate_json(json.dumps({**start["fractals"], **over.get("fractals", {})}))
        pt = PretrainParams.model_validate_json(json.dumps({**start["pretrain"], **over.get("pretrain", {})}))
        variants[name] = {"fractals": fr, "pretrain": pt, "note": over.get("note", "")}
    return variants, spec["models"]


def backbone_name(v: dict | None, arch: str, seed: int) -> tuple[str, str]:
    """(backbone folder name, pretraining key) of a variant's recipe (None: random init) at `seed`.

    The name hashes the recipe, not the variant's label, and keys every cached result: a redefined variant never
    reuses the rows of its old definition, and a renamed one keeps its rows."""
    if v is None:
        return f"random-{arch}-s{seed}", ""
    fr, pt = v["fractals"], v["pretrain"]
    key = _digest({"fractals": params_hash(seed, fr), "pretrain": pt.model_dump(mode="json"), "seed": seed})
    return f"fractal-s{seed}-{key}", key


def dataset_key(ds: str, args: argparse.Namespace, base: Params) -> tuple[str, int]:
    """(prepared-dataset folder name, image side): the folder name keys cached results, so a study at
    another size or train cap never reuses them."""
    if ds == "synthetic_sem":
        size = base.datasets["synthetic_sem"].image_size
        return f"{ds}-{size}", size
    return f"{ds}-{args.image_size}" + (f"-train{args.max_train}" if args.max_train else ""), args.image_size


def backbone_for(work: Path, name: str, v: dict | None, arch: str, seed: int) -> tuple[Path, dict]:
    """Backbone dir (weights + card) for variant `name` (None → random init) and seed; cached."""
    bb_name, key = backbone_name(v, arch, seed)
    if v is None:
        out = work / "backbones" / bb_name
        if not (out / "card.json").is_file():
            materialize_backbone(out, arch=arch, init="random", seed=seed)
        return out, {}
    fr, pt = v["fractals"], v["pretrain"]
    frac_dir = work / "fractals" / params_hash(seed, fr)
    pre_dir = work / "pretrain" / key
    info_path = pre_dir / "study.json"
    if not info_path.is_file():
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        if not (frac_dir / "info.json").is_file():
            generate(frac_dir, fr, seed)
        t1 = time.perf_counter()
        result = run_pretrain(
            frac_dir,
            pre_dir / "out",
            pre_dir / "metrics.json",
            pre_dir / "log.csv",
            work / "pretrain-work",
            pt,
            seed=seed,
            device="cpu",
        )
        t2 = time.perf_counter()
        info = {
            "variant": name,
            "fractals_s": t1 - t0,
            "pretrain_s": t2 - t1,
            "load_start": load0,
            "load_end": os.getloadavg()[0],
            "val_top1": json.loads((pre_dir / "metrics.json").read_text()).get("val_top1"),
            "epochs": len(result.log),
            "seed": seed,
            "key": key,
        }
        write_json(info_path, info)
    bb = work / "backbones" / bb_name
    if not (bb / "card.json").is_file():
        materialize_backbone(bb, arch=pt.arch, init="fractal", pretrain_dir=pre_dir / "out")
    return bb, json.loads(info_path.read_text())


@torch.no_grad()
def adapt_batchnorm(backbone: FeatureExtractor, train: ImageSource, batch_size: int = 16) -> None:
    """AdaBN (Li et al. 2016), an experiment of the study: replace the frozen backbone's BatchNorm running
    statistics by those of the train normals (cumulative average over one pass; no labels, no test images)."""
    norms = [m for m in backbone.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for batch in float_batches(train, batch_size, backbone.device):
        backbone.net(backbone.normalize(batch))
    for m in norms:
        m.eval()


def evaluate(
    dataset_dir: Path, image_size: int, backbone_dir: Path, model: str, hp: dict, seed: int, adapt_bn: bool = False
) -> dict:
    """Fit on the train normals, score the test split → image (and pixel) metrics."""
    set_deterministic(True)
    train = ImageSource(dataset_dir, "train", image_size=image_size)
    test = ImageSource(dataset_dir, "test", image_size=image_size)
    hp = dict(hp)
    if "seed" in model_class(model).Params.model_fields:
        hp["seed"] = seed
    seed_everything(seed)
    backbone = load_feature_extractor(backbone_dir, hp["layers"], torch.device("cpu"))
    if adapt_bn:
        adapt_batchnorm(backbone, train)
    net = create_model(model, backbone=backbone, **hp)
    t0 = time.perf_counter()
    net.fit(train, None)
    fit_s = time.perf_counter() - t0
    has_masks = bool(test.has_mask[test.labels == 1].any())
    maps = np.zeros((len(test), image_size, image_size), np.float32) if has_masks else None
    scores = predict_stream(net, test, 16, torch.device("cpu"), maps)
    row = {"image_auroc": image_metrics(scores, test.labels, None)["image_auroc"], "fit_s": fit_s}
    if has_masks:
        masks = np.stack([test.mask(i).numpy() for i in range(len(test))])
        row["pixel_auroc"] = pixel_metrics(maps, masks)["pixel_auroc"]
    return row


def run(args: argparse.Namespace) -> None:
    base = load_params(ROOT / "params.yaml")
    variants, models = load_variants(args.variants, base)
    names = args.only or list(variants)
    if args.models:
        models = {k: models[k] for k in args.models}
    work = args.work
    datasets = {}
    for ds in args.datasets:
        key, size = dataset_key(ds, args, base)
        prepared = prepare(ds, work / "datasets" / f"{ds}-{size}", size, 0)
        if key != prepared.name:
            prepared = limit_train(prepared, work / "datasets" / key, args.max_train)
        datasets[ds] = (prepared, size)
    for seed in args.seeds:
        for name in ["random", *names]:
            v = None if name == "random" else variants[name]
            arch = base.pretrain.arch if v is None else v["pretrain"].arch
            bb, _ = backbone_for(work, name, v, arch, seed)
            for ds, (ddir, size) in datasets.items():
                for label, m in models.items():
                    hp = {**base.models[m["model"]], **m.get("params", {})}
                    out = work / "results" / bb.name / f"{ddir.name}-{label}.json"
                    if out.is_file():
                        continue
                    t0 = time.perf_counter()
                    row = evaluate(ddir, size, bb, m["model"], hp, seed, adapt_bn=m.get("adapt_bn", False))
                    row.update(
                        variant=name,
                        seed=seed,
                        dataset=ddir.name,
                        model=label,
                        backbone=bb.name,
                        load=os.getloadavg()[0],
                    )
                    write_json(out, row)
                    print(f"{name} s{seed} {ds} {label}: {row['image_auroc']:.3f} ({time.perf_counter() - t0:.0f} s)")
    report(args, variants, models)


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def report(args: argparse.Namespace, variants: dict, models: dict) -> None:
    base = load_params(ROOT / "params.yaml")
    keys = {ds: dataset_key(ds, args, base)[0] for ds in args.datasets}
    arch = base.pretrain.arch
    current = {  # (variant, seed) → backbone name of the variant's current recipe
        (name, s): backbone_name(variants.get(name), arch, s) for name in ["random", *variants] for s in args.seeds
    }
    rows = [json.loads(p.read_text()) for p in sorted((args.work / "results").glob("*/*.json"))]
    by = {(r["backbone"], r["dataset"], r["model"]): r for r in rows}
    keys_now = {key for _, key in current.values() if key}
    pre = [json.loads(p.read_text()) for p in sorted((args.work / "pretrain").glob("*/study.json"))]
    pre = [x for x in pre if x.get("key") in keys_now]
    lines = [
        f"\n## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — `{' '.join(sys.argv[1:])}`\n",
        f"Machine: {os.cpu_count()} cores, {cpu_model()}, kind {machine_kind()} (pretraining bytes differ between "
        f"kinds, docs/CI.md); ELPV at {args.image_size} px"
        + (f", first {args.max_train} train normals" if args.max_train else ", all train normals")
        + "; synthetic_sem as params.yaml. Image AUROC (pixel AUROC for synthetic_sem after the slash); "
        "Δ = fractal − random in AUROC points, paired by seed, mean ± std.\n",
        "| variant | note | seeds | val top-1 | pretrain s (fractals + train, load) |"
        + "".join(f" {ds} {m} |" for ds in args.datasets for m in models)
        + "\n|---|---|---|---|---|"
        + "---|" * (len(args.datasets) * len(models)),
    ]
    for name in ["random", *variants]:
        cells = []
        seeds_done = set()
        for ds in args.datasets:
            for m in models:
                vals, pix, deltas = [], [], []
                for s in args.seeds:
                    r = by.get((current[name, s][0], keys[ds], m))
                    if r is None:
                        continue
                    seeds_done.add(s)
                    vals.append(r["image_auroc"])
                    if r.get("pixel_auroc") is not None:
                        pix.append(r["pixel_auroc"])
                    ref = by.get((current["random", s][0], keys[ds], m))
                    if ref is not None and name != "random":
                        deltas.append(100 * (r["image_auroc"] - ref["image_auroc"]))
                cell = _mean_std(vals) + (f" / {_mean_std(pix)}" if pix else "")
                if deltas:
                    d = statistics.mean(deltas)
                    sd = f" ± {statistics.stdev(deltas):.1f}" if len(deltas) > 1 else ""
                    cell += f" (Δ {d:+.1f}{sd})"
                cells.append(cell)
        if not seeds_done:
            continue
        own = {current[name, s][1] for s in args.seeds}  # by recipe, not label: a renamed variant keeps its timings
        p = [x for x in pre if x.get("key") in own]
        top1 = _mean_std([x["val_top1"] for x in p if x.get("val_top1") is not None])
        secs = (
            f"{statistics.mean(x['fractals_s'] for x in p):.0f} + {statistics.mean(x['pretrain_s'] for x in p):.0f}"
            f" (load {statistics.mean(x['load_start'] for x in p):.1f})"
            if p
            else "–"
        )
        note = variants[name]["note"] if name in variants else "timm init, seeded"
        lines.append(f"| {name} | {note} | {len(seeds_done)} | {top1} | {secs} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_text(RESULTS, merge_report(RESULTS.read_text() if RESULTS.is_file() else "", text))


def merge_report(old: str, section: str) -> str:
    """The results file with `section` in place of an older section of the same command (one table per command;
    older versions are in git history), or appended."""
    header = "# Fractal pretraining recipe study\n\nWritten by `benchmarks/pretrain_study.py`.\n"
    command = section.split("`", 2)[1]
    kept = [part for part in old.split("\n## ")[1:] if part.split("`", 2)[1] != command]
    return header + "".join("\n## " + part.rstrip("\n") + "\n" for part in kept) + section


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=Path, default=ROOT / "benchmarks" / "pretrain_study.yaml")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "pretrain-study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="+", help="variants to run (random init always runs)")
    ap.add_argument("--models", nargs="+", help="model labels of the variants file to run (default: all)")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--image-size", type=int, default=256, help="ELPV side in px")
    ap.add_argument("--max-train", type=int, default=0, help="ELPV: keep the first N train normals (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print the tables, do not append to the results file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report_only:
        base = load_params(ROOT / "params.yaml")
        variants, models = load_variants(args.variants, base)
        report(args, variants, {k: models[k] for k in args.models} if args.models else models)
    else:
        run(args)


if __name__ == "__main__":
    main()
