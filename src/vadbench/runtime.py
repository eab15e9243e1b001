"""Seeding, device choice and determinism switches shared by every stage."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def select_device(requested: str = "auto") -> torch.device:
    """`auto` → CUDA when present, else CPU; `cpu`/`cuda`/`cuda:N` are taken as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available on this machine")
    return dev


def set_deterministic(enabled: bool = True) -> None:
    """Make CPU and CUDA kernels repeatable (same params + seed → identical metrics)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = not enabled
        torch.backends.cudnn.deterministic = enabled


@contextmanager
def intra_op_threads(n: int, device: torch.device) -> Iterator[None]:
    """On CPU, run the block with at most `n` torch intra-op threads, then restore the previous count.

    For loops of tiny ops (CFlow's 256-fiber MLP steps) waking OpenMP threads costs more than the
    threads save, most of all with OMP_WAIT_POLICY=PASSIVE. No effect on CUDA devices.
    """
    before = torch.get_num_threads()
    if device.type != "cpu" or n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
