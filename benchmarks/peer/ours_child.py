"""Our side of one peer run, in a fresh process of our venv: fit on train normals, score the test split.

    python benchmarks/peer/ours_child.py JOB.json

JOB.json: {"dataset_dir", "backbone_dir", "image_size", "model", "hparams", "out_dir", "seed", "threads",
"use_val" (default false: fit on train normals only, as the anomalib side), "teacher_dir" (EfficientAD: the
distilled teacher both sides use)}.
Writes out_dir/{scores.npy (N,), maps.npy (N, H, W) float32, run.json}; run.json holds fit_s, score_s,
latency_ms (batch-1 median), fit_peak_mib (VmHWM after the fit) and peak_mib (VmHWM at the end: the
whole process, imports and backbone included). Runs through the library's model API, exactly what the
fit/score stages call (`vadbench.cell`), without the stages' bookkeeping (metrics, galleries, fp16 copies).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vadbench.backbones import load_feature_extractor
from vadbench.cell import predict_stream
from vadbench.data.source import ImageSource, loader, to_float
from vadbench.metrics.cost import measure_latency
from vadbench.models import create_model, model_class
from vadbench.runtime import seed_everything, set_deterministic


def vm_hwm_mib() -> float:
    """Peak resident set size of this process so far (VmHWM), MiB."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(int(job["threads"]))
    set_deterministic(True)
    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    size, name, hp = int(job["image_size"]), job["model"], dict(job["hparams"])
    train = ImageSource(Path(job["dataset_dir"]), "train", image_size=size)
    val = ImageSource(Path(job["dataset_dir"]), "val", image_size=size)
    test = ImageSource(Path(job["dataset_dir"]), "test", image_size=size)
    if "seed" in model_class(name).Params.model_fields:
        hp["seed"] = int(job["seed"])
    t0 = time.perf_counter()
    seed_everything(int(job["seed"]))
    backbone = load_feature_extractor(Path(job["backbone_dir"]), hp["layers"], device)
    model = create_model(name, backbone=backbone, **hp).to(device)
    if job.get("teacher_dir"):
        model.use_teacher(Path(job["teacher_dir"]))  # as the fit stage does (anomalib loads its teacher in fit too)
    # like anomalib here (no validation loader), no validation normals: no early stopping and no best-epoch
    # restore, the last epoch is kept; only EfficientAD gets them (its map quantiles; anomalib's side too)
    report = model.fit(train, val if job.get("use_val") and len(val) else None)
    fit_s = time.perf_counter() - t0
    fit_peak = vm_hwm_mib()
    maps = np.zeros((len(test), size, size), np.float32)
    t1 = time.perf_counter()
    scores = predict_stream(model, test, 16, device, maps)
    score_s = time.perf_counter() - t1
    batch = to_float(next(iter(loader(test, 16))), device)
    latency = measure_latency(model.predict, batch, warmup=2, repeats=10, batch_size=16)
    np.save(out / "scores.npy", scores)
    np.save(out / "maps.npy", maps)
    run = {
        "fit_s": fit_s,
        "score_s": score_s,
        "latency_ms": latency["latency_ms_median"],
        "fit_peak_mib": fit_peak,
        "peak_mib": vm_hwm_mib(),
        "paths": list(test.paths),
        "epochs_run": report.get("epochs_run", report.get("epochs")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "run.json").write_text(json.dumps(run, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
