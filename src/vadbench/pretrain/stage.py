"""The pretrain stage's work, callable from stages/pretrain.py, from torchrun and from tests.

Outputs (rank 0 only, each written atomically):
  <out_dir>/weights.safetensors  full timm state dict (classifier included; features_only drops it);
                                 objective simclr: the backbone without classifier and projection head
  <out_dir>/card.json            BackboneCard: arch, init "fractal", mean/std used in training, extra
  <timing_path>                  throughput, device, thread count (a measurement: outside the cached output,
                                 metrics/measured/ in the pipeline, so data/pretrain stays byte-identical)
  <metrics_path>                 final/best val top-1, chance level, sizes (deterministic)
  <log_path>                     per-epoch CSV: epoch,train_loss,train_top1,val_top1,lr
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vadbench.backbones.weights import CARD, WEIGHTS, BackboneCard
from vadbench.io import atomic_dir, sha256_file, write_json, write_text
from vadbench.pretrain.dist import barrier, init_distributed, shutdown_distributed
from vadbench.pretrain.params import PretrainParams
from vadbench.pretrain.train import LOG_COLUMNS, PretrainResult, pretrain, run_key
from vadbench.runtime import select_device


def _fractal_info(fractal_dir: Path) -> dict[str, Any]:
    path = Path(fractal_dir) / "info.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    return {**info.get("params", {}), **info}  # image_size sits at the top level or under "params"


def recipe_extra(p: PretrainParams) -> dict[str, Any]:
    """Card entries of the recipe options that differ from the original recipe (classification, basic).

    Only non-default values are written, so the default run's card (and data/pretrain, which DVC hashes and
    every downstream stage depends on) stays byte-identical to the one written before these options
    existed: a card without `objective` / `augment` is classification / basic.
    """
    extra: dict[str, Any] = {}
    if p.objective != "classification":
        extra.update(
            objective=p.objective,
            simclr_proj_dim=p.simclr_proj_dim,
            simclr_temperature=p.simclr_temperature,
            val_metric="knn1_cosine",  # val_top1 is a 1-NN top-1 of pooled features, not a classifier's
        )
    if p.augment != "basic":
        extra.update(augment=p.augment, crop_scale=list(p.crop_scale))
    return extra


def write_outputs(
    result: PretrainResult,
    p: PretrainParams,
    seed: int,
    fractal_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    log_path: Path,
    timing_path: Path | None = None,
) -> BackboneCard:
    final = result.log[-1]
    extra = dict(
        fractal_data_sha256=result.data_sha256,
        fractal_image_size=_fractal_info(fractal_dir).get("image_size"),
        epochs=p.epochs,
        batch_size=p.batch_size,
        lr=p.lr,
        milestones=list(p.milestones),
        seed=seed,
        num_classes=result.num_classes,
        input_size=p.input_size,
        image_size=p.crop_size,
        val_top1=final["val_top1"],
        train_top1=final["train_top1"],
        n_train=result.n_train,
        n_val=result.n_val,
        **recipe_extra(p),
    )
    card = BackboneCard(
        arch=p.arch,
        init="fractal",
        mean=tuple(p.mean),
        std=tuple(p.std),
        source=f"vadbench pretrain stage: {p.arch} trained from scratch on {fractal_dir}",
        extra=extra,
    )
    with atomic_dir(Path(out_dir)) as tmp:
        save_file(result.state_dict, str(tmp / WEIGHTS))
        card.weights_sha256 = sha256_file(tmp / WEIGHTS)
        (tmp / CARD).write_text(json.dumps(card.to_json(), indent=2, sort_keys=True) + "\n")
    metrics = dict(
        val_top1=final["val_top1"],
        best_val_top1=max(r["val_top1"] for r in result.log),
        train_top1=final["train_top1"],
        train_loss=final["train_loss"],
        chance_top1=1.0 / result.num_classes,
        epochs=p.epochs,
        num_classes=result.num_classes,
        n_train=result.n_train,
        n_val=result.n_val,
    )
    write_json(Path(metrics_path), metrics)
    if timing_path is not None:
        write_json(Path(timing_path), {**result.timing, "torch_threads": torch.get_num_threads()})
    lines = [",".join(LOG_COLUMNS)]
    lines += [",".join(str(int(r[c])) if c == "epoch" else f"{r[c]:.6g}" for c in LOG_COLUMNS) for r in result.log]
    write_text(Path(log_path), "\n".join(lines) + "\n")
    return card


def run_pretrain(
    fractal_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    log_path: Path,
    work_root: Path,
    p: PretrainParams,
    *,
    seed: int,
    device: str = "auto",
    stop_after_epoch: int | None = None,
    timing_path: Path | None = None,
) -> PretrainResult:
    """Whole stage for this process: joins torchrun's group if launched by it; rank 0 writes the outputs.

    The checkpoint dir is removed after a successful write (DVC caches the outputs; nothing to resume).
    """
    ctx, dev = init_distributed(select_device(device), p.dist_timeout_s)
    try:
        result = pretrain(
            Path(fractal_dir),
            p,
            seed=seed,
            device=dev,
            work_root=Path(work_root),
            ctx=ctx,
            stop_after_epoch=stop_after_epoch,
        )
        if ctx.is_main:
            write_outputs(
                result, p, seed, Path(fractal_dir), Path(out_dir), Path(metrics_path), Path(log_path), timing_path
            )
            key = run_key(p, seed, result.data_sha256, ctx.world_size, dev.type)
            shutil.rmtree(Path(work_root) / key, ignore_errors=True)
        barrier(ctx)
        return result
    finally:
        shutdown_distributed()
