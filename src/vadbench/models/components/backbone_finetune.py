"""Fine-tuning a copy of a frozen `FeatureExtractor` (PANDA, CutPaste): the copy, pooling, L2-SP.

The frozen extractor stays under the model's `backbone.` prefix (not saved); the trainable copy
lives under another attribute (e.g. `encoder.`) so its fine-tuned weights are saved with the model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from vadbench.backbones import FeatureExtractor


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


def pooled_features(net: nn.Module, normalized: torch.Tensor, pooling: Pooling = "avg") -> torch.Tensor:
    """Normalised images (N, 3, H, W) → globally pooled feature maps (avg or max), concatenated (N, ΣC)."""
    if pooling == "max":
        return torch.cat([f.amax(dim=(2, 3)) for f in net(normalized)], dim=1)
    return torch.cat([f.mean(dim=(2, 3)) for f in net(normalized)], dim=1)


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (the L2-SP anchor θ₀)."""
    return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def l2sp_penalty(net: nn.Module, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ ‖θ − θ₀‖² over the trainable parameters (L2-SP, Li et al. 2018): pulls weights toward the start."""
    terms = [((p - anchor[n]) ** 2).sum() for n, p in net.named_parameters() if n in anchor]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
