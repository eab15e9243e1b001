"""Train a timm classifier from scratch on the fractal classes; checkpoint every epoch; resume exactly.

One function serves 1 process and N torchrun processes: the global batch is split over the ranks
(DistributedSampler), SyncBN makes the BatchNorm statistics those of the global batch and DDP averages
the gradients, so N processes follow the 1-process trajectory up to float summation order.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from vadbench.io import atomic_path, load_tensors, sha256_tree
from vadbench.pretrain.data import FractalImages, read_fractal_split
from vadbench.pretrain.dist import DistContext, all_sum, barrier, convert_sync_batchnorm
from vadbench.pretrain.params import PretrainParams
from vadbench.runtime import seed_everything, set_deterministic

LOG_COLUMNS = ("epoch", "train_loss", "train_top1", "val_top1", "lr")


class StopRequested(RuntimeError):
    """Raised by the `stop_after_epoch` test hook after that epoch's checkpoint is on disk."""


@dataclass
class PretrainResult:
    state_dict: dict[str, torch.Tensor]
    log: list[dict[str, float]]
    num_classes: int
    n_train: int
    n_val: int
    data_sha256: str
    resumed_from_epoch: int = 0
    timing: dict[str, Any] = field(default_factory=dict)


def run_key(params: PretrainParams, seed: int, data_sha256: str, world_size: int, device_type: str) -> str:
    """Identity of a training run: a checkpoint is only resumed by the run that wrote it."""
    ident = dict(
        params=params.model_dump(mode="json"), seed=seed, data=data_sha256, world_size=world_size, device=device_type
    )
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def lr_at(p: PretrainParams, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Multistep schedule (drop by gamma at each milestone epoch), with optional linear warm-up."""
    lr = p.lr * p.gamma ** sum(epoch >= m for m in p.milestones)
    if epoch < p.warmup_epochs:
        lr *= (epoch * steps_per_epoch + step + 1) / (p.warmup_epochs * steps_per_epoch)
    return lr


def _to_input(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Grey (N,1,H,W) in [0,1] → normalised (N,3,H,W), exactly as the AD feature extractor feeds it."""
    x = (x.expand(-1, 3, -1, -1) - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _save_checkpoint(
    path: Path,
    epoch: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    log: list[dict[str, float]],
) -> None:
    state = {
        "epochs_done": epoch,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        # the schedule is a pure function of the epoch; RNG states as tensors keep weights_only loading
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "log": log,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def pretrain(
    fractal_dir: Path,
    p: PretrainParams,
    *,
    seed: int,
    device: torch.device,
    work_root: Path,
    ctx: DistContext = DistContext(),
    stop_after_epoch: int | None = None,
) -> PretrainResult:
    """Train `p.arch` on `fractal_dir`; checkpoints go to ``work_root/<run_key>/last.pt`` (resumed if present).

    Returns the final (unwrapped, plain BatchNorm) state dict and the per-epoch log on every rank.
    """
    set_deterministic(True)
    if p.batch_size % ctx.world_size:
        raise ValueError(f"pretrain.batch_size ({p.batch_size}) must be divisible by the world size ({ctx.world_size})")
    split = read_fractal_split(fractal_dir, p.val_fraction, seed)
    if len(split.train) < p.batch_size:
        raise ValueError(
            f"pretrain.batch_size ({p.batch_size}) exceeds the {len(split.train)} training fractals "
            f"in {fractal_dir}: lower it or render more instances"
        )
    data_sha = sha256_tree(fractal_dir)
    ckpt = Path(work_root) / run_key(p, seed, data_sha, ctx.world_size, device.type) / "last.pt"
    local_batch = p.batch_size // ctx.world_size
    train_ds = FractalImages(split.train, p.input_size, p.crop_size, train=True, hflip=p.hflip, seed=seed)
    val_ds = FractalImages(split.val, p.input_size, p.crop_size, train=False)
    # num_replicas=1 in the single-process case too: the same permutation as N processes
    sampler = DistributedSampler(
        train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
    )
    pin = device.type == "cuda"
    train_dl = DataLoader(
        train_ds, batch_size=local_batch, sampler=sampler, drop_last=True, num_workers=p.workers, pin_memory=pin
    )
    val_dl = DataLoader(
        Subset(val_ds, range(ctx.rank, len(val_ds), ctx.world_size)),
        batch_size=local_batch,
        num_workers=p.workers,
        pin_memory=pin,
    )
    steps = len(train_dl)

    seed_everything(seed)  # same init on every rank (DDP also broadcasts rank 0's)
    model: nn.Module = timm.create_model(p.arch, pretrained=False, num_classes=len(split.classes))
    if ctx.active:
        model = convert_sync_batchnorm(model, device)
    channels_last = device.type == "cuda" and p.channels_last
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    amp_dtype = None
    if device.type == "cuda" and p.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    log: list[dict[str, float]] = []
    start = 0
    if ckpt.is_file():
        state = load_tensors(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        log, start = list(state["log"]), int(state["epochs_done"])
        if ctx.is_main:
            tqdm.write(f"pretrain: resuming from epoch {start} of {p.epochs} ({ckpt})")
    net = (
        DistributedDataParallel(model, device_ids=[device.index] if pin else None, broadcast_buffers=False)
        if ctx.active
        else model
    )
    mean = torch.tensor(p.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(p.std, device=device).view(1, 3, 1, 1)
    loss_fn = nn.CrossEntropyLoss()
    throughput: list[float] = []

    for epoch in range(start, p.epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        net.train()
        sums = [0.0, 0.0, 0.0]  # loss * n, correct, n
        t0 = time.perf_counter()
        bar = tqdm(train_dl, desc=f"pretrain {epoch + 1}/{p.epochs}", disable=not ctx.is_main, leave=False)
        for step, (x, y) in enumerate(bar):
            lr = lr_at(p, epoch, step, steps)
            for group in opt.param_groups:
                group["lr"] = lr
            x = _to_input(x.to(device, non_blocking=True), mean, std, channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = net(x)
                loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"pretrain loss is {loss.item()} at epoch {epoch + 1} step {step + 1}: "
                    f"lower pretrain.lr ({p.lr}) or add pretrain.warmup_epochs"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sums[0] += loss.item() * len(y)
            sums[1] += (logits.argmax(1) == y).sum().item()
            sums[2] += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4g}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        loss_sum, correct, n = all_sum(sums, ctx, device)
        throughput.append(n / elapsed)
        val_top1 = evaluate(model, val_dl, mean, std, channels_last, amp_dtype, device, ctx)
        row = dict(
            epoch=epoch + 1,
            train_loss=loss_sum / n,
            train_top1=correct / n,
            val_top1=val_top1,
            lr=lr_at(p, epoch, steps - 1, steps),
        )
        log.append(row)
        if ctx.is_main:
            tqdm.write(
                f"epoch {epoch + 1}/{p.epochs}: loss {row['train_loss']:.4f} "
                f"train top-1 {row['train_top1']:.3f} val top-1 {val_top1:.3f} ({n / elapsed:.1f} img/s)"
            )
            _save_checkpoint(ckpt, epoch + 1, model, opt, scaler, log)
        barrier(ctx)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < p.epochs:
            raise StopRequested(f"stopped after epoch {epoch + 1} (checkpoint {ckpt})")

    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    timing = dict(
        train_images_per_s_median=statistics.median(throughput) if throughput else None,
        train_images_per_s=throughput,
        device=str(device),
        world_size=ctx.world_size,
    )
    return PretrainResult(
        state_dict,
        log,
        len(split.classes),
        len(split.train),
        len(split.val),
        data_sha,
        resumed_from_epoch=start,
        timing=timing,
    )


@torch.no_grad()
def evaluate(
    net: nn.Module,
    loader: DataLoader,
    mean: torch.Tensor,
    std: torch.Tensor,
    channels_last: bool,
    amp_dtype: torch.dtype | None,
    device: torch.device,
    ctx: DistContext,
) -> float:
    """Top-1 on the held-out fractal instances (each rank scores its shard; counts are summed).

    `net` is the unwrapped model: shards may differ in size, so no DDP forward (and no collective) here.
    """
    net.eval()
    correct = total = 0
    for x, y in loader:
        x = _to_input(x.to(device), mean, std, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            pred = net(x).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    correct, total = all_sum([correct, total], ctx, device)
    return correct / total
