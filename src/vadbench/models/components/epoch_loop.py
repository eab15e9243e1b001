"""An epoch loop with early stopping on the validation loss, and seeded mini-batch index order."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


def minibatches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index batches over range(n): shuffled with `generator` when given, else in order.

    The permutation comes from the caller's CPU generator, so the data order is the same on
    CPU and CUDA and independent of any other RNG use.
    """
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def fit_epochs(
    module: nn.Module,
    train_epoch: Callable[[int], float],
    val_loss: Callable[[], float] | None,
    epochs: int,
    patience: int = 0,
    desc: str = "fit",
) -> dict[str, Any]:
    """Run `train_epoch(epoch)` up to `epochs` times; keep the weights with the lowest validation loss.

    `val_loss()` is evaluated after every epoch (on held-out normal images). Training stops once it
    has not improved for `patience` epochs (0 = never stop early); `module` is then restored to its
    best epoch. Without `val_loss` all epochs run and the last weights are kept.
    Returns a JSON-able report: epochs run, best epoch, per-epoch losses.
    """
    train_losses: list[float] = []
    val_losses: list[float] = []
    best, best_epoch, best_state = math.inf, -1, None
    bar = tqdm(range(epochs), desc=desc, leave=False)
    for epoch in bar:
        train_losses.append(float(train_epoch(epoch)))
        if val_loss is None:
            bar.set_postfix(loss=f"{train_losses[-1]:.4g}")
            continue
        val_losses.append(float(val_loss()))
        bar.set_postfix(loss=f"{train_losses[-1]:.4g}", val=f"{val_losses[-1]:.4g}")
        if val_losses[-1] < best:
            best, best_epoch = val_losses[-1], epoch
            # clone: state_dict tensors alias the live parameters
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        elif patience and epoch - best_epoch >= patience:
            break
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    return {
        "epochs_run": len(train_losses),
        "best_epoch": best_epoch if val_loss is not None else len(train_losses) - 1,
        "train_loss": train_losses,
        "val_loss": val_losses,
    }
