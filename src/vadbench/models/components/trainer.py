"""The one training loop of every gradient-trained model: epochs, seeded order, AMP, early stopping.

A model file keeps its modules, its loss and its calibration; this loop owns the rest::

    report = train(
        trainable=self.student,                      # what the optimiser moves (best epoch restored)
        optimizer=torch.optim.SGD(self.student.parameters(), lr=p.lr),
        loss_fn=self.loss,                           # float batch on the device → scalar loss
        train=train, val=val,                        # image sources (`vadbench.data.source`) or any Dataset
        settings=LoopSettings(epochs=p.epochs, batch_size=p.batch_size, patience=p.patience, amp=p.amp),
        generator=torch.Generator().manual_seed(p.seed),
        device=device, desc=self.name,
    )

Per epoch: batches in one seeded permutation (`SeededBatches`: identical on CPU and CUDA), uint8 →
float on the device (`batch_fn`), the loss under fp16 autocast when `amp` and on CUDA, backward through a
GradScaler, optional gradient clipping, a guard that stops on a non-finite loss with a named error; then
the mean validation loss over the validation normals, in order and without grad. The weights of the epoch
with the lowest validation loss are kept; training stops after `patience` epochs without improvement.
Nothing here holds more than one batch of data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vadbench.data.source import as_source, loader, to_float

#: batch (as the loader collates it) + device → what `loss_fn` takes
BatchFn = Callable[[Any, torch.device], Any]


def images_to_device(batch: Any, device: torch.device) -> torch.Tensor:
    """The default `BatchFn`: a uint8 image batch → float32 in [0, 1] on `device`."""
    return to_float(batch, device)


def batch_len(batch: Any) -> int:
    """Samples in a collated batch: a tensor's first dim, or that of a list/tuple's first tensor."""
    return len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)


@dataclass(frozen=True)
class LoopSettings:
    """What the shared loop needs from a model's Params."""

    epochs: int
    batch_size: int
    patience: int = 0  # epochs without validation improvement before stopping; 0 = never stop early
    amp: bool = False  # fp16 autocast + GradScaler, CUDA only (a no-op on CPU)
    grad_clip: float | None = None  # max gradient norm per step
    min_batch: int = 1  # smaller batches are skipped (BatchNorm cannot train on one sample)
    num_workers: int | None = None  # DataLoader decode workers; None = the stage's params.loader_workers


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """fp16 autocast on CUDA when `enabled`; a no-op context on CPU (AMP is a GPU speed-up only)."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda")


class OptimizerStep:
    """zero_grad → backward → (clip) → step, through a GradScaler when AMP is on (CUDA only). Returns the loss."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        amp: bool,
        grad_clip: float | None = None,
        scheduler: Any | None = None,
    ) -> None:
        self.optimizer, self.grad_clip, self.scheduler = optimizer, grad_clip, scheduler
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")

    def __call__(self, loss: torch.Tensor) -> float:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}: lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return float(loss.detach())


def mean_loss(
    loss_fn: Callable[[Any], torch.Tensor | float],
    data: Dataset,
    batch_size: int,
    device: torch.device,
    batch_fn: BatchFn = images_to_device,
    num_workers: int | None = None,
) -> float:
    """Σ loss_fn(batch)·len(batch) / N over `data` in order, without grad (a validation loss)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in loader(data, batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"):
            k = batch_len(batch)
            total += float(loss_fn(batch_fn(batch, device))) * k
            n += k
    if n == 0:
        raise ValueError("validation loss over an empty split")
    return total / n


#: a custom step: (batch on device, OptimizerStep) → (summed loss, count) of the steps it took
StepFn = Callable[[Any, OptimizerStep], tuple[float, int]]


def train(
    *,
    trainable: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any], torch.Tensor],
    train: Dataset | torch.Tensor,
    val: Dataset | torch.Tensor | None,
    settings: LoopSettings,
    generator: torch.Generator,
    device: torch.device,
    desc: str = "fit",
    val_loss_fn: Callable[[Any], torch.Tensor | float] | None = None,
    val_loss: Callable[[], float] | None = None,
    batch_fn: BatchFn = images_to_device,
    train_mode: Callable[[], None] | None = None,
    eval_mode: Callable[[], None] | None = None,
    scheduler: Any | None = None,
    step_fn: StepFn | None = None,
) -> dict[str, Any]:
    """Train `trainable` on `train`; keep the epoch with the lowest validation loss. See the module doc.

    `val_loss_fn` (default `loss_fn`) is averaged over `val` batches; `val_loss` replaces that whole
    computation (a model whose criterion is not a per-batch mean). `train_mode` / `eval_mode` default to
    ``trainable.train()`` / ``.eval()`` (fine-tuning models keep frozen BatchNorms in eval mode).
    `step_fn` replaces the single optimiser step per batch (CFlow takes many fiber steps per image batch).
    Returns a JSON-able report: epochs run, best epoch, per-epoch train / validation losses.
    """
    train_src = as_source(train)
    val_src = as_source(val) if val is not None and len(val) > 0 else None
    if len(train_src) == 0:
        raise ValueError(f"{desc}: the train split is empty")
    step = OptimizerStep(optimizer, device, settings.amp, settings.grad_clip, scheduler)
    to_train = train_mode or (lambda: trainable.train())
    to_eval = eval_mode or (lambda: trainable.eval())

    def one_step(batch: Any, stepper: OptimizerStep) -> tuple[float, int]:
        with autocast(device, settings.amp):
            loss = loss_fn(batch)
        return stepper(loss) * batch_len(batch), batch_len(batch)  # backward outside autocast, as torch.amp says

    take_step = step_fn or one_step

    def train_epoch() -> float:
        to_train()
        total, count = 0.0, 0
        batches: Iterable[Any] = loader(
            train_src,
            settings.batch_size,
            generator=generator,
            num_workers=settings.num_workers,
            pin_memory=device.type == "cuda",
        )
        for batch in batches:
            if batch_len(batch) < settings.min_batch:
                continue
            loss_sum, n = take_step(batch_fn(batch, device), step)
            total, count = total + loss_sum, count + n
        return total / max(count, 1)

    def validation() -> float:
        to_eval()
        if val_loss is not None:
            return float(val_loss())
        # fp32 even under AMP: epochs are compared by this number
        return mean_loss(val_loss_fn or loss_fn, val_src, settings.batch_size, device, batch_fn, settings.num_workers)

    has_val = val_src is not None or val_loss is not None
    return fit_epochs(trainable, train_epoch, validation if has_val else None, settings.epochs, settings.patience, desc)


def fit_epochs(
    module: nn.Module,
    train_epoch: Callable[[], float],
    val_loss: Callable[[], float] | None,
    epochs: int,
    patience: int = 0,
    desc: str = "fit",
) -> dict[str, Any]:
    """Run `train_epoch()` up to `epochs` times; keep `module`'s weights with the lowest validation loss."""
    train_losses: list[float] = []
    val_losses: list[float] = []
    best, best_epoch, best_state = math.inf, -1, None
    bar = tqdm(range(epochs), desc=desc, leave=False)
    for epoch in bar:
        train_losses.append(float(train_epoch()))
        if val_loss is None:
            bar.set_postfix(loss=f"{train_losses[-1]:.4g}")
            continue
        val_losses.append(float(val_loss()))
        bar.set_postfix(loss=f"{train_losses[-1]:.4g}", val=f"{val_losses[-1]:.4g}")
        if not math.isfinite(val_losses[-1]):
            raise FloatingPointError(f"{desc}: validation loss became {val_losses[-1]} at epoch {epoch}")
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


@torch.no_grad()
def predict_maps(
    maps_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """maps_fn over one batch of float images (already on the device) in sub-batches → (max of each map (B,),
    maps (B, H, W)), float32 on CPU. Every map method here scores an image by its map's maximum."""
    out = [
        maps_fn(images[start : start + batch_size].float()).float().cpu() for start in range(0, len(images), batch_size)
    ]
    maps = torch.cat(out)
    return maps.flatten(1).amax(1), maps


@torch.no_grad()
def stream_maps(
    maps_fn: Callable[[torch.Tensor], torch.Tensor],
    source: Dataset | torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> Iterable[torch.Tensor]:
    """maps_fn (B, C, H, W) float on device → (B, H, W), applied to a whole source batch by batch (no grad)."""
    for batch in loader(as_source(source), batch_size, pin_memory=device.type == "cuda"):
        yield maps_fn(to_float(batch, device))
