"""Backbones: weight sources (random, fractal, imagenet, file) and the frozen timm feature extractor."""

import os

# before timm/huggingface_hub are imported (they read it once): never let timm try a hub download
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vadbench.backbones.extractor import FeatureExtractor, build_feature_net, load_feature_extractor, pick  # noqa: E402
from vadbench.backbones.weights import BackboneCard, materialize_backbone, read_card  # noqa: E402

__all__ = [
    "BackboneCard",
    "FeatureExtractor",
    "build_feature_net",
    "load_feature_extractor",
    "materialize_backbone",
    "pick",
    "read_card",
]
