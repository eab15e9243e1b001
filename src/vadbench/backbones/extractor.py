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
    # timm returns features in network order whatever order out_indices has: ask in that order
    out_indices = tuple(sorted(names.index(name) for name in set(layers)))
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
    """Frozen backbone: images (N, C, H, W) in [0, 1] → {layer name: feature map (N, c, h, w)}.

    Feature maps are keyed by layer name (as anomalib's ``TimmFeatureExtractor``), in `layers` order, so
    a model asks for ``feats["layer2"]`` and never relies on positions; `channels` / `reductions` are
    keyed the same way. Grey images are replicated to 3 channels, then normalised with the mean/std
    the weights were trained with. Always in eval mode (BatchNorm statistics never move), never needs grad.
    """

    def __init__(
        self,
        net: nn.Module,
        layers: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        arch: str = "",
        channels_last: bool = False,
    ):
        super().__init__()
        # channels_last: ~1.3x faster resnet18 extraction on this CPU (benchmarks/results/pretrain.md);
        # outputs are made contiguous again so callers may .view() them
        self.channels_last = channels_last
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.arch = arch
        # the net's own module names, in network order (the order its outputs come in)
        self.layers = list(net.feature_info.module_name())
        if sorted(self.layers) != sorted(set(layers)):
            raise ValueError(f"feature net returns {self.layers}, asked for {list(layers)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        info = net.feature_info
        self.channels: dict[str, int] = dict(zip(self.layers, info.channels(), strict=True))
        self.reductions: dict[str, int] = dict(zip(self.layers, info.reduction(), strict=True))
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:  # noqa: ARG002 - frozen by design
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"expected 1 or 3 image channels, got {images.shape[1]}")
        return (images - self.mean) / self.std

    def channels_of(self, layers: Sequence[str]) -> list[int]:
        """Channel counts of `layers`, with a clear error for a layer this extractor was not built with."""
        self.require(layers)
        return [self.channels[name] for name in layers]

    def require(self, layers: Sequence[str]) -> None:
        missing = [name for name in layers if name not in self.channels]
        if missing:
            raise ValueError(
                f"backbone extractor was built with layers {self.layers}, the model needs {list(layers)} "
                f"(missing {missing}): build it with load_feature_extractor(dir, layers=<model params>.layers)"
            )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalize(images)
        if self.channels_last:
            feats = [f.contiguous() for f in self.net(x.contiguous(memory_format=torch.channels_last))]
        else:
            feats = self.net(x)
        return dict(zip(self.layers, feats, strict=True))

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 32) -> dict[str, torch.Tensor]:
        """Feature maps of a few images (N, C, H, W) on any device, `batch_size` at a time.

        Batches move to the extractor's device; results come back on the images' device, concatenated.
        For whole splits stream an image source instead (`vadbench.data.source.float_batches`).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        parts: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(images), batch_size):
            feats = self(images[start : start + batch_size].to(self.device, non_blocking=True))
            parts.append({k: f.to(images.device) for k, f in feats.items()})
        return {name: torch.cat([p[name] for p in parts]) for name in self.layers}


def pick(feats: dict[str, torch.Tensor], layers: Sequence[str]) -> list[torch.Tensor]:
    """The maps of `layers` from an extractor's output dict, in that order (clear error when one is missing)."""
    missing = [name for name in layers if name not in feats]
    if missing:
        raise ValueError(f"feature maps {missing} were not extracted; the extractor returns {list(feats)}")
    return [feats[name] for name in layers]


def load_feature_extractor(
    backbone_dir: Path, layers: Sequence[str], device: torch.device | str = "cpu", channels_last: bool = False
) -> FeatureExtractor:
    """Frozen extractor from a materialized backbone dir (``weights.safetensors`` + ``card.json``)."""
    card = read_card(backbone_dir)
    net = build_feature_net(card.arch, layers, Path(backbone_dir) / WEIGHTS)
    return FeatureExtractor(net, layers, card.mean, card.std, arch=card.arch, channels_last=channels_last).to(device)
