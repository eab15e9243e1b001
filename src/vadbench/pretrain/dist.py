"""Process-group plumbing for torchrun (1..N GPUs, 1..N nodes, or CPU processes with gloo).

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; without them everything runs as a
single process. Every collective has a timeout, so a dead peer fails the run instead of hanging it.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: torch.device, timeout_s: int) -> tuple[DistContext, torch.device]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); returns the context and this rank's device."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext(), device
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)  # one GPU per local process
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size, timeout=timedelta(seconds=timeout_s))
    return ctx, device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum a few scalars over all processes (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if ctx.active:
        dist.all_reduce(t)
    return t.tolist()


def all_gather_with_grad(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's `t` (same shape on all ranks) in rank order; gradients flow back to each rank.

    The backward sums the gradients that all ranks' losses put on this rank's slice, so a loss averaged
    over local rows, with DDP averaging the parameter gradients, is the loss over the global batch.
    """
    if not ctx.active:
        return t
    return torch.cat(dist_fn.all_gather(t), dim=0)


def gather_strided(t: torch.Tensor, n_total: int, ctx: DistContext) -> torch.Tensor:
    """Rank r holds rows r, r + W, r + 2W, … of an `n_total`-row tensor: rebuild it, in order, on every rank.

    Shards may differ by one row, so they are padded to equal length for `all_gather`. No gradient.
    """
    if not ctx.active:
        return t
    w = ctx.world_size
    longest = -(-n_total // w)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    out = torch.empty((n_total, *t.shape[1:]), dtype=t.dtype, device=t.device)
    for r, part in enumerate(parts):
        out[r::w] = part[: len(range(r, n_total, w))]
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def torchrun_command(nproc_per_node: int, script_args: list[str]) -> list[str]:
    """Arg list that relaunches a script on this node with `nproc_per_node` processes (free port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        *script_args,
    ]


# the autograd-aware all_reduce/all_gather are deprecated in favour of functional collectives, which have
# no backward through all_reduce yet; they work, so keep logs quiet
warnings.filterwarnings(
    "ignore", message=r".*torch.distributed.nn.functional.all_(reduce|gather) is deprecated", category=FutureWarning
)


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span the global batch of all processes, on CPU/gloo.

    torch's SyncBatchNorm only runs on GPUs. Same parameters and buffers as BatchNorm2d (the state dict
    is interchangeable). Two-pass mean/variance through autograd-aware all_reduce: the gradient is
    that of BatchNorm over the concatenated global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        n_local = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        n = dist_fn.all_reduce(n_local)
        mean = dist_fn.all_reduce(x.sum(dims)) / n
        centred = x - mean.view(1, -1, 1, 1)
        var = dist_fn.all_reduce((centred * centred).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)  # unbiased, as torch
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        return out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """SyncBN for multi-process training: torch's on CUDA, `CpuSyncBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = CpuSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return model
