"""Train a timm backbone from scratch on the fractals; checkpoint every epoch; resume exactly.

Objectives (`pretrain.objective`): `classification` (cross-entropy on the fractal classes, top-1 of the
classifier on held-out instances) and `simclr` (NT-Xent between two augmented views of every image through
a projection MLP, labels unused; validation top-1 is a 1-nearest-neighbour (cosine) classification of the
held-out images' pooled features against the training images' features, see `knn_top1`).

One function serves 1 process and N torchrun processes: the global batch is split over the ranks
(DistributedSampler), SyncBN makes the BatchNorm statistics those of the global batch and DDP averages
the gradients; for simclr the negatives are the whole global batch (all_gather with gradients). So N
processes follow the 1-process trajectory up to float summation order.
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
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from vadbench.io import atomic_path, load_tensors, sha256_tree
from vadbench.pretrain.data import FractalImages, read_fractal_split
from vadbench.pretrain.dist import (
    DistContext,
    all_gather_with_grad,
    all_sum,
    barrier,
    convert_sync_batchnorm,
    gather_strided,
)
from vadbench.pretrain.params import PretrainParams
from vadbench.runtime import seed_everything, set_deterministic

LOG_COLUMNS = ("epoch", "train_loss", "train_top1", "val_top1", "lr")
#: simclr's kNN validation compares with at most this many training images per class (the first ones of the
#: split): all of them at the default scale (~29), a bounded eval pass and memory at FractalDB-1k scale
KNN_REFERENCE_PER_CLASS = 100


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
    """Identity of a training run: a checkpoint is only resumed by the run that wrote it.

    Every `pretrain:` key is in it (objective, augment, simclr_*, crop_scale included).
    """
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


@dataclass(frozen=True)
class InputPrep:
    """How a batch becomes the network's input on `device`: normalisation, memory format and autocast."""

    mean: torch.Tensor  # (1, 3, 1, 1) on device
    std: torch.Tensor
    channels_last: bool
    amp_dtype: torch.dtype | None  # None: full precision
    device: torch.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Grey (N,1,H,W) or RGB (N,3,H,W) in [0,1] → normalised (N,3,H,W), as the AD feature extractor feeds it."""
        x = (x.to(self.device, non_blocking=True).expand(-1, 3, -1, -1) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None
        )


class SimCLRNet(nn.Module):
    """A timm backbone without classifier (forward → pooled features) + SimCLR's projection head.

    Head: Linear(d, d) → ReLU → Linear(d, proj_dim), d the pooled feature width. Only `backbone` is saved
    as the stage's weights; checkpoints hold both (resume restores the head and its optimizer state).
    """

    def __init__(self, backbone: nn.Module, proj_dim: int):
        super().__init__()
        self.backbone = backbone
        d = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def nt_xent(z_local: torch.Tensor, temperature: float, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent (SimCLR) over the global batch → (loss averaged over this rank's rows, number of those rows
    whose most similar other row is their positive).

    `z_local` (2B, d): this rank's projections, view 0 of its B images then view 1 of the same images. The
    candidates of every row are all 2N rows of the global batch (all ranks, gathered with gradients) but
    itself; its positive is the other view of its image.
    """
    z = F.normalize(z_local.float(), dim=1)
    n_local = z.shape[0]
    z_all = all_gather_with_grad(z, ctx)
    offset = ctx.rank * n_local
    logits = z @ z_all.T / temperature
    rows = torch.arange(n_local, device=z.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, offset + rows] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    positive = offset + (rows + n_local // 2) % n_local
    loss = F.cross_entropy(logits, positive)
    return loss, (logits.argmax(1) == positive).sum()


def knn_reference(train: list[tuple[Path, int]], per_class: int = KNN_REFERENCE_PER_CLASS) -> list[tuple[Path, int]]:
    """The first `per_class` training items of every class, in split order (independent of the world size)."""
    seen: dict[int, int] = {}
    out = []
    for path, label in train:
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            out.append((path, label))
    return out


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
    simclr = p.objective == "simclr"
    train_ds = FractalImages(
        split.train,
        p.input_size,
        p.crop_size,
        train=True,
        hflip=p.hflip,
        seed=seed,
        augment=p.augment,
        views=2 if simclr else 1,
        crop_scale=p.crop_scale,
    )
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
    knn_train_dl, knn_ref = None, knn_reference(split.train)
    if simclr:  # the kNN reference set: training images, centre crop, sharded like val
        knn_train_dl = DataLoader(
            Subset(
                FractalImages(knn_ref, p.input_size, p.crop_size, train=False),
                range(ctx.rank, len(knn_ref), ctx.world_size),
            ),
            batch_size=local_batch,
            num_workers=p.workers,
            pin_memory=pin,
        )
    steps = len(train_dl)

    seed_everything(seed)  # same init on every rank (DDP also broadcasts rank 0's)
    model: nn.Module
    if simclr:
        model = SimCLRNet(timm.create_model(p.arch, pretrained=False, num_classes=0), p.simclr_proj_dim)
    else:
        model = timm.create_model(p.arch, pretrained=False, num_classes=len(split.classes))
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
    prep = InputPrep(
        mean=torch.tensor(p.mean, device=device).view(1, 3, 1, 1),
        std=torch.tensor(p.std, device=device).view(1, 3, 1, 1),
        channels_last=channels_last,
        amp_dtype=amp_dtype,
        device=device,
    )
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
            if simclr:  # (B, 2, C, H, W) → (2B, C, H, W): view 0 of every image, then view 1
                x = x.transpose(0, 1).flatten(0, 1)
            x = prep(x)
            y = y.to(device, non_blocking=True)
            with prep.autocast():
                logits = net(x)
                if simclr:
                    loss, n_correct = nt_xent(logits, p.simclr_temperature, ctx)
                else:
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
            if simclr:  # per view: loss and contrastive top-1 (the positive is the nearest of the batch)
                sums[0] += loss.item() * len(x)
                sums[1] += n_correct.item()
                sums[2] += len(x)
            else:
                sums[0] += loss.item() * len(y)
                sums[1] += (logits.argmax(1) == y).sum().item()
                sums[2] += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4g}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        loss_sum, correct, n = all_sum(sums, ctx, device)
        throughput.append(n / train_ds.views / elapsed)  # images (not views) per second
        if simclr:
            val_top1 = knn_top1(model.backbone, knn_train_dl, val_dl, len(knn_ref), prep, ctx)
        else:
            val_top1 = evaluate(model, val_dl, prep, ctx)
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
                f"train top-1 {row['train_top1']:.3f} val top-1 {val_top1:.3f} ({throughput[-1]:.1f} img/s)"
            )
            _save_checkpoint(ckpt, epoch + 1, model, opt, scaler, log)
        barrier(ctx)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < p.epochs:
            raise StopRequested(f"stopped after epoch {epoch + 1} (checkpoint {ckpt})")

    # simclr: the backbone alone (no projection head, no classifier): timm loads it as the plain arch
    final = model.backbone if simclr else model
    state_dict = {k: v.detach().cpu().contiguous() for k, v in final.state_dict().items()}
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
def evaluate(net: nn.Module, loader: DataLoader, prep: InputPrep, ctx: DistContext) -> float:
    """Top-1 on the held-out fractal instances (each rank scores its shard; counts are summed).

    `net` is the unwrapped model: shards may differ in size, so no DDP forward (and no collective) here.
    """
    net.eval()
    correct = total = 0
    for x, y in loader:
        with prep.autocast():
            pred = net(prep(x)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    correct, total = all_sum([correct, total], ctx, prep.device)
    return correct / total


@torch.no_grad()
def _pooled_features(backbone: nn.Module, loader: DataLoader, prep: InputPrep) -> tuple[torch.Tensor, torch.Tensor]:
    device = prep.device
    feats, labels = [], []
    for x, y in loader:
        with prep.autocast():
            feats.append(F.normalize(backbone(prep(x)).float(), dim=1))
        labels.append(y.to(device))
    if not feats:  # an empty shard (fewer held-out images than processes)
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(
    backbone: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    n_train: int,
    prep: InputPrep,
    ctx: DistContext,
) -> float:
    """1-nearest-neighbour top-1 (cosine similarity of pooled features; eval-mode BatchNorm, centre crops).

    Every held-out image takes the class of its most similar reference image (`knn_reference`: the training
    images, at most KNN_REFERENCE_PER_CLASS per class); ties go to the first in split order. Label-free training gets a
    score on the same scale as the classifier's top-1 (chance 1 / classes). Each rank embeds its shards
    (rows rank, rank + W, …); the training features are gathered in order on every rank, so the result does
    not depend on the number of processes beyond float order.
    """
    backbone.eval()
    train_f, train_y = _pooled_features(backbone, train_loader, prep)
    train_f = gather_strided(train_f, n_train, ctx)
    train_y = gather_strided(train_y, n_train, ctx)
    val_f, val_y = _pooled_features(backbone, val_loader, prep)
    correct = 0
    for i in range(0, len(val_f), 1024):  # chunks bound the similarity matrix at FractalDB-1k scale
        nearest = (val_f[i : i + 1024] @ train_f.T).argmax(1)
        correct += int((train_y[nearest] == val_y[i : i + 1024]).sum())
    correct, total = all_sum([correct, len(val_f)], ctx, prep.device)
    return correct / total
