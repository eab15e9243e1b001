"""anomalib's side of one peer run, in a fresh process of the peer venv (anomalib 2.x, no vadbench).

    .venv-peer/bin/python benchmarks/peer/anomalib_child.py run JOB.json
    .venv-peer/bin/python benchmarks/peer/anomalib_child.py aupro MAPS.npy MASKS.npy OUT.json

run: JOB.json {"folder", "image_size", "model_class", "kwargs", "pre_trained", "epochs", "batch_size", "arch",
"weights", "mean", "std", "out_dir", "seed", "threads"}, and for EfficientAd "val_dir" (validation normals, under
`folder`), "teacher_root" (what anomalib's pretrained-weights directory resolves to: our distilled teacher, converted)
and "penalty_dir" (its `imagenet_dir`: our fractal penalty images). `folder` is the MVTec-style export of our prepared
split (train/good, test/good, test/abnormal; file `tNNNN.png` = test index NNNN). anomalib runs the way its
own scripts run it — `Folder` datamodule, `Engine.fit`, `Engine.predict` — with these fairness settings:

* every timm backbone anomalib builds with pretrained weights gets OUR checkpoint: `timm.create_model` is
  wrapped to add `pretrained_cfg_overlay=dict(file=weights)` (the local-file route; STFPM's teacher always asks
  for pretrained weights, random init included — our seeded random init is what it gets);
* input normalisation is the backbone card's mean/std (anomalib's default is ImageNet's);
* `val_split_mode="none"`: the Folder default moves half of the test set into validation; here the whole test
  set is predicted, and the child checks that every test image came back exactly once (EfficientAd: the
  validation loader is the validation normals, run once after the last epoch for its map quantiles);
* post-processor, evaluator and visualizer off: raw image scores and maps, no adaptive-threshold F1;
* `Engine(barebones=True)`: no checkpointing, logging or progress bars (anomalib's leanest setting).

Writes out_dir/{scores.npy, maps.npy, run.json} like `ours_child.py`.
aupro: anomalib's current AUPRO (fpr_limit 0.3) of maps (N, H, W) vs masks (N, H, W) → OUT.json.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def use_local_weights(arch: str, weights: str) -> None:
    """Every pretrained `arch` that timm builds from now on loads `weights` (a local file, never the hub)."""
    import timm

    original = timm.create_model

    @functools.wraps(original)
    def create_model(name: str, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if kwargs.get("pretrained") and name == arch:
            kwargs["pretrained_cfg_overlay"] = dict(file=weights)
        elif kwargs.get("pretrained"):
            raise RuntimeError(f"anomalib asked for pretrained {name!r}; only {arch!r} has local weights here")
        return original(name, *args, **kwargs)

    timm.create_model = create_model


def _maps_of(batch: Any) -> torch.Tensor:
    maps = batch.anomaly_map.detach().float().cpu()
    return maps[:, 0] if maps.ndim == 4 else maps


def run(job: dict[str, Any]) -> None:
    torch.set_num_threads(int(job["threads"]))
    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    use_local_weights(job["arch"], job["weights"])
    import anomalib
    import lightning
    from anomalib import models
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.pre_processing import PreProcessor
    from lightning.pytorch import seed_everything
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    size = int(job["image_size"])
    kwargs = dict(job["kwargs"])
    if job.get("teacher_root"):  # EfficientAd: our distilled teacher and penalty images, never a download
        import anomalib.models.image.efficient_ad.lightning_model as efficient_ad

        efficient_ad.get_pretrained_weights_dir = lambda: Path(job["teacher_root"])
        kwargs["imagenet_dir"] = job["penalty_dir"]
    t0 = time.perf_counter()
    seed_everything(int(job["seed"]), verbose=False)
    folder = Path(job["folder"])
    datamodule = Folder(
        name="peer",
        root=folder,
        normal_dir="train/good",
        abnormal_dir="test/abnormal",
        normal_test_dir="test/good",
        train_batch_size=int(job["batch_size"]),
        eval_batch_size=16,
        num_workers=0,
        test_split_mode="from_dir",
        val_split_mode="from_dir" if job.get("val_dir") else "none",
        seed=int(job["seed"]),
    )
    net = int(job.get("net_size", size))  # the networks' input (EfficientAd: ≥ 256)
    resize = Resize((net, net), antialias=True)
    if job["model_class"] == "EfficientAd":  # normalises inside its networks (ImageNet's; folded into our teacher)
        pre = PreProcessor(transform=Compose([resize]))
    else:
        pre = PreProcessor(transform=Compose([resize, Normalize(job["mean"], job["std"])]))
    if job["pre_trained"]:
        kwargs["pre_trained"] = True
    cls = getattr(models, job["model_class"])
    model = cls(**kwargs, pre_processor=pre, post_processor=False, evaluator=False, visualizer=False)
    trainer_args: dict[str, Any] = dict(barebones=True, accelerator="cpu", devices=1, default_root_dir=out / "engine")
    if job["epochs"] is not None:
        trainer_args["max_epochs"] = int(job["epochs"])
    if job.get("val_dir"):  # one validation, after the last epoch (ours computes the quantiles once, at the end)
        trainer_args["check_val_every_n_epoch"] = int(job["epochs"])
    engine = Engine(**trainer_args)
    datamodule.setup()
    if job.get("val_dir"):
        # the validation normals only (never test images), as ours: a Folder of that directory as its test set
        val = Folder(name="peer-val", root=folder, normal_dir=job["val_dir"], normal_test_dir=job["val_dir"],
                     eval_batch_size=16, num_workers=0, test_split_mode="from_dir", val_split_mode="none")  # fmt: skip
        val.setup()
        datamodule.val_data = val.test_data
        engine.fit(model=model, datamodule=datamodule)
    else:
        # no validation loader: nothing of the test set is seen before predict (these models need no validation
        # to fit; the post-processor, which would calibrate on it, is off)
        engine.fit(model=model, train_dataloaders=datamodule.train_dataloader())
    fit_s = time.perf_counter() - t0
    fit_peak = vm_hwm_mib()
    t1 = time.perf_counter()
    batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    score_s = time.perf_counter() - t1
    index, scores, maps = [], [], []
    for batch in batches or []:
        index += [int(Path(p).stem[1:]) for p in batch.image_path]
        scores.append(batch.pred_score.detach().float().cpu().reshape(-1))
        maps.append(_maps_of(batch))
    order = np.argsort(index)
    if sorted(index) != list(range(len(index))):
        raise RuntimeError(f"anomalib predicted {len(index)} test images, not each of the exported ones once")
    np.save(out / "scores.npy", torch.cat(scores).numpy()[order])
    all_maps = torch.cat(maps)
    if all_maps.shape[-1] != size:  # maps at the networks' input: back to the exported images' size
        all_maps = torch.nn.functional.interpolate(all_maps[:, None], size=(size, size), mode="bilinear")[:, 0]
    np.save(out / "maps.npy", all_maps.numpy()[order])
    latency = _latency(model, folder, size)
    run_info = {
        "fit_s": fit_s,
        "score_s": score_s,
        "latency_ms": latency,
        "fit_peak_mib": fit_peak,
        "peak_mib": vm_hwm_mib(),
        "n_test": len(index),
        "epochs_run": engine.trainer.current_epoch if job["epochs"] is not None else None,
        "anomalib": anomalib.__version__,
        "lightning": lightning.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "run.json").write_text(json.dumps(run_info, indent=1))


def _latency(model: torch.nn.Module, folder: Path, size: int, warmup: int = 2, repeats: int = 10) -> float:
    """Batch-1 median ms of the module's forward (pre-processing + model), as ours: one test image at a time."""
    from anomalib.data.utils import read_image

    files = sorted((folder / "test").rglob("*.png"))[: warmup + repeats]
    images = [read_image(f, as_tensor=True)[None] for f in files]
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            x = images[i % len(images)]
            t = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def aupro(maps_path: str, masks_path: str, out_path: str) -> None:
    from anomalib.metrics.aupro import _AUPRO

    metric = _AUPRO(fpr_limit=0.3)
    metric.update(torch.from_numpy(np.load(maps_path)).float(), torch.from_numpy(np.load(masks_path)).int())
    Path(out_path).write_text(json.dumps({"aupro": float(metric.compute())}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if sys.argv[1] == "run":
        run(json.loads(Path(sys.argv[2]).read_text()))
    elif sys.argv[1] == "aupro":
        aupro(*sys.argv[2:5])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}: run | aupro")
