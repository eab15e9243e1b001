"""A frozen timm backbone that returns named intermediate feature maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from vadbench.backbones.weights import WEIGHTS, read_card


def build_feature_net(arch: str, layers: Sequence[str], weights_file: Path | None = None) -> nn.Module:
    """timm ``features_only`` net returning `layers` (module names such as ``layer2``), in that order.

    `weights_file` None → timm's random init (for students trained from scratch).
    """
    probe = timm.create_model(arch, pretrained=False, features_only=True)
    names = probe.feature_info.module_name()
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise ValueError(f"layers {unknown} are not feature layers of {arch!r}; available: {names}")
    out_indices = tuple(names.index(name) for name in layers)
    if weights_file is None:
        return timm.create_model(arch, pretrained=False, features_only=True, out_indices=out_indices)
    return timm.create_model(
        arch,
        pretrained=True,
        features_only=True,
        out_indices=out_indices,
        pretrained_cfg_overlay=dict(file=str(weights_file)),
    )


class FeatureExtractor(nn.Module):
    """Frozen backbone: images (N, C, H, W) in [0, 1] → list of feature maps, one per layer.

    Grey images are replicated to 3 channels, then normalised with the mean/std the weights were
    trained with. Always in eval mode (BatchNorm statistics never move), never needs grad.
    """

    def __init__(self, net: nn.Module, layers: Sequence[str], mean: Sequence[float], std: Sequence[float], arch: str = ""):
        super().__init__()
        self.net = net
        self.arch = arch
        self.layers = list(layers)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        info = net.feature_info
        self.channels: list[int] = list(info.channels())
        self.reductions: list[int] = list(info.reduction())
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:  # noqa: ARG002 - frozen by design
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"expected 1 or 3 image channels, got {images.shape[1]}")
        return (images - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.net(self.normalize(images))


def load_feature_extractor(
    backbone_dir: Path, layers: Sequence[str], device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """Frozen extractor from a materialized backbone dir (``weights.safetensors`` + ``card.json``)."""
    card = read_card(backbone_dir)
    net = build_feature_net(card.arch, layers, Path(backbone_dir) / WEIGHTS)
    return FeatureExtractor(net, layers, card.mean, card.std, arch=card.arch).to(device)
