"""Small pieces every gradient-trained feature model shares: input checks, AMP steps, batched predict.

The epoch loop itself (early stopping on validation loss, best-weights restore) is
`components.epoch_loop.fit_epochs`; this module supplies what runs inside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vadbench.backbones import FeatureExtractor


def check_images(images: torch.Tensor, model: str, what: str = "images") -> torch.Tensor:
    """Raise a clear error unless `images` is (N, C, H, W) float with C in {1, 3} and N ≥ 1."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{model}: {what} must be a (N, C, H, W) tensor with C = 1 or 3, got {shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{model}: {what} is empty")
    if not images.is_floating_point():
        raise ValueError(f"{model}: {what} must be float in [0, 1], got dtype {images.dtype}")
    return images


def check_teacher_layers(model: str, backbone: FeatureExtractor, layers: list[str]) -> None:
    """The fit stage builds the teacher with `layers`; a mismatch would silently pair the wrong maps."""
    if list(backbone.layers) != list(layers):
        raise ValueError(f"models.{model}.layers is {layers} but the backbone returns {backbone.layers}")


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """fp16 autocast on CUDA when `enabled`; a no-op context on CPU (AMP is a GPU speed-up only)."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda")


class OptimizerStep:
    """zero_grad → backward → step, through a GradScaler when AMP is on (CUDA only). Returns the loss."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, amp: bool) -> None:
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")

    def __call__(self, loss: torch.Tensor) -> float:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}: lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())


def mean_over_batches(
    fn: Callable[[Any], torch.Tensor],
    data: torch.Tensor | list[torch.Tensor],
    batch_size: int,
    device: torch.device,
) -> float:
    """Σ fn(batch)·len(batch) / N, in order, without grad: a validation loss over all of `data`.

    `data` is images (N, C, H, W), or cached feature levels [(N, c, h, w), ...] sliced together.
    """
    levels = data if isinstance(data, list) else None
    n = len(levels[0]) if levels is not None else len(data)
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if levels is not None:
                batch: Any = [f[start:stop].to(device) for f in levels]
            else:
                batch = data[start:stop].to(device)
            total += float(fn(batch)) * (stop - start)
    return total / n


def predict_in_batches(
    maps_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """maps_fn: batch (B, C, H, W) on device → maps (B, H, W). Returns (max of each map (N,), maps (N, H, W)),
    float32 on CPU. Every method here scores an image by its map's maximum."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device, torch.float32)
            out.append(maps_fn(batch).float().cpu())
    maps = torch.cat(out)
    return maps.flatten(1).amax(1), maps


def cache_features(
    features_fn: Callable[[torch.Tensor], list[torch.Tensor]], images: torch.Tensor, batch_size: int, device: torch.device
) -> list[torch.Tensor]:
    """Frozen-backbone features of all `images`, once: per level (N, c, h, w), kept on the CPU.

    Models that train only heads on fixed features (the flows) reuse them every epoch instead of
    re-running the backbone; batches move to `device` as they are used.
    """
    chunks: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            feats = features_fn(images[start : start + batch_size].to(device))
            chunks.append([f.float().cpu() for f in feats])
    return [torch.cat(level) for level in zip(*chunks)]
