"""Fine-tuning a copy of a frozen `FeatureExtractor` (PANDA, CutPaste): the copy, pooling, L2-SP.

The frozen extractor stays under the model's `backbone.` prefix (not saved); the trainable copy
lives under another attribute (e.g. `encoder.`) so its fine-tuned weights are saved with the model.
The copy is the raw timm net (a list of maps in the extractor's `layers` order); `pooled_features`
names them with `names` and keeps the model's `layers`. `pooled_stream` pools a whole image source
batch by batch into the (N, D) vectors these methods need (a kNN bank, a Gaussian), never holding images.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from vadbench.backbones import FeatureExtractor, pick
from vadbench.data.source import float_batches, to_float


def trainable_copy(backbone: FeatureExtractor, trainable: Sequence[str]) -> nn.Module:
    """Deep copy of `backbone.net` where only the top-level modules named in `trainable` get gradients.

    Names are the timm feature net's children (resnet: conv1, bn1, layer1 … layer4).
    """
    if not isinstance(backbone, FeatureExtractor):
        raise TypeError(f"expected a vadbench FeatureExtractor backbone, got {type(backbone).__name__}")
    net = copy.deepcopy(backbone.net)
    children = dict(net.named_children())
    unknown = [name for name in trainable if name not in children]
    if unknown:
        raise ValueError(f"trainable modules {unknown} are not in the backbone; available: {list(children)}")
    for name, module in children.items():
        for p in module.parameters():
            p.requires_grad_(name in trainable)
    return net


def set_finetune_mode(net: nn.Module, trainable: Sequence[str], train: bool) -> None:
    """Frozen modules always in eval mode (their BatchNorm statistics never move); trainable ones follow `train`."""
    net.eval()
    if train:
        for name, module in net.named_children():
            if name in trainable:
                module.train()


#: global pooling of a feature map: avg (the papers) or max — a defect covering 0.1 % of the image moves
#: an average by 0.1 % of its local change, a maximum by all of it
Pooling = Literal["avg", "max"]


def pooled_features(
    net: nn.Module,
    normalized: torch.Tensor,
    pooling: Pooling = "avg",
    names: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
) -> torch.Tensor:
    """Normalised images (N, 3, H, W) → globally pooled feature maps (avg or max), concatenated (N, ΣC).

    `names` labels the net's outputs (the extractor's `layers`); `layers` then picks which are pooled, in
    that order (default: every output, in the net's order)."""
    maps = list(net(normalized))
    if names is not None and layers is not None:
        maps = pick(dict(zip(names, maps, strict=True)), layers)
    if pooling == "max":
        return torch.cat([f.amax(dim=(2, 3)) for f in maps], dim=1)
    return torch.cat([f.mean(dim=(2, 3)) for f in maps], dim=1)


def float_chunks(images: Dataset | torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Float32 batches in [0, 1] on `device`, in order: slices of a tensor (float used as is, uint8 scaled;
    never quantised) or an image source streamed batch by batch."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
        for start in range(0, len(images), batch_size):
            yield to_float(images[start : start + batch_size], device)
    else:
        yield from float_batches(images, batch_size, device)


@torch.no_grad()
def pooled_stream(
    embed: Callable[[torch.Tensor], torch.Tensor], images: Dataset | torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """`embed` over `images` (a tensor or an image source, see `float_chunks`), `batch_size` at a time → (N, D)."""
    return torch.cat([embed(x) for x in float_chunks(images, batch_size, device)])


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (the L2-SP anchor θ₀)."""
    return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def l2sp_penalty(net: nn.Module, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ ‖θ − θ₀‖² over the trainable parameters (L2-SP, Li et al. 2018): pulls weights toward the start."""
    terms = [((p - anchor[n]) ** 2).sum() for n, p in net.named_parameters() if n in anchor]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
